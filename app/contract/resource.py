"""Record -> the public generation resource, shared so that GET, SSE and webhooks show the same thing."""

from collections.abc import Callable
from typing import Any

from app.contract.records import rfc3339, ts_or_none

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
        "queue_position": queue_position if status == "queued" else None,
        "progress": rec.get("progress") or {"step": 0, "total_steps": 0, "stage": "queued", "eta_seconds": None},
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
