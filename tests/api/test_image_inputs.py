"""Image inputs through the API (in-process apps, real Redis, local storage): hostile files refused by every
carrier (JSON `data:` URI, multipart part, upload id, POST /v1/image-uploads) with a 422/413 that names the field
and the value and leaves nothing queued and no upload behind; uploads isolated per key, bounded per key, expiring
and undeletable while in use; URL inputs fetched from a loopback server under the SSRF policy.

No traffic goes anywhere but 127.0.0.1: other addresses are classified by common/ssrf.py directly, IP literals
only (no DNS)."""

import base64
import http.server
import io
import json
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from common import ssrf
from tests.client import Key, keys_env

OK: dict[str, Any] = {"prompt": "a lighthouse", "num_inference_steps": 4}
UNKNOWN_UPLOAD = "upl_" + "A" * 22


# --- images -----------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def png(w: int = 64, h: int = 64, color: Any = (90, 120, 200), mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, (w, h), color))


def noisy_png(w: int, h: int) -> bytes:
    """Incompressible: its size is about w*h*3 bytes."""
    return encode(Image.frombytes("RGB", (w, h), random.Random(w * h).randbytes(w * h * 3)))


def gray_mask(w: int = 64, h: int = 64) -> bytes:
    img = Image.new("L", (w, h), 0)
    img.paste(255, (0, 0, w // 2, h))
    return encode(img)


def colour_mask(w: int = 64, h: int = 64) -> bytes:
    img = Image.new("RGB", (w, h), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, w // 2, h // 2))
    return encode(img)


def bomb() -> bytes:
    """A 1x1 PNG whose header claims 30000x30000 (CRC fixed up): refused from the header, never decoded."""
    data = bytearray(png(1, 1))
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def animated(fmt: str) -> bytes:
    first, *rest = (Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255)))
    return encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)


def data_uri(data: bytes, ctype: str = "image/png") -> str:
    return f"data:{ctype};base64," + base64.b64encode(data).decode()


# (name, bytes, what the message says)
HOSTILE: list[tuple[str, bytes, str]] = [
    ("not an image", b"<html><body>hello</body></html>", "is not an image (PNG, JPEG or WebP expected)"),
    ("empty", b"", "is empty"),
    ("gif", encode(Image.new("RGB", (64, 64)), "GIF"), "is GIF; accepted formats are PNG, JPEG and WebP"),
    ("bmp", encode(Image.new("RGB", (64, 64)), "BMP"), "is BMP; accepted formats are PNG, JPEG and WebP"),
    ("tiff", encode(Image.new("RGB", (64, 64)), "TIFF"), "is TIFF; accepted formats are PNG, JPEG and WebP"),
    ("bomb", bomb(), "pixels"),
    ("animated png", animated("PNG"), "is animated; send a single frame"),
    ("animated webp", animated("WEBP"), "is animated; send a single frame"),
    ("truncated png", noisy_png(64, 64)[:4000], "could not be decoded"),
    ("truncated jpeg", encode(Image.open(io.BytesIO(noisy_png(64, 64))), "JPEG")[:600], "could not be decoded"),
]
HOSTILE_IDS = [h[0] for h in HOSTILE]


# --- checks -----------------------------------------------------------------------------------------------


def problem(res: httpx.Response, status: int, field: str | None = None, value: Any = ...) -> dict[str, Any]:
    """The answer is the one problem format, `status`, naming `field` (and its `value` where given)."""
    assert res.status_code == status, res.text
    assert res.headers["content-type"] == "application/problem+json", res.headers
    body = res.json()
    assert body["type"].startswith("urn:sdxl:problem:") and body["status"] == status and body["detail"], body
    if field is not None:
        errors = {e["field"]: e for e in body.get("errors", [])}
        assert field in errors, body
        assert f"`{field}`" in body["detail"], body
        if value is not ...:
            assert errors[field]["value"] == value, body
    return body


def message(body: dict[str, Any], field: str) -> str:
    return next(str(e["message"]) for e in body["errors"] if e["field"] == field)


def uploads_in(r: redis.Redis) -> set[str]:
    return {k.decode().rsplit(":", 1)[1] for k in r.scan_iter("sdxl:upload:*")}


