"""CORS for browser apps on other origins (SDXL_CORS_ORIGINS); off when no origin is configured."""

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

ALLOW_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "X-Request-ID", "Last-Event-ID"]
# what browser code may read from answers: where a new generation lives, limits, and the id to quote in reports
EXPOSE_HEADERS = [
    "Location",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Retry-After",
    "X-Request-ID",
    "Idempotent-Replayed",
    "Preference-Applied",
]


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Add last, so it is the outermost layer: preflights and every error answer get the CORS headers too."""
    if not origins:
        return
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=ALLOW_HEADERS,
        expose_headers=EXPOSE_HEADERS,
        allow_credentials=False,  # keys travel in Authorization, never in cookies
        max_age=600,
    )
