"""HTTP routes for /v1/generations."""

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from app import openapi as oas
from app.auth import Principal
from app.deps import PrincipalDep, ServiceDep, SettingsDep
from app.errors import Problem, field_error
from app.generations import GenerationService
from app.idempotency import create_once
from app.image_inputs import read_generation_request
from app.listing import list_generations as list_page
from app.schemas import Generation, GenerationCreate, GenerationList
from common.contract.params import OutputFormat
from common.contract.status import TERMINAL_STATUSES

router = APIRouter(prefix="/v1/generations", tags=["generations"], responses=oas.V1)

IMAGE_ACCEPT = {"image/png": OutputFormat.png, "image/webp": OutputFormat.webp, "image/jpeg": OutputFormat.jpeg}
PREFER_WAIT = re.compile(r"(?:^|[;,\s])wait\s*=\s*(\d+)")
GenId = Annotated[str, Path(description="Generation id", max_length=64,
                             openapi_examples={"id": {"value": "gen_3q2Vd0yq8zS0mN6pW1xYbA"}})]


def prefer_wait(prefer: str | None, max_wait: int) -> int | None:
    if not prefer:
        return None
    m = PREFER_WAIT.search(prefer)
    if not m:
        return None
    return min(int(m.group(1)), max_wait)


@router.post(
    "",
    operation_id="create_generation",
    status_code=202,
    response_model=Generation,
    responses={
        200: oas.success("Replay: this Idempotency-Key already created it", "Location", "Idempotent-Replayed",
                         model=Generation, links=oas.GENERATION_LINKS),
        201: oas.success("Finished within `Prefer: wait`", "Location", "Preference-Applied",
                         model=Generation, links=oas.GENERATION_LINKS),
        202: oas.success("Queued (or still unfinished when `Prefer: wait` ran out); follow `Location`", "Location",
                         links=oas.GENERATION_LINKS),
        **oas.BODY,
        409: oas.problem(
            409,
            "This `Idempotency-Key` was used with a different body (`idempotency-key-reused`), or its first "
            "request is still being processed (`idempotency-key-in-use`, with `Retry-After`)",
            "this Idempotency-Key was already used with a different request body; use a new key for a different "
            "request",
            "idempotency-key-reused",
        ),
    },
    summary="Generate images from a prompt (and optionally an image and a mask)",
    openapi_extra=oas.generation_request_body(),
)
async def create_generation(
    request: Request,
    service: ServiceDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    prefer: Annotated[str | None, Header(alias="Prefer", openapi_examples={"wait": {"value": "wait=30"}},
                                         description="`wait=N` (N <= 60): answer 201 when done within N s")] = None,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key",
        description="Repeat-safe submit: the same key and body return the first generation (200), a different "
                    "body 409. Scoped to the API key; kept as long as the generation.", max_length=255,
        json_schema_extra={"pattern": r"^[\x20-\x7e]{1,255}$"})] = None,  # documents app.idempotency.KEY_RE
    accept: Annotated[str | None, Header(
        alias="Accept", description="`image/png`, `image/webp`, `image/jpeg` or `image/*` with `Prefer: wait`: "
                                    "a single image that finishes in time comes back as its bytes (201)")] = None,
) -> Response:
    body, files, fingerprinted = await read_generation_request(request, settings, GenerationCreate)
    image_type = wanted_image_type(accept)
    if image_type is not None:
        body = with_accepted_format(body, image_type)
    request_id = getattr(request.state, "request_id", None)
    replayed = False
    if idempotency_key is None:
        resource = await service.create(body, principal, request_id, files=files)
    else:
        resource, replayed = await create_once(service, body, principal, request_id, idempotency_key,
                                               fingerprinted, files=files)
    headers = {"Location": service.location(resource["id"])}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    wait = prefer_wait(prefer, settings.max_wait_seconds)
    if wait:
        # the resource was just created (or read, on a replay) for this principal: no second read first
        resource = await service.wait(resource["id"], principal, wait, created=resource)
        if resource["status"] in TERMINAL_STATUSES:
            headers["Preference-Applied"] = f"wait={wait}"
            status = 200 if replayed else 201
            if image_type is not None and resource["status"] == "succeeded" and len(resource["images"]) == 1:
                return await image_answer(service, principal, resource, headers, status)
            return JSONResponse(resource, status_code=status, headers=headers)
    return JSONResponse(resource, status_code=200 if replayed else 202, headers=headers)


def wanted_image_type(accept: str | None) -> str | None:
    """The image type `Accept` prefers over JSON (`image/*` -> whatever the request's format is), or None."""
    if not accept:
        return None
    ranges = []
    for i, part in enumerate(accept.split(",")):
        media, *params = (x.strip() for x in part.split(";"))
        q = 1.0
        for param in params:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        ranges.append((-q, i, media.lower()))
    for _q, _i, media in sorted(ranges):
        if media in IMAGE_ACCEPT or media == "image/*":
            return media
        if media in ("application/json", "*/*", "application/*"):
            return None
    return None


