"""Who is calling. With no API keys configured every caller is the same open principal."""

from dataclasses import dataclass

from fastapi import Request


@dataclass(frozen=True)
class Principal:
    owner: str  # generations belong to this id; other owners get 404
    name: str


OPEN = Principal(owner="open", name="open")


async def authenticate(request: Request) -> Principal:
    return OPEN
