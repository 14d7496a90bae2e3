"""Pure ASGI middleware: request ids; header, body size, body time and media type guards."""

import asyncio
import re
import secrets
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Problem, problem_response

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# RFC 9110 field values: no control characters but HTAB (h11 lets \x01-\x1f and DEL through)
CONTROL_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
IMAGE_ROUTE_TYPES = (b"application/json", b"multipart/form-data", b"image/png", b"image/jpeg", b"image/webp",
                     b"application/octet-stream")


class RequestIdMiddleware:
    """Accept a sane `X-Request-ID` or mint one; echo it on the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                candidate = v.decode("latin-1")
                rid = candidate if REQUEST_ID_RE.match(candidate) else None
        rid = rid or "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


class RequestGuardMiddleware:
    """431 for too many or too large headers; 413 over the body size limit (counted as it streams in, not
    trusting Content-Length); 415 for non-JSON; 408 when the body does not arrive within the read timeout,
    and the connection closes (a client that declares 100 bytes and sends one must not hold it)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_headers: int = 100, max_header_bytes: int = 16384,
                 read_timeout: float = 30.0, image_routes: tuple[str, ...] = (), max_image_bytes: int = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # routes that carry images: their own (larger) limit, and multipart or raw image bodies besides JSON;
        # JSON without an image is held to `max_bytes` there too, once parsed (app/image_inputs.py)
        self.image_routes = frozenset(image_routes)
        self.max_image_bytes = max(max_image_bytes, max_bytes)
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope["headers"]
        if len(raw) > self.max_headers:
            await self._reject(scope, send, Problem(
                431, f"{len(raw)} request headers exceed the limit of {self.max_headers} (SDXL_MAX_HEADERS)"))
            return
        for k, v in raw:
            if CONTROL_RE.search(v):
                await self._reject(scope, send, Problem(
                    400, f"header {k.decode('latin-1')!r} holds a control character", kind="bad-header"))
                return
        size = sum(len(k) + len(v) for k, v in raw)
        if size > self.max_header_bytes:
            await self._reject(scope, send, Problem(
                431, f"request headers of {size} bytes exceed the limit of {self.max_header_bytes} bytes "
                     "(SDXL_MAX_HEADER_BYTES)"))
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(raw)
        images = scope["path"].rstrip("/") in self.image_routes
        max_bytes = self.max_image_bytes if images else self.max_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            await self._reject(scope, send, Problem(413, f"request body exceeds {max_bytes} bytes"))
            return
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        has_body = length not in (None, b"0") or b"transfer-encoding" in headers
        accepted = IMAGE_ROUTE_TYPES if images else (b"application/json",)
        if has_body and ctype not in accepted:
            names = " or ".join(t.decode() for t in accepted)
            await self._reject(
                scope, send,
                Problem(415, f"Content-Type must be {names}, not {ctype.decode('latin-1') or 'absent'!r}"),
            )
            return
        received = 0
        body_done = False
        deadline = time.monotonic() + self.read_timeout

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives only watch for a disconnect (long-polls): no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                raise _Refused(408, f"the request body did not arrive within {self.read_timeout:g} s "
                                    "(SDXL_BODY_READ_TIMEOUT_SECONDS)", headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise _Refused(413, f"request body exceeds {max_bytes} bytes")
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except _Refused as exc:
            await self._reject(scope, send, Problem(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    async def _reject(self, scope: Scope, send: Send, problem: Problem) -> None:
        from starlette.requests import Request

        response = problem_response(problem, Request(scope))
        await response(scope, _noop_receive, send)


class _Refused(HTTPException):
    """Raised from receive(). An HTTPException, because FastAPI's body reader passes those on to the error
    handlers and turns any other exception into a generic 400 (which would hide the 413 or 408)."""


async def _noop_receive() -> Any:
    return {"type": "http.disconnect"}
