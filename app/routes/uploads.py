"""/v1/image-uploads: store an input image once, reference it from many generations (app/uploads.py).

Not `/v1/uploads`: under one base URL that is OpenAI's (resumable file uploads), which our OpenAI-compatible
routes may meet in the same client.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse

from app import openapi as oas
from app.deps import PrincipalDep, ServiceDep
from app.errors import field_error
from app.image_inputs import MULTIPART, media_type, read_form
from app.schemas import ImageUpload, ImageUploadList

router = APIRouter(prefix="/v1/image-uploads", tags=["image-uploads"], responses=oas.V1)
UploadId = Annotated[str, Path(description="Upload id", max_length=64,
                                openapi_examples={"id": {"value": "upl_3q2Vd0yq8zS0mN6pW1xYbA"}})]
UPLOAD = "upl_3q2Vd0yq8zS0mN6pW1xYbA"
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: oas.problem(404, "No such upload for this key (`upload-not-found`)",
                              f"image upload `{UPLOAD}` does not exist", "upload-not-found",
                              f"/v1/image-uploads/{UPLOAD}")}


@router.post(
    "",
    operation_id="create_image_upload",
    status_code=201,
    response_model=ImageUpload,
    responses={
        201: oas.success("Stored; reference it as `image` or `mask_image` by its `id`", "Location"),
        **oas.BODY,
        429: oas.problem(429, "This key's uploads are at their count or byte limit (`upload-limit`), or the rate "
                              "limit was hit", "this API key has 100 live image uploads; the limit is 100 "
                              "(SDXL_MAX_UPLOADS_PER_KEY): delete some or wait for them to expire", "upload-limit",
                         "/v1/image-uploads"),
    },
    summary="Store an input image (multipart `file` part, or the raw image as the body)",
    # declared as multipart only (generated clients trip over a File-or-form union); the route also takes the raw
    # image as the body with Content-Type image/png, image/jpeg, image/webp or application/octet-stream
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": oas.BINARY_PART}}},
    }}},
)
async def create_image_upload(request: Request, service: ServiceDep, principal: PrincipalDep) -> Response:
    if media_type(request) == MULTIPART:
        fields, files = await read_form(request, ("file",), max_files=1)
        if fields:
            name = next(iter(fields))
            raise field_error(name, "is not a field of an upload; send the image as the `file` part", None)
        if "file" not in files:
            raise field_error("file", "is missing: send the image as a multipart part named `file`", None)
        data = files["file"][0]
    else:
        data = await request.body()
    upload = await service.uploads.create(principal, data, "file")
    return JSONResponse(upload, status_code=201,
                        headers={"Location": f"{service.public_base_url}/v1/image-uploads/{upload['id']}"})


@router.get("", operation_id="list_image_uploads", response_model=ImageUploadList,
            responses={200: oas.success("This key's live uploads, newest first")},
            summary="List this API key's image uploads")
async def list_image_uploads(service: ServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"data": await service.uploads.list_for(principal)}


@router.get("/{upload_id}", operation_id="get_image_upload", response_model=ImageUpload,
            responses={200: oas.success("The upload"), **NOT_FOUND}, summary="Read an image upload")
async def get_image_upload(upload_id: UploadId, service: ServiceDep, principal: PrincipalDep) -> dict[str, Any]:
    return await service.uploads.get(upload_id, principal)


@router.delete(
    "/{upload_id}", operation_id="delete_image_upload", status_code=204, response_class=Response,
    responses={204: oas.success("Deleted; no content"), **NOT_FOUND,
               409: oas.problem(409, "An unfinished generation uses it (`upload-in-use`)",
                                f"image upload `{UPLOAD}` is used by unfinished generation `{oas.GEN}`; cancel it "
                                "or wait for it to finish", "upload-in-use", f"/v1/image-uploads/{UPLOAD}")},
    summary="Delete an image upload (409 while a queued or running generation uses it)")
async def delete_image_upload(upload_id: UploadId, service: ServiceDep, principal: PrincipalDep) -> Response:
    await service.uploads.delete(upload_id, principal)
    return Response(status_code=204)
