"""Record -> the public generation resource, shared so that GET, SSE and webhooks show the same thing."""

from collections.abc import Callable
from typing import Any

from common.contract.records import rfc3339, ts_or_none
from common.contract.status import TERMINAL_STATUSES, GenerationStatus, Stage

ImageUrl = Callable[[str, dict[str, Any]], str]


def render(rec: dict[str, Any], image_url: ImageUrl, queue_position: int | None = None) -> dict[str, Any]:
    gen_id = rec["id"]
    status = rec["status"]
    images = [
        {**{k: v for k, v in img.items() if k != "key"}, "url": image_url(gen_id, img)}
        for img in (rec.get("images") or [])
    ]
    return {
        "id": gen_id,
        "status": status,
        "queue_position": queue_position if status == GenerationStatus.queued else None,
        "progress": progress(status, rec.get("progress")),
        "params": rec.get("params"),
        "token_counts": rec.get("token_counts"),
        "images": images,
        "error": rec.get("error"),
        "attempt": int(rec.get("attempt") or 1),
        "created_at": rfc3339(ts_or_none(rec.get("created_at"))),
        "started_at": rfc3339(ts_or_none(rec.get("started_at"))),
        "finished_at": rfc3339(ts_or_none(rec.get("finished_at"))),
        "expires_at": rfc3339(ts_or_none(rec.get("expires_at"))),
        "timings": rec.get("timings") or {},
        "manifest": rec.get("manifest"),
        "webhook": rec.get("webhook"),
    }


def progress(status: str, stored: dict[str, Any] | None) -> dict[str, Any]:
    """A terminal generation's progress says where it ended: the step reached (of how many), stage `done`,
    nothing left to wait for, whatever the stage the last progress write named (a lost worker's says `base`)."""
    p = stored or {"step": 0, "total_steps": 0, "stage": Stage.queued.value, "eta_seconds": None}
    if status in TERMINAL_STATUSES:
        return {"step": p.get("step", 0), "total_steps": p.get("total_steps", 0), "stage": Stage.done.value,
                "eta_seconds": 0}
    return p
