"""The published OpenAPI document: FastAPI's generated schema plus what it cannot see in the route signatures.

FastAPI knows the parameters and models; it does not know that every error is RFC 9457 problem+json (it invents
its own 422 shape), which routes need a key, or which headers the middleware adds. Those rules are stated once
here, derived from the routes themselves (a route that depends on `authenticate` is secured and rate-limited;
a POST can meet the body guard), so a route added later gets them without remembering to. `make openapi`
writes the result to openapi/openapi.json; tests/test_openapi.py keeps the two equal and lints the file.
"""

import copy
import http
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts

from app.auth import authenticate
from app.errors import PROBLEM_JSON, TITLES, TYPE_BASE

SECURITY_SCHEME = "apiKey"
PROBLEM_REF = {"$ref": "#/components/schemas/ProblemDetails"}
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")

DESCRIPTION = """\
Text-to-image generation with Stable Diffusion XL. A request is queued and answered at once (`202` with a
`Location`); resident GPU workers take jobs in fair-share order and store the images. Follow a generation by
polling `GET /v1/generations/{gen_id}` (optionally long-polling with `Prefer: wait=N`), by server-sent events,
or by webhooks.

**Errors.** Every 4xx and 5xx answer is `application/problem+json` (RFC 9457) with a `type` that is stable per
kind of error (`urn:sdxl:problem:<kind>`), so clients branch on `type`, never on `detail`. Unknown paths answer
`404` (`urn:sdxl:problem:not-found`) and known paths with another method `405`
(`urn:sdxl:problem:method-not-allowed`, with `Allow`).

**Request ids.** Every answer carries `X-Request-ID`; a client may send its own (1-128 of `A-Za-z0-9._:-`) to
correlate logs, otherwise the service mints one.

**Limits.** With API keys configured, each key has a request rate (`429` with `Retry-After` and `RateLimit-*`
headers) and a cap on unfinished generations; a full queue answers `503` with `Retry-After`. Deployment limits
(image size, steps, images per prompt, body size) are settings, so a request that fits this schema can still
answer `422` naming the field and the limit.
"""

TAGS = [
    {"name": "generations", "description": "Submit, follow, download, cancel and delete generations"},
    {"name": "webhooks", "description": "What happened to a generation's webhook deliveries"},
    {"name": "health", "description": "Probes for orchestrators and load balancers (no key needed)"},
]
SERVERS = [{"url": "http://127.0.0.1:8000", "description": "`make run` on this machine; deployments use their own"}]
LICENSE = {"name": "Apache-2.0", "identifier": "Apache-2.0"}

HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The request's id (the client's own `X-Request-ID` when it sent a valid one); quote it in "
        "reports, it is in every log line of the request",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        "example": "req_5f2b8c1d9e0a4b7c",
    },
    "RateLimit-Limit": {
        "description": "Requests the key may make at once (its bucket size); present when the key is rate-limited",
        "schema": {"type": "integer", "minimum": 0},
        "example": 1000,
    },
    "RateLimit-Remaining": {
        "description": "Requests left in the key's bucket after this one",
        "schema": {"type": "integer", "minimum": 0},
        "example": 999,
    },
    "RateLimit-Reset": {
        "description": "Seconds until the key's bucket is full again",
        "schema": {"type": "integer", "minimum": 0},
        "example": 1,
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer", "minimum": 0},
        "example": 2,
    },
    "Location": {
        "description": "URL of the generation resource",
        "required": True,
        "schema": {"type": "string"},
        "example": "/v1/generations/gen_3q2Vd0yq8zS0mN6pW1xYbA",
    },
    "WWW-Authenticate": {
        "description": "The bearer challenge (RFC 6750), with `error` when a key was sent but refused",
        "required": True,
        "schema": {"type": "string"},
        "example": 'Bearer realm="sdxl", error="invalid_token"',
    },
    "Idempotent-Replayed": {
        "description": "`true`: this `Idempotency-Key` already created the generation; nothing new was queued",
        "required": True,
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Preference-Applied": {
        "description": "The `Prefer: wait=N` that was honoured",
        "required": True,
        "schema": {"type": "string"},
        "example": "wait=30",
    },
}
RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")

