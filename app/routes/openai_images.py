"""OpenAI-compatible images routes (docs/openai.md): POST /v1/images/generations and /v1/images/edits, and the
signed image URLs their `response_format: url` answers point to. Logic: app/openai_images.py.

The /v1/images routes answer OpenAI's error envelope (app/openai_errors.py), so their error responses are
declared here in that shape instead of the problem+json the other routers share.
"""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from app import openapi as oas
from app.deps import PrincipalDep, ServiceDep, SettingsDep
from app.errors import Problem
from app.generations import GenerationService
from app.image_inputs import MULTIPART, media_type
from app.openai_errors import error_type
from app.openai_images import OpenAIImages, edit_request
from app.schemas import OpenAIError, OpenAIImageOptions, OpenAIImagesResponse
from app.signed_urls import PATH as SIGNED_PATH
from app.signed_urls import get_signer, signed_image

router = APIRouter(tags=["images"])
GEN = oas.GEN


def openai_error(status: int, description: str, message: str, code: str, param: str | None = None,
                 headers: tuple[str, ...] = ()) -> dict[str, Any]:
    """One error response in OpenAI's envelope, for the OpenAPI document."""
    names = ("X-Request-ID", *(("Retry-After",) if status in oas.RETRY_AFTER_CODES else ()), *headers)
    example = {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}
    return {"description": description, "model": OpenAIError, "headers": {n: oas.HEADERS[n] for n in names},
            "content": {"application/json": {"example": example}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: openai_error(400, "An invalid field (`param` names it; where our other routes answer 422)",
                      "`size` must be `WIDTHxHEIGHT` (such as `1024x1024`) or `auto`", "validation_error", "size"),
    401: openai_error(401, "No API key, a malformed `Authorization` header, or an unknown key",
                      "the API key is not valid", "invalid_api_key", headers=("WWW-Authenticate",)),
    413: openai_error(413, "The body is over SDXL_MAX_BODY_BYTES (JSON) or SDXL_MAX_IMAGE_BODY_BYTES (edits)",
                      "request body exceeds 65536 bytes", "payload_too_large"),
    415: openai_error(415, "generations: not JSON; edits: not multipart/form-data",
                      "Content-Type must be application/json, not 'text/plain'", "unsupported_media_type"),
    424: openai_error(424, "Not finished within SDXL_MAX_WAIT_SECONDS (`generation_timeout`: it goes on; the id is "
                           "in the message, `X-Generation-Id` and `Location`), or canceled meanwhile "
                           "(`generation_canceled`). Outside the statuses OpenAI clients retry, so a timeout "
                           "never creates a second generation",
                      f"generation `{GEN}` is still running: it did not finish within 60 s "
                      f"(SDXL_MAX_WAIT_SECONDS). It goes on: follow it at GET /v1/generations/{GEN}, or cancel "
                      f"it with POST /v1/generations/{GEN}/cancel", "generation_timeout",
                      headers=("Location",)),
    429: openai_error(429, "Over the key's request rate, or at its cap on unfinished generations",
                      "API key 'team-a' is over its rate limit of 600 requests per minute (burst 20); retry in 1 s",
                      "rate_limit_exceeded", headers=oas.RATE_LIMIT_HEADERS),
    431: openai_error(431, "More request headers than SDXL_MAX_HEADERS, or more bytes than SDXL_MAX_HEADER_BYTES",
                      "request headers of 20480 bytes exceed the limit of 16384 bytes (SDXL_MAX_HEADER_BYTES)",
                      "headers_too_large"),
    500: openai_error(500, "The generation failed (`code`: its error type; `x-should-retry: false`), or an "
                           "unexpected error (logged with the request id)",
                      f"generation `{GEN}` failed: the pipeline failed; the error was logged", "pipeline_error"),
    503: openai_error(503, "The job store or object storage is unreachable, or the queue is full",
                      "the job store is unreachable; retry shortly", "store_unavailable"),
    "4XX": openai_error(408, "Any other client error (408 body timeout, 404, 405), in the same envelope",
                        "the request body did not arrive within 30 s (SDXL_BODY_READ_TIMEOUT_SECONDS)",
                        "request_timeout"),
}
SUCCESS = oas.success("The images; the generation's id is in `X-Generation-Id`", "Location", model=OpenAIImagesResponse)
SUCCESS["headers"]["X-Generation-Id"] = {"description": "The generation behind the answer (GET /v1/generations/"
                                         "{id})", "required": True, "schema": {"type": "string"}, "example": GEN}

EDIT_FORM = {"requestBody": {"required": True, "content": {MULTIPART: {"schema": {
    "type": "object", "required": ["image", "prompt"], "additionalProperties": True,
    "description": "OpenAI's edit fields; any GenerationCreate field besides (`seed`, `strength`, "
                   "`refiner[mode]`, ...), as a form field",
    "properties": {
        "image": {**oas.BINARY_PART, "description": "The picture to edit (PNG, JPEG or WebP), one per request. Its "
                  "transparent pixels are the area to repaint when no `mask` is sent; none: image to image"},
        "mask": {**oas.BINARY_PART, "description": "PNG whose transparent pixels (alpha below half) mark the area "
                 "to repaint (OpenAI's convention, not our white-is-repaint `mask_image`); the size of `image`"},
        "prompt": {"type": "string"},
        "n": {"type": "integer", "minimum": 1},
        "size": {"type": "string", "example": "1024x1024"},
        "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "url"},
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        "model": {"type": "string"},
        "quality": {"type": "string"},
        "user": {"type": "string"},
    }}}}}}


def base_url(request: Request, service: GenerationService) -> str:
    return service.public_base_url or str(request.base_url).rstrip("/")


def answer(service: GenerationService, request: Request) -> OpenAIImages:
    return OpenAIImages(service, get_signer(request.app.state, service))


@router.post(
    "/v1/images/generations",
    operation_id="create_openai_image",
    response_model=OpenAIImagesResponse,
    responses={200: SUCCESS, **ERRORS},
    summary="OpenAI-compatible: generate images and wait for them (up to SDXL_MAX_WAIT_SECONDS)",
)
async def create_openai_image(body: OpenAIImageOptions, request: Request, service: ServiceDep,
                              principal: PrincipalDep) -> Response:
    content, headers = await answer(service, request).generate(
        body, principal, getattr(request.state, "request_id", None), base_url(request, service))
    return JSONResponse(content, headers=headers)


@router.post(
    "/v1/images/edits",
    operation_id="create_openai_image_edit",
    response_model=OpenAIImagesResponse,
    responses={200: SUCCESS, **ERRORS},
    summary="OpenAI-compatible: inpaint (transparent pixels of `mask` or of `image`) or image to image, and wait",
    openapi_extra=EDIT_FORM,
)
async def create_openai_image_edit(request: Request, service: ServiceDep, principal: PrincipalDep,
                                   settings: SettingsDep) -> Response:
    if media_type(request) != MULTIPART:
        raise Problem(415, f"Content-Type must be {MULTIPART} (the image as a file part), not "
                           f"{media_type(request) or 'absent'!r}")
    opts, files, renamed = await edit_request(request, settings.max_input_pixels)
    content, headers = await answer(service, request).generate(
        opts, principal, getattr(request.state, "request_id", None), base_url(request, service), files, renamed)
    return JSONResponse(content, headers=headers)


@router.get(
    SIGNED_PATH + "/{gen_id}/{index}",
    operation_id="get_signed_image",
    responses={
        200: oas.success("The image bytes", keyed=False,
                         content={m: oas.BINARY for m in ("image/png", "image/webp", "image/jpeg")}),
        403: oas.problem(403, "The signature does not match (`bad-signature`) or the URL expired (`url-expired`)",
                         "the image URL's signature is not valid", "bad-signature",
                         f"{SIGNED_PATH}/{GEN}/0"),
        404: oas.problem(404, "The generation or image is gone (expired or deleted)",
                         f"generation `{GEN}` does not exist", "generation-not-found", f"{SIGNED_PATH}/{GEN}/0"),
        422: oas.STANDARD[422],
        503: oas.STANDARD[503],
    },
    response_class=Response,
    summary="Download an image by a signed, expiring URL (no key: the signature is the capability)",
    openapi_extra=oas.PUBLIC,
)
async def get_signed_image(
    gen_id: Annotated[str, Path(max_length=64, description="Generation id")],
    index: Annotated[int, Path(ge=0, le=64)],
    expires: Annotated[int, Query(ge=0, description="Unix time the URL stops working")],
    signature: Annotated[str, Query(max_length=128, description="HMAC-SHA256 of id, index and expiry")],
    request: Request,
    service: ServiceDep,
) -> Response:
    data, content_type = await signed_image(service, get_signer(request.app.state, service), gen_id, index,
                                            expires, signature)
    max_age = max(0, min(3600, expires - int(time.time())))  # a cache keeps it no longer than the URL lives
    return Response(data, media_type=content_type, headers={"Cache-Control": f"private, max-age={max_age}"})
