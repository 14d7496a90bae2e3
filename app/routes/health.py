"""Liveness and readiness."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.deps import ServiceDep

router = APIRouter(tags=["health"])


@router.get("/healthz", operation_id="healthz", summary="The API process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="This API process can accept work (Redis reachable); lists live workers",
    responses={503: {"description": "Redis is unreachable"}},
)
async def readyz(service: ServiceDep) -> JSONResponse:
    body: dict[str, Any] = {"status": "ready", "redis": "ok"}
    try:
        await service.ar.ping()
        workers = await service.live_workers()
    except Exception as exc:  # any Redis failure means this replica cannot take work
        body.update(status="unavailable", redis=f"error: {type(exc).__name__}", workers=[])
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})
    body["workers"] = [
        {
            "id": w.get("id"),
            "state": w.get("state"),
            "models_loaded": w.get("state") in ("ready", "busy"),
            "has_refiner": w.get("has_refiner") == "1",
            "model_loads": int(w.get("model_loads", "0")),
            "jobs_done": int(w.get("jobs_done", "0")),
        }
        for w in workers
    ]
    return JSONResponse(body)