def stored_files(storage_dir: Path) -> list[Path]:
    root = storage_dir / "uploads"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_nothing_queued(r: redis.Redis, storage_dir: Path, uploads_before: set[str] | None = None) -> None:
    """No generation record, no rq job, nothing pending; and no upload left behind by the refused request."""
    assert r.llen("rq:queue:sdxl-generations") == 0
    assert list(r.scan_iter("sdxl:gen:*")) == []
    assert list(r.scan_iter("sdxl:pending:*")) == []
    before = uploads_before or set()
    assert uploads_in(r) == before
    assert len(stored_files(storage_dir)) == len(before)


def post_json(client: httpx.Client, key: Key | None = None, **fields: Any) -> httpx.Response:
    return client.post("/v1/generations", json={**OK, **fields}, headers=key.headers if key else {})


def post_multipart(client: httpx.Client, files: dict[str, bytes], key: Key | None = None,
                   **fields: Any) -> httpx.Response:
    form = {k: str(v) for k, v in {**OK, **fields}.items()}
    parts = [(name, (f"{name}.bin", data, "application/octet-stream")) for name, data in files.items()]
    return client.post("/v1/generations", data=form, files=parts, headers=key.headers if key else {})


def upload(client: httpx.Client, data: bytes, key: Key | None = None, raw: bool = False,
           ctype: str = "image/png") -> httpx.Response:
    headers = key.headers if key else {}
    if raw:
        return client.post("/v1/image-uploads", content=data, headers={**headers, "content-type": ctype})
    return client.post("/v1/image-uploads", files={"file": ("f.png", data, ctype)}, headers=headers)


def upload_id(client: httpx.Client, data: bytes, key: Key | None = None) -> str:
    res = upload(client, data, key)
    assert res.status_code == 201, res.text
    return str(res.json()["id"])


# --- hostile files, by every carrier ----------------------------------------------------------------------


