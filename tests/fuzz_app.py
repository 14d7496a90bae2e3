"""uvicorn factory for the fuzzing run: the real app, except that webhook host names never reach DNS.

Fuzzed webhook URLs name arbitrary hosts, and tests make no real DNS lookups: every name is answered "does not
resolve" (the API then refuses the URL with its usual 422). IP-literal URLs take the normal, DNS-free path; no
webhook dispatcher runs in the fuzz service, so nothing is ever delivered anywhere.
"""

from fastapi import FastAPI

from app.main import create_app as real_create_app
from common import ssrf


def no_dns(host: str, port: int) -> list[str]:
    raise OSError(f"tests do not resolve names ({host}:{port})")


def create_app() -> FastAPI:
    ssrf.system_resolver = no_dns  # GenerationService takes its resolver from here when the lifespan starts
    return real_create_app()
