"""Priority bounds per key at submit (in-process; the fair-share and priority order a worker follows is
tests/test_fairness.py, on a real worker)."""

from collections.abc import Callable

import httpx
import pytest

from tests.client import TINY, Key, create, keys_env

A = Key("tenant-a")
LOW = Key("low", max_priority=0)


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(A, LOW))


def test_priority_is_bounded_per_key(api: httpx.Client) -> None:
    res = create(api, {"prompt": "urgent", **TINY, "priority": 1}, LOW)
    assert res.status_code == 422, res.text
    err = res.json()["errors"][0]
    assert err["field"] == "priority" and err["value"] == 1 and "at most 0" in err["message"]
    assert create(api, {"prompt": "too urgent", **TINY, "priority": 3}, A).status_code == 422  # 0..2 for all
    ok = create(api, {"prompt": "normal", **TINY, "priority": 0}, LOW)
    assert ok.status_code == 202  # stays queued: no worker here, and Redis is flushed before the next test
