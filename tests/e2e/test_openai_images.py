"""The OpenAI-compatible images API (docs/openai.md) through the official `openai` client, against real API
processes on the shared stack's worker: generations and edits, both response formats, the signed URLs, OpenAI's
error envelope (and RFC 9457 everywhere else), keys and limits, and the wait cap."""

import base64
import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis
from PIL import Image

from app.signed_urls import SECRET_KEY, signature
from tests.access import Key, cancel, get, keys_env, wait_final
from tests.procs import Service

TINY = {"num_inference_steps": 4, "refiner": {"mode": "none"}}  # every request's extensions: fast on the tiny model
SIZE = "128x128"
SECRET = "test-url-signing-secret"
TIMEOUT = 120.0  # per call: long enough for a generation on a loaded machine


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def picture(alpha_hole: bool = False) -> bytes:
    """128x128 RGB(A); `alpha_hole`: a transparent square in the middle (OpenAI's "edit here")."""
    img = Image.new("RGBA", (128, 128), (200, 120, 40, 255))
    if alpha_hole:
        img.paste((0, 0, 0, 0), (32, 32, 96, 96))
        return png(img)
    return png(img.convert("RGB"))


def client_for(url: str, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, timeout=TIMEOUT, **kw)


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def generation(url: str, gen_id: str, key: Key | None = None) -> dict[str, Any]:
    res = get(url, f"/v1/generations/{gen_id}", key)
    assert res.status_code == 200, res.text
    return dict(res.json())


@pytest.fixture(scope="module")
def client(service: Service) -> openai.OpenAI:
    return client_for(service.url)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {"team": Key("team"), "rival": Key("rival"), "slow": Key("slow", rate_per_minute=1, burst=1)}


@pytest.fixture(scope="module")
def keyed(service: Service, keys: dict[str, Key]) -> Iterator[str]:
    """An API with keys and a configured signing secret, on the shared worker."""
    view = service.view(SDXL_API_KEYS=keys_env(*keys.values()), SDXL_URL_SIGNING_SECRET=SECRET)
    try:
        yield view.start_api()
    finally:
        view.stop()


# --- generations ------------------------------------------------------------------------------------------------

