"""Liveness and readiness.

Readiness needs Redis and a usable object store. The store is checked when the API starts (a clear log line
either way) and again by /readyz at most every STORAGE_CHECK_SECONDS, so that a bucket created or credentials
fixed after the start make the replica ready without a restart. A store that is *permanently* broken (missing
bucket, refused or unknown credentials, a read-only directory) makes /readyz answer 503: this replica could
take requests but could neither store their images nor serve them. The process stays up (it is alive, and
recovers by itself once the store is fixed) rather than refusing to start. A store that is merely unreachable
for now (connection refused, timeouts, 5xx) is shown in the `storage` field but keeps the replica ready: the
workers ride out outages with retries, and every replica failing its probe at once for a storage blip would
take the whole service off its load balancer.
"""

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request

from app import openapi as oas
from app.deps import ServiceDep
from app.errors import Problem
from common.storage import ObjectStore, StorageStatus, check_storage

router = APIRouter(tags=["health"])
log = logging.getLogger("app.health")

PROBE_TIMEOUT = 2.0  # seconds
STORAGE_CHECK_SECONDS = 5.0  # how long one storage check answers /readyz before the next is made


class StorageReadiness:
    """The object store's last check, refreshed in a thread at most every `max_age` seconds, one at a time.

    `status()` waits for a refresh at most `wait` seconds; past that it answers with the previous result while
    the check finishes in the background (the S3 probe client is bounded at 2 s connect + 5 s read), so a slow
    store never makes /readyz itself time out. Each change (broken, fixed, another error) is logged once.
    """

    def __init__(self, store: ObjectStore, max_age: float = STORAGE_CHECK_SECONDS,
                 wait: float = PROBE_TIMEOUT) -> None:
        self.store = store
        self.max_age = max_age
        self.wait = wait
        self.last: StorageStatus | None = None
        self._task: asyncio.Task[StorageStatus] | None = None

    async def status(self) -> StorageStatus:
        last = self.last
        if last is not None and time.monotonic() - last.checked_at < self.max_age:
            return last
        if self._task is None:
            self._task = asyncio.create_task(self._check())
        try:
            return await asyncio.wait_for(asyncio.shield(self._task), self.wait)
        except TimeoutError:
            if self.last is not None:
                return self.last
            return StorageStatus(f"{self.store.location}: no answer to the storage check within {self.wait:g}s",
                                 code="Timeout", checked_at=time.monotonic())

    async def refresh(self) -> StorageStatus:
        """A check now, waited for (the API's start): its result is logged."""
        self.last = None
        if self._task is None:
            self._task = asyncio.create_task(self._check())
        return await asyncio.shield(self._task)

    def close(self) -> None:
        """Stop waiting for a check still in flight (the API's shutdown); its thread ends on its own timeouts."""
        if self._task is not None:
            self._task.cancel()

    async def _check(self) -> StorageStatus:
        try:
            try:
                status = await asyncio.to_thread(check_storage, self.store)
            except Exception as exc:  # a bug in a store's check must not turn /readyz into a 500
                log.exception("storage check raised")
                status = StorageStatus(f"{self.store.location}: the storage check raised {type(exc).__name__}",
                                       code=type(exc).__name__, checked_at=time.monotonic())
            self._log_change(self.last, status)
            self.last = status
            return status
        finally:
            self._task = None

    def _log_change(self, before: StorageStatus | None, now: StorageStatus) -> None:
        if before is not None and before.error == now.error:
            return
        fields = {"storage": self.store.location, "error_code": now.code}
        if now.ok:
            log.info("storage ok: %s%s", self.store.location, " (recovered)" if before is not None else "",
                     extra=fields)
        elif now.permanent:
            log.error("storage check failed: %s; /readyz answers 503 until it is fixed (checked again every "
                      "%gs, no restart needed)", now.error, self.max_age, extra=fields)
        else:
            log.warning("storage check failed: %s; still ready (workers retry outages), checked again on /readyz",
                        now.error, extra=fields)


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
    summary="This API process can accept work (Redis reachable, object store usable); lists the workers and their "
    "readiness",
    description="Ready means this replica can take requests: it does not wait for workers (generations queue "
    "while workers load their models). `storage` is `ok` or why the object store failed its check (a HEAD on "
    "the S3 bucket, a test write in the local directory; re-checked every few seconds): a missing bucket or "
    "refused credentials answer 503, an unreachable store is shown but stays ready. Each worker reports its "
    "own state: loading (models), warming (first run), waiting_for_storage (its store check fails; it takes "
    "no job), ready, busy, stopping.",
    responses={
        200: oas.success("Ready: Redis answers and the store is usable; the workers are listed with their states",
                         keyed=False),
        503: oas.problem(503, "Redis is unreachable, or the object store is misconfigured (missing bucket, "
                         "refused or unknown credentials)",
                         "Redis is unreachable (ConnectionError): this replica cannot take work", "not-ready",
                         "/readyz"),
    },
    openapi_extra=oas.PUBLIC,
)
async def readyz(service: ServiceDep, request: Request) -> dict[str, Any]:
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
    storage: StorageReadiness | None = getattr(request.app.state, "storage", None)
    checked = await storage.status() if storage is not None else None
    if checked is not None and checked.permanent:
        raise Problem(
            503,
            f"object storage check failed: {checked.error}; this replica can neither store nor serve images",
            kind="not-ready",
            headers={"Retry-After": f"{STORAGE_CHECK_SECONDS:g}"},
        )
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
            "storage": w.get("storage"),  # the worker's own store check: `ok`, or why it waits
        }
        for w in workers
    ]
    return {"status": "ready", "redis": "ok", "storage": checked.describe() if checked else "unchecked",
            "workers_ready": sum(w["ready"] for w in listed), "workers": listed}
