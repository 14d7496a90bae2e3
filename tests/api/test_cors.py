"""CORS for browser apps: allowed origins get preflights answered and may read Location, RateLimit-*,
Retry-After and X-Request-ID; other origins, and deployments without SDXL_CORS_ORIGINS, get no CORS headers."""

from collections.abc import Callable

import httpx
import pytest

from app.settings import Settings
from tests.client import TINY, Key, keys_env

APP = "https://app.example"
KEY = Key("browser")
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key, prefer",
}


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(KEY), cors_origins=f"{APP}, https://other.example")


@pytest.fixture
def plain(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    """The same keys, SDXL_CORS_ORIGINS empty."""
    return make_api(api_keys=keys_env(KEY), cors_origins="")


def exposed(res: httpx.Response) -> set[str]:
    return {h.strip().lower() for h in res.headers.get("access-control-expose-headers", "").split(",")}


def test_preflight_from_an_allowed_origin(api: httpx.Client) -> None:
    res = api.options("/v1/generations", headers={"Origin": APP, **PREFLIGHT})
    assert res.status_code == 200, res.text
    assert res.headers["access-control-allow-origin"] == APP
    assert "POST" in res.headers["access-control-allow-methods"]
    allowed = res.headers["access-control-allow-headers"].lower()
    for header in ("authorization", "content-type", "idempotency-key", "prefer"):
        assert header in allowed
    assert "access-control-allow-credentials" not in res.headers  # keys go in Authorization, not cookies


def test_browser_can_read_location_limits_and_request_id(api: httpx.Client) -> None:
    res = api.post(
        "/v1/generations", json={"prompt": "from a browser", **TINY}, headers={"Origin": APP, **KEY.headers}
    )
    assert res.status_code == 202, res.text
    assert res.headers["access-control-allow-origin"] == APP
    want = {"location", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "retry-after", "x-request-id"}
    assert want <= exposed(res)
    assert {"location", "ratelimit-limit", "x-request-id"} <= set(res.headers)


def test_error_answers_carry_cors_headers_too(api: httpx.Client) -> None:
    res = api.get("/v1/generations", headers={"Origin": APP})
    assert res.status_code == 401
    assert res.headers["access-control-allow-origin"] == APP  # so the page can read the problem


def test_other_origins_get_nothing(api: httpx.Client) -> None:
    pre = api.options("/v1/generations", headers={"Origin": "https://evil.example", **PREFLIGHT})
    assert pre.status_code == 400
    assert "access-control-allow-origin" not in pre.headers
    res = api.get("/v1/generations", headers={"Origin": "https://evil.example", **KEY.headers})
    assert res.status_code == 200 and "access-control-allow-origin" not in res.headers


def test_no_cors_unless_configured(plain: httpx.Client) -> None:
    pre = plain.options("/v1/generations", headers={"Origin": APP, **PREFLIGHT})
    assert "access-control-allow-origin" not in pre.headers
    res = plain.get("/v1/generations", headers={"Origin": APP, **KEY.headers})
    assert res.status_code == 200 and "access-control-allow-origin" not in res.headers


def test_origins_setting_accepts_a_json_list_or_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    both = ["https://a.example", "https://b.example"]
    for raw, want in (
        ('["https://a.example", "https://b.example"]', both),
        ("https://a.example, https://b.example", both),
        ("", []),
    ):
        monkeypatch.setenv("SDXL_CORS_ORIGINS", raw)
        assert Settings().cors_origins == want
