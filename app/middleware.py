"""Pure ASGI middleware: request ids, body size and media type guards (cheap on the hot path)."""

import re
import secrets
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Problem, problem_response

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


class BodyGuardMiddleware:
    """413 over the size limit (counted as it streams in, not trusting Content-Length); 415 for non-JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._reject(scope, send, Problem(413, f"request body exceeds {self.max_bytes} bytes"))
            return
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        has_body = length not in (None, b"0") or b"transfer-encoding" in headers
        if has_body and ctype != b"application/json":
            await self._reject(
                scope, send,
                Problem(415, f"Content-Type must be application/json, not {ctype.decode('latin-1') or 'absent'!r}"),
            )
            return
        received = 0

        async def guarded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except _TooLarge:
            await self._reject(scope, send, Problem(413, f"request body exceeds {self.max_bytes} bytes"))

    async def _reject(self, scope: Scope, send: Send, problem: Problem) -> None:
        from starlette.requests import Request

        response = problem_response(problem, Request(scope))
        await response(scope, _noop_receive, send)


class _TooLarge(HTTPException):
    """Raised from receive(). An HTTPException, because FastAPI's body reader passes those on to the error
    handlers and turns any other exception into a generic 400 (which would hide the 413)."""


async def _noop_receive() -> Any:
    return {"type": "http.disconnect"}