# Problems every route of a kind can answer, shared as components/responses: name, description, example detail
STANDARD: dict[int, tuple[str, str, str]] = {
    401: (
        "Unauthorized",
        "No API key, a malformed `Authorization` header, or an unknown key",
        "this API needs a key: send `Authorization: Bearer <key>`",
    ),
    408: (
        "RequestTimeout",
        "The request body did not arrive within `SDXL_BODY_READ_TIMEOUT_SECONDS`; the connection is closed",
        "the request body did not arrive within 30 s (SDXL_BODY_READ_TIMEOUT_SECONDS)",
    ),
    413: (
        "PayloadTooLarge",
        "The request body is over the deployment's limit (`SDXL_MAX_BODY_BYTES`)",
        "request body exceeds 65536 bytes",
    ),
    415: (
        "UnsupportedMediaType",
        "A request body that is not `application/json`",
        "Content-Type must be application/json, not 'text/plain'",
    ),
    431: (
        "HeadersTooLarge",
        "More request headers than `SDXL_MAX_HEADERS`, or more header bytes than `SDXL_MAX_HEADER_BYTES`",
        "request headers of 20480 bytes exceed the limit of 16384 bytes (SDXL_MAX_HEADER_BYTES)",
    ),
    422: (
        "ValidationFailed",
        "A parameter or body field is invalid; `errors` names each field, its value and why",
        "`width` must be a multiple of 8 but is 1000",
    ),
    429: (
        "TooManyRequests",
        "The key is over its request rate (`rate-limited`) or has as many unfinished "
        "generations as it may (`too-many-unfinished`); wait `Retry-After` seconds",
        "API key 'team-a' is over its rate limit of 600 requests per minute (burst 20); retry in 1 s",
    ),
    500: (
        "InternalError",
        "An unexpected error; it was logged with the request id (no details are disclosed)",
        "an unexpected error occurred; it has been logged",
    ),
    503: (
        "Unavailable",
        "The job store or object storage is unreachable (`store-unavailable`, "
        "`storage-unavailable`), or the queue is full (`queue-full`); retry after `Retry-After` seconds",
        "the job store is unreachable; retry shortly",
    ),
}
RETRY_AFTER_CODES = {429, 503}


def install(app: FastAPI) -> None:
    """Serve the finished document at /openapi.json (and to `scripts/export_openapi.py`)."""
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        raw = FastAPI.openapi(app)  # FastAPI's own, cached until the routes change
        if cache.get("raw") is not raw:
            cache["raw"], cache["doc"] = raw, finish(app, copy.deepcopy(raw))
        return cache["doc"]  # type: ignore[no-any-return]

    app.openapi = openapi  # type: ignore[method-assign]


def _needs_key(route: RouteContext) -> bool:
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if dep.call is authenticate:
            return True
        stack.extend(dep.dependencies)
    return False


def _problem_example(code: int, kind: str | None, detail: str, instance: str = "/v1/generations") -> dict[str, Any]:
    default_kind, title = TITLES.get(code, ("error", "Error"))
    return {
        "type": TYPE_BASE + (kind or default_kind),
        "title": title,
        "status": code,
        "detail": detail,
        "instance": instance,
    }


def _header_refs(*names: str) -> dict[str, Any]:
    return {n: {"$ref": f"#/components/headers/{n}"} for n in names}


def _standard_responses() -> dict[str, Any]:
    out = {}
    for code, (name, description, detail) in STANDARD.items():
        headers = ["X-Request-ID"]
        if code in RETRY_AFTER_CODES:
            headers.append("Retry-After")
        if code == 401:
            headers.append("WWW-Authenticate")
        if code == 429:
            headers += RATE_LIMIT_HEADERS
        example = _problem_example(code, None, detail)
        if code == 422:
            example["errors"] = [{"field": "width", "message": "must be a multiple of 8 but is 1000", "value": 1000}]
        out[name] = {
            "description": description,
            "headers": _header_refs(*headers),
            "content": {PROBLEM_JSON: {"schema": PROBLEM_REF, "example": example}},
        }
    return out


