"""Images in, end to end: every way to send an image (multipart, an URL fetched at submit, a `data:` URI, an upload
id), image to image and inpainting, through the real API and worker on the tiny model; one-call image answers;
reproducibility and micro-batching with inputs."""

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.file_server import serve_files
from tests.procs import Service, free_port

BODY = {"prompt": "a red barn", "num_inference_steps": 4, "seed": 11, "refiner": {"mode": "none"}}
W, H = 128, 96  # not square: the output must take the input's size, not a default


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def picture(seed: int = 0) -> bytes:
    img = Image.new("RGB", (W, H))
    img.putdata([((x * 7 + seed) % 256, (y * 5) % 256, (x * y + seed * 3) % 256) for y in range(H) for x in range(W)])
    return png(img)


def mask() -> bytes:
    m = Image.new("L", (W, H), 0)
    m.paste(255, (32, 24, 96, 72))
    return png(m)


IMAGE, MASK = picture(), mask()


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A loopback server of the test images; the module's API allowlists exactly its address."""
    with serve_files({"/image.png": ("image/png", IMAGE), "/mask.png": ("image/png", MASK)}) as server:
        yield server.url


@pytest.fixture(scope="module")
def api(service: Service, image_server: str) -> Iterator[str]:
    """An API on the shared worker that may fetch images from the module's loopback server (and nothing else)."""
    port = image_server.rsplit(":", 1)[1]
    view = service.view()
    try:
        yield view.start_api(SDXL_IMAGE_FETCH_ALLOW_HTTP="true", SDXL_IMAGE_FETCH_ALLOW_ADDRESSES=f"127.0.0.1:{port}")
    finally:
        view.stop()  # a view's API processes are its own to stop


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def submit(api: str, route: str, image_server: str, inpaint: bool, extra: dict[str, Any] | None = None
           ) -> httpx.Response:
    """The same request sent one of the four ways; waits for the result."""
    body = {**BODY, **(extra or {})}
    headers = {"Prefer": "wait=60"}
    if route == "multipart":
        files = {"image": ("in.png", IMAGE, "image/png")}
        if inpaint:
            files["mask_image"] = ("mask.png", MASK, "image/png")
        return httpx.post(f"{api}/v1/generations", data={"request": json.dumps(body)}, files=files,
                          headers=headers, timeout=90)
    if route == "url":
        body["image"] = f"{image_server}/image.png"
        if inpaint:
            body["mask_image"] = f"{image_server}/mask.png"
    elif route == "data_uri":
        body["image"] = data_uri(IMAGE)
        if inpaint:
            body["mask_image"] = data_uri(MASK)
    else:
        body["image"] = upload(api, IMAGE)["id"]
        if inpaint:
            body["mask_image"] = upload(api, MASK)["id"]
    return httpx.post(f"{api}/v1/generations", json=body, headers=headers, timeout=90)


def upload(api: str, data: bytes) -> dict[str, Any]:
    r = httpx.post(f"{api}/v1/image-uploads", files={"file": ("x.png", data, "image/png")}, timeout=30)
    assert r.status_code == 201, r.text
    return dict(r.json())


def image_bytes(api: str, gen: dict[str, Any]) -> bytes:
    r = httpx.get(f"{api}/v1/generations/{gen['id']}/images/0", timeout=30)
    assert r.status_code == 200
    return r.content


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_every_input_route_gives_the_same_image(api: str, image_server: str, inpaint: bool) -> None:
    results = {}
    for route in ("multipart", "url", "data_uri", "upload_id"):
        r = submit(api, route, image_server, inpaint)
        assert r.status_code == 201, (route, r.text)
        gen = r.json()
        assert gen["status"] == "succeeded", (route, gen["error"])
        img = gen["images"][0]
        assert (img["width"], img["height"]) == (W, H)  # the output follows the input's size
        manifest = gen["manifest"]
        assert manifest["mode"] == ("inpaint" if inpaint else "img2img")
        assert manifest["inputs"]["image"]["sha256"] == hashlib.sha256(IMAGE).hexdigest()
        if inpaint:
            assert manifest["inputs"]["mask_image"]["sha256"] == hashlib.sha256(MASK).hexdigest()
        assert gen["params"]["strength"] == (0.9999 if inpaint else 0.3)  # diffusers' defaults, reported back
        results[route] = img["sha256"]
    assert len(set(results.values())) == 1, results  # one input, four routes: byte-identical outputs


