"""Retention on the local store: DELETE, expiry (404, then removed by `python -m cleanup --once`),
and the cleanup process's other duties (deadlines, dead workers' jobs). Real API, worker and Redis."""

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from common.contract import keys
from tests.access import BLOCKER, TINY, Key, keys_env, post, wait_status
from tests.procs import PY, ROOT, Service, wait_for

A = Key("alice")
B = Key("bob")


@pytest.fixture(scope="module")
def svc(shared_stack: Service) -> Iterator[Service]:
    """APIs with keys A and B on the shared stack (one worker): one as configured, one with a 3 s TTL."""
    s = shared_stack.view(SDXL_API_KEYS=keys_env(A, B))
    try:
        s.start_api()
        s.short_ttl_api = s.start_api(SDXL_GENERATION_TTL_SECONDS="3")  # type: ignore[attr-defined]
        yield s
    finally:
        s.stop()


@pytest.fixture
def idle(idle_service: Service) -> Service:
    """An API with no worker on a flushed Redis (tests/e2e/conftest.py): what it accepts stays queued."""
    return idle_service


def rds(s: Service) -> redis.Redis:
    return redis.Redis.from_url(s.redis_url, socket_timeout=5)


def images_dir(s: Service, gen_id: str) -> Path:
    return s.data_dir / "images" / "generations" / gen_id


def delete(url: str, gen_id: str, key: Key | None) -> httpx.Response:
    return httpx.delete(f"{url}/v1/generations/{gen_id}", headers=key.headers if key else {}, timeout=30)


