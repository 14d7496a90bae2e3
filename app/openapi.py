"""The published OpenAPI document, declared where FastAPI builds it.

`create_app` passes the info, servers and tags to `FastAPI(...)` and the responses every operation can answer
(`EVERY_ROUTE`); the routers pass what their routes answer (`V1`, `BODY`, the `success`/`problem` helpers);
`app.auth.authenticate` depends on an `HTTPBearer`, so each keyed operation carries its security requirement.
Every error is RFC 9457 problem+json: FastAPI's own 422 shape never appears because each route with
parameters declares 422 itself. `install` adds only what is not declared (see there).
`make openapi` writes the result to openapi/openapi.json; tests/unit/test_openapi.py keeps the two equal and lints it.
"""

from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.models import Schema

from app.errors import PROBLEM_JSON, TITLES, TYPE_BASE
from app.schemas import GenerationCreate, ProblemDetails

TITLE = "SDXL inference service"
VERSION = "1.0.0"
SUMMARY = "Text to image with Stable Diffusion XL: queued, resident GPU workers, durable results."
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
    {"name": "adapters", "description": "The LoRA adapters and few-step presets a generation may use"},
    {"name": "usage", "description": "Your API key's images and GPU time per UTC day, and its daily quota"},
    {"name": "health", "description": "Probes for orchestrators and load balancers (no key needed)"},
]
SERVERS = [{"url": "http://127.0.0.1:8000", "description": "`make run` on this machine; deployments use their own"}]
LICENSE = {"name": "Apache-2.0", "identifier": "Apache-2.0"}

GEN = "gen_3q2Vd0yq8zS0mN6pW1xYbA"
PROBLEM_REF = {"$ref": "#/components/schemas/ProblemDetails"}
PUBLIC: dict[str, Any] = {"security": []}  # openapi_extra of a route that needs no key

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
        "example": f"/v1/generations/{GEN}",
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
RETRY_AFTER_CODES = {429, 503}


def _headers(*names: str) -> dict[str, dict[str, Any]]:
    return {name: HEADERS[name] for name in names}