def test_the_input_image_shapes_the_output(api: str, image_server: str) -> None:
    a = submit(api, "upload_id", image_server, False, {"strength": 0.5}).json()
    b = httpx.post(f"{api}/v1/generations", json={**BODY, "strength": 0.5, "image": data_uri(picture(seed=99))},
                   headers={"Prefer": "wait=60"}, timeout=90).json()
    text = httpx.post(f"{api}/v1/generations", json={**BODY, "width": W, "height": H},
                      headers={"Prefer": "wait=60"}, timeout=90).json()
    shas = {g["images"][0]["sha256"] for g in (a, b, text)}
    assert len(shas) == 3  # another image, or none, gives another output with the same seed and prompt
    again = submit(api, "upload_id", image_server, False, {"strength": 0.5}).json()
    assert again["images"][0]["sha256"] == a["images"][0]["sha256"]  # same inputs, params, seed: same bytes


def test_inpainting_keeps_the_unmasked_area_with_padding_mask_crop(api: str, image_server: str) -> None:
    r = submit(api, "upload_id", image_server, True, {"padding_mask_crop": 8})
    gen = r.json()
    assert gen["status"] == "succeeded", gen
    assert gen["params"]["refiner"]["mode"] == "none"
    out = Image.open(io.BytesIO(image_bytes(api, gen))).convert("RGB")
    src = Image.open(io.BytesIO(IMAGE)).convert("RGB")
    # far from the mask (crop box + padding), the original pixels are pasted back unchanged
    assert out.getpixel((2, 2)) == src.getpixel((2, 2))
    assert out.getpixel((W - 3, H - 3)) == src.getpixel((W - 3, H - 3))
    inside = [(x, y) for x in range(40, 88, 4) for y in range(30, 66, 4)]
    assert sum(out.getpixel(p) != src.getpixel(p) for p in inside) > len(inside) // 2  # the masked box is repainted


def test_an_explicit_size_resizes_the_input(api: str) -> None:
    odd = png(Image.new("RGB", (101, 75), (10, 200, 30)))
    refused = httpx.post(f"{api}/v1/generations", json={**BODY, "image": data_uri(odd)}, timeout=30)
    assert refused.status_code == 422
    problem = refused.json()
    assert problem["errors"][0]["field"] == "image" and "101x75" in problem["detail"]
    assert "104x72" in problem["detail"]  # the nearest valid size, named
    r = httpx.post(f"{api}/v1/generations", json={**BODY, "image": data_uri(odd), "width": 128, "height": 96},
                   headers={"Prefer": "wait=60"}, timeout=90)
    gen = r.json()
    assert gen["status"] == "succeeded" and (gen["images"][0]["width"], gen["images"][0]["height"]) == (128, 96)


def test_less_than_one_denoising_step_is_refused(api: str) -> None:
    r = httpx.post(f"{api}/v1/generations", json={**BODY, "num_inference_steps": 2, "image": data_uri(IMAGE)},
                   timeout=30)  # 2 x the default 0.3: no whole step, which diffusers would fail on in the worker
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "strength"


def test_snap_to_bucket_snaps_the_input_shape(api: str) -> None:
    wide = png(Image.new("RGB", (320, 256), (90, 90, 200)))
    r = httpx.post(f"{api}/v1/generations", json={**BODY, "num_inference_steps": 4, "image": data_uri(wide),
                                                  "snap_to_bucket": True}, timeout=30)
    assert r.status_code == 202, r.text
    assert (r.json()["params"]["width"], r.json()["params"]["height"]) == (1152, 896)  # 1.25 -> 1.29, not 1024^2
    httpx.post(f"{api}/v1/generations/{r.json()['id']}/cancel", timeout=10)


