"""Annotated dependencies so routes read as prose."""

from typing import Annotated

from fastapi import Depends, Request

from app.auth import Principal, authenticate
from app.generations import GenerationService
from app.settings import Settings
from app.usage import UsageService


# async: FastAPI runs a plain `def` dependency in the thread pool, a hop per request for an attribute read
async def get_service(request: Request) -> GenerationService:
    return request.app.state.service  # type: ignore[no-any-return]


async def get_usage(request: Request) -> UsageService:
    return request.app.state.usage  # type: ignore[no-any-return]


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


ServiceDep = Annotated[GenerationService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
PrincipalDep = Annotated[Principal, Depends(authenticate)]
UsageDep = Annotated[UsageService, Depends(get_usage)]