def _is_default_description(code: int, text: str | None) -> bool:
    """FastAPI fills an undescribed response with the status phrase; ours then says it better."""
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return not text or text in (phrase, "Validation Error", "Additional Response", "Successful Response")


GEN = "gen_3q2Vd0yq8zS0mN6pW1xYbA"
# Problems whose meaning depends on the operation: (operation id or "*", status) -> description, kind, detail
SPECIFIC: dict[tuple[str, int], tuple[str, str, str]] = {
    ("*", 404): (
        "No such generation: unknown, another key's, expired or deleted (`generation-not-found`)",
        "generation-not-found",
        f"generation `{GEN}` does not exist",
    ),
    ("get_generation_image", 404): (
        "No such generation (`generation-not-found`) or no such image of it (`image-not-found`)",
        "image-not-found",
        f"generation `{GEN}` has no image 0",
    ),
    ("create_generation", 409): (
        "This `Idempotency-Key` was used with a different body (`idempotency-key-reused`), or its first request "
        "is still being processed (`idempotency-key-in-use`, with `Retry-After`)",
        "idempotency-key-reused",
        "this Idempotency-Key was already used with a different request body; use a new key for a different request",
    ),
    ("cancel_generation", 409): (
        "The generation already succeeded or failed (`generation-final`)",
        "generation-final",
        f"generation `{GEN}` already succeeded; it cannot be canceled",
    ),
    ("readyz", 503): ("", "not-ready", "Redis is unreachable (ConnectionError): this replica cannot take work"),
}


def _problem_response(op_id: str, code: int, declared: dict[str, Any] | None, instance: str) -> dict[str, Any]:
    specific = SPECIFIC.get((op_id, code)) or SPECIFIC.get(("*", code))
    described = declared is not None and not _is_default_description(code, declared.get("description"))
    if code in STANDARD and not described and specific is None:
        return {"$ref": f"#/components/responses/{STANDARD[code][0]}"}
    description, kind, detail = specific or ("", None, TITLES.get(code, ("", "Error"))[1])
    if described:
        description = declared["description"]  # type: ignore[index]
    headers = ["X-Request-ID"]
    if code in RETRY_AFTER_CODES:
        headers.append("Retry-After")
    return {
        "description": description or TITLES.get(code, ("", "Error"))[1],
        "headers": _header_refs(*headers),
        "content": {PROBLEM_JSON: {"schema": PROBLEM_REF, "example": _problem_example(code, kind, detail, instance)}},
    }


def _problem_codes(route: RouteContext, method: str, op: dict[str, Any], secured: bool) -> set[int]:
    """Every error status this operation can answer: declared by the route, plus what the stack adds."""
    codes = {int(c) for c in op.get("responses", {}) if c.isdigit() and int(c) >= 400}
    codes.add(500)
    if route.path != "/healthz":
        codes.add(503)  # everything else reads Redis
    if secured:
        codes |= {401, 429}
    codes.add(431)  # app.middleware.RequestGuardMiddleware, before routing
    if method in ("post", "put", "patch"):
        codes |= {408, 413, 415}
    if op.get("parameters") or op.get("requestBody"):
        codes.add(422)
    return codes


def _tidy_parameters(op: dict[str, Any]) -> None:
    canonical = {"prefer": "Prefer", "idempotency-key": "Idempotency-Key", "last-event-id": "Last-Event-ID"}
    examples = {
        "Prefer": "wait=30",
        "Last-Event-ID": "1700000000000-0",
        "gen_id": "gen_3q2Vd0yq8zS0mN6pW1xYbA",
    }
    for param in op.get("parameters", []):
        if param.get("in") == "header":
            param["name"] = canonical.get(param["name"], param["name"])
        if param["name"] in examples and "example" not in param:
            param["example"] = examples[param["name"]]


