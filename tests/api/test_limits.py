"""Per-key limits held in Redis across API replicas: rate (429 + Retry-After + RateLimit-*), unfinished
generations per key (429), global queue depth (503 + Retry-After from measured throughput), and that a refused
submit writes nothing. No worker runs here, so everything submitted stays queued and the counts are exact."""

import time
from collections.abc import Callable

import httpx
import pytest
import redis

from app.limits import NO_WORKER_RETRY_SECONDS, retry_after
from common.contract import keys
from tests.client import TINY, Key, cancel, create, get, keys_env

SLOW = Key("slow", rate_per_minute=1, burst=3)  # one token a minute: nothing refills during the test
CAPPED = Key("capped", max_queued=2)
FREE = Key("free")
BODY = {"prompt": "a queued one", **TINY}


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(SLOW, CAPPED, FREE))


@pytest.fixture
def replica(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    """A second replica on the same Redis."""
    return make_api(api_keys=keys_env(SLOW, CAPPED, FREE))


@pytest.fixture
def shallow(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    """A replica whose queue is full at 3."""
    return make_api(api_keys=keys_env(SLOW, CAPPED, FREE), max_queue_depth=3)


def stored(r: redis.Redis, key: Key) -> dict[str, int]:
    """What a submit writes: records, the owner's index, its pending line, the rq list."""
    return {
        "records": len(r.keys("sdxl:gen:*")),
        "index": r.zcard(keys.owner_index(key.owner)),
        "pending": r.zcard(keys.pending(key.owner)),
        "rq": r.llen(keys.RQ_QUEUE_KEY),
    }


def test_rate_limit_is_shared_by_replicas_and_answers_429(api: httpx.Client, replica: httpx.Client,
                                                          r: redis.Redis) -> None:
    seen = []
    for c in (api, replica, api):
        res = get(c, "/v1/generations", SLOW)
        assert res.status_code == 200, res.text
        assert res.headers["ratelimit-limit"] == "3"
        seen.append(int(res.headers["ratelimit-remaining"]))
        assert int(res.headers["ratelimit-reset"]) >= 1
    assert seen == [2, 1, 0]  # one bucket, whichever replica answers
    before = stored(r, SLOW)
    res = create(replica, BODY, SLOW)
    assert res.status_code == 429, res.text
    assert res.headers["content-type"].startswith("application/problem+json")
    assert res.json()["type"] == "urn:sdxl:problem:rate-limited"
    assert 1 <= int(res.headers["retry-after"]) <= 60  # the next token comes within a minute
    assert res.headers["ratelimit-remaining"] == "0"
    assert stored(r, SLOW) == before  # refused before anything was written
    # another key has its own bucket
    ok = get(api, "/v1/generations", FREE)
    assert ok.status_code == 200 and ok.headers["ratelimit-limit"] == "1000"


def test_successful_submit_carries_ratelimit_headers(api: httpx.Client) -> None:
    res = create(api, BODY, FREE)
    assert res.status_code == 202
    assert res.headers["ratelimit-limit"] == "1000"
    assert 0 <= int(res.headers["ratelimit-remaining"]) < 1000


def test_unfinished_generations_per_key_are_capped(api: httpx.Client, replica: httpx.Client,
                                                   r: redis.Redis) -> None:
    first = [create(api, BODY, CAPPED) for _ in range(2)]
    assert [x.status_code for x in first] == [202, 202]
    before = stored(r, CAPPED)
    assert before["records"] == before["index"] == before["pending"] + before["rq"] == 2
    refused = create(replica, BODY, CAPPED)  # the cap holds on every replica
    assert refused.status_code == 429, refused.text
    assert refused.json()["type"] == "urn:sdxl:problem:too-many-unfinished"
    assert refused.headers["retry-after"] == str(NO_WORKER_RETRY_SECONDS)  # no worker is draining anything
    assert stored(r, CAPPED) == before
    assert create(api, BODY, FREE).status_code == 202  # other keys are not affected
    # a finished (here: canceled) generation frees its place
    assert cancel(api, first[0].json()["id"], CAPPED).status_code == 202
    assert create(api, BODY, CAPPED).status_code == 202
    assert create(api, BODY, CAPPED).status_code == 429


def test_global_queue_depth_answers_503_with_retry_after_from_throughput(api: httpx.Client, shallow: httpx.Client,
                                                                        r: redis.Redis) -> None:
    assert [create(shallow, BODY, k).status_code for k in (FREE, CAPPED, FREE)] == [202, 202, 202]
    before = {k.name: stored(r, k) for k in (FREE, CAPPED)}
    full = create(shallow, BODY, CAPPED)
    assert full.status_code == 503, full.text
    assert full.json()["type"] == "urn:sdxl:problem:queue-full"
    assert full.headers["retry-after"] == str(NO_WORKER_RETRY_SECONDS)
    assert {k.name: stored(r, k) for k in (FREE, CAPPED)} == before
    assert r.zcard(keys.active(CAPPED.owner)) == 1  # the refused id did not keep a reservation

    # A worker's registry entry as every worker publishes it each heartbeat: 1 job in 8 busy seconds. It is
    # written here rather than run, because a real worker would drain the queue this test needs full.
    now = time.time()
    r.hset(
        keys.worker("w-measured"),
        mapping={
            "id": "w-measured",
            "state": "busy",
            "has_refiner": "1",
            "jobs_done": "1",
            "busy_seconds": "8",
            "heartbeat": str(now),
        },
    )
    r.zadd(keys.WORKERS, {"w-measured": now})
    full = create(shallow, BODY, FREE)
    assert full.status_code == 503
    assert full.headers["retry-after"] == "8"  # one place frees after 1 / (1 job / 8 s)
    # the default replicas have a deep queue: the same submit is accepted there
    assert create(api, BODY, FREE).status_code == 202


def test_retry_after_from_measured_rate() -> None:
    assert retry_after(1, 0, 0.0) == NO_WORKER_RETRY_SECONDS
    assert retry_after(10, 2, 4.0) == 3
    assert retry_after(1, 1, 100.0) == 1
    assert retry_after(10**6, 1, 0.5) == 300
