"""GET /v1/generations/{id}/events: the generation's events as server-sent events.

Read from the generation's Redis stream, so any API replica serves any client and `Last-Event-ID` (the
stream entry id) resumes exactly where a dropped connection stopped. The stream ends after the terminal event.
"""

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import openapi as oas
from app.deps import PrincipalDep, ServiceDep
from app.errors import Problem, field_error
from app.generations import TERMINAL, TERMINAL_EVENTS, GenerationService, resource_json
from app.routes.generations import GenId
from common.contract import keys
from common.contract.events import PREVIEW_NAME, EventType, preview_key
from common.contract.records import as_str, decode
from common.storage import ObjectNotFound, StorageUnavailable

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=oas.V1)

STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
BLOCK_MS = 2000  # one XREAD wait; well under the API's Redis read timeout (app/main.py REDIS_READ_TIMEOUT)
KEEPALIVE_SECONDS = 15.0  # a comment line this often keeps proxies from closing an idle stream
SETTLE_MS = 1000  # status is final but its event not yet in the stream: the emitter is a few ms behind


# `generation.preview`'s data (worker/previews.py event_data): inline base64 up to SDXL_PREVIEW_INLINE_MAX_BYTES,
# else a URL (GET /v1/generations/{id}/previews/{name}, or presigned)
PREVIEW_DATA: dict[str, Any] = {
    "type": "object",
    "title": "GenerationPreview",
    "required": ["generation_id", "index", "step", "total_steps", "stage", "width", "height", "content_type",
                 "bytes", "b64", "url"],
    "properties": {
        "generation_id": {"type": "string"},
        "index": {"type": "integer", "description": "The image of the generation it previews (0-based)"},
        "step": {"type": "integer", "description": "Denoising steps done when it was taken"},
        "total_steps": {"type": "integer"},
        "stage": {"type": "string", "description": "`base` or `refiner`"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "content_type": {"type": "string", "examples": ["image/webp"]},
        "bytes": {"type": "integer"},
        "b64": {"type": ["string", "null"], "description": "The image file, base64; null when `url` is set"},
        "url": {"type": ["string", "null"], "description": "Where a preview too large to go inline is"},
    },
}

# One event of the stream (the stream is a sequence of them): OpenAPI 3.2 names this `itemSchema`; 3.1 tools such
# as schemathesis read `schema` of text/event-stream that way. `data` is the generation resource as JSON.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": [t.value for t in EventType]},
        "id": {"type": "string", "pattern": STREAM_ID.pattern, "description": "Send as `Last-Event-ID` to resume"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "The generation resource; for `generation.preview`, the preview (PREVIEW_DATA)",
            "contentSchema": {"oneOf": [{"$ref": "#/components/schemas/Generation"}, PREVIEW_DATA]},
        },
        "retry": {"type": "integer", "description": "Milliseconds to wait before reconnecting"},
    },
}


def _entry(raw_id: Any, fields: Any) -> tuple[str, str, str]:
    """(id, type, data) of one stream entry; the API's Redis clients return bytes."""
    event = fields.get(b"type") or fields.get("type") or b""
    data = fields.get(b"data") or fields.get("data") or b"{}"
    return as_str(raw_id), as_str(event), as_str(data)


