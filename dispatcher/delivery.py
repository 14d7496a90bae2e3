"""Signed webhook delivery (Standard Webhooks): one HTTP attempt per rq job, retries put on a due zset.

Runs only in the dispatcher (`python -m dispatcher`), never on a GPU worker's time, and imports no torch.
An attempt connects to the address approved at submit (common/ssrf.py), never to a fresh DNS answer, sends the
original Host header and TLS SNI name, and follows no redirects. Whatever happens here, the generation's own
status is never touched.
"""

import base64
import email.utils
import json
import logging
import random
import re
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import redis
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from rq import Queue
from rq.serializers import JSONSerializer
from standardwebhooks import Webhook

from common import scripts, ssrf
from common.contract import keys, stats
from common.contract.events import EventType
from common.contract.records import rfc3339

log = logging.getLogger("dispatcher.delivery")

JOB_TIMEOUT = 60  # rq's limit on one attempt (emit() uses the same); the HTTP timeout stays well under it
LOG_MAX = 500  # attempts kept per generation
USER_AGENT = "sdxl-service-webhooks/1.0"

class DispatcherSettings(BaseSettings):
    """The dispatcher process's settings (`SDXL_*`)."""

    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    # `whsec_<base64>`, comma-separated; every one signs each delivery (rotation: add the new, drop the old later)
    webhook_secrets: Annotated[list[str], NoDecode] = []
    # seconds before attempt 2, 3, ...: the Standard Webhooks schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h)
    webhook_retry_schedule: Annotated[list[float], NoDecode] = [5, 300, 1800, 7200, 18000, 36000, 36000]
    webhook_jitter: float = Field(default=0.1, ge=0, le=1)  # each delay is scaled by a random factor in 1 +- this
    webhook_timeout_seconds: float = Field(default=15.0, gt=0, le=JOB_TIMEOUT - 10)
    webhook_max_retry_after_seconds: float = 86400  # a receiver's Retry-After is honoured up to this
    webhook_allow_addresses: str = ""  # same meaning as the API's: rechecked at delivery, without DNS
    webhook_allow_http: bool = False
    webhook_pump_interval_seconds: float = Field(default=0.2, gt=0)  # how often due retries are moved to the queue
    generation_ttl_seconds: int = 7 * 24 * 3600  # attempt logs live as long as their generation
    dispatcher_name: str = ""

    @field_validator("webhook_secrets", mode="before")
    @classmethod
    def _secrets(cls, v: Any) -> list[str]:
        secrets = ssrf.split_list(v)
        for s in secrets:
            body = s.removeprefix("whsec_")
            try:
                key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
            except ValueError:
                key = b""
            if not s.startswith("whsec_") or len(key) < 16:
                raise ValueError("each webhook secret must be `whsec_` + base64 of at least 16 random bytes")
        return secrets

    @field_validator("webhook_retry_schedule", mode="before")
    @classmethod
    def _schedule(cls, v: Any) -> list[float]:
        delays = [float(x) for x in ssrf.split_list(v)]
        if any(d < 0 for d in delays):
            raise ValueError(f"retry delays must be >= 0 seconds, got {delays}")
        return delays

    def policy(self) -> ssrf.Policy:
        return ssrf.Policy.build(ssrf.split_list(self.webhook_allow_addresses), self.webhook_allow_http)


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """`Retry-After` as delay-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def next_delay(
    schedule: list[float],
    attempt: int,
    jitter: float,
    retry_after: float | None,
    max_retry_after: float,
    rng: random.Random | None = None,
) -> float | None:
    """Seconds until attempt `attempt + 1`, or None when the schedule is spent."""
    if attempt - 1 >= len(schedule):
        return None
    rng = rng or random.Random()
    delay = schedule[attempt - 1] * (1 + rng.uniform(-jitter, jitter))  # jitter: retries of many hooks spread out
    if retry_after is not None:
        delay = max(delay, min(retry_after, max_retry_after))  # never earlier than the receiver asked
    return max(0.0, delay)


def event_body(payload: dict[str, Any]) -> str:
    """The signed body: `{type, timestamp, data}`, identical on every attempt of one event."""
    body = {"type": payload["type"], "timestamp": rfc3339(float(payload["timestamp"])), "data": payload["data"]}
    return json.dumps(body, separators=(",", ":"))


def sign_headers(signers: list[Webhook], msg_id: str, body: str, ts: int) -> dict[str, str]:
    when = datetime.fromtimestamp(ts, UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": " ".join(w.sign(msg_id, when, body) for w in signers),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


def pinned_request(client: httpx.Client, url: str, address: str, body: str, headers: dict[str, str]) -> httpx.Request:
    """POST to `address` while presenting the URL's own host (Host header, TLS SNI and certificate check)."""
    target, host_header, extensions = ssrf.pinned_target(url, address)
    return client.build_request(
        "POST",
        target,
        content=body.encode(),
        headers={**headers, "host": host_header},
        extensions=extensions,
    )


