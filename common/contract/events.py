"""Generation events: one Redis stream per generation (SSE, long-poll wake-ups) plus webhook fan-out.

Streams give increasing ids per generation, work across API replicas, and let `Last-Event-ID` resume.
"""

import json
import re
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

import redis

from common.contract import keys, stats
from common.contract.records import as_str, decode
from common.contract.resource import ImageUrl, render


class EventType(StrEnum):
    queued = "generation.queued"
    started = "generation.started"
    progress = "generation.progress"
    succeeded = "generation.succeeded"
    failed = "generation.failed"
    canceled = "generation.canceled"
    # live previews: on the stream (SSE) only, never in webhooks; its data is a preview, not the resource
    preview = "generation.preview"

    @property
    def is_terminal(self) -> bool:
        return self in (EventType.succeeded, EventType.failed, EventType.canceled)


STREAM_MAXLEN = 2000
STREAM_ONLY = frozenset({EventType.preview})  # event types no webhook ever carries, whatever it subscribes to
PREVIEW_NAME = re.compile(r"^(\d{1,3})-(\d{1,5})\.(webp|jpeg)$")  # <image index>-<step>.<ext>


def preview_key(storage_prefix: str, gen_id: str, name: str) -> str:
    """Where a preview too large to go inline is stored: under the generation's prefix (common/storage.py
    generation_prefix), so deleting the generation deletes it."""
    return f"{storage_prefix}{gen_id}/previews/{name}"

def emit(
    r: redis.Redis,
    gen_id: str,
    event_type: EventType,
    image_url: ImageUrl,
    ttl_seconds: int,
    webhook_queue: Any = None,
    progress_interval: float = 2.0,
) -> str | None:
    """Append an event carrying the current resource; enqueue a webhook delivery when subscribed."""
    raw = r.hgetall(keys.generation(gen_id))
    if not raw:
        return None
    return emit_record(r, decode(raw), event_type, image_url, ttl_seconds, webhook_queue, progress_interval)


def emit_record(
    r: redis.Redis,
    rec: dict[str, Any],
    event_type: EventType,
    image_url: ImageUrl,
    ttl_seconds: int,
    webhook_queue: Any = None,
    progress_interval: float = 2.0,
    also: Callable[[Any], None] | None = None,
) -> str:
    """`emit` for a record the caller has just read (a transition script answers it).

    `also` adds the caller's own commands to the same pipeline."""
    gen_id = rec["id"]
    resource = render(rec, image_url)
    body = json.dumps(resource, separators=(",", ":"))
    pipe = r.pipeline(transaction=False)
    if also is not None:
        also(pipe)
    xadd_at = len(pipe.command_stack)
    pipe.xadd(keys.events(gen_id), {"type": event_type.value, "data": body}, maxlen=STREAM_MAXLEN, approximate=True)
    pipe.expire(keys.events(gen_id), ttl_seconds)
    stats.record_event(pipe, event_type.value, rec)  # metrics ride the same round trip
    event_id = as_str(pipe.execute()[xadd_at])
    enqueue_webhook(r, rec, event_type, event_id, resource, webhook_queue, progress_interval)
    return event_id


def enqueue_webhook(
    r: redis.Redis,
    rec: dict[str, Any],
    event_type: EventType,
    event_id: str,
    resource: dict[str, Any],
    webhook_queue: Any,
    progress_interval: float,
) -> None:
    """A delivery job for an event the generation's webhook subscribes to (progress: at most one per interval)."""
    gen_id = rec["id"]
    hook = rec.get("webhook")
    if event_type in STREAM_ONLY:
        return
    if webhook_queue is not None and hook and event_type.value in hook.get("events", []):
        if event_type == EventType.progress and progress_interval > 0:
            gate = r.set(keys.webhook_progress_gate(gen_id), b"1", nx=True, px=max(1, int(progress_interval * 1000)))
            if not gate:  # the stream (SSE) still has every step; webhooks get at most one per interval
                return
        webhook_queue.enqueue(
            "dispatcher.delivery.deliver",
            {
                "generation_id": gen_id,
                "event_id": f"evt_{gen_id}_{event_id}",
                "type": event_type.value,
                "timestamp": time.time(),
                "data": resource,
                "url": hook["url"],
                "address": hook.get("address"),
                "attempt": 1,
                "request_id": rec.get("request_id") or None,
            },
            job_timeout=60,
            result_ttl=300,
            failure_ttl=86400,
        )

