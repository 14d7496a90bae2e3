"""Reading a create request that may carry images: JSON (images as upload ids, `data:` URIs or URLs), or
multipart/form-data (images as file parts, the other fields as form fields or one JSON `request` part).

Read by hand rather than by FastAPI's body parameter because one operation takes both media types; the answers
are the same: a 422 naming each field, in the one problem format.
"""

import hashlib
import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from app.errors import Problem, field_error, validation_problem
from app.settings import Settings

IMAGE_FIELDS = ("image", "mask_image")
# form fields whose values are JSON (objects and pairs); every other form field is a string pydantic coerces
JSON_FORM_FIELDS = {"refiner", "webhook", "original_size", "target_size", "crops_coords_top_left",
                    "negative_original_size", "negative_target_size", "negative_crops_coords_top_left"}
MULTIPART = "multipart/form-data"


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def has_inline_image(data: dict[str, Any]) -> bool:
    return any(isinstance(data.get(f), str) and data[f].startswith("data:") for f in IMAGE_FIELDS)


async def read_json(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes]:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Problem(422, "`body` is not valid JSON", errors=[
            {"field": "body", "message": f"is not valid JSON: {str(exc)[:200]}", "value": None}]) from None
    if not isinstance(data, dict):
        raise field_error("body", "must be a JSON object", type(data).__name__)
    # the image body limit is for images: JSON that carries none keeps the small limit
    if len(raw) > settings.max_body_bytes and not has_inline_image(data):
        raise Problem(413, f"request body exceeds {settings.max_body_bytes} bytes (SDXL_MAX_BODY_BYTES; only "
                           f"bodies with a `data:` image may reach SDXL_MAX_IMAGE_BODY_BYTES)")
    return data, raw


async def parse_form(request: Request, max_files: int) -> FormData:
    """Starlette's multipart parse, bounded; its own refusals (too many files, malformed parts) as our 422."""
    try:
        return await request.form(max_files=max_files, max_fields=100, max_part_size=256 * 1024)
    except HTTPException as exc:
        raise field_error("body", f"is not valid multipart/form-data: {exc.detail}", None) from None


async def read_form(request: Request, file_fields: tuple[str, ...], max_files: int = 2
                    ) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """Form fields (JSON where JSON_FORM_FIELDS says, merged with a JSON `request` part) and file parts."""
    form = await parse_form(request, max_files)
    data: dict[str, Any] = {}
    files: dict[str, list[bytes]] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in file_fields:
                    raise field_error(name, f"is a file part; files go in {', '.join(f'`{f}`' for f in file_fields)}",
                                      value.filename)
                files.setdefault(name, []).append(await value.read())
                continue
            if name == "request":
                try:
                    part = json.loads(value)
                except ValueError:
                    raise field_error("request", "must be a JSON object", value[:60]) from None
                if not isinstance(part, dict):
                    raise field_error("request", "must be a JSON object", value[:60])
                data.update(part)
            else:
                put_field(data, name, value)
    finally:
        await form.close()
    check_no_clash(data, files)
    return data, files


def put_field(data: dict[str, Any], name: str, value: str) -> None:
    """One plain form field into `data`: JSON where JSON_FORM_FIELDS says so (objects and pairs), else the string
    for pydantic to coerce ("30" -> 30). A field sent twice is refused, not silently overwritten."""
    if name in data:
        raise field_error(name, "was sent twice", value[:60])
    if name in JSON_FORM_FIELDS and value.lstrip()[:1] in ("{", "["):
        try:
            data[name] = json.loads(value)
        except ValueError:
            raise field_error(name, "must be JSON in a form field", value[:60]) from None
    else:
        data[name] = value


def check_no_clash(data: dict[str, Any], files: dict[str, list[bytes]]) -> None:
    for name in files:
        if name in data:
            raise field_error(name, "was sent both as a file part and as a field", str(data[name])[:60])


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_problem(RequestValidationError(exc.errors())) from None


def fingerprint_source(data: dict[str, Any], files: dict[str, list[bytes]]) -> bytes:
    """What Idempotency-Key compares for a multipart request: the fields and each file's sha256, not the raw
    body (its boundary is random per request, so a faithful retry would otherwise count as a new body)."""
    digests = {k: [hashlib.sha256(b).hexdigest() for b in v] for k, v in files.items()}
    return json.dumps({"fields": data, "files": digests}, sort_keys=True, separators=(",", ":")).encode()


async def read_generation_request(request: Request, settings: Settings, model: type[BaseModel]
                                  ) -> tuple[Any, dict[str, bytes], bytes]:
    """(the validated request, its image file parts by field, the bytes Idempotency-Key fingerprints)."""
    if media_type(request) == MULTIPART:
        data, files = await read_form(request, IMAGE_FIELDS)
        for name, parts in files.items():
            if len(parts) > 1:
                raise field_error(name, f"holds {len(parts)} files; send one", len(parts))
        source = fingerprint_source(data, files)
        return validate(model, data), {k: v[0] for k, v in files.items()}, source
    data, raw = await read_json(request, settings)
    return validate(model, data), {}, raw
