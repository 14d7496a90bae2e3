"""`GET /metrics` for Prometheus and `GET /metrics/scaling` for autoscalers: operators only (the gateway does not
publish /metrics or anything under it; SDXL_METRICS_TOKEN guards both)."""

import logging

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app import scaling
from app.deps import ServiceDep, SettingsDep
from app.errors import Problem
from app.metrics import check_token

router = APIRouter(tags=["operations"])
log = logging.getLogger("app.metrics")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    check_token(token, request.headers.get("authorization"))
    # the cluster collector reads Redis with the sync client: off the event loop
    body = await run_in_threadpool(generate_latest, request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/metrics/scaling", include_in_schema=False)
async def scaling_numbers(request: Request, settings: SettingsDep, service: ServiceDep) -> dict[str, int]:
    """Work waiting and running, for KEDA's metrics-api scaler (app/scaling.py, docs/kubernetes.md)."""
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    check_token(token, request.headers.get("authorization"), path="/metrics/scaling")
    try:
        numbers = await run_in_threadpool(scaling.read, service.r)
    except redis.RedisError as exc:
        # an error, never zeros: KEDA then keeps the workers (its `fallback`) instead of scaling them to zero
        log.warning("scaling numbers unavailable: %s", exc)
        raise Problem(503, f"Redis is unreachable ({type(exc).__name__}): no scaling numbers", kind="not-ready",
                      headers={"Retry-After": "2"}) from exc
    return numbers.as_json()