def sse(event: str, data: str, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


async def event_stream(service: GenerationService, gen_id: str, last_id: str) -> AsyncIterator[str]:
    """History after `last_id`, then live events, until the terminal one (or the record is gone)."""
    key = keys.events(gen_id)
    last_write = time.monotonic()
    yield "retry: 2000\n\n"
    while True:
        res: Any = await service.ar.xread({key: last_id}, block=BLOCK_MS, count=100)
        if res:
            for _stream, entries in res:
                for raw_id, fields in entries:
                    last_id, event, data = _entry(raw_id, fields)
                    yield sse(event, data, last_id)
                    if event in TERMINAL_EVENTS:
                        return
            last_write = time.monotonic()
            continue
        status = await service.ar.hget(keys.generation(gen_id), "status")  # type: ignore[misc]
        if status is None:
            return  # expired or deleted: nothing more will come
        if as_str(status) in TERMINAL:
            res = await service.ar.xread({key: last_id}, block=SETTLE_MS, count=100)
            if res:
                continue  # handled by the loop above on the next pass
            # final, but its event never reached the stream (an emit lost to a Redis error): say so once, with
            # no id, so a client that reconnects still resumes from the last real entry
            raw = await service.ar.hgetall(keys.generation(gen_id))  # type: ignore[misc]
            if raw and await terminal_entry(service, gen_id) is None:
                rec = decode(raw)
                yield sse(f"generation.{rec['status']}", resource_json(await service.resource(rec)))
            return
        if time.monotonic() - last_write >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()


async def terminal_entry(service: GenerationService, gen_id: str) -> str | None:
    """The id of the stream's terminal entry (always its last one), if it has one."""
    tail: Any = await service.ar.xrevrange(keys.events(gen_id), count=1)
    if tail:
        entry_id, event, _data = _entry(*tail[0])
        if event in TERMINAL_EVENTS:
            return entry_id
    return None


def _id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


@router.get(
    "/{gen_id}/events",
    operation_id="stream_generation_events",
    response_class=StreamingResponse,
    responses={
        204: oas.success("`Last-Event-ID` is the terminal event: nothing follows (EventSource stops)"),
        200: oas.success(
            "Server-sent events named by type (`generation.started`, `generation.progress`, "
            "`generation.succeeded`, ...); `id` is the stream entry id, `data` the generation resource. "
            "The stream ends after the terminal event.",
            content={"text/event-stream": {"schema": SSE_EVENT}},
        ),
        **oas.generation_not_found(f"/v1/generations/{oas.GEN}/events"),
    },
    summary="Follow a generation live (server-sent events; resume with Last-Event-ID)",
)
async def stream_generation_events(
    gen_id: GenId,
    service: ServiceDep,
    principal: PrincipalDep,
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", openapi_examples={"id": {"value": "1700000000000-0"}},
                           description="Resume after this event id (sent automatically by EventSource)")
    ] = None,
) -> Response:
    rec = await service.record(gen_id, principal)  # owner check before the stream starts: a plain 404 problem
    if last_event_id is not None and not STREAM_ID.match(last_event_id.strip()):
        raise field_error(
            "Last-Event-ID", "must be an event id from this stream, like `1700000000000-0`", last_event_id[:64]
        )
    start = last_event_id.strip() if last_event_id else "0-0"
    if last_event_id and rec["status"] in TERMINAL:
        # EventSource reconnects whenever a stream closes; 204 is the SSE way to tell it to stop
        end = await terminal_entry(service, gen_id)
        if end is not None and _id_key(end) <= _id_key(start):
            return Response(status_code=204)
    return StreamingResponse(
        event_stream(service, gen_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )



@router.get(
    "/{gen_id}/previews/{name}",
    operation_id="get_generation_preview",
    responses={
        200: oas.success("The preview's bytes", content={m: oas.BINARY for m in ("image/webp", "image/jpeg")}),
        404: oas.problem(404, "No such generation (`generation-not-found`) or no such preview of it "
                         "(`preview-not-found`)", f"generation `{oas.GEN}` has no preview 0-5.webp",
                         "preview-not-found", f"/v1/generations/{oas.GEN}/previews/0-5.webp"),
    },
    response_class=Response,
    summary="Download a live preview too large to travel inline in its `generation.preview` event",
)
async def get_generation_preview(
    gen_id: GenId,
    name: Annotated[str, Path(max_length=32, description="`<image index>-<step>.<webp|jpeg>`, as the event's "
                              "`url` names it", openapi_examples={"name": {"value": "0-5.webp"}})],
    service: ServiceDep,
    principal: PrincipalDep,
) -> Response:
    await service.record(gen_id, principal)  # the owner's only, like its images
    missing = Problem(404, f"generation `{gen_id}` has no preview {name[:32]}", kind="preview-not-found")
    if not PREVIEW_NAME.match(name):
        raise missing
    try:
        obj = await run_in_threadpool(service.store.get, preview_key(service.settings.storage_prefix, gen_id, name))
    except ObjectNotFound as exc:
        raise missing from exc
    except StorageUnavailable as exc:
        raise Problem(503, "object storage is unavailable", kind="storage-unavailable",
                      headers={"Retry-After": "5"}) from exc
    return Response(obj.data, media_type=obj.content_type, headers={"Cache-Control": "private, max-age=3600"})