SUCCESS = {
    ("create_generation", "202"): "Queued (or still unfinished when `Prefer: wait` ran out); follow `Location`",
    ("cancel_generation", "202"): "Cancellation accepted: `canceled` at once if it was queued, within a step "
    "if it was running, unchanged if it was already canceled",
    ("get_generation", "200"): "The generation (final, or the state when `Prefer: wait` ran out)",
    ("list_generations", "200"): "One page of this key's generations, newest first",
    ("list_generation_webhook_attempts", "200"): "Every delivery attempt, oldest first",
    ("healthz", "200"): "The process is alive",
    ("readyz", "200"): "Ready: Redis answers; the workers are listed with their states",
    ("*", "202"): "Accepted",
    ("*", "204"): "Done; no content",
}


def _links() -> dict[str, Any]:
    """OpenAPI links from a generation to what can be done with it (clients and stateful fuzzers follow them)."""
    gen = {"gen_id": "$response.body#/id"}
    targets = {
        "get_generation": ("get_generation", gen),
        "cancel_generation": ("cancel_generation", gen),
        "delete_generation": ("delete_generation", gen),
        "stream_generation_events": ("stream_generation_events", gen),
        "list_generation_webhook_attempts": ("list_generation_webhook_attempts", gen),
    }
    return {name: {"operationId": op_id, "parameters": params} for name, (op_id, params) in targets.items()}


def finish(app: FastAPI, doc: dict[str, Any]) -> dict[str, Any]:
    doc["info"]["description"] = DESCRIPTION
    doc["info"]["license"] = LICENSE
    doc["servers"] = SERVERS
    doc["tags"] = TAGS
    doc["security"] = [{SECURITY_SCHEME: []}]
    components = doc.setdefault("components", {})
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <key>` with a key from `python -m cli.apikeys create NAME`. A "
            "deployment with no keys configured (loopback only, or `SDXL_ALLOW_OPEN`) accepts requests without it.",
        }
    }
    components["headers"] = HEADERS
    components["responses"] = _standard_responses()
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape: we answer problem+json
        schemas.pop(name, None)

    ops_ids = {op_id for item in doc["paths"].values() for m, op in item.items() if (op_id := op.get("operationId"))}
    routes = {  # routers are included lazily: the contexts carry each route's full path
        (ctx.path_format, m.lower()): ctx
        for ctx in iter_route_contexts(app.routes)
        if isinstance(ctx.original_route, APIRoute)
        for m in ctx.methods or ()
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            route = routes[(path, method)]
            op_id = op.get("operationId", "")
            secured = _needs_key(route)
            if not secured:
                op["security"] = []
            _tidy_parameters(op)
            responses = op.setdefault("responses", {})
            instance = path.replace("{gen_id}", "gen_3q2Vd0yq8zS0mN6pW1xYbA").replace("{index}", "0")
            for code in sorted(_problem_codes(route, method, op, secured)):
                responses[str(code)] = _problem_response(op_id, code, responses.get(str(code)), instance)
            for code, resp in responses.items():
                if "$ref" in resp or not code.isdigit() or int(code) >= 400:
                    continue
                if _is_default_description(int(code), resp.get("description")):
                    resp["description"] = SUCCESS.get((op_id, code)) or SUCCESS.get(("*", code), "OK")
                names = ["X-Request-ID", *(RATE_LIMIT_HEADERS if secured else ())]
                if op.get("operationId") == "create_generation":
                    names.append("Location")
                    names += {"200": ["Idempotent-Replayed"], "201": ["Preference-Applied"]}.get(code, [])
                    resp["links"] = {k: v for k, v in _links().items() if v["operationId"] in ops_ids}
                if code == "307":
                    names.append("Location")
                for media in resp.get("content", {}).values():
                    media.setdefault("schema", {"type": "string", "format": "binary"})  # image bytes
                resp["headers"] = {**_header_refs(*names), **resp.get("headers", {})}
    return doc
