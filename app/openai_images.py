"""OpenAI's images API over our generations (docs/openai.md): requests mapped to a GenerationCreate, created and
waited on like any other (same keys, limits and isolation), answered in OpenAI's shape. Routes:
app/routes/openai_images.py; errors: app/openai_errors.py.
"""

import base64
import json
import re
from datetime import datetime
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.auth import Principal
from app.errors import Problem, field_error
from app.generations import GenerationService
from app.image_inputs import check_no_clash, parse_form, put_field, validate
from app.schemas import GenerationCreate, OpenAIImageOptions
from app.signed_urls import UrlSigner
from common import images

SIZE_RE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
BRACKET_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\[([A-Za-z0-9_]*)\]$")
IMAGE_PARTS = ("image", "image[]")  # the openai client sends a list of images as `image[]`
# OpenAI accepts up to 16 images and a mask: more parts than that are refused by the form parser itself
MAX_FILE_PARTS = 17
# our field -> the OpenAI field that stands for it (errors name the field the client sent)
STANDS_FOR = {"width": "size", "height": "size", "num_images_per_prompt": "n"}
RECORDED = ("model", "quality", "style", "user", "response_format")
RECORD_FIELD = "openai"  # the generation record's field holding what OpenAI's request said besides


def parse_size(size: str) -> tuple[int, int]:
    m = SIZE_RE.match(size)
    if not m:
        raise field_error("size", "must be `WIDTHxHEIGHT` (such as `1024x1024`) or `auto`", size)
    width, height = int(m.group(1)), int(m.group(2))
    if width % 8 or height % 8:
        raise field_error("size", f"must be multiples of 8 in both sides but is {size}", size)
    return width, height


def to_generation(opts: OpenAIImageOptions) -> tuple[GenerationCreate, dict[str, str]]:
    """(the request as ours, our field -> OpenAI field for the fields the client named the OpenAI way)."""
    data = dict(opts.model_extra or {})
    renamed: dict[str, str] = {}
    given: dict[str, Any] = {}
    if opts.n is not None:
        given["num_images_per_prompt"] = opts.n
    if opts.size is not None and opts.size != "auto":
        given["width"], given["height"] = parse_size(opts.size)
    for ours, value in given.items():
        theirs = STANDS_FOR[ours]
        if ours in data:
            raise field_error(ours, f"and `{theirs}` say the same thing; send one of them", data[ours])
        data[ours] = value
        renamed[ours] = theirs
    data["prompt"] = opts.prompt
    if opts.output_format is not None:
        data["output_format"] = opts.output_format
    try:
        return validate(GenerationCreate, data), renamed
    except Problem as exc:
        raise renamed_fields(exc, renamed) from None


def renamed_fields(exc: Problem, renamed: dict[str, str]) -> Problem:
    """The problem with each renamed field named as the client sent it (`width` -> `size`, `mask_image` -> `mask`)."""
    for err in exc.errors or []:
        err["field"] = renamed.get(err["field"], err["field"])
    return exc


async def read_edit_form(request: Request) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """The edit's form: fields (`a[b]` as {a: {b}}, `a[]` as lists, the way the openai client flattens
    `extra_body`; JSON_FORM_FIELDS may also be JSON text) and file parts by name."""
    form = await parse_form(request, MAX_FILE_PARTS)
    data: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in (*IMAGE_PARTS, "mask"):
                    raise field_error(name, "is a file part; files go in `image` and `mask`", value.filename)
                files.setdefault("image" if name in IMAGE_PARTS else name, []).append(await value.read())
                continue
            m = BRACKET_RE.match(name)
            if m and m.group(2):  # refiner[mode]=none
                inner = data.setdefault(m.group(1), {})
                if not isinstance(inner, dict) or m.group(2) in inner:
                    raise field_error(name, "was sent twice", value[:60])
                inner[m.group(2)] = value
            elif m:  # original_size[]=1024, once per item
                items = data.setdefault(m.group(1), [])
                if not isinstance(items, list):
                    raise field_error(name, "was sent twice", value[:60])
                items.append(value)
            else:
                put_field(data, name, value)
    finally:
        await form.close()
    check_no_clash(data, files)
    return data, files


def edit_inputs(files: dict[str, list[bytes]], fields: dict[str, Any], max_pixels: int
                ) -> tuple[dict[str, bytes], dict[str, str]]:
    """(the generation's image and mask files, renamed fields) from an edit's parts, in OpenAI's convention:
    transparent pixels of `mask` (or, without one, of `image` itself) mark the area to repaint; neither: img2img.
    Runs in a thread (it decodes the images)."""
    parts = files.get("image", [])
    if len(parts) > 1:
        raise field_error("image", f"holds {len(parts)} images; this service edits one image per request (the "
                          "limit is 1)", len(parts))
    masks = files.get("mask", [])
    if len(masks) > 1:
        raise field_error("mask", f"holds {len(masks)} files; send one", len(masks))
    # without a file part, a form field `image` may name it (an upload id, `data:` URI or URL)
    if not parts and "image" not in fields:
        raise field_error("image", "is required: the picture to edit, as a file part", None)
    given = {"image": parts[0]} if parts else {}
    if masks and "mask_image" in fields:
        raise field_error("mask_image", "and `mask` say the same thing; send one", str(fields["mask_image"])[:60])
    if masks:
        try:
            mask = images.mask_from_alpha(masks[0], max_pixels)
        except images.InvalidImage as exc:
            raise field_error("mask", str(exc), f"<{len(masks[0])} bytes>") from None
        if mask is None:
            raise field_error("mask", "has no transparent pixels: its transparent pixels mark the area to edit "
                              "(OpenAI's convention)", f"<{len(masks[0])} bytes>")
        return {**given, "mask_image": mask}, {"mask_image": "mask"}
    if not parts:  # a named image is read as it is, as for /v1/generations: its alpha is no mask
        return {}, {}
    image = parts[0]
    if "mask_image" in fields:  # our own extension, in our convention (white: repaint): the alpha is no mask then
        return {"image": image}, {}
    try:
        mask = images.mask_from_alpha(image, max_pixels)
    except images.InvalidImage as exc:
        raise field_error("image", str(exc), f"<{len(image)} bytes>") from None
    return ({"image": image, "mask_image": mask} if mask else {"image": image}), {"mask_image": "image"}


