"""Idempotency-Key on POST /v1/generations: replays answer 200 with the original generation and enqueue
nothing; a different body is a 409; keys are per API key; concurrent identical requests create one job.
No worker runs, so every generation stays queued and the Redis counts are exact."""

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from app.idempotency import fingerprint
from common.contract import keys
from tests.client import TINY, Key, create, keys_env

ALICE = Key("alice")
BOB = Key("bob")
BODY = {"prompt": "a lighthouse", "seed": 3, **TINY}
TTL = 3600


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(ALICE, BOB), generation_ttl_seconds=TTL)


def jobs(r: redis.Redis) -> tuple[int, int]:
    """(generation records, ids waiting in line): what a second submit would add to."""
    waiting = r.llen(keys.RQ_QUEUE_KEY) + sum(r.zcard(k) for k in r.keys("sdxl:pending:*"))
    return len(r.keys("sdxl:gen:*")), waiting


def test_replay_returns_the_original_with_200_and_enqueues_nothing(api: httpx.Client, r: redis.Redis) -> None:
    first = create(api, BODY, ALICE, Idempotency_Key="order-17")
    assert first.status_code == 202, first.text
    after_first = jobs(r)
    assert after_first == (1, 1)
    # the same JSON with other key order and whitespace is the same body
    raw = json.dumps(dict(reversed(list(BODY.items()))), indent=2)
    again = api.post(
        "/v1/generations",
        content=raw,
        timeout=30,
        headers={**ALICE.headers, "Content-Type": "application/json", "Idempotency-Key": "order-17"},
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert jobs(r) == after_first


def test_same_key_with_another_body_is_409(api: httpx.Client, r: redis.Redis) -> None:
    assert create(api, BODY, ALICE, Idempotency_Key="k").status_code == 202
    before = jobs(r)
    res = create(api, {**BODY, "seed": 4}, ALICE, Idempotency_Key="k")
    assert res.status_code == 409, res.text
    assert res.json()["type"] == "urn:sdxl:problem:idempotency-key-reused"
    assert jobs(r) == before


def test_keys_are_scoped_per_api_key(api: httpx.Client, r: redis.Redis) -> None:
    a = create(api, BODY, ALICE, Idempotency_Key="shared")
    b = create(api, BODY, BOB, Idempotency_Key="shared")
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


def test_entry_expires_with_the_generation(api: httpx.Client, r: redis.Redis) -> None:
    create(api, BODY, ALICE, Idempotency_Key="ttl")
    entry = keys.idempotency(ALICE.owner, hashlib.sha256(b"ttl").hexdigest())
    assert TTL - 60 < r.ttl(entry) <= TTL
    held = r.get(entry)
    assert isinstance(held, bytes)
    held_fp, held_id, _ms = held.decode().split(" ")
    assert held_fp == fingerprint(json.dumps(BODY).encode())
    assert r.exists(keys.generation(held_id))


def test_concurrent_identical_requests_create_one_generation(api: httpx.Client, r: redis.Redis) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: create(api, BODY, ALICE, Idempotency_Key="race"), range(8)))
    assert sorted(a.status_code for a in answers) == [200] * 7 + [202], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert jobs(r) == (1, 1)


def test_a_refused_request_does_not_hold_the_key(api: httpx.Client, r: redis.Redis) -> None:
    too_big = create(api, {**BODY, "width": 4096}, ALICE, Idempotency_Key="retry-me")
    assert too_big.status_code == 422  # refused after the key was claimed: the claim is given back
    fixed = create(api, BODY, ALICE, Idempotency_Key="retry-me")
    assert fixed.status_code == 202, fixed.text


def test_malformed_key_is_422(api: httpx.Client, r: redis.Redis) -> None:
    res = create(api, BODY, ALICE, Idempotency_Key="x" * 256)
    assert res.status_code == 422
    assert res.json()["errors"][0]["field"] == "idempotency-key"
    assert jobs(r) == (0, 0)