@pytest.mark.parametrize("name,data,says", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_image_as_data_uri(api: httpx.Client, r: redis.Redis, storage_dir: Path, name: str, data: bytes,
                                   says: str) -> None:
    body = problem(post_json(api, image=data_uri(data)), 422, "image", f"<{len(data)} bytes>")
    assert says in message(body, "image")
    assert_nothing_queued(r, storage_dir)


@pytest.mark.parametrize("name,data,says", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_image_as_multipart_part(api: httpx.Client, r: redis.Redis, storage_dir: Path, name: str,
                                         data: bytes, says: str) -> None:
    body = problem(post_multipart(api, {"image": data}), 422, "image", f"<{len(data)} bytes>")
    assert says in message(body, "image")
    assert_nothing_queued(r, storage_dir)


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw body"])
@pytest.mark.parametrize("name,data,says", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_image_upload(api: httpx.Client, r: redis.Redis, storage_dir: Path, name: str, data: bytes,
                              says: str, raw: bool) -> None:
    body = problem(upload(api, data, raw=raw), 422, "file", f"<{len(data)} bytes>")
    assert says in message(body, "file")
    assert_nothing_queued(r, storage_dir)
    assert api.get("/v1/image-uploads").json()["data"] == []


@pytest.mark.parametrize("name,data,says", HOSTILE, ids=HOSTILE_IDS)
def test_hostile_mask(api: httpx.Client, r: redis.Redis, storage_dir: Path, name: str, data: bytes,
                      says: str) -> None:
    """The mask is checked as strictly as the image, and the valid image is not stored when the mask fails."""
    body = problem(post_json(api, image=data_uri(png()), mask_image=data_uri(data)), 422, "mask_image",
                   f"<{len(data)} bytes>")
    assert says in message(body, "mask_image")
    assert_nothing_queued(r, storage_dir)


def test_too_many_pixels(make_api: Callable[..., httpx.Client], r: redis.Redis, storage_dir: Path) -> None:
    api = make_api(max_input_pixels=64 * 64)
    data = png(128, 128)
    says = "is 128x128 = 16384 pixels; the limit is 4096"
    body = problem(post_json(api, image=data_uri(data)), 422, "image", f"<{len(data)} bytes>")
    assert message(body, "image") == says
    body = problem(post_multipart(api, {"image": data}), 422, "image")
    assert message(body, "image") == says
    assert message(problem(upload(api, data), 422, "file"), "file") == says
    assert_nothing_queued(r, storage_dir)
    assert post_json(api, image=data_uri(png(64, 64))).status_code == 202  # at the limit: taken


# --- masks ------------------------------------------------------------------------------------------------


def test_colour_mask_is_refused(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    says = "has colour; a mask must be grayscale (white: repaint, black: keep)"
    body = problem(post_json(api, image=data_uri(png()), mask_image=data_uri(colour_mask())), 422, "mask_image")
    assert message(body, "mask_image") == says
    body = problem(post_multipart(api, {"image": png(), "mask_image": colour_mask()}), 422, "mask_image")
    assert message(body, "mask_image") == says
    assert_nothing_queued(r, storage_dir)
    # an upload is any image; used as a mask by its id, the colour is refused then
    image_id, mask_id = upload_id(api, png()), upload_id(api, colour_mask())
    body = problem(post_json(api, image=image_id, mask_image=mask_id), 422, "mask_image")
    assert message(body, "mask_image") == says
    assert_nothing_queued(r, storage_dir, {image_id, mask_id})


def test_cmyk_mask_is_refused(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    cmyk = encode(Image.new("CMYK", (64, 64), (0, 0, 0, 0)), "JPEG")
    body = problem(post_json(api, image=data_uri(png()), mask_image=data_uri(cmyk, "image/jpeg")), 422,
                   "mask_image")
    assert "not convertible to a single-channel mask" in message(body, "mask_image")
    assert_nothing_queued(r, storage_dir)


@pytest.mark.parametrize("carrier", ["json", "multipart", "upload id"])
def test_mask_size_must_equal_image_size(api: httpx.Client, r: redis.Redis, storage_dir: Path,
                                         carrier: str) -> None:
    image, mask = png(64, 64), gray_mask(128, 64)
    before: set[str] = set()
    if carrier == "json":
        res = post_json(api, image=data_uri(image), mask_image=data_uri(mask))
    elif carrier == "multipart":
        res = post_multipart(api, {"image": image, "mask_image": mask})
    else:
        before = {upload_id(api, image), upload_id(api, mask)}
        ids = sorted(before, key=lambda i: api.get(f"/v1/image-uploads/{i}").json()["width"])
        res = post_json(api, image=ids[0], mask_image=ids[1])
    body = problem(res, 422, "mask_image", "128x64")
    assert message(body, "mask_image") == "is 128x64 but `image` is 64x64; they must be the same size"
    assert_nothing_queued(r, storage_dir, before)


def test_inpainting_with_a_gray_mask_is_queued(api: httpx.Client, r: redis.Redis) -> None:
    res = post_multipart(api, {"image": png(), "mask_image": gray_mask()}, strength=0.5, padding_mask_crop=8,
                         refiner=json.dumps({"mode": "none"}))
    assert res.status_code == 202, res.text
    params = res.json()["params"]
    assert params["image"]["width"] == 64 and params["mask_image"]["height"] == 64
    assert params["strength"] == 0.5 and params["padding_mask_crop"] == 8
    assert len(uploads_in(r)) == 2


# --- fields that need an input they lack ------------------------------------------------------------------


@pytest.mark.parametrize("fields,field,value", [
    ({"mask_image": "MASK"}, "mask_image", "<mask without image>"),
    ({"strength": 0.5}, "strength", 0.5),
    ({"image": "IMAGE", "padding_mask_crop": 16}, "padding_mask_crop", 16),
], ids=["mask without image", "strength without image", "padding_mask_crop without mask"])
def test_field_needs_its_input(api: httpx.Client, r: redis.Redis, storage_dir: Path, fields: dict[str, Any],
                               field: str, value: Any) -> None:
    sub = {"MASK": data_uri(gray_mask()), "IMAGE": data_uri(png())}
    body: dict[str, Any] = {k: sub.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}
    problem(post_json(api, **body), 422, field, value)
    assert_nothing_queued(r, storage_dir)


# --- strings that are no image ----------------------------------------------------------------------------


def test_bad_base64(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    body = problem(post_json(api, image="data:image/png;base64,!!!not*base64"), 422, "image")
    assert "invalid base64" in message(body, "image")
    body = problem(post_json(api, image="data:image/png,rawtext"), 422, "image")
    assert "base64 `data:` URI" in message(body, "image")
    assert_nothing_queued(r, storage_dir)


@pytest.mark.parametrize("value", ["cat.png", "ftp://127.0.0.1/cat.png", "upl_short", "/etc/passwd"])
def test_neither_data_uri_nor_url_nor_upload(api: httpx.Client, r: redis.Redis, storage_dir: Path,
                                             value: str) -> None:
    body = problem(post_json(api, image=value), 422, "image", value)
    assert "must be an image upload id (upl_...), a `data:` URI or an https URL" in message(body, "image")
    assert_nothing_queued(r, storage_dir)


def test_unknown_upload_id(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    body = problem(post_json(api, image=UNKNOWN_UPLOAD), 422, "image", UNKNOWN_UPLOAD)
    assert "does not exist" in message(body, "image")
    assert_nothing_queued(r, storage_dir)


# --- size of the output -----------------------------------------------------------------------------------


@pytest.mark.parametrize("carrier", ["json", "multipart", "upload id"])
def test_input_size_not_a_multiple_of_8(api: httpx.Client, r: redis.Redis, storage_dir: Path,
                                        carrier: str) -> None:
    data = png(100, 70)
    before: set[str] = set()
    if carrier == "json":
        res = post_json(api, image=data_uri(data))
    elif carrier == "multipart":
        res = post_multipart(api, {"image": data})
    else:
        before = {upload_id(api, data)}
        res = post_json(api, image=next(iter(before)))
    body = problem(res, 422, "image", "100x70")
    assert "the nearest valid size is 96x72" in message(body, "image")
    assert "`width` and `height`" in message(body, "image")
    assert_nothing_queued(r, storage_dir, before)


@pytest.mark.parametrize("carrier", ["json", "multipart"])
def test_input_size_with_width_and_height_is_resized(api: httpx.Client, r: redis.Redis, carrier: str) -> None:
    data = png(100, 70)
    if carrier == "json":
        res = post_json(api, image=data_uri(data), width=96, height=72)
    else:
        res = post_multipart(api, {"image": data}, width=96, height=72)
    assert res.status_code == 202, res.text
    gen = res.json()
    assert gen["status"] == "queued"
    assert (gen["params"]["width"], gen["params"]["height"]) == (96, 72)
    assert (gen["params"]["image"]["width"], gen["params"]["image"]["height"]) == (100, 70)
    assert r.llen("rq:queue:sdxl-generations") == 1


def test_output_takes_the_input_size(api: httpx.Client) -> None:
    res = post_json(api, image=data_uri(png(96, 72)))
    assert res.status_code == 202, res.text
    assert (res.json()["params"]["width"], res.json()["params"]["height"]) == (96, 72)


# --- body limits ------------------------------------------------------------------------------------------


def test_json_without_images_keeps_the_small_limit(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    res = api.post("/v1/generations", json={**OK, "padding": "x" * 70000})
    body = problem(res, 413)
    assert "SDXL_MAX_BODY_BYTES" in body["detail"]
    # a URL or an upload id is no inline image either
    res = api.post("/v1/generations", json={**OK, "image": UNKNOWN_UPLOAD, "padding": "x" * 70000})
    problem(res, 413)
    assert_nothing_queued(r, storage_dir)


def test_json_with_a_data_image_may_be_larger(api: httpx.Client, r: redis.Redis) -> None:
    data = noisy_png(128, 128)
    assert len(data_uri(data)) > 65536
    res = post_json(api, image=data_uri(data))
    assert res.status_code == 202, res.text
    assert res.json()["params"]["image"]["width"] == 128


@pytest.mark.parametrize("carrier", ["json", "multipart", "upload"])
def test_body_over_the_image_body_limit(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                        storage_dir: Path, carrier: str) -> None:
    api = make_api(max_image_body_bytes=100_000)
    data = noisy_png(256, 256)
    assert len(data) > 100_000
    if carrier == "json":
        res = post_json(api, image=data_uri(data))
    elif carrier == "multipart":
        res = post_multipart(api, {"image": data})
    else:
        res = upload(api, data, raw=True)
    assert "100000" in problem(res, 413)["detail"]
    assert_nothing_queued(r, storage_dir)


# --- multipart shapes -------------------------------------------------------------------------------------


def test_file_part_under_an_unknown_name(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    res = api.post("/v1/generations", data={"prompt": "x"}, files={"photo": ("cat.png", png(), "image/png")})
    body = problem(res, 422, "photo", "cat.png")
    assert "`image`, `mask_image`" in message(body, "photo")
    res = api.post("/v1/image-uploads", files={"image": ("cat.png", png(), "image/png")})
    problem(res, 422, "image", "cat.png")
    assert_nothing_queued(r, storage_dir)


def test_two_image_parts(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    res = api.post("/v1/generations", data={"prompt": "x"},
                   files=[("image", ("a.png", png(), "image/png")), ("image", ("b.png", png(), "image/png"))])
    body = problem(res, 422, "image", 2)
    assert "holds 2 files; send one" in message(body, "image")
    assert_nothing_queued(r, storage_dir)


def test_image_both_as_part_and_field(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    res = api.post("/v1/generations", data={"prompt": "x", "image": UNKNOWN_UPLOAD},
                   files={"image": ("a.png", png(), "image/png")})
    problem(res, 422, "image")
    assert_nothing_queued(r, storage_dir)


def test_upload_with_other_fields_or_no_file(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    problem(api.post("/v1/image-uploads", data={"purpose": "x"}, files={"file": ("a.png", png(), "image/png")}),
            422, "purpose")
    problem(api.post("/v1/image-uploads", files={"purpose": (None, "x")}), 422, "purpose")  # multipart, no file
    problem(api.post("/v1/image-uploads", data={"purpose": "x"}), 415)  # a urlencoded form carries no image
    assert_nothing_queued(r, storage_dir)


# --- uploads: per key -------------------------------------------------------------------------------------

ALICE = Key("alice")
BOB = Key("bob")


def test_uploads_are_isolated_between_keys(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                           storage_dir: Path) -> None:
    api = make_api(api_keys=keys_env(ALICE, BOB))
    alices = upload_id(api, png(), ALICE)
    bobs = upload_id(api, png(72, 64), BOB)
    assert api.get(f"/v1/image-uploads/{alices}", headers=ALICE.headers).status_code == 200
    for res in (api.get(f"/v1/image-uploads/{alices}", headers=BOB.headers),
                api.delete(f"/v1/image-uploads/{alices}", headers=BOB.headers)):
        body = problem(res, 404)
        assert body["type"] == "urn:sdxl:problem:upload-not-found" and alices in body["detail"]
    body = problem(post_json(api, BOB, image=alices), 422, "image", alices)
    assert "does not exist" in message(body, "image")
    problem(post_json(api, BOB, image=bobs, mask_image=alices), 422, "mask_image", alices)
    assert [u["id"] for u in api.get("/v1/image-uploads", headers=ALICE.headers).json()["data"]] == [alices]
    assert [u["id"] for u in api.get("/v1/image-uploads", headers=BOB.headers).json()["data"]] == [bobs]
    assert_nothing_queued(r, storage_dir, {alices, bobs})
    assert api.get(f"/v1/image-uploads/{alices}", headers=ALICE.headers).status_code == 200  # BOB changed nothing
    assert post_json(api, ALICE, image=alices).status_code == 202


def test_upload_resource(api: httpx.Client, storage_dir: Path) -> None:
    data = png(72, 64)
    res = upload(api, data)
    assert res.status_code == 201
    up = res.json()
    assert res.headers["location"].endswith(f"/v1/image-uploads/{up['id']}")
    assert (up["width"], up["height"], up["bytes"], up["content_type"]) == (72, 64, len(data), "image/png")
    assert api.get(f"/v1/image-uploads/{up['id']}").json() == up
    assert [p.read_bytes() for p in stored_files(storage_dir)] == [data]
    assert api.delete(f"/v1/image-uploads/{up['id']}").status_code == 204
    assert api.get(f"/v1/image-uploads/{up['id']}").status_code == 404
    assert stored_files(storage_dir) == []


def test_upload_count_limit(make_api: Callable[..., httpx.Client], r: redis.Redis, storage_dir: Path) -> None:
    api = make_api(api_keys=keys_env(ALICE, BOB), max_uploads_per_key=2)
    first, _second = upload_id(api, png(), ALICE), upload_id(api, png(), ALICE)
    body = problem(upload(api, png(), ALICE), 429)
    assert body["type"] == "urn:sdxl:problem:upload-limit" and "SDXL_MAX_UPLOADS_PER_KEY" in body["detail"]
    # an inline image is an upload too: refused the same way, and nothing is queued
    body = problem(post_json(api, ALICE, image=data_uri(png())), 429)
    assert body["type"] == "urn:sdxl:problem:upload-limit"
    assert r.llen("rq:queue:sdxl-generations") == 0 and list(r.scan_iter("sdxl:gen:*")) == []
    assert len(stored_files(storage_dir)) == 2
    assert upload(api, png(), BOB).status_code == 201  # another key's limit is its own
    assert api.delete(f"/v1/image-uploads/{first}", headers=ALICE.headers).status_code == 204
    assert upload(api, png(), ALICE).status_code == 201  # a deleted upload stops counting


def test_upload_byte_limit(make_api: Callable[..., httpx.Client], storage_dir: Path) -> None:
    small, large = png(64, 64), noisy_png(64, 64)
    api = make_api(max_upload_bytes_per_key=len(small) + len(large) - 1)
    upload_id(api, small)
    body = problem(upload(api, large), 429)
    assert body["type"] == "urn:sdxl:problem:upload-limit" and "SDXL_MAX_UPLOAD_BYTES_PER_KEY" in body["detail"]
    assert len(stored_files(storage_dir)) == 1
    assert upload(api, small).status_code == 201


def test_concurrent_uploads_never_pass_the_limit(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                                 storage_dir: Path) -> None:
    api = make_api(max_uploads_per_key=3)
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda i: upload(api, png(64, 64, (i, i, i))).status_code, range(12)))
    assert sorted(answers) == [201] * 3 + [429] * 9
    assert r.zcard("sdxl:uploads:open") == 3 and len(uploads_in(r)) == 3
    assert len(stored_files(storage_dir)) == 3  # the refused ones' bytes are gone too
    assert len(api.get("/v1/image-uploads").json()["data"]) == 3


def test_upload_expiry(make_api: Callable[..., httpx.Client], r: redis.Redis, storage_dir: Path) -> None:
    api = make_api(upload_ttl_seconds=1)
    up = upload(api, png()).json()
    assert api.get(f"/v1/image-uploads/{up['id']}").status_code == 200
    assert [u["id"] for u in api.get("/v1/image-uploads").json()["data"]] == [up["id"]]
    time.sleep(max(0.0, float(r.hget(f"sdxl:upload:{up['id']}", "expires_at") or 0) - time.time()) + 0.1)
    assert problem(api.get(f"/v1/image-uploads/{up['id']}"), 404)["type"] == "urn:sdxl:problem:upload-not-found"
    assert api.get("/v1/image-uploads").json()["data"] == []
    problem(post_json(api, image=up["id"]), 422, "image", up["id"])
    assert api.delete(f"/v1/image-uploads/{up['id']}").status_code == 404
    # an expired upload stops counting against the limit at once (cleanup deletes its bytes later)
    limited = make_api(upload_ttl_seconds=1, max_uploads_per_key=1)
    assert upload(limited, png()).status_code == 201


def test_delete_while_a_queued_generation_uses_it(api: httpx.Client, r: redis.Redis, storage_dir: Path) -> None:
    up = upload_id(api, png())
    res = post_json(api, image=up)
    assert res.status_code == 202, res.text
    gen_id = res.json()["id"]
    body = problem(api.delete(f"/v1/image-uploads/{up}"), 409)
    assert body["type"] == "urn:sdxl:problem:upload-in-use" and gen_id in body["detail"]
    assert api.get(f"/v1/image-uploads/{up}").status_code == 200 and len(stored_files(storage_dir)) == 1
    assert api.post(f"/v1/generations/{gen_id}/cancel").status_code in (200, 202)
    assert api.get(f"/v1/generations/{gen_id}").json()["status"] == "canceled"
    assert api.delete(f"/v1/image-uploads/{up}").status_code == 204
    assert stored_files(storage_dir) == [] and uploads_in(r) == set()


def test_inline_inputs_become_uploads_of_the_caller(api: httpx.Client, storage_dir: Path) -> None:
    res = post_json(api, image=data_uri(png()))
    assert res.status_code == 202
    ref = res.json()["params"]["image"]
    listed = api.get("/v1/image-uploads").json()["data"]
    assert [u["id"] for u in listed] == [ref["upload_id"]]
    assert problem(api.delete(f"/v1/image-uploads/{ref['upload_id']}"), 409)["type"] == \
        "urn:sdxl:problem:upload-in-use"


def test_refused_admission_leaves_no_upload(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                            storage_dir: Path) -> None:
    key = Key("limited", max_queued=1)
    api = make_api(api_keys=keys_env(key))
    assert post_json(api, key, image=data_uri(png())).status_code == 202
    before = uploads_in(r)
    problem(post_json(api, key, image=data_uri(png(72, 64))), 429)  # its one unfinished generation: the cap
    assert uploads_in(r) == before and len(stored_files(storage_dir)) == 1


# --- URL inputs -------------------------------------------------------------------------------------------


class Server:
    """A loopback HTTP server with the answers the fetch tests need; `hits` lists the paths it was asked for."""

    def __init__(self, routes: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]) -> None:
        self.hits: list[str] = []
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.hits.append(self.path)
                routes.get(self.path, not_found)(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def answer(status: int, body: bytes, ctype: str, length: bool = True, **headers: str
           ) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        for k, v in headers.items():
            h.send_header(k.replace("_", "-"), v)
        if length:
            h.send_header("Content-Length", str(len(body)))
        else:
            h.close_connection = True  # the body ends when the connection does
        h.end_headers()
        h.wfile.write(body)

    return handle


def not_found(h: http.server.BaseHTTPRequestHandler) -> None:
    answer(404, b"no such thing", "text/plain")(h)


VALID = png(64, 64)
BIG = noisy_png(256, 256)  # over the 100 000-byte limit the fetch apps get


@pytest.fixture
def other() -> Iterator[Server]:
    """A second loopback server, on a port no app allows: it must never be asked for anything."""
    with Server({"/ok.png": answer(200, VALID, "image/png")}) as server:
        yield server


@pytest.fixture
def origin(other: Server) -> Iterator[Server]:
    def slow(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(VALID)))
        h.end_headers()
        h.wfile.write(VALID[:20])
        h.wfile.flush()
        server.stop.wait(5)  # the rest never comes in time

    server = Server({
        "/ok.png": answer(200, VALID, "image/png"),
        "/ok-with-charset.png": answer(200, VALID, "image/png; charset=binary"),
        "/page.html": answer(200, b"<html>hi</html>", "text/html"),
        "/big.png": answer(200, BIG, "image/png"),
        "/big-streamed.png": answer(200, BIG, "image/png", length=False),
        "/not-an-image.png": answer(200, b"this is text", "image/png"),
        "/slow.png": slow,
        "/redirect-here": answer(302, b"", "text/plain", Location="/ok.png"),
        "/redirect-elsewhere": answer(302, b"", "text/plain", Location=other.url("/ok.png")),
        "/redirect-loop": answer(302, b"", "text/plain", Location="/redirect-loop"),
    })
    with server:
        yield server


@pytest.fixture
def fetching(make_api: Callable[..., httpx.Client], origin: Server) -> httpx.Client:
    return make_api(image_fetch_allow_http=True, image_fetch_allow_addresses=f"127.0.0.1:{origin.port}",
                    image_fetch_timeout_seconds=1, max_image_body_bytes=100_000)


def test_url_fetch_of_a_valid_png(fetching: httpx.Client, origin: Server, r: redis.Redis) -> None:
    for path in ("/ok.png", "/ok-with-charset.png", "/redirect-here"):
        res = post_json(fetching, image=origin.url(path))
        assert res.status_code == 202, res.text
        ref = res.json()["params"]["image"]
        assert (ref["width"], ref["height"]) == (64, 64)
    assert origin.hits == ["/ok.png", "/ok-with-charset.png", "/redirect-here", "/ok.png"]
    assert r.llen("rq:queue:sdxl-generations") == 3 and len(uploads_in(r)) == 3


@pytest.mark.parametrize("path,says", [
    ("/page.html", "answered Content-Type 'text/html'"),
    ("/big.png", f"is {len(BIG)} bytes; the limit is 100000"),
    ("/big-streamed.png", "is larger than the limit of 100000 bytes"),
    ("/slow.png", "did not answer within 1 s (SDXL_IMAGE_FETCH_TIMEOUT_SECONDS)"),
    ("/missing.png", "answered HTTP 404"),
    ("/redirect-loop", "redirected more than 3 times (SDXL_IMAGE_FETCH_MAX_REDIRECTS)"),
])
def test_url_fetch_refused(fetching: httpx.Client, origin: Server, r: redis.Redis, storage_dir: Path, path: str,
                           says: str) -> None:
    url = origin.url(path)
    body = problem(post_json(fetching, image=url), 422, "image", url)
    assert says in message(body, "image"), body
    assert_nothing_queued(r, storage_dir)


def test_url_that_is_no_image(fetching: httpx.Client, origin: Server, r: redis.Redis, storage_dir: Path) -> None:
    body = problem(post_json(fetching, image=origin.url("/not-an-image.png")), 422, "image")
    assert "is not an image" in message(body, "image")
    assert_nothing_queued(r, storage_dir)


def test_redirect_to_a_loopback_port_not_allowed(fetching: httpx.Client, origin: Server, other: Server,
                                                 r: redis.Redis, storage_dir: Path) -> None:
    url = origin.url("/redirect-elsewhere")
    body = problem(post_json(fetching, image=url), 422, "image", url)
    says = message(body, "image")
    assert "loopback address" in says and "SDXL_IMAGE_FETCH_ALLOW_ADDRESSES" in says, says
    assert origin.hits == ["/redirect-elsewhere"] and other.hits == []  # the redirect was never followed
    assert_nothing_queued(r, storage_dir)


def test_loopback_url_not_on_the_allowlist(fetching: httpx.Client, other: Server, r: redis.Redis,
                                           storage_dir: Path) -> None:
    url = other.url("/ok.png")
    says = message(problem(post_json(fetching, image=url), 422, "image", url), "image")
    assert "loopback" in says and "SDXL_IMAGE_FETCH_ALLOW_ADDRESSES" in says, says
    assert other.hits == []
    assert_nothing_queued(r, storage_dir)


def test_plain_http_refused_by_default(api: httpx.Client, origin: Server, r: redis.Redis,
                                       storage_dir: Path) -> None:
    url = origin.url("/ok.png")
    says = message(problem(post_json(api, image=url), 422, "image", url), "image")
    assert "must use https" in says and "SDXL_IMAGE_FETCH_ALLOW_HTTP" in says, says
    assert origin.hits == []
    assert_nothing_queued(r, storage_dir)


def test_a_fetched_mask_is_checked_as_a_mask(fetching: httpx.Client, origin: Server, r: redis.Redis,
                                             storage_dir: Path) -> None:
    url = origin.url("/ok.png")  # a colour picture: no mask
    body = problem(post_json(fetching, image=data_uri(png()), mask_image=url), 422, "mask_image")
    assert "has colour" in message(body, "mask_image")
    assert_nothing_queued(r, storage_dir)


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"no DNS lookups in tests ({host})")


@pytest.mark.parametrize("url,reason", [
    ("https://10.1.2.3/cat.png", "private"),
    ("https://192.168.0.10/cat.png", "private"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://127.0.0.1:8443/cat.png", "loopback"),  # loopback, but not the allowed port
    ("https://[::1]:9/cat.png", "loopback"),
    ("https://[::ffff:127.0.0.1]:9/cat.png", "loopback"),
    ("https://2130706433:9/cat.png", "loopback"),  # 127.0.0.1 as one number
    ("https://0.0.0.0/cat.png", "unspecified"),
])
def test_fetch_policy_allows_only_the_allowed_loopback_port(url: str, reason: str) -> None:
    """The policy an app with `SDXL_IMAGE_FETCH_ALLOW_ADDRESSES=127.0.0.1:<port>` fetches under: that one
    address and port, nothing else that is not public. Classified here, never connected to."""
    policy = ssrf.Policy.build(ssrf.split_list("127.0.0.1:8080"), allow_http=True)
    with pytest.raises(ssrf.UnsafeUrl, match=reason):
        ssrf.check_url(url, policy, no_dns)
    assert ssrf.check_url("http://127.0.0.1:8080/cat.png", policy, no_dns).address == "127.0.0.1"
    assert ssrf.check_url("https://93.184.215.14/cat.png", policy, no_dns).address == "93.184.215.14"