class Deliverer:
    def __init__(
        self,
        r: redis.Redis,
        settings: DispatcherSettings,
        client: httpx.Client | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.r = r
        self.settings = settings
        self.policy = settings.policy()
        self.signers = [Webhook(s) for s in settings.webhook_secrets]
        timeout = settings.webhook_timeout_seconds
        # trust_env=False: an HTTP(S)_PROXY variable must not reroute deliveries away from the pinned address
        self.client = client or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), follow_redirects=False, trust_env=False
        )
        self.rng = rng or random.Random()

    def deliver(self, p: dict[str, Any]) -> dict[str, Any]:
        gen_id, url, attempt = p["generation_id"], p["url"], int(p.get("attempt") or 1)
        entry: dict[str, Any] = {
            "event_id": p["event_id"],
            "type": p["type"],
            "attempt": attempt,
            "url": url,
            "attempted_at": rfc3339(time.time()),
            "status_code": None,
            "latency_ms": None,
            "error": None,
            "outcome": None,
            "next_attempt_at": None,
        }
        if not self.signers:
            return self._record(gen_id, entry, "failed", "the dispatcher has no signing secrets")
        if self.r.sismember(keys.WEBHOOK_GONE, url):
            return self._record(gen_id, entry, "skipped", "the URL answered 410 Gone earlier; no more deliveries")
        address = p.get("address")
        if not address:
            return self._record(gen_id, entry, "refused", "no approved address was pinned at submit")
        port = httpx.URL(url).port or (443 if url.lower().startswith("https") else 80)
        refusal = ssrf.recheck_address(str(address), port, self.policy)
        if refusal is None and not self.policy.allow_http and not url.lower().startswith("https:"):
            refusal = "plain http is not allowed"
        if refusal:
            return self._record(gen_id, entry, "refused", refusal)

        body = event_body(p)
        headers = sign_headers(self.signers, p["event_id"], body, int(time.time()))
        if p.get("request_id"):
            headers["x-request-id"] = str(p["request_id"])
        t0 = time.monotonic()
        retry_after = None
        try:
            response = self.client.send(pinned_request(self.client, url, str(address), body, headers), stream=True)
            response.close()  # the body is never read: a receiver cannot make us download anything
            entry["status_code"] = response.status_code
            retry_after = retry_after_seconds(response.headers.get("retry-after"), time.time())
        except httpx.TimeoutException:
            entry["error"] = f"timed out after {self.settings.webhook_timeout_seconds:g} s"
        except (httpx.HTTPError, OSError) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        entry["latency_ms"] = round((time.monotonic() - t0) * 1000, 1)

        status = entry["status_code"]
        if status is not None and 200 <= status < 300:
            return self._record(gen_id, entry, "delivered")
        if status == 410:
            self.r.sadd(keys.WEBHOOK_GONE, url)
            return self._record(gen_id, entry, "gone")
        if status is not None and entry["error"] is None:
            entry["error"] = f"HTTP {status}"
        if p["type"] == EventType.progress.value:
            return self._record(gen_id, entry, "dropped")  # progress is best-effort: the next one supersedes it
        delay = next_delay(
            self.settings.webhook_retry_schedule,
            attempt,
            self.settings.webhook_jitter,
            retry_after,
            self.settings.webhook_max_retry_after_seconds,
            self.rng,
        )
        if delay is None:
            return self._record(gen_id, entry, "failed")
        due = time.time() + delay
        entry["next_attempt_at"] = rfc3339(due)
        retry = json.dumps({**p, "attempt": attempt + 1}, separators=(",", ":"))  # key order kept: same body
        return self._record(gen_id, entry, "retrying", due=(retry, due))

    def _record(
        self,
        gen_id: str,
        entry: dict[str, Any],
        outcome: str,
        error: str | None = None,
        due: tuple[str, float] | None = None,
    ) -> dict[str, Any]:
        entry["outcome"] = outcome
        if error:
            entry["error"] = error
        ttl: Any = self.r.ttl(keys.generation(gen_id))  # -2: deleted, so nobody can read a log any more
        pipe = self.r.pipeline(transaction=True)
        if ttl != -2:
            pipe.rpush(keys.webhook_log(gen_id), json.dumps(entry, separators=(",", ":")))
            pipe.ltrim(keys.webhook_log(gen_id), -LOG_MAX, -1)
            pipe.expire(keys.webhook_log(gen_id), ttl if ttl > 0 else self.settings.generation_ttl_seconds)
        if due is not None:  # logged and scheduled together: the log never shows a retry that was not queued
            pipe.zadd(keys.WEBHOOK_DUE, {due[0]: due[1]})
        stats.count_webhook(pipe, outcome)
        pipe.execute()
        level = logging.INFO if outcome in ("delivered", "retrying") else logging.WARNING
        log.log(
            level,
            "webhook %s",
            outcome,
            extra={
                "generation_id": gen_id,
                "event_id": entry["event_id"],
                "attempt": entry["attempt"],
                "status_code": entry["status_code"],
                "latency_ms": entry["latency_ms"],
                "error": entry["error"],
            },
        )
        return entry


