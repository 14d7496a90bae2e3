"""Refused requests: RFC 9457 problem details naming the field and value, and nothing enqueued."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import RedisServer, Service

OK: dict[str, Any] = {"prompt": "a lighthouse", "width": 128, "height": 128, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def api(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, RedisServer]]:
    """API processes only (no worker): one with the refiner configured, one without."""
    server = RedisServer()
    server.start()
    svc = Service(server.url, tiny_model, tmp_path_factory.mktemp("val"))
    try:
        svc.start_api()
        svc.no_refiner_url = svc.start_api(SDXL_REFINER_MODEL="")  # type: ignore[attr-defined]
        yield svc, server
    finally:
        svc.stop()
        server.stop()


def assert_nothing_enqueued(server: RedisServer) -> None:
    r = server.client()
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
    ("bad output format", {**OK, "output_format": "gif"}, "output_format", "gif"),
    ("bad pair", {**OK, "original_size": [1, 2, 3]}, "original_size", [1, 2, 3]),
    ("guidance out of range", {**OK, "guidance_scale": 100}, "guidance_scale", 100),
    # bound by the loaded model: the tiny text encoders have 4 layers, so clip_skip may be at most 3
    ("clip_skip beyond the text encoder's depth", {**OK, "clip_skip": 4}, "clip_skip", 4),
]


def test_clip_skip_is_bound_by_the_loaded_model(api: tuple[Service, RedisServer]) -> None:
    svc, server = api
    r = httpx.post(f"{svc.url}/v1/generations", json={**OK, "clip_skip": 4})
    assert r.status_code == 422 and "at most 3 for this model" in r.json()["errors"][0]["message"], r.text
    assert_nothing_enqueued(server)
    r = httpx.post(f"{svc.url}/v1/generations", json={**OK, "clip_skip": 3})
    assert r.status_code == 202, r.text
    server.client().flushdb()  # no worker here: the accepted job would stay queued for the next test


@pytest.mark.parametrize("name,body,field,value", CASES, ids=[c[0] for c in CASES])
def test_invalid_input_names_field_and_value(api: tuple[Service, RedisServer], name: str, body: dict,
                                             field: str, value: Any) -> None:
    svc, server = api
    r = httpx.post(f"{svc.url}/v1/generations", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"].startswith("urn:sdxl:problem:") and problem["status"] == 422
    assert problem["title"] and problem["detail"]
    fields = {e["field"]: e for e in problem["errors"]}
    assert field in fields, problem
    if value is not None:
        assert fields[field]["value"] == value
    assert_nothing_enqueued(server)


def test_malformed_json(api: tuple[Service, RedisServer]) -> None:
    svc, server = api
    r = httpx.post(f"{svc.url}/v1/generations", content=b'{"prompt": "x",',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    assert_nothing_enqueued(server)


def test_non_json_media_type_is_415(api: tuple[Service, RedisServer]) -> None:
    svc, server = api
    r = httpx.post(f"{svc.url}/v1/generations", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "urn:sdxl:problem:unsupported-media-type"
    assert_nothing_enqueued(server)


def test_oversized_body_is_413(api: tuple[Service, RedisServer]) -> None:
    svc, server = api
    r = httpx.post(f"{svc.url}/v1/generations", content=b'{"prompt": "' + b"x" * 70000 + b'"}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert_nothing_enqueued(server)


def test_refiner_refused_at_submit_without_a_refiner(api: tuple[Service, RedisServer]) -> None:
    svc, server = api
    base = svc.no_refiner_url  # type: ignore[attr-defined]
    for mode in ("ensemble", "img2img"):
        r = httpx.post(f"{base}/v1/generations", json={**OK, "refiner": {"mode": mode}})
        assert r.status_code == 422
        assert r.json()["errors"][0] == {"field": "refiner.mode", "message": r.json()["errors"][0]["message"],
                                         "value": mode}
    assert_nothing_enqueued(server)
    # without a refiner the default mode is none, and that is accepted
    ok = httpx.post(f"{base}/v1/generations", json=OK)
    assert ok.status_code == 202 and ok.json()["params"]["refiner"]["mode"] == "none"
    server.client().flushdb()  # our private server: leave it empty for the next test


def test_refiner_refused_when_registered_workers_have_none(api: tuple[Service, RedisServer]) -> None:
    svc, server = api
    r = server.client()
    import time

    r.hset("sdxl:worker:fake", mapping={"id": "fake", "state": "ready", "has_refiner": "0"})
    r.zadd("sdxl:workers", {"fake": time.time()})
    time.sleep(1.5)  # each API replica re-reads the worker registry once a second, in the background
    try:
        res = httpx.post(f"{svc.url}/v1/generations", json={**OK, "refiner": {"mode": "ensemble"}})
        assert res.status_code == 422 and res.json()["errors"][0]["field"] == "refiner.mode"
    finally:
        r.delete("sdxl:worker:fake")
        r.zrem("sdxl:workers", "fake")


def test_routing_errors_use_the_problem_format(api: tuple[Service, RedisServer]) -> None:
    svc, _ = api
    r = httpx.get(f"{svc.url}/nowhere")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    r = httpx.delete(f"{svc.url}/healthz")
    assert r.status_code == 405 and r.json()["status"] == 405
