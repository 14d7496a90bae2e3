"""Per-key limits held in Redis across API replicas: rate (429 + Retry-After + RateLimit-*), unfinished
generations per key (429), global queue depth (503 + Retry-After from measured throughput), and that a refused
submit writes nothing. No worker runs here, so everything submitted stays queued and the counts are exact."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.limits import NO_WORKER_RETRY_SECONDS, retry_after
from common.contract import keys
from tests.access import TINY, Key, cancel, get, keys_env, post, service_with
from tests.procs import Service

SLOW = Key("slow", rate_per_minute=1, burst=3)  # one token a minute: nothing refills during the test
CAPPED = Key("capped", max_queued=2)
FREE = Key("free")
BODY = {"prompt": "a queued one", **TINY}


@pytest.fixture(scope="module")
def svc(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = {"SDXL_API_KEYS": keys_env(SLOW, CAPPED, FREE)}
    with service_with(tiny_model, tmp_path_factory.mktemp("limits"), 0, env) as s:
        s.replica = s.start_api()  # type: ignore[attr-defined]  # a second replica on the same Redis
        s.shallow = s.start_api(SDXL_MAX_QUEUE_DEPTH="3")  # type: ignore[attr-defined]
        yield s



def stored(r: redis.Redis, key: Key) -> dict[str, int]:
    """What a submit writes: records, the owner's index, its pending line, the rq list."""
    return {
        "records": len(r.keys("sdxl:gen:*")),
        "index": r.zcard(keys.owner_index(key.owner)),
        "pending": r.zcard(keys.pending(key.owner)),
        "rq": r.llen(keys.RQ_QUEUE_KEY),
    }


def test_rate_limit_is_shared_by_replicas_and_answers_429(svc: Service, r: redis.Redis) -> None:
    replica: str = svc.replica  # type: ignore[attr-defined]
    seen = []
    for url in (svc.url, replica, svc.url):
        res = get(url, "/v1/generations", SLOW)
        assert res.status_code == 200, res.text
        assert res.headers["ratelimit-limit"] == "3"
        seen.append(int(res.headers["ratelimit-remaining"]))
        assert int(res.headers["ratelimit-reset"]) >= 1
    assert seen == [2, 1, 0]  # one bucket, whichever replica answers
    before = stored(r, SLOW)
    res = post(replica, BODY, SLOW)
    assert res.status_code == 429, res.text
    assert res.headers["content-type"].startswith("application/problem+json")
    assert res.json()["type"] == "urn:sdxl:problem:rate-limited"
    assert 1 <= int(res.headers["retry-after"]) <= 60  # the next token comes within a minute
    assert res.headers["ratelimit-remaining"] == "0"
    assert stored(r, SLOW) == before  # refused before anything was written
    # another key has its own bucket
    ok = get(svc.url, "/v1/generations", FREE)
    assert ok.status_code == 200 and ok.headers["ratelimit-limit"] == "1000"


def test_successful_submit_carries_ratelimit_headers(svc: Service, r: redis.Redis) -> None:
    res = post(svc.url, BODY, FREE)
    assert res.status_code == 202
    assert res.headers["ratelimit-limit"] == "1000"
    assert 0 <= int(res.headers["ratelimit-remaining"]) < 1000


def test_unfinished_generations_per_key_are_capped(svc: Service, r: redis.Redis) -> None:
    first = [post(svc.url, BODY, CAPPED) for _ in range(2)]
    assert [x.status_code for x in first] == [202, 202]
    before = stored(r, CAPPED)
    assert before["records"] == before["index"] == before["pending"] + before["rq"] == 2
    refused = post(svc.replica, BODY, CAPPED)  # type: ignore[attr-defined]  # the cap holds on every replica
    assert refused.status_code == 429, refused.text
    assert refused.json()["type"] == "urn:sdxl:problem:too-many-unfinished"
    assert refused.headers["retry-after"] == str(NO_WORKER_RETRY_SECONDS)  # no worker is draining anything
    assert stored(r, CAPPED) == before
    assert post(svc.url, BODY, FREE).status_code == 202  # other keys are not affected
    # a finished (here: canceled) generation frees its place
    assert cancel(svc.url, first[0].json()["id"], CAPPED).status_code == 202
    assert post(svc.url, BODY, CAPPED).status_code == 202
    assert post(svc.url, BODY, CAPPED).status_code == 429


def test_global_queue_depth_answers_503_with_retry_after_from_throughput(svc: Service, r: redis.Redis) -> None:
    shallow: str = svc.shallow  # type: ignore[attr-defined]
    assert [post(shallow, BODY, k).status_code for k in (FREE, CAPPED, FREE)] == [202, 202, 202]
    before = {k.name: stored(r, k) for k in (FREE, CAPPED)}
    full = post(shallow, BODY, CAPPED)
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
    full = post(shallow, BODY, FREE)
    assert full.status_code == 503
    assert full.headers["retry-after"] == "8"  # one place frees after 1 / (1 job / 8 s)
    # the default replicas have a deep queue: the same submit is accepted there
    assert post(svc.url, BODY, FREE).status_code == 202


def test_retry_after_from_measured_rate() -> None:
    assert retry_after(1, 0, 0.0) == NO_WORKER_RETRY_SECONDS
    assert retry_after(10, 2, 4.0) == 3
    assert retry_after(1, 1, 100.0) == 1
    assert retry_after(10**6, 1, 0.5) == 300
