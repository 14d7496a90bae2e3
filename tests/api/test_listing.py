"""GET /v1/generations: the caller's generations newest first, cursor pages that do not shift when new
work arrives, a status filter, and expired or deleted generations skipped. No worker: all stay queued unless
canceled, which gives two statuses to filter on."""

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from common.contract import keys
from tests.client import TINY, Key, cancel, create, get, keys_env

A = Key("lister")
B = Key("other")


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(A, B))


def create_n(api: httpx.Client, key: Key, n: int) -> list[str]:
    ids = []
    for i in range(n):
        res = create(api, {"prompt": f"picture {i}", **TINY}, key)
        assert res.status_code == 202, res.text
        ids.append(res.json()["id"])
    return ids


def page(api: httpx.Client, key: Key = A, **params: Any) -> dict[str, Any]:
    res = get(api, "/v1/generations", key, **params)
    assert res.status_code == 200, res.text
    return dict(res.json())


def all_pages(api: httpx.Client, **params: Any) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        body = page(api, **params, **({"cursor": cursor} if cursor else {}))
        pages.append([g["id"] for g in body["data"]])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


def test_newest_first_in_cursor_pages(api: httpx.Client) -> None:
    ids = create_n(api, A, 5)
    first = page(api)
    assert [g["id"] for g in first["data"]] == ids[::-1] and first["next_cursor"] is None
    assert first["data"][0]["status"] == "queued" and first["data"][0]["params"]["prompt"] == "picture 4"
    assert all_pages(api, limit=2) == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    assert all_pages(api, limit=5) == [ids[::-1]]


def test_new_work_does_not_shift_the_next_page(api: httpx.Client) -> None:
    ids = create_n(api, A, 4)
    one = page(api, limit=2)
    create_n(api, A, 2)  # arrives between the two page reads
    two = page(api, limit=2, cursor=one["next_cursor"])
    assert [g["id"] for g in one["data"] + two["data"]] == ids[::-1]


def test_status_filter(api: httpx.Client) -> None:
    ids = create_n(api, A, 5)
    for gid in (ids[1], ids[3]):
        assert cancel(api, gid, A).status_code == 202
    assert [g["id"] for g in page(api, status="canceled")["data"]] == [ids[3], ids[1]]
    assert [g["id"] for g in page(api, status="queued")["data"]] == [ids[4], ids[2], ids[0]]
    assert all_pages(api, status="queued", limit=2) == [[ids[4], ids[2]], [ids[0]]]
    assert page(api, status="succeeded")["data"] == []


def test_only_the_callers_generations(api: httpx.Client) -> None:
    mine = create_n(api, A, 2)
    theirs = create_n(api, B, 3)
    assert [g["id"] for g in page(api, A)["data"]] == mine[::-1]
    assert [g["id"] for g in page(api, B)["data"]] == theirs[::-1]


def test_expired_and_deleted_generations_are_skipped(api: httpx.Client, r: redis.Redis) -> None:
    ids = create_n(api, A, 4)
    r.delete(keys.generation(ids[1]))  # gone (deleted, or its record expired)
    r.hset(keys.generation(ids[2]), "expires_at", "1")  # past its expiry, record not yet reaped
    assert all_pages(api, limit=1) == [[ids[3]], [ids[0]]]
    assert r.zscore(keys.owner_index(A.owner), ids[1]) is None  # the dangling index entry was dropped


def test_bad_parameters_are_422(api: httpx.Client) -> None:
    for params in ({"limit": 0}, {"limit": 101}, {"cursor": "not-a-cursor"}, {"status": "done"}):
        res = get(api, "/v1/generations", A, **params)
        assert res.status_code == 422, (params, res.text)
        assert res.headers["content-type"].startswith("application/problem+json")
