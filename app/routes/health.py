"""Liveness and readiness."""

import asyncio
import time
from typing import Any

from fastapi import APIRouter

from app import openapi as oas
from app.deps import ServiceDep
from app.errors import Problem

router = APIRouter(tags=["health"])

PROBE_TIMEOUT = 2.0  # seconds


@router.get(
    "/healthz",
    operation_id="healthz",
    summary="The API process is alive",
    responses={200: oas.success("The process is alive", keyed=False)},
    openapi_extra=oas.PUBLIC,
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="This API process can accept work (Redis reachable); lists the workers and their readiness",
    description="Ready means this replica can take requests: it does not wait for workers (generations queue "
    "while workers load their models). Each worker reports its own state: loading (models), warming (first "
    "run), ready, busy, stopping.",
    responses={
        200: oas.success("Ready: Redis answers; the workers are listed with their states", keyed=False),
        503: oas.problem(503, "Redis is unreachable",
                         "Redis is unreachable (ConnectionError): this replica cannot take work", "not-ready",
                         "/readyz"),
    },
    openapi_extra=oas.PUBLIC,
)
async def readyz(service: ServiceDep) -> dict[str, Any]:
    try:
        # bounded: a hung Redis must turn into a quick 503, not a health check that times out
        await asyncio.wait_for(service.ar.ping(), PROBE_TIMEOUT)
        workers = await asyncio.wait_for(service.live_workers(), PROBE_TIMEOUT)
    except Exception as exc:  # any Redis failure means this replica cannot take work
        raise Problem(
            503,
            f"Redis is unreachable ({type(exc).__name__}): this replica cannot take work",
            kind="not-ready",
            headers={"Retry-After": "2"},
        ) from exc
    now = time.time()
    listed = [
        {
            "id": w.get("id"),
            "state": w.get("state"),
            "ready": w.get("state") in ("ready", "busy"),
            "models_loaded": w.get("state") not in (None, "loading"),
            "warm": w.get("warm") == "1",
            "has_refiner": w.get("has_refiner") == "1",
            "model_loads": int(w.get("model_loads", "0")),
            "jobs_done": int(w.get("jobs_done", "0")),
            "heartbeat_age_seconds": round(max(0.0, now - float(w.get("heartbeat") or now)), 3),
        }
        for w in workers
    ]
    return {"status": "ready", "redis": "ok", "workers_ready": sum(w["ready"] for w in listed), "workers": listed}