def test_a_mask_of_another_size_is_refused(api: str) -> None:
    small = png(Image.new("L", (64, 64), 255))
    r = httpx.post(f"{api}/v1/generations", json={**BODY, "image": data_uri(IMAGE), "mask_image": data_uri(small)},
                   timeout=30)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "mask_image"
    assert "64x64" in r.json()["detail"] and f"{W}x{H}" in r.json()["detail"]


def test_one_call_answers_the_image_bytes(api: str) -> None:
    r = httpx.post(f"{api}/v1/generations", json={**BODY, "image": data_uri(IMAGE)},
                   headers={"Prefer": "wait=60", "Accept": "image/webp"}, timeout=90)
    assert r.status_code == 201 and r.headers["content-type"] == "image/webp"
    gen_id = r.headers["x-generation-id"]
    assert r.headers["location"].endswith(f"/v1/generations/{gen_id}")
    assert r.headers["x-image-sha256"] == hashlib.sha256(r.content).hexdigest()
    assert Image.open(io.BytesIO(r.content)).size == (W, H)
    gen = httpx.get(f"{api}/v1/generations/{gen_id}", timeout=10).json()
    assert gen["params"]["output_format"] == "webp" and str(gen["images"][0]["seed"]) == r.headers["x-seed"]
    # several images keep JSON; an output_format that contradicts Accept is refused, not guessed at
    several = httpx.post(f"{api}/v1/generations", json={**BODY, "num_images_per_prompt": 2, "width": 64,
                                                        "height": 64},
                         headers={"Prefer": "wait=60", "Accept": "image/png"}, timeout=90)
    assert several.status_code == 201 and several.json()["status"] == "succeeded"
    clash = httpx.post(f"{api}/v1/generations", json={**BODY, "output_format": "jpeg"},
                       headers={"Prefer": "wait=60", "Accept": "image/png"}, timeout=30)
    assert clash.status_code == 422 and clash.json()["errors"][0]["field"] == "output_format"


def test_a_blocked_url_is_refused_before_anything_is_queued(api: str, image_server: str) -> None:
    other = free_port()  # loopback, but not the allowlisted port
    r = httpx.post(f"{api}/v1/generations", json={**BODY, "image": f"http://127.0.0.1:{other}/x.png"}, timeout=30)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "image"
    assert "SDXL_IMAGE_FETCH_ALLOW_ADDRESSES" in r.json()["detail"]
    missing = httpx.post(f"{api}/v1/generations", json={**BODY, "image": f"{image_server}/nope.png"}, timeout=30)
    assert missing.status_code == 422 and "404" in missing.json()["detail"]


def test_jobs_batch_only_with_the_same_input(batching_stack: Service) -> None:
    api = batching_stack.url
    common = {**BODY, "strength": 0.6}
    blocker = httpx.post(f"{api}/v1/generations", json={"prompt": "blocker", "width": 256, "height": 256,
                                                        "num_inference_steps": 30}, timeout=30).json()
    first = upload(api, IMAGE)["id"]
    same_bytes = upload(api, IMAGE)["id"]  # another upload of the same bytes: compatible
    other = upload(api, picture(seed=5))["id"]
    gens = [httpx.post(f"{api}/v1/generations", json={**common, "seed": 100 + i, "image": img}, timeout=30).json()
            for i, img in enumerate((first, same_bytes, other))]
    results = []
    for g in (blocker, *gens):
        res = httpx.get(f"{api}/v1/generations/{g['id']}", headers={"Prefer": "wait=60"}, timeout=70).json()
        results.append(res)
    assert all(r["status"] == "succeeded" for r in results), [r["error"] for r in results]
    sizes = [r["timings"]["batch_images"] for r in results[1:]]
    assert sizes == [2, 2, 1], sizes
    # batched or not, each image is what it would be alone
    solo = httpx.post(f"{api}/v1/generations", json={**common, "seed": 101, "image": first},
                      headers={"Prefer": "wait=60"}, timeout=90).json()
    a = Image.open(io.BytesIO(image_bytes(api, solo))).convert("RGB").tobytes()
    b = Image.open(io.BytesIO(image_bytes(api, results[2]))).convert("RGB").tobytes()
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1  # the batching tolerance (test_engine_e2e)