def run_cleanup(s: Service) -> list[dict[str, Any]]:
    out = subprocess.run(
        [PY, "-m", "cleanup", "--once"], env=s.env(), cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert lines and all(line["process"] == "cleanup" for line in lines)  # JSON logs
    return lines


def assert_gone(r: redis.Redis, gen_id: str, owner: str) -> None:
    assert not r.exists(keys.generation(gen_id), keys.events(gen_id), keys.webhook_log(gen_id))
    assert r.zscore(keys.owner_index(owner), gen_id) is None
    assert r.zscore(keys.pending(owner), gen_id) is None
    assert not r.exists(f"rq:job:{gen_id}-1")  # the job hash holds the prompt


def test_delete_removes_record_events_index_images_and_rq_job(svc: Service) -> None:
    r = rds(svc)
    gen = post(svc.url, {"prompt": "delete me", "num_images_per_prompt": 2, **TINY}, A, Prefer="wait=30").json()
    assert gen["status"] == "succeeded", gen
    gid = gen["id"]
    assert sorted(p.name for p in images_dir(svc, gid).iterdir() if p.suffix == ".png") == ["0.png", "1.png"]
    assert r.exists(keys.generation(gid), keys.events(gid)) == 2 and r.exists(f"rq:job:{gid}-1")
    assert r.zscore(keys.owner_index(A.owner), gid) is not None and r.zscore(keys.EXPIRY, gid) is not None

    other = delete(svc.url, gid, B)  # another key: as if it did not exist, and nothing is removed
    assert other.status_code == 404 and other.headers["content-type"] == "application/problem+json"
    assert images_dir(svc, gid).exists() and r.exists(keys.generation(gid))

    res = delete(svc.url, gid, A)
    assert res.status_code == 204 and res.content == b""
    assert not images_dir(svc, gid).exists()
    assert_gone(r, gid, A.owner)
    assert r.zscore(keys.EXPIRY, gid) is None
    for method, path in (("GET", ""), ("GET", "/images/0"), ("DELETE", "")):
        again = httpx.request(method, f"{svc.url}/v1/generations/{gid}{path}", headers=A.headers, timeout=10)
        assert again.status_code == 404 and again.json()["status"] == 404
    listed = httpx.get(f"{svc.url}/v1/generations", headers=A.headers, timeout=10)
    assert gid not in [g["id"] for g in listed.json().get("data", [])]


def test_delete_unknown_or_malformed_id_is_404(svc: Service) -> None:
    for gid in ("gen_AAAAAAAAAAAAAAAAAAAAAA", "nope"):
        res = delete(svc.url, gid, A)
        assert res.status_code == 404 and res.headers["content-type"] == "application/problem+json"
    assert delete(svc.url, "gen_AAAAAAAAAAAAAAAAAAAAAA", None).status_code == 401  # keys are configured


def test_delete_in_flight_generations_cancels_them_first(svc: Service) -> None:
    r = rds(svc)
    blocker = post(svc.url, BLOCKER, A).json()
    wait_status(svc.url, blocker["id"], A, {"running"})
    queued = post(svc.url, {"prompt": "behind the blocker", **TINY}, A).json()
    assert httpx.get(f"{svc.url}/v1/generations/{queued['id']}", headers=A.headers).json()["status"] == "queued"

    assert delete(svc.url, queued["id"], A).status_code == 204
    assert_gone(r, queued["id"], A.owner)
    assert r.lpos(keys.RQ_QUEUE_KEY, f"{queued['id']}-1") is None

    cancels = r.pubsub()
    cancels.subscribe(keys.CANCEL_CHANNEL)
    assert cancels.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    t0 = time.time()
    assert delete(svc.url, blocker["id"], A).status_code == 204
    # the cancel path ran: the worker holding the job was told to stop
    told = cancels.get_message(timeout=10)
    assert told is not None and told["data"] == blocker["id"].encode()
    cancels.close()
    assert not r.exists(keys.generation(blocker["id"]))
    # a worker may still be uploading a running job's images: cleanup sweeps its prefix again later
    assert (r.zscore(keys.EXPIRY, blocker["id"]) or 0) > t0 + 60
    # the worker was told to stop: it gives the job up within a step and is free again
    wait_for(
        lambda: not r.sismember(keys.RUNNING, blocker["id"]) and not r.exists(keys.lease(blocker["id"])),
        60,
        "the worker to drop the deleted job",
        interval=0.1,
    )
    after = post(svc.url, {"prompt": "after the deletes", **TINY}, A, Prefer="wait=30").json()
    assert after["status"] == "succeeded"
    assert not images_dir(svc, blocker["id"]).exists() and not images_dir(svc, queued["id"]).exists()


def test_expired_generation_is_404_and_cleanup_removes_it(svc: Service) -> None:
    r = rds(svc)
    keep = post(svc.url, {"prompt": "long lived", **TINY}, A, Prefer="wait=30").json()
    gen = post(svc.short_ttl_api, {"prompt": "short lived", **TINY}, A).json()  # type: ignore[attr-defined]
    gid = gen["id"]
    wait_for(lambda: r.hget(keys.generation(gid), "status") == b"succeeded", 60, "the short-lived generation")
    wait_for(
        lambda: httpx.get(f"{svc.url}/v1/generations/{gid}", headers=A.headers).status_code == 404,
        30,
        "the generation to expire",
        interval=0.2,
    )
    for method, path in (("GET", "/images/0"), ("DELETE", "")):
        res = httpx.request(method, f"{svc.url}/v1/generations/{gid}{path}", headers=A.headers, timeout=10)
        assert res.status_code == 404
    # expired for the API; the record stays (for its grace period) so cleanup can attribute its index entries
    assert r.exists(keys.generation(gid)) and (images_dir(svc, gid) / "0.png").exists()

    lines = run_cleanup(svc)
    assert [line for line in lines if line["msg"] == "cleanup sweep"][0]["expired"] >= 1
    assert not images_dir(svc, gid).exists()
    assert_gone(r, gid, A.owner)
    assert r.zscore(keys.EXPIRY, gid) is None
    # one that has not expired is left alone
    assert (images_dir(svc, keep["id"]) / "0.png").exists()
    assert httpx.get(f"{svc.url}/v1/generations/{keep['id']}", headers=A.headers).json()["status"] == "succeeded"


def test_cleanup_fails_queued_generations_past_their_deadline(idle: Service) -> None:
    r = rds(idle)
    late = post(idle.url, {"prompt": "in a hurry", "deadline": 0.5, **TINY}).json()
    patient = post(idle.url, {"prompt": "no hurry", **TINY}).json()
    deadline_at = float(r.hget(keys.generation(late["id"]), "deadline_at") or 0)
    wait_for(lambda: time.time() > deadline_at, 10, "the deadline to pass")

    run_cleanup(idle)
    failed = httpx.get(f"{idle.url}/v1/generations/{late['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["type"] == "deadline_exceeded"
    events: list[Any] = r.xrange(keys.events(late["id"]))  # type: ignore[assignment]
    assert events[-1][1][b"type"] == b"generation.failed"
    assert json.loads(events[-1][1][b"data"])["error"]["type"] == "deadline_exceeded"
    assert r.lpos(keys.RQ_QUEUE_KEY, f"{late['id']}-1") is None
    assert r.zscore(keys.pending("open"), late["id"]) is None
    assert httpx.get(f"{idle.url}/v1/generations/{patient['id']}").json()["status"] == "queued"


def test_cleanup_requeues_a_generation_whose_worker_died(idle: Service) -> None:
    r = rds(idle)
    gen = post(idle.url, {"prompt": "orphan", **TINY}).json()
    gid = gen["id"]
    # as a worker that took the job and then died leaves it: running, in the running set, no lease
    r.lrem(keys.RQ_QUEUE_KEY, 0, f"{gid}-1")
    r.hset(keys.generation(gid), mapping={"status": "running", "worker_id": "dead-worker", "started_at": time.time()})
    r.sadd(keys.RUNNING, gid)

    lines = run_cleanup(idle)
    assert [line for line in lines if line["msg"] == "cleanup sweep"][0]["requeued"] >= 1
    res = httpx.get(f"{idle.url}/v1/generations/{gid}").json()
    assert res["status"] == "queued" and res["attempt"] == 2
    assert not r.sismember(keys.RUNNING, gid)


def test_cleanup_sweeps_the_prefix_of_a_generation_whose_record_is_gone(svc: Service) -> None:
    # what DELETE of a running generation leaves for later: an expiry entry and, maybe, a late upload
    r = rds(svc)
    gid = "gen_LateUploadLateUpload00"
    late = images_dir(svc, gid)
    late.mkdir(parents=True)
    (late / "0.png").write_bytes(b"late")
    r.zadd(keys.EXPIRY, {gid: time.time() - 1})
    run_cleanup(svc)
    assert not late.exists() and r.zscore(keys.EXPIRY, gid) is None
