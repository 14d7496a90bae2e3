"""create_app(): settings, Redis clients, storage, routers, error handlers."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aredis
from fastapi import FastAPI

from app import errors
from app.generations import GenerationService
from app.middleware import BodyGuardMiddleware, RequestIdMiddleware
from app.routes import generations, health
from app.settings import Settings, get_settings
from app.storage import ObjectStore, build_store


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        # long-polls block in XREAD for up to max_wait_seconds: the read timeout must outlast them
        ar = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2,
                                   socket_timeout=settings.max_wait_seconds + 10)
        store: ObjectStore = build_store(settings)
        app.state.settings = settings
        app.state.service = GenerationService(r, ar, settings, store)
        try:
            yield
        finally:
            await ar.aclose()
            r.close()

    app = FastAPI(
        title="SDXL inference service",
        version="1.0.0",
        summary="Text to image with Stable Diffusion XL: queued, resident GPU workers, durable results.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(generations.router)
    app.add_middleware(BodyGuardMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)
    return app