def test_generate_urls_fetchable_without_a_key(service: Service, client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(prompt="a lighthouse", n=2, size=SIZE, response_format="url",
                                                   extra_body={**TINY, "seed": 7, "negative_prompt": "fog"})
    res = raw.parse()
    assert res.created > 0 and res.size == SIZE and res.output_format == "png"
    assert res.data is not None and len(res.data) == 2
    for item in res.data:
        assert item.b64_json is None and item.revised_prompt is None
        assert item.url and item.url.startswith(f"{service.url}/v1/signed-images/")
        got = httpx.get(item.url, timeout=30)  # no Authorization header: the signature is the capability
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert decoded(got.content).size == (128, 128)
    gen = generation(service.url, raw.headers["x-generation-id"])
    assert gen["status"] == "succeeded" and len(gen["images"]) == 2
    params = gen["params"]
    assert (params["seed"], params["num_inference_steps"], params["negative_prompt"]) == (7, 4, "fog")
    assert (params["width"], params["height"], params["num_images_per_prompt"]) == (128, 128, 2)


def test_generate_b64_json_records_model_and_quality(service: Service, client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(
        prompt="a lighthouse", size="128x64", response_format="b64_json", output_format="webp", model="sdxl-test",
        quality="high", user="end-user-1", extra_body=TINY)
    res = raw.parse()
    assert res.data is not None and len(res.data) == 1 and res.data[0].url is None
    img = decoded(base64.b64decode(res.data[0].b64_json or ""))
    assert (img.format, img.size) == ("WEBP", (128, 64))
    assert (res.quality, res.output_format, res.size) == ("high", "webp", "128x64")
    r = redis.Redis.from_url(service.redis_url)
    try:
        recorded = json.loads(r.hget(f"sdxl:gen:{raw.headers['x-generation-id']}", "openai") or b"{}")
    finally:
        r.close()
    assert recorded == {"model": "sdxl-test", "quality": "high", "user": "end-user-1",
                        "response_format": "b64_json"}


def test_the_same_seed_gives_the_same_bytes(client: openai.OpenAI) -> None:
    first, second = (client.images.generate(prompt="a lighthouse", size=SIZE, response_format="b64_json",
                                            extra_body={**TINY, "seed": 11}) for _ in range(2))
    assert first.data and second.data and first.data[0].b64_json == second.data[0].b64_json


# --- edits --------------------------------------------------------------------------------------------------------

def test_edit_reads_transparency_as_the_mask(service: Service, client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.edit(image=("in.png", picture(alpha_hole=True), "image/png"),
                                               prompt="a window", response_format="b64_json", extra_body=TINY)
    res = raw.parse()
    assert res.data and decoded(base64.b64decode(res.data[0].b64_json or "")).size == (128, 128)
    params = generation(service.url, raw.headers["x-generation-id"])["params"]
    assert params["image"] and params["mask_image"] and params["strength"] == pytest.approx(0.9999)


def test_edit_with_a_mask(service: Service, client: openai.OpenAI) -> None:
    mask = Image.new("RGBA", (128, 128), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 64, 128))  # left half transparent: edit there
    raw = client.images.with_raw_response.edit(
        image=("in.png", picture(), "image/png"), mask=("mask.png", png(mask), "image/png"), prompt="a door",
        size=SIZE, extra_body={**TINY, "strength": 0.8, "seed": 3})
    res = raw.parse()
    assert res.data and res.data[0].url
    assert httpx.get(res.data[0].url, timeout=30).status_code == 200
    params = generation(service.url, raw.headers["x-generation-id"])["params"]
    assert params["mask_image"] and params["strength"] == pytest.approx(0.8) and params["seed"] == 3


def test_edit_of_an_opaque_image_alone_is_image_to_image(service: Service, client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.edit(image=("in.png", picture(), "image/png"), prompt="autumn",
                                               extra_body=TINY)
    assert raw.parse().data
    params = generation(service.url, raw.headers["x-generation-id"])["params"]
    assert params["image"] and params["mask_image"] is None and params["strength"] == pytest.approx(0.3)


def test_edit_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as several:
        client.images.edit(image=[("a.png", picture(), "image/png"), ("b.png", picture(), "image/png")],
                           prompt="x", extra_body=TINY)
    assert several.value.param == "image" and "the limit is 1" in several.value.message
    opaque = png(Image.new("RGBA", (128, 128), (0, 0, 0, 255)))
    with pytest.raises(openai.BadRequestError) as no_hole:
        client.images.edit(image=("in.png", picture(), "image/png"), mask=("m.png", opaque, "image/png"),
                           prompt="x", extra_body=TINY)
    assert no_hole.value.param == "mask" and "transparent" in no_hole.value.message
    small = png(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    with pytest.raises(openai.BadRequestError) as mismatch:
        client.images.edit(image=("in.png", picture(), "image/png"), mask=("m.png", small, "image/png"),
                           prompt="x", extra_body=TINY)
    assert mismatch.value.param == "mask" and "64x64" in mismatch.value.message
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=("in.png", b"not an image", "image/png"), prompt="x", extra_body=TINY)
    assert not_an_image.value.param == "image"


# --- errors: OpenAI's envelope here, RFC 9457 elsewhere ---------------------------------------------------------------

@pytest.mark.parametrize(("fields", "param"), [
    ({"size": "big"}, "size"),
    ({"size": "100x100"}, "size"),
    ({"size": "4096x4096"}, "size"),  # over SDXL_MAX_WIDTH: refused by the deployment's bounds, named as sent
    ({"size": SIZE, "n": 99}, "n"),
    ({"size": SIZE, "response_format": "gif"}, "response_format"),
    ({"size": SIZE, "extra_body": {"num_inference_steps": 1000}}, "num_inference_steps"),
    ({"size": SIZE, "extra_body": {"no_such_field": 1}}, "no_such_field"),
    ({"size": SIZE, "extra_body": {"width": 256}}, "width"),  # `size` says it already
])
def test_invalid_input_is_400_with_param(client: openai.OpenAI, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.images.generate(prompt="x", **fields)
    err = exc.value
    assert err.status_code == 400 and err.param == param and err.type == "invalid_request_error"
    assert err.response.headers["content-type"] == "application/json" and "x-request-id" in err.response.headers


def test_middleware_refusals_use_the_openai_envelope_only_there(service: Service) -> None:
    url = service.url
    wrong_type = httpx.post(f"{url}/v1/images/generations", content=b"x", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415 and wrong_type.json()["error"]["code"] == "unsupported_media_type"
    huge = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x" * 70000})
    assert huge.status_code == 413 and huge.json()["error"]["type"] == "invalid_request_error"
    edit_json = httpx.post(f"{url}/v1/images/edits", json={"prompt": "x"})
    assert edit_json.status_code == 415 and "multipart/form-data" in edit_json.json()["error"]["message"]
    not_json = httpx.post(f"{url}/v1/images/generations", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] == "body"
    wrong_method = httpx.get(f"{url}/v1/images/generations")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    unknown = httpx.post(f"{url}/v1/images/variations", json={})
    assert unknown.status_code == 404 and set(unknown.json()["error"]) == {"message", "type", "param", "code"}
    native = httpx.post(f"{url}/v1/generations", content=b"x", headers={"content-type": "text/plain"})
    assert native.status_code == 415 and native.headers["content-type"] == "application/problem+json"
    assert native.json()["type"] == "urn:sdxl:problem:unsupported-media-type"


def test_keys_limits_and_the_configured_secret(keyed: str, keys: dict[str, Key]) -> None:
    with pytest.raises(openai.AuthenticationError) as bad:
        client_for(keyed, "sdxl_not_a_key").images.generate(prompt="x", size=SIZE, extra_body=TINY)
    assert bad.value.code == "invalid_api_key" and bad.value.response.headers["www-authenticate"]
    team = keys["team"]
    raw = client_for(keyed, team.secret).images.with_raw_response.generate(prompt="x", size=SIZE, extra_body=TINY)
    res, gen_id = raw.parse(), raw.headers["x-generation-id"]
    assert res.data and res.data[0].url
    assert httpx.get(res.data[0].url, timeout=30).status_code == 200  # no key needed for the signed URL
    assert get(keyed, f"/v1/generations/{gen_id}", keys["rival"]).status_code == 404  # isolation as ever
    # the configured secret signs: an URL made with it, but expired, is refused for being expired
    past = int(time.time()) - 5
    sig = signature(SECRET.encode(), gen_id, 0, past)
    expired = httpx.get(f"{keyed}/v1/signed-images/{gen_id}/0", params={"expires": past, "signature": sig})
    assert expired.status_code == 403 and expired.json()["type"] == "urn:sdxl:problem:url-expired"
    # one request a minute: the second is 429, in OpenAI's envelope (not retried: max_retries=0)
    slow = client_for(keyed, keys["slow"].secret, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        slow.images.generate(prompt="x", size="bad")  # authenticated (and charged) before the body is read
    with pytest.raises(openai.RateLimitError) as limited:
        slow.images.generate(prompt="x", size=SIZE, extra_body=TINY)
    assert limited.value.code == "rate_limit_exceeded" and limited.value.response.headers["retry-after"]


# --- signed URLs ---------------------------------------------------------------------------------------------------

def test_forged_or_expired_signatures_are_refused(service: Service, client: openai.OpenAI) -> None:
    res = client.images.generate(prompt="x", size=SIZE, extra_body=TINY)
    assert res.data and res.data[0].url
    url = httpx.URL(res.data[0].url)
    assert httpx.get(url).status_code == 200
    m = re.search(r"/v1/signed-images/(gen_[\w-]+)/0$", url.path)
    assert m
    gen_id = m.group(1)
    forged = httpx.get(url.copy_set_param("signature", "A" * 43))
    assert forged.status_code == 403 and forged.headers["content-type"] == "application/problem+json"
    assert forged.json()["type"] == "urn:sdxl:problem:bad-signature"
    later = httpx.get(url.copy_set_param("expires", str(int(url.params["expires"]) + 3600)))  # not what was signed
    assert later.status_code == 403
    other_image = httpx.get(str(url).replace(f"/{gen_id}/0?", f"/{gen_id}/1?"))
    assert other_image.status_code == 403
    # signed with the shared secret (generated once in Redis) but already expired
    r = redis.Redis.from_url(service.redis_url)
    try:
        stored = r.get(SECRET_KEY)
    finally:
        r.close()
    assert isinstance(stored, bytes)
    secret = stored
    past = int(time.time()) - 1
    expired = httpx.get(url.copy_set_param("expires", str(past)).copy_set_param(
        "signature", signature(secret, gen_id, 0, past)))
    assert expired.status_code == 403 and expired.json()["type"] == "urn:sdxl:problem:url-expired"
    unknown, ahead = f"gen_{'x' * 22}", int(time.time()) + 60
    missing = httpx.get(f"{service.url}/v1/signed-images/{unknown}/0",
                        params={"expires": ahead, "signature": signature(secret, unknown, 0, ahead)})
    assert missing.status_code == 404 and missing.json()["type"] == "urn:sdxl:problem:generation-not-found"


# --- the wait cap ----------------------------------------------------------------------------------------------------

def test_the_wait_cap_answers_424_names_the_generation_and_is_not_retried(service: Service) -> None:
    key = Key("impatient")
    view = service.view(SDXL_API_KEYS=keys_env(key), SDXL_MAX_WAIT_SECONDS="1")
    try:
        url = view.start_api()
        slow = client_for(url, key.secret)  # the default max_retries (2): a retried timeout would show below
        with pytest.raises(openai.APIStatusError) as exc:
            slow.images.generate(prompt="blocker", size="768x768",
                                 extra_body={"num_inference_steps": 100, "refiner": {"mode": "none"}})
        err = exc.value
        gen_id = err.response.headers["x-generation-id"]
        assert err.status_code == 424 and err.code == "generation_timeout" and gen_id in err.message
        assert err.response.headers["x-should-retry"] == "false"
        listed = get(url, "/v1/generations", key).json()["data"]
        assert [g["id"] for g in listed] == [gen_id]  # one generation: the client did not try again
        assert listed[0]["status"] in ("queued", "running")  # it goes on
        assert cancel(url, gen_id, key).status_code == 202
        assert wait_final(url, gen_id, key)["status"] == "canceled"
    finally:
        view.stop()