def unix(rfc3339: str | None) -> int:
    if not rfc3339:
        return 0
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


class OpenAIImages:
    """Create, wait up to SDXL_MAX_WAIT_SECONDS, answer `{created, data: [...]}`."""

    def __init__(self, service: GenerationService, signer: UrlSigner) -> None:
        self.service = service
        self.signer = signer
        self.settings = service.settings

    async def generate(self, opts: OpenAIImageOptions, principal: Principal, request_id: str | None, base_url: str,
                       files: dict[str, bytes] | None = None, renamed: dict[str, str] | None = None
                       ) -> tuple[dict[str, Any], dict[str, str]]:
        """(the answer's body, its headers)."""
        req, renamed_opts = to_generation(opts)
        renamed = {**renamed_opts, **(renamed or {})}
        try:
            resource = await self.service.create(req, principal, request_id, files=files,
                                                 extra={RECORD_FIELD: self.recorded(opts)})
        except Problem as exc:
            raise renamed_fields(exc, renamed) from None
        gen_id = resource["id"]
        wait = self.settings.max_wait_seconds
        final = await self.service.wait(gen_id, principal, wait, created=resource)
        headers = {"X-Generation-Id": gen_id, "Location": self.service.location(gen_id)}
        if final["status"] != "succeeded":
            raise self.unfinished(final, wait, headers)
        data = [await self.item(final, img, opts.response_format, principal, base_url)
                for img in sorted(final["images"], key=lambda i: i["index"])]
        first = final["images"][0] if final["images"] else {}
        body: dict[str, Any] = {
            "created": unix(final.get("created_at")),
            "data": data,
            "size": f"{first.get('width')}x{first.get('height')}" if first else None,
            "output_format": (final.get("params") or {}).get("output_format"),
        }
        if opts.quality is not None:
            body["quality"] = opts.quality
        return body, headers

    @staticmethod
    def recorded(opts: OpenAIImageOptions) -> str:
        """OpenAI's own fields that change nothing here, kept with the generation (the record's `openai` field)."""
        fields = {name: getattr(opts, name) for name in RECORDED if getattr(opts, name) is not None}
        return json.dumps(fields, separators=(",", ":"))

    def unfinished(self, final: dict[str, Any], wait: int, headers: dict[str, str]) -> Problem:
        """Not succeeded: 424 while it still runs (or was canceled), 500 when it failed; never retried.

        424 is outside what the openai client retries (408, 409, 429, 5xx) whatever the headers, so a timeout
        cannot create a second generation; `x-should-retry: false` tells it the same for the 500 (the service
        already runs a lost worker's job again itself)."""
        gen_id = final["id"]
        headers = {**headers, "x-should-retry": "false"}
        status = final["status"]
        if status == "failed":
            err = final.get("error") or {}
            kind = str(err.get("type") or "generation_failed").replace("_", "-")
            return Problem(500, f"generation `{gen_id}` failed: {err.get('message', 'no reason recorded')}",
                           kind=kind, headers=headers)
        if status == "canceled":
            return Problem(424, f"generation `{gen_id}` was canceled", kind="generation-canceled", headers=headers)
        why = "the API is shutting down" if self.service.stopping.is_set() else \
            f"it did not finish within {wait} s (SDXL_MAX_WAIT_SECONDS)"
        return Problem(424, f"generation `{gen_id}` is still {status}: {why}. It goes on: follow it at "
                            f"GET /v1/generations/{gen_id}, or cancel it with POST /v1/generations/{gen_id}/cancel",
                       kind="generation-timeout", headers=headers)

    async def item(self, resource: dict[str, Any], img: dict[str, Any], response_format: str, principal: Principal,
                   base_url: str) -> dict[str, Any]:
        gen_id, index = resource["id"], img["index"]
        if response_format == "b64_json":
            result = await self.service.image(gen_id, index, principal, redirect=False)
            assert not isinstance(result, str)  # redirect=False: always the bytes
            return {"b64_json": base64.b64encode(result[0]).decode(), "revised_prompt": None}
        url = str(img.get("url") or "")
        if self.settings.image_url_mode == "presigned" and not url.endswith(f"/v1/generations/{gen_id}/images/"
                                                                             f"{index}"):
            return {"url": url, "revised_prompt": None}  # the store's presigned URL, already in the resource
        return {"url": await self.signer.url(base_url, gen_id, index), "revised_prompt": None}


async def edit_request(request: Request, max_pixels: int
                       ) -> tuple[OpenAIImageOptions, dict[str, bytes], dict[str, str]]:
    """(the edit's options, the generation's image files, renamed fields) from its multipart body."""
    fields, files = await read_edit_form(request)
    opts: OpenAIImageOptions = validate(OpenAIImageOptions, fields)
    inputs, renamed = await run_in_threadpool(edit_inputs, files, opts.model_extra or {}, max_pixels)
    return opts, inputs, renamed