class DuePump(threading.Thread):
    """Moves due retries from the zset onto the rq queue. Every dispatcher runs one; claims are atomic."""

    def __init__(self, r: redis.Redis, interval: float, lease_seconds: float = 60.0) -> None:
        super().__init__(name="webhook-pump", daemon=True)
        self.r = r
        self.interval = interval
        self.lease_seconds = lease_seconds
        self.queue = Queue(keys.WEBHOOK_QUEUE, connection=r, serializer=JSONSerializer)
        self._claim = scripts.register(r, "webhook_claim")
        self.stopping = threading.Event()

    def pump_once(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        items = self._claim(keys=[keys.WEBHOOK_DUE], args=[now, now + self.lease_seconds, 100])
        for raw in items:
            enqueue_delivery(self.queue, json.loads(raw))
            self.r.zrem(keys.WEBHOOK_DUE, raw)
        return len(items)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                while self.pump_once() >= 100:
                    pass
            except redis.RedisError:
                log.warning("webhook pump could not reach Redis; retrying", exc_info=True)

    def stop(self) -> None:
        self.stopping.set()


def enqueue_delivery(queue: Queue, payload: dict[str, Any]) -> None:
    queue.enqueue("dispatcher.delivery.deliver", payload, job_timeout=JOB_TIMEOUT, result_ttl=300, failure_ttl=86400)


_deliverer: Deliverer | None = None


def configure(deliverer: Deliverer) -> None:
    global _deliverer
    _deliverer = deliverer


def deliver(payload: dict[str, Any]) -> dict[str, Any]:
    """The rq job (enqueued by common.contract.events.emit and by the pump)."""
    if _deliverer is None:
        raise RuntimeError("dispatcher.delivery.deliver runs only inside `python -m dispatcher`")
    return _deliverer.deliver(payload)