def with_accepted_format(body: GenerationCreate, image_type: str) -> GenerationCreate:
    """`Accept: image/webp` sets the output format, unless the body names another one (then 422: no guessing)."""
    if image_type == "image/*":
        return body
    fmt = IMAGE_ACCEPT[image_type]
    if "output_format" in body.model_fields_set and body.output_format != fmt:
        raise field_error("output_format", f"is {body.output_format.value} but Accept asks for {image_type}",
                          body.output_format.value)
    return body.model_copy(update={"output_format": fmt})


async def image_answer(service: GenerationService, principal: Principal, resource: dict[str, Any],
                       headers: dict[str, str], status: int) -> Response:
    """One call, image out: the bytes, and what identifies them in headers (the JSON stays one GET away)."""
    img = resource["images"][0]
    result = await service.image(resource["id"], 0, principal, redirect=False)
    assert not isinstance(result, str)  # redirect=False: always the bytes
    data, content_type = result
    headers = {**headers, "X-Generation-Id": resource["id"], "X-Seed": str(img["seed"]),
               "X-Image-Sha256": img["sha256"], "Cache-Control": "private, max-age=3600"}
    return Response(data, status_code=status, media_type=content_type, headers=headers)


@router.get(
    "",
    operation_id="list_generations",
    response_model=GenerationList,
    responses={200: oas.success("One page of this key's generations, newest first")},
    summary="List this API key's generations, newest first",
)
async def list_generations(
    service: ServiceDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size")] = 20,
    cursor: Annotated[str | None, Query(max_length=200, description="`next_cursor` of the previous page")] = None,
    status: Annotated[
        Literal["queued", "running", "succeeded", "failed", "canceled"] | None, Query(description="Only this status")
    ] = None,
) -> dict[str, Any]:
    return await list_page(service, principal, limit, cursor, status)


@router.get(
    "/{gen_id}",
    operation_id="get_generation",
    response_model=Generation,
    responses={200: oas.success("The generation (final, or the state when `Prefer: wait` ran out)"),
               **oas.generation_not_found()},
    summary="Read a generation (optionally long-poll with Prefer: wait=N)",
)
async def get_generation(
    gen_id: GenId,
    service: ServiceDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    prefer: Annotated[str | None, Header(alias="Prefer", openapi_examples={"wait": {"value": "wait=30"}},
                                         description="`wait=N`: answer when final or after N s")] = None,
) -> dict[str, Any]:
    wait = prefer_wait(prefer, settings.max_wait_seconds)
    if wait:
        return await service.wait(gen_id, principal, wait)
    return await service.get(gen_id, principal)


@router.post(
    "/{gen_id}/cancel",
    operation_id="cancel_generation",
    status_code=202,
    response_model=Generation,
    responses={
        202: oas.success("Cancellation accepted: `canceled` at once if it was queued, within a step if it was "
                         "running, unchanged if it was already canceled"),
        **oas.BODY,
        **oas.generation_not_found(f"/v1/generations/{oas.GEN}/cancel"),
        409: oas.problem(409, "The generation already succeeded or failed (`generation-final`)",
                         f"generation `{oas.GEN}` already succeeded; it cannot be canceled", "generation-final",
                         f"/v1/generations/{oas.GEN}/cancel"),
    },
    summary="Cancel a queued or running generation",
)
async def cancel_generation(gen_id: GenId, service: ServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    return await service.cancel(gen_id, principal)


@router.delete(
    "/{gen_id}",
    operation_id="delete_generation",
    status_code=204,
    response_class=Response,
    responses={204: oas.success("Done; no content"), **oas.generation_not_found()},
    summary="Delete a generation and its images (a queued or running one is canceled first)",
)
async def delete_generation(gen_id: GenId, service: ServiceDep, principal: PrincipalDep) -> Response:
    await service.delete(gen_id, principal)
    return Response(status_code=204)


@router.get(
    "/{gen_id}/images/{index}",
    operation_id="get_generation_image",
    responses={
        200: oas.success("The image bytes", content={m: oas.BINARY for m in ("image/png", "image/webp", "image/jpeg")}),
        307: oas.success("Redirect to a presigned object-store URL", "Location"),
        404: oas.problem(404, "No such generation (`generation-not-found`) or no such image of it (`image-not-found`)",
                         f"generation `{oas.GEN}` has no image 0", "image-not-found",
                         f"/v1/generations/{oas.GEN}/images/0"),
    },
    response_class=Response,
    summary="Download one image",
)
async def get_generation_image(
    gen_id: GenId,
    index: Annotated[int, Path(ge=0, le=64)],
    service: ServiceDep,
    principal: PrincipalDep,
) -> Response:
    result = await service.image(gen_id, index, principal)
    if isinstance(result, str):
        return RedirectResponse(result, status_code=307)
    data, content_type = result
    return Response(data, media_type=content_type, headers={"Cache-Control": "private, max-age=3600"})


__all__ = ["router", "Problem"]
