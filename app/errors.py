"""One error format (RFC 9457 problem details) for every 4xx and 5xx, produced here and nowhere else.

The one exception: the OpenAI-compatible routes (/v1/images/...) answer OpenAI's error envelope, converted
from the same Problem in `problem_response` (app/openai_errors.py)."""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import openai_errors

log = logging.getLogger("app.errors")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:sdxl:problem:"

TITLES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Missing or invalid API key"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    408: ("request-timeout", "Request body not received in time"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    431: ("headers-too-large", "Request headers too large"),
    422: ("validation-error", "Invalid request"),
    429: ("rate-limited", "Too many requests"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


class Problem(Exception):
    """A domain error that maps to one problem-details answer."""

    def __init__(
        self,
        status: int,
        detail: str,
        kind: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        default_kind, default_title = TITLES.get(status, ("error", "Error"))
        self.status = status
        self.detail = detail
        self.kind = kind or default_kind
        self.title = title or default_title
        self.headers = headers or {}
        self.errors = errors


def field_error(field: str, message: str, value: Any) -> Problem:
    return Problem(422, f"`{field}` {message}", errors=[{"field": field, "message": message, "value": value}])


def problem_response(p: Problem, request: Request | None = None) -> JSONResponse:
    if request is not None and openai_errors.applies(request.url.path):
        return openai_errors.response(p)
    body: dict[str, Any] = {"type": TYPE_BASE + p.kind, "title": p.title, "status": p.status, "detail": p.detail}
    if request is not None:
        body["instance"] = request.url.path
    if p.errors is not None:
        body["errors"] = p.errors
    return JSONResponse(body, status_code=p.status, headers=p.headers, media_type=PROBLEM_JSON)


def _field_name(loc: tuple[Any, ...]) -> str:
    if loc[:1] == ("header",):  # header names are case-insensitive: named as they arrive (lowercase)
        return ".".join(str(x).lower() for x in loc[1:])
    parts = [str(x) for x in loc if x not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        # the echoed value must itself be valid UTF-8 (lone surrogates arrive via JSON escapes)
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value][:20]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in list(value.items())[:20]}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")[:200]
    return str(value)[:200]


def validation_problem(exc: RequestValidationError) -> Problem:
    """A 422 naming each field once, in the service's words (app/error_messages.py), with the value received."""
    from app.error_messages import merge, message

    errors = []
    for err in exc.errors():
        field = _field_name(tuple(err.get("loc", ())))
        if err.get("type") == "json_invalid":
            field, msg = "body", f"is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        else:
            msg = message(dict(err), field)
        value = _jsonable(err.get("input"))
        if isinstance(value, str) and len(value) > 200:
            value = value[:200] + "..."
        errors.append({"field": field, "message": msg, "value": value})
    errors = merge(errors)
    detail = "; ".join(f"`{e['field']}` {e['message']}" for e in errors[:5])
    return Problem(422, detail, errors=errors)


def allowed_methods(request: Request) -> str:
    """Every method the path has: Starlette's own 405 names only the first route whose path matched."""
    from fastapi.routing import iter_route_contexts

    path = request.scope.get("path", "")
    methods: set[str] = set()
    for ctx in iter_route_contexts(request.app.routes):
        regex = getattr(ctx, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(ctx, "methods", None) or ())
    return ", ".join(sorted(methods))


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return problem_response(validation_problem(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else TITLES.get(exc.status_code, ("", "Error"))[1]
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route for {request.url.path}"
        headers = dict(exc.headers or {})
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's answer for bodies json.loads itself chokes on (invalid UTF-8, nesting, huge ints)
            p = Problem(422, "`body` could not be parsed as JSON", errors=[
                {"field": "body", "message": "could not be parsed as JSON (encoding, nesting depth or number size)",
                 "value": None}])
            return problem_response(p, request)
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
            headers["Allow"] = allowed_methods(request)
        return problem_response(Problem(exc.status_code, detail, headers=headers), request)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unavailable: %s", exc)
        p = Problem(503, "the job store is unreachable; retry shortly", kind="store-unavailable",
                    headers={"Retry-After": "2"})
        return problem_response(p, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # answered from outside the middleware stack: carry the request id RequestIdMiddleware assigned
        rid = request.scope.get("state", {}).get("request_id")
        headers = {"X-Request-ID": rid} if rid else None
        return problem_response(Problem(500, "an unexpected error occurred; it has been logged", headers=headers),
                                request)
