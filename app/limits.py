"""Per-key limits kept in Redis, so every API replica enforces the same numbers.

- Request rate: a token bucket per owner (`sdxl:rate:<owner>`), one Lua script per authenticated request, on
  Redis's clock (replicas' clocks never disagree). Over it: 429 + Retry-After. Every answer to an
  authenticated request carries RateLimit-Limit / -Remaining / -Reset (IETF httpapi-ratelimit-headers draft).
- Unfinished generations per owner: `sdxl:active:<owner>` holds the ids of its queued or running generations;
  ADMIT prunes the final ones lazily (nobody has to remember to decrement a counter on every path to a final
  state), checks the cap and reserves the new id in the same script, so concurrent submits cannot overshoot.
  It runs inside app/enqueue.py's CREATE, the submit's one round trip, which writes nothing when it refuses.
- Images per UTC day (`daily_image_quota`, common/usage.py): CREATE reserves a request's images against the
  owner's day in the same script as admission, and refuses (429 `daily-quota-exceeded`, Retry-After until the
  next UTC midnight) a request that would go over, so concurrent submits cannot overshoot it.
- Global queue depth: ADMIT counts what waits (rq list + every owner's pending zset). Over it: 503 with a
  Retry-After from the measured drain rate (see `drain_rate`).
"""

import math
import time
from typing import Any

import redis.asyncio as aredis
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import Principal
from app.errors import Problem
from app.settings import Settings
from common import scripts
from common.contract import keys
from common.contract.records import as_str
from common.usage import seconds_to_next_day, utc_day

NO_WORKER_RETRY_SECONDS = 30  # nothing drains the queue until a worker registers
UNMEASURED_RETRY_SECONDS = 10  # workers are up but none has finished a job yet
MAX_RETRY_SECONDS = 300


def retry_after(waiting: int, live_workers: int, per_second: float) -> int:
    """Seconds until `waiting` generations have drained at the measured rate, bounded to [1, 300]."""
    if live_workers == 0:
        return NO_WORKER_RETRY_SECONDS
    if per_second <= 0:
        return UNMEASURED_RETRY_SECONDS
    return max(1, min(MAX_RETRY_SECONDS, math.ceil(waiting / per_second)))


class Limiter:
    def __init__(self, ar: aredis.Redis, settings: Settings) -> None:
        self.ar = ar
        self.settings = settings
        self._bucket = scripts.register(ar, "token_bucket")

    async def hit(self, request: Request, principal: Principal) -> None:
        """Charge one request to the principal's bucket (one round trip); 429 when it is empty."""
        lim = principal.limits
        if lim.rate_per_minute <= 0:
            return
        allowed, remaining, wait_ms, full_ms = await self._bucket(
            keys=[keys.rate_bucket(principal.owner)], args=[lim.rate_per_minute / 60000, lim.burst]
        )
        request.state.ratelimit = {
            "RateLimit-Limit": str(lim.burst),
            "RateLimit-Remaining": str(int(remaining)),
            "RateLimit-Reset": str(math.ceil(int(full_ms) / 1000)),
        }
        if not allowed:
            wait = max(1, math.ceil(int(wait_ms) / 1000))
            raise Problem(
                429,
                f"API key {principal.name!r} is over its rate limit of {lim.rate_per_minute} requests per minute "
                f"(burst {lim.burst}); retry in {wait} s",
                kind="rate-limited",
                headers={"Retry-After": str(wait)},
            )

    async def refuse(self, principal: Principal, code: int, count: int, images: int = 1) -> None:
        """CREATE's answer -> nothing (0, admitted), 429 (1, the key's cap; 3, its daily quota, `count` images
        already admitted today, `images` asked for) or 503 (2, the queue is full)."""
        if code == 0:
            return
        if code == 3:
            raise quota_exceeded(principal, count, images, time.time())
        live, per_second = await self.drain_rate()
        if code == 1:
            wait = retry_after(1, live, per_second)
            raise Problem(
                429,
                f"API key {principal.name!r} already has {count} unfinished generations, its limit; "
                "wait for one to finish or cancel one",
                kind="too-many-unfinished",
                headers={"Retry-After": str(wait)},
            )
        limit = self.settings.max_queue_depth
        wait = retry_after(count - limit + 1, live, per_second)
        raise Problem(
            503,
            f"the queue is full ({count} generations waiting, limit {limit}); retry in {wait} s",
            kind="queue-full",
            headers={"Retry-After": str(wait)},
        )

    async def drain_rate(self) -> tuple[int, float]:
        """(live workers, generations per second they finish while busy), from counters every worker already
        publishes in its registry hash each heartbeat (jobs_done / busy_seconds). Busy seconds are pipeline
        time, so this is the rate of a saturated fleet, which is the case whenever the queue is full."""
        ids = await self.ar.zrangebyscore(keys.WORKERS, time.time() - keys.WORKER_LIVE_SECONDS, "+inf")
        if not ids:
            return 0, 0.0
        pipe = self.ar.pipeline(transaction=False)
        for wid in ids:
            name = as_str(wid)
            pipe.hmget(keys.worker(name), ["jobs_done", "busy_seconds"])
        live, per_second = 0, 0.0
        for jobs, busy in await pipe.execute():
            if jobs is None and busy is None:
                continue  # registry hash expired: that worker is gone
            live += 1
            done, seconds = float(jobs or 0), float(busy or 0)
            if done > 0 and seconds > 0:
                per_second += done / seconds
        return live, per_second


def quota_exceeded(principal: Principal, used: int, images: int, now: float) -> Problem:
    quota = principal.limits.daily_image_quota
    wait = seconds_to_next_day(now)
    return Problem(
        429,
        f"API key {principal.name!r} has a daily quota of {quota} images (UTC day {utc_day(now)}): {used} already "
        f"submitted today and this request asks for {images}; the quota starts afresh at the next UTC midnight, "
        f"in {wait} s",
        kind="daily-quota-exceeded",
        title="Daily image quota exceeded",
        headers={"Retry-After": str(wait)},
    )


class RateLimitHeadersMiddleware:
    """Puts the RateLimit-* values that `Limiter.hit` left in the request's state on its answer (any status)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                values = state.get("ratelimit")
                if values:
                    extra = [(k.lower().encode(), v.encode()) for k, v in values.items()]
                    message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_limits)