def problem(
    status: int,
    description: str,
    detail: str,
    kind: str | None = None,
    instance: str = "/v1/generations",
    headers: tuple[str, ...] = (),
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One problem+json response: `X-Request-ID` always, `Retry-After` where the status implies a wait."""
    default_kind, title = TITLES.get(status, ("error", "Error"))
    example: dict[str, Any] = {
        "type": TYPE_BASE + (kind or default_kind),
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    if errors is not None:
        example["errors"] = errors
    names = ("X-Request-ID", *(("Retry-After",) if status in RETRY_AFTER_CODES else ()), *headers)
    return {
        "description": description,
        "headers": _headers(*names),
        "content": {PROBLEM_JSON: {"schema": PROBLEM_REF, "example": example}},
    }


STANDARD: dict[int, dict[str, Any]] = {
    401: problem(
        401,
        "No API key, a malformed `Authorization` header, or an unknown key",
        "this API needs a key: send `Authorization: Bearer <key>`",
        headers=("WWW-Authenticate",),
    ),
    408: problem(
        408,
        "The request body did not arrive within `SDXL_BODY_READ_TIMEOUT_SECONDS`; the connection is closed",
        "the request body did not arrive within 30 s (SDXL_BODY_READ_TIMEOUT_SECONDS)",
    ),
    413: problem(
        413,
        "The request body is over the deployment's limit (`SDXL_MAX_BODY_BYTES`)",
        "request body exceeds 65536 bytes",
    ),
    415: problem(
        415,
        "A request body that is not `application/json`",
        "Content-Type must be application/json, not 'text/plain'",
    ),
    422: problem(
        422,
        "A parameter or body field is invalid; `errors` names each field, its value and why",
        "`width` must be a multiple of 8 but is 1001",
        errors=[{"field": "width", "message": "must be a multiple of 8 but is 1001", "value": 1001}],
    ),
    429: problem(
        429,
        "The key is over its request rate (`rate-limited`), has as many unfinished generations as it may "
        "(`too-many-unfinished`), or a submit would go over its daily image quota (`daily-quota-exceeded`: "
        "`Retry-After` is the next UTC midnight); wait `Retry-After` seconds",
        "API key 'team-a' is over its rate limit of 600 requests per minute (burst 20); retry in 1 s",
        headers=RATE_LIMIT_HEADERS,
    ),
    431: problem(
        431,
        "More request headers than `SDXL_MAX_HEADERS`, or more header bytes than `SDXL_MAX_HEADER_BYTES`",
        "request headers of 20480 bytes exceed the limit of 16384 bytes (SDXL_MAX_HEADER_BYTES)",
    ),
    500: problem(
        500,
        "An unexpected error; it was logged with the request id (no details are disclosed)",
        "an unexpected error occurred; it has been logged",
    ),
    503: problem(
        503,
        "The job store or object storage is unreachable (`store-unavailable`, "
        "`storage-unavailable`), or the queue is full (`queue-full`); retry after `Retry-After` seconds",
        "the job store is unreachable; retry shortly",
    ),
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: STANDARD[code] for code in codes}


# FastAPI(responses=...): RequestGuardMiddleware's header limit runs before routing; the catch-all handler answers 500
EVERY_ROUTE = problems(431, 500)
# APIRouter(responses=...) of the /v1 routers: each route needs a key, takes parameters and reads Redis
V1 = problems(401, 422, 429, 503)
# a route that takes a request body can meet RequestGuardMiddleware's body guard
BODY = problems(408, 413, 415)


def generation_not_found(instance: str = f"/v1/generations/{GEN}") -> dict[int | str, dict[str, Any]]:
    return {
        404: problem(
            404,
            "No such generation: unknown, another key's, expired or deleted (`generation-not-found`)",
            f"generation `{GEN}` does not exist",
            "generation-not-found",
            instance,
        )
    }


def success(description: str, *headers: str, keyed: bool = True, **fields: Any) -> dict[str, Any]:
    """A 2xx or 3xx response: `X-Request-ID` always, the `RateLimit-*` headers on routes that take a key."""
    names = ("X-Request-ID", *(RATE_LIMIT_HEADERS if keyed else ()), *headers)
    return {"description": description, "headers": _headers(*names), **fields}


# OpenAPI links from a new generation to what can be done with it (clients and stateful fuzzers follow them)
GENERATION_LINKS: dict[str, Any] = {
    op_id: {"operationId": op_id, "parameters": {"gen_id": "$response.body#/id"}}
    for op_id in (
        "get_generation",
        "cancel_generation",
        "delete_generation",
        "stream_generation_events",
        "list_generation_webhook_attempts",
    )
}
BINARY = {"schema": {"type": "string", "format": "binary"}}

# FastAPI registers a response model's schema only under the route's own media type (application/json), never
# under problem+json: ProblemDetails (and FieldError, which it uses) are registered here instead, encoded as
# FastAPI encodes its own schemas (a `None` default is left out)
_problem_schema = ProblemDetails.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
PROBLEM_SCHEMAS: dict[str, Any] = {
    name: jsonable_encoder(Schema(**schema), by_alias=True, exclude_none=True)
    for name, schema in {"ProblemDetails": _problem_schema, **_problem_schema.pop("$defs", {})}.items()
}

# Routes that take JSON or multipart/form-data read their body themselves (app/image_inputs.py), so FastAPI sees
# no body model: their request schemas are registered here, encoded the same way, and the bodies declared below.
_schemas_of = [GenerationCreate.model_json_schema(ref_template="#/components/schemas/{model}")]
REQUEST_SCHEMAS: dict[str, Any] = {}
for _schema in _schemas_of:
    REQUEST_SCHEMAS.update({name: jsonable_encoder(Schema(**s), by_alias=True, exclude_none=True)
                            for name, s in {_schema.get("title", ""): _schema, **_schema.pop("$defs", {})}.items()})
BINARY_PART = {"type": "string", "format": "binary"}


def generation_request_body() -> dict[str, Any]:
    """POST /v1/generations: JSON, or multipart with the images as file parts and the rest as a JSON part."""
    ref = {"$ref": "#/components/schemas/GenerationCreate"}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": ref},
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["request"], "properties": {
                "request": {**ref, "description": "Every field but the images, as JSON"},
                "image": {**BINARY_PART, "description": "The input image (PNG, JPEG or WebP)"},
                "mask_image": {**BINARY_PART, "description": "Inpainting mask: white is repainted"},
            }},
            "encoding": {"request": {"contentType": "application/json"}},
        },
    }}}


# Canonical header names and examples: declarable in the route signatures (Header(alias=..., example=...)), which
# this module's change leaves alone; until they carry them, (in, name) -> what is set here
def install(app: FastAPI) -> None:
    """Serve FastAPI's document plus the one thing declarations cannot give: the problem schemas (FastAPI adds a
    model's schema under the route's own media type only, never under application/problem+json)."""

    def openapi() -> dict[str, Any]:
        doc = FastAPI.openapi(app)  # cached by FastAPI until the routes change; the additions below are idempotent
        doc.setdefault("components", {}).setdefault("schemas", {}).update({**REQUEST_SCHEMAS, **PROBLEM_SCHEMAS})
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
