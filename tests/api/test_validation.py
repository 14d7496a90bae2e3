"""Refused requests: RFC 9457 problem details naming the field and value, and nothing enqueued."""

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

OK: dict[str, Any] = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_inference_steps": 4}


@pytest.fixture
def no_refiner(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    """An app without the refiner configured (`api` has one)."""
    return make_api(refiner_model="")


def assert_nothing_enqueued(r: redis.Redis) -> None:
    assert r.llen("rq:queue:sdxl-generations") == 0
    assert list(r.scan_iter("sdxl:gen:*")) == []
    assert list(r.scan_iter("sdxl:pending:*")) == []


CASES = [
    ("empty prompt", {**OK, "prompt": ""}, "prompt", ""),
    ("blank prompt", {**OK, "prompt": "   "}, "prompt", "   "),
    ("oversized prompt", {**OK, "prompt": "x" * 4001}, "prompt", None),
    ("width not multiple of 8", {**OK, "width": 1001}, "width", 1001),
    ("height not multiple of 8", {**OK, "height": 100}, "height", 100),
    ("width too large", {**OK, "width": 4096}, "width", 4096),
    ("height too small", {**OK, "height": 32}, "height", 32),
    ("steps zero", {**OK, "num_inference_steps": 0}, "num_inference_steps", 0),
    ("steps too many", {**OK, "num_inference_steps": 1000}, "num_inference_steps", 1000),
    ("too many images", {**OK, "num_images_per_prompt": 9}, "num_images_per_prompt", 9),
    ("unknown field", {**OK, "promtp": "typo"}, "promtp", "typo"),
    ("wrong type", {**OK, "width": "wide"}, "width", "wide"),
    ("negative seed", {**OK, "seed": -1}, "seed", -1),
    ("seed beyond 2^53-1", {**OK, "seed": 2**53}, "seed", 2**53),
    ("unknown scheduler", {**OK, "scheduler": "dpm_fast"}, "scheduler", "dpm_fast"),
    ("bad refiner mode", {**OK, "refiner": {"mode": "twice"}}, "refiner.mode", "twice"),
    ("denoising_start out of range", {**OK, "refiner": {"denoising_start": 1.5}}, "refiner.denoising_start", 1.5),
    # 2 steps x 0.3 rounds down to no denoising step: diffusers would fail the job in the worker
    ("refiner img2img under one step", {**OK, "num_inference_steps": 2, "refiner": {"mode": "img2img"}},
     "refiner.strength", 0.3),
    ("bad output format", {**OK, "output_format": "gif"}, "output_format", "gif"),
    ("bad pair", {**OK, "original_size": [1, 2, 3]}, "original_size", [1, 2, 3]),
    ("guidance out of range", {**OK, "guidance_scale": 100}, "guidance_scale", 100),
    # bound by the loaded model: the tiny text encoders have 4 layers, so clip_skip may be at most 3
    ("clip_skip beyond the text encoder's depth", {**OK, "clip_skip": 4}, "clip_skip", 4),
]


def test_clip_skip_is_bound_by_the_loaded_model(api: httpx.Client, r: redis.Redis) -> None:
    res = api.post("/v1/generations", json={**OK, "clip_skip": 4})
    assert res.status_code == 422 and "at most 3 for this model" in res.json()["errors"][0]["message"], res.text
    assert_nothing_enqueued(r)
    res = api.post("/v1/generations", json={**OK, "clip_skip": 3})
    assert res.status_code == 202, res.text  # stays queued (no worker); Redis is flushed before the next test


@pytest.mark.parametrize("name,body,field,value", CASES, ids=[c[0] for c in CASES])
def test_invalid_input_names_field_and_value(api: httpx.Client, r: redis.Redis, name: str, body: dict,
                                             field: str, value: Any) -> None:
    res = api.post("/v1/generations", json=body)
    assert res.status_code == 422, res.text
    assert res.headers["content-type"] == "application/problem+json"
    problem = res.json()
    assert problem["type"].startswith("urn:sdxl:problem:") and problem["status"] == 422
    assert problem["title"] and problem["detail"]
    fields = {e["field"]: e for e in problem["errors"]}
    assert field in fields, problem
    if value is not None:
        assert fields[field]["value"] == value
    assert_nothing_enqueued(r)


def test_malformed_json(api: httpx.Client, r: redis.Redis) -> None:
    res = api.post("/v1/generations", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert res.status_code == 422 and res.json()["errors"][0]["field"] == "body"
    assert_nothing_enqueued(r)


def test_non_json_media_type_is_415(api: httpx.Client, r: redis.Redis) -> None:
    res = api.post("/v1/generations", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert res.status_code == 415 and res.json()["type"] == "urn:sdxl:problem:unsupported-media-type"
    assert_nothing_enqueued(r)


def test_oversized_body_is_413(api: httpx.Client, r: redis.Redis) -> None:
    res = api.post("/v1/generations", content=b'{"prompt": "' + b"x" * 70000 + b'"}',
                   headers={"content-type": "application/json"})
    assert res.status_code == 413 and res.headers["content-type"] == "application/problem+json"
    assert_nothing_enqueued(r)


def test_refiner_refused_at_submit_without_a_refiner(no_refiner: httpx.Client, r: redis.Redis) -> None:
    for mode in ("ensemble", "img2img"):
        res = no_refiner.post("/v1/generations", json={**OK, "refiner": {"mode": mode}})
        assert res.status_code == 422
        assert res.json()["errors"][0] == {"field": "refiner.mode", "message": res.json()["errors"][0]["message"],
                                           "value": mode}
    assert_nothing_enqueued(r)
    # without a refiner the default mode is none, and that is accepted
    ok = no_refiner.post("/v1/generations", json=OK)
    assert ok.status_code == 202 and ok.json()["params"]["refiner"]["mode"] == "none"


def test_refiner_refused_when_registered_workers_have_none(api: httpx.Client, r: redis.Redis) -> None:
    r.hset("sdxl:worker:fake", mapping={"id": "fake", "state": "ready", "has_refiner": "0"})
    r.zadd("sdxl:workers", {"fake": time.time()})
    time.sleep(1.5)  # each API replica re-reads the worker registry once a second, in the background
    try:
        res = api.post("/v1/generations", json={**OK, "refiner": {"mode": "ensemble"}})
        assert res.status_code == 422 and res.json()["errors"][0]["field"] == "refiner.mode"
    finally:
        r.delete("sdxl:worker:fake")
        r.zrem("sdxl:workers", "fake")


def test_routing_errors_use_the_problem_format(api: httpx.Client) -> None:
    res = api.get("/nowhere")
    assert res.status_code == 404 and res.headers["content-type"] == "application/problem+json"
    res = api.delete("/healthz")
    assert res.status_code == 405 and res.json()["status"] == 405
