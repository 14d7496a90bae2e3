"""`GET /metrics` for Prometheus: operators only (the gateway does not publish it; SDXL_METRICS_TOKEN guards it)."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import SettingsDep
from app.metrics import check_token

router = APIRouter(tags=["operations"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, settings: SettingsDep) -> Response:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    check_token(token, request.headers.get("authorization"))
    # the cluster collector reads Redis with the sync client: off the event loop
    body = await run_in_threadpool(generate_latest, request.app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
