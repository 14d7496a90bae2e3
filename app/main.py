"""create_app(): settings, Redis clients, storage, routers, error handlers."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aredis
from fastapi import FastAPI
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from app import errors, openapi, shutdown
from app.auth import KeyRing, check_open_mode
from app.cors import install_cors
from app.generations import GenerationService
from app.limits import RateLimitHeadersMiddleware
from app.metrics import ObservabilityMiddleware, build_registry
from app.middleware import RequestGuardMiddleware, RequestIdMiddleware
from app.routes import (
    adapters,
    events,
    generations,
    health,
    metrics,
    openai_images,
    playground,
    uploads,
    usage,
    webhooks,
)
from app.settings import Settings, get_settings
from app.usage import UsageService
from common import logs
from common.storage import ObjectStore, build_store

# A Redis that stops answering (a partition that silently drops packets, not a refused connection) must become
# a 503 with Retry-After (app/errors.py) within seconds, not a request that hangs through redis-py's default ten
# retries of the whole read timeout (minutes). Every blocking read the API makes (XREAD for long-polls and SSE)
# blocks for well under the read timeout. One retry at once replaces a connection a Redis restart broke; a silent
# Redis costs one read timeout plus one connect timeout: tests/e2e/test_partitions.py measures it.
REDIS_READ_TIMEOUT = 5.0  # seconds
REDIS_CONNECT_TIMEOUT = 2.0
REDIS_RETRIES = 1

# routes whose bodies may carry images: the image body limit, and multipart or raw image bodies besides JSON
IMAGE_ROUTES = ("/v1/generations", "/v1/image-uploads", "/v1/images/edits")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logs.configure("api", settings.log_level, settings.log_prompts)
    keyring = KeyRing.from_settings(settings)  # bad key config stops the start, with the reason
    check_open_mode(settings, keyring)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        r = redis.Redis.from_url(settings.redis_url, socket_timeout=REDIS_READ_TIMEOUT,
                                 socket_connect_timeout=REDIS_CONNECT_TIMEOUT, retry=Retry(NoBackoff(), REDIS_RETRIES))
        ar = aredis.Redis.from_url(settings.redis_url, socket_timeout=REDIS_READ_TIMEOUT,
                                   socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
                                   retry=AsyncRetry(NoBackoff(), REDIS_RETRIES))
        store: ObjectStore = build_store(settings)
        # checked now for a start-up log line that says whether images can be stored. The API starts either
        # way: a misconfigured store makes /readyz answer 503 until it is fixed (app/routes/health.py)
        app.state.storage = health.StorageReadiness(store)
        await app.state.storage.refresh()
        app.state.settings = settings
        app.state.service = GenerationService(r, ar, settings, store)
        app.state.usage = UsageService(ar, settings)
        stop_watching = shutdown.watch(app.state.service.stopping)  # SIGTERM: long-polls answer at once
        registry_watch = asyncio.create_task(app.state.service.watch_workers())
        try:
            yield
        finally:
            registry_watch.cancel()
            app.state.storage.close()
            stop_watching()
            await app.state.service.uploads.fetcher.aclose()
            await app.state.service.adapter_urls.aclose()
            await ar.aclose()
            r.close()

    app = FastAPI(
        title=openapi.TITLE,
        version=openapi.VERSION,
        summary=openapi.SUMMARY,
        description=openapi.DESCRIPTION,
        license_info=openapi.LICENSE,
        servers=openapi.SERVERS,
        openapi_tags=openapi.TAGS,
        responses=openapi.EVERY_ROUTE,
        lifespan=lifespan,
    )
    app.state.keyring = keyring
    # the cluster view is read with the service's sync client, which exists once the lifespan has started
    registry, http_metrics = build_registry(lambda: getattr(getattr(app.state, "service", None), "r", None))
    app.state.metrics_registry = registry
    errors.install(app)
    openapi.install(app)  # the little FastAPI cannot declare: app/openapi.py
    app.include_router(health.router)
    app.include_router(generations.router)
    app.include_router(events.router)
    app.include_router(webhooks.router)
    app.include_router(uploads.router)
    app.include_router(adapters.router)  # GET /v1/adapters (docs/adapters.md)
    app.include_router(usage.router)  # GET /v1/usage (docs/access.md)
    app.include_router(openai_images.router)  # OpenAI's images API, in its error shape (docs/openai.md)
    app.include_router(metrics.router)
    app.include_router(playground.router)  # the web page at / (no key needed to load it)
    app.add_middleware(RequestGuardMiddleware, max_bytes=settings.max_body_bytes,
                       image_routes=IMAGE_ROUTES, max_image_bytes=settings.max_image_body_bytes,
                       max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes, read_timeout=settings.body_read_timeout_seconds)
    app.add_middleware(ObservabilityMiddleware, metrics=http_metrics)  # inside RequestId: sees the request id
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(RateLimitHeadersMiddleware)
    install_cors(app, settings.cors_origins)  # outermost
    return app
