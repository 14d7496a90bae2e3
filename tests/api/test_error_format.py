"""Every 4xx and 5xx the API can produce is RFC 9457 problem+json with a stable `type`, and the spec declares it.

In-process apps (tests/api/conftest.py) on a real Redis, no worker; the unexpected 500 is provoked through a
test-only route on an app built by create_app whose lifespan never runs.
"""

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.client import Key, keys_env
from tests.procs import ROOT, RedisServer

SPEC = json.loads((ROOT / "openapi" / "openapi.json").read_text())
PROBLEM_SCHEMA = {"$ref": "#/components/schemas/ProblemDetails", "components": SPEC["components"]}
TINY = {"prompt": "a red bicycle", "width": 128, "height": 128, "num_inference_steps": 4}
MAX_BODY = 2048
MISSING = "gen_AAAAAAAAAAAAAAAAAAAAAA"

MAIN = Key("main")
TIGHT = Key("tight", rate_per_minute=1, burst=1)  # one request, then 429 for a minute
CAPPED = Key("capped", max_queued=1)


def assert_problem(r: Any, status: int, kind: str, op: tuple[str, str] | None = None) -> dict[str, Any]:
    """`r` (an httpx response, or the TestClient's) is a problem of this kind, shaped as the spec says, and
    declared for `op` (method, path)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body: dict[str, Any] = r.json()
    jsonschema.validate(body, PROBLEM_SCHEMA)
    assert body["type"] == f"urn:sdxl:problem:{kind}" and body["status"] == status, body
    assert body["title"] and body["detail"] and body["instance"] == r.request.url.path
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert r.headers.get("x-request-id"), "every answer carries its request id"
    if op is not None:
        method, path = op
        assert str(status) in SPEC["paths"][path][method]["responses"], f"{status} not declared for {op}"
    if status in (429, 503):
        assert int(r.headers["retry-after"]) >= 1
    return body


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(MAIN, TIGHT), max_body_bytes=MAX_BODY)


def call(c: httpx.Client, method: str, path: str, key: Key | None = MAIN, **kw: Any) -> httpx.Response:
    headers = {**(key.headers if key else {}), **kw.pop("headers", {})}
    return c.request(method, path, headers=headers, timeout=60, **kw)


def test_404_from_routing_and_for_a_missing_generation(api: httpx.Client) -> None:
    assert_problem(call(api, "GET", "/v1/nothing-here"), 404, "not-found")
    r = call(api, "GET", f"/v1/generations/{MISSING}")
    assert_problem(r, 404, "generation-not-found", ("get", "/v1/generations/{gen_id}"))
    r = call(api, "GET", f"/v1/generations/{MISSING}/images/0")
    assert_problem(r, 404, "generation-not-found", ("get", "/v1/generations/{gen_id}/images/{index}"))


def test_405_names_every_allowed_method(api: httpx.Client) -> None:
    r = call(api, "PATCH", "/v1/generations")
    assert_problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == "GET, POST"
    r = call(api, "PUT", f"/v1/generations/{MISSING}")
    assert_problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == "DELETE, GET"


def test_413_over_the_body_limit_declared_or_streamed(api: httpx.Client) -> None:
    big = {**TINY, "prompt": "x" * MAX_BODY}
    assert_problem(
        call(api, "POST", "/v1/generations", json=big), 413, "payload-too-large", ("post", "/v1/generations")
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the guard counts the bytes as they arrive
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 256 + 1):
            yield b"y" * 256
        yield b'"}'

    r = call(api, "POST", "/v1/generations", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "payload-too-large")


def test_415_for_a_body_that_is_not_json(api: httpx.Client) -> None:
    r = call(api, "POST", "/v1/generations", content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert_problem(r, 415, "unsupported-media-type", ("post", "/v1/generations"))


def test_422_names_the_field_and_the_value(api: httpx.Client) -> None:
    r = call(api, "POST", "/v1/generations", json={**TINY, "width": 100})
    body = assert_problem(r, 422, "validation-error", ("post", "/v1/generations"))
    assert [(e["field"], e["value"]) for e in body["errors"]] == [("width", 100)]
    assert "multiple of 8" in body["errors"][0]["message"]
    for raw in (b'{"prompt": ', b'{"prompt": "\xff"}'):  # not JSON; not even UTF-8
        r = call(api, "POST", "/v1/generations", content=raw, headers={"Content-Type": "application/json"})
        assert assert_problem(r, 422, "validation-error")["errors"][0]["field"] == "body"
    r = call(api, "GET", "/v1/generations", params={"limit": 0})
    assert assert_problem(r, 422, "validation-error", ("get", "/v1/generations"))["errors"][0]["field"] == "limit"


def test_409_cancel_of_a_finished_generation(api: httpx.Client, succeed: Callable[[str], None]) -> None:
    gid = call(api, "POST", "/v1/generations", json=TINY).json()["id"]
    succeed(gid)  # no worker here: the records it would leave
    done = call(api, "GET", f"/v1/generations/{gid}").json()
    assert done["status"] == "succeeded"
    r = call(api, "POST", f"/v1/generations/{done['id']}/cancel")
    assert_problem(r, 409, "generation-final", ("post", "/v1/generations/{gen_id}/cancel"))


def test_401_without_or_with_a_wrong_key(api: httpx.Client) -> None:
    r = call(api, "GET", "/v1/generations", key=None)
    assert_problem(r, 401, "unauthorized", ("get", "/v1/generations"))
    assert r.headers["www-authenticate"] == 'Bearer realm="sdxl"'
    r = call(api, "POST", "/v1/generations", key=None, json=TINY, headers={"Authorization": "Bearer nope"})
    assert_problem(r, 401, "unauthorized", ("post", "/v1/generations"))
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_429_over_the_rate_limit(api: httpx.Client) -> None:
    assert call(api, "GET", "/v1/generations", key=TIGHT).status_code == 200
    r = call(api, "GET", "/v1/generations", key=TIGHT)
    assert_problem(r, 429, "rate-limited", ("get", "/v1/generations"))
    assert r.headers["ratelimit-limit"] == "1" and r.headers["ratelimit-remaining"] == "0"


IDLE = {"api_keys": keys_env(MAIN, CAPPED), "max_queue_depth": 1}  # no worker: what is submitted stays queued


@pytest.fixture
def stoppable_redis() -> Iterator[RedisServer]:
    """A private Redis the test may stop (not the session's)."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_429_unfinished_cap_and_503_queue_full(make_api: Callable[..., httpx.Client]) -> None:
    idle_service = make_api(**IDLE)
    assert call(idle_service, "POST", "/v1/generations", key=CAPPED, json=TINY).status_code == 202
    r = call(idle_service, "POST", "/v1/generations", key=CAPPED, json=TINY)
    assert_problem(r, 429, "too-many-unfinished", ("post", "/v1/generations"))
    r = call(idle_service, "POST", "/v1/generations", key=MAIN, json=TINY)
    assert_problem(r, 503, "queue-full", ("post", "/v1/generations"))


def test_503_with_retry_after_when_redis_is_down(make_api: Callable[..., httpx.Client],
                                                 stoppable_redis: RedisServer) -> None:
    idle_service = make_api(redis_url=stoppable_redis.url, **IDLE)
    gen = call(idle_service, "POST", "/v1/generations", key=MAIN, json=TINY).json()
    stoppable_redis.stop()
    r = call(idle_service, "GET", f"/v1/generations/{gen['id']}")
    assert_problem(r, 503, "store-unavailable", ("get", "/v1/generations/{gen_id}"))
    r = call(idle_service, "POST", "/v1/generations", json=TINY)
    assert_problem(r, 503, "store-unavailable", ("post", "/v1/generations"))
    assert_problem(call(idle_service, "GET", "/readyz", key=None), 503, "not-ready", ("get", "/readyz"))
    assert call(idle_service, "GET", "/healthz", key=None).status_code == 200  # alive, just not ready


def test_unexpected_500_discloses_nothing() -> None:
    # no lifespan runs (no `with`), so nothing connects anywhere; the port is a dead one all the same
    app = create_app(Settings.model_construct(redis_url="redis://127.0.0.1:9/0"))

    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    app.add_api_route("/boom", boom)
    r = TestClient(app, raise_server_exceptions=False).get("/boom", headers={"X-Request-ID": "req-test-500"})
    body = assert_problem(r, 500, "internal-error")
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert body["detail"] == "an unexpected error occurred; it has been logged"
    assert r.headers["x-request-id"] == "req-test-500"


@pytest.mark.parametrize("body, field, message", [
    ({"steps": 20}, "steps", "is not a known field; did you mean `num_inference_steps`?"),
    ({"guidence_scale": 4}, "guidence_scale", "is not a known field; did you mean `guidance_scale`?"),
    ({"refiner": {"strenght": 0.3}}, "refiner.strenght", "is not a known field; did you mean `refiner.strength`?"),
    ({"xyzzy": 1}, "xyzzy", "is not a known field"),
    ({"num_inference_steps": "many"}, "num_inference_steps", "must be a whole number"),
    ({"guidance_scale": 99}, "guidance_scale", "must be at most 30.0"),
    ({"num_inference_steps": 0}, "num_inference_steps", "must be at least 1"),
    ({"output_format": "gif"}, "output_format", "must be one of `png`, `webp` or `jpeg`"),
    ({"snap_to_bucket": "maybe"}, "snap_to_bucket", "must be true or false"),
    ({"original_size": [1, 2, 3]}, "original_size", "must be a pair of whole numbers, [a, b]"),
    ({"refiner": 5}, "refiner", "must be a JSON object"),
])
def test_422_messages_say_what_to_do(api: httpx.Client, body: dict[str, Any], field: str, message: str) -> None:
    r = call(api, "POST", "/v1/generations", json={**TINY, **body})
    problem = assert_problem(r, 422, "validation-error", ("post", "/v1/generations"))
    assert [(e["field"], e["message"]) for e in problem["errors"]] == [(field, message)]
    assert "Input should" not in r.text and "Field required" not in r.text  # no raw pydantic text


def test_a_missing_prompt_is_required(api: httpx.Client) -> None:
    r = call(api, "POST", "/v1/generations", json={"width": 128, "height": 128})
    assert assert_problem(r, 422, "validation-error")["errors"] == [
        {"field": "prompt", "message": "is required", "value": {"width": 128, "height": 128}}]


def test_a_long_prompt_is_reported_once(api: httpx.Client) -> None:
    r = call(api, "POST", "/v1/generations", json={**TINY, "prompt": "a lighthouse " * 60, "long_prompt": "reject"})
    problem = assert_problem(r, 422, "prompt-too-long")
    fields = [e["field"] for e in problem["errors"]]
    assert fields == ["prompt"]  # it feeds both encoders: one entry, both counts in its message
    assert "text_encoder;" in problem["errors"][0]["message"] and "text_encoder_2" in problem["errors"][0]["message"]
