"""Lifecycle under faults, with real processes: SIGTERM and kill -9 of busy workers, a Redis restart under a
busy worker, a broken model path, an API without workers, readiness transitions, SIGTERM to the API during a
long-poll, the worker health probe, and the reaper's rescue of a job dequeued by a worker that then died.

Every test gets its own Redis (nothing here may disturb another module). Long jobs are 256 px with many steps:
long enough to be caught mid-run on any machine; tests wait on states, never on durations.
"""

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rq.intermediate_queue import IntermediateQueue

from app.enqueue import resolve
from app.schemas import GenerationCreate
from app.settings import Settings
from common.contract import keys
from common.contract.records import decode
from common.contract.resource import render
from common.reaper import Reaper
from common.settings import CommonSettings
from tests.procs import PY, ROOT, Proc, RedisServer, Service, base_env, free_port, wait_for

SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
LONG = {"width": 256, "height": 256, "num_inference_steps": 60}
LONGER = {"width": 256, "height": 256, "num_inference_steps": 100}

Stack = Callable[..., Service]


@pytest.fixture
def stack(tiny_model: Path, tmp_path: Path) -> Iterator[Stack]:
    """make(appendonly=False, api=True, **env) -> a Service (API started unless api=False) on a private Redis;
    all stopped at the end."""
    made: list[tuple[RedisServer, Service]] = []

    def make(appendonly: bool = False, api: bool = True, **env: str) -> Service:
        server = RedisServer(appendonly=appendonly)
        server.start()
        svc = Service(server.url, tiny_model, tmp_path / f"s{len(made)}", env)
        svc.data_dir.mkdir()
        svc.redis_server = server  # type: ignore[attr-defined]
        made.append((server, svc))
        if api:
            svc.start_api()
        return svc

    yield make
    for server, svc in made:
        svc.stop()
        server.stop()


def rclient(svc: Service) -> redis.Redis:
    return redis.Redis.from_url(svc.redis_url, socket_timeout=5)


def submit(svc: Service, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "lifecycle", **body}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def record(svc: Service, gen_id: str) -> dict[str, str]:
    raw = rclient(svc).hgetall(keys.generation(gen_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def wait_running(svc: Service, gen_id: str) -> str:
    """Until the generation is inside the pipeline (a step done); returns the worker running it."""

    def running() -> str | None:
        rec = record(svc, gen_id)
        if rec.get("status") == "running" and json.loads(rec.get("progress") or "{}").get("step", 0) >= 1:
            return rec["worker_id"]
        return None

    return wait_for(running, 120, f"{gen_id} running", interval=0.02)  # type: ignore[no-any-return]


def final(svc: Service, gen_id: str, timeout: float = 240) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = httpx.get(f"{svc.url}/v1/generations/{gen_id}", headers={"Prefer": "wait=10"}, timeout=20).json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(done, timeout, f"{gen_id} final", interval=0.2)  # type: ignore[no-any-return]


def stored_images(svc: Service, gen_id: str) -> set[str]:
    folder = svc.data_dir / "images" / "generations" / gen_id
    return {p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.name.endswith(".type")}


def metric(svc: Service, field: str) -> int:
    return int(rclient(svc).hget(keys.METRICS, field) or 0)


def pick(workers: list[Proc], wid: str) -> tuple[Proc, Proc]:
    busy = next(w for w in workers if w.worker_id == wid)  # type: ignore[attr-defined]
    other = next(w for w in workers if w is not busy)
    return busy, other


# --- workers: SIGTERM, kill -9, Redis restart --------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_busy_worker_finishes_its_job_and_exits_0(stack: Stack) -> None:
    svc = stack()
    w = svc.start_worker()
    gen = submit(svc, LONGER)
    wait_running(svc, gen["id"])
    w.signal(signal.SIGTERM)
    time.sleep(1.5)  # rq turns a second signal more than 1 s later into SystemExit mid-job: not ours
    w.signal(signal.SIGTERM)
    assert w.proc.wait(240) == 0, w.output()[-3000:]
    out = w.output()
    assert "shutdown requested: finishing the current job" in out
    assert "cold shut down" not in out
    done = final(svc, gen["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 1, done
    assert stored_images(svc, gen["id"]) == {"0.png"}
    assert not rclient(svc).exists(keys.worker(w.worker_id))  # type: ignore[attr-defined]


@pytest.mark.slow
def test_sigterm_past_grace_requeues_to_another_worker(stack: Stack) -> None:
    svc = stack(SDXL_SHUTDOWN_GRACE_SECONDS="1")
    svc.start_worker()
    svc.start_worker()
    gen = submit(svc, LONGER)
    busy, other = pick(svc.workers, wait_running(svc, gen["id"]))
    busy.signal(signal.SIGTERM)
    assert busy.proc.wait(120) == 0, busy.output()[-3000:]
    done = final(svc, gen["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    assert record(svc, gen["id"])["worker_id"] == other.worker_id  # type: ignore[attr-defined]
    assert stored_images(svc, gen["id"]) == {"0.png"}
    assert metric(svc, "requeue|shutdown") == 1
    assert other.stop() == 0  # an idle worker leaves at once, exit 0


@pytest.mark.slow
def test_kill_9_busy_worker_job_is_requeued_once_and_completed_by_the_other(stack: Stack) -> None:
    svc = stack()
    svc.start_worker()
    svc.start_worker()
    gen = submit(svc, LONG)
    busy, other = pick(svc.workers, wait_running(svc, gen["id"]))
    busy.signal(signal.SIGKILL)
    busy.proc.wait(10)
    # the dead worker's lease runs out; a live worker's reaper requeues the job with a new ownership token
    done = final(svc, gen["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    rec = record(svc, gen["id"])
    assert rec["worker_id"] == other.worker_id  # type: ignore[attr-defined]
    assert len(done["images"]) == 1 and stored_images(svc, gen["id"]) == {"0.png"}  # one set of images
    assert metric(svc, "requeue|lease_expired") == 1
    assert not rclient(svc).sismember(keys.RUNNING, gen["id"])


@pytest.mark.slow
def test_redis_restart_under_a_busy_worker_loses_nothing(stack: Stack) -> None:
    svc = stack(appendonly=True)
    w = svc.start_worker()
    busy = submit(svc, LONG)
    queued = submit(svc, SMALL)
    wait_running(svc, busy["id"])
    server: RedisServer = svc.redis_server  # type: ignore[attr-defined]
    server.stop()  # append-only: everything written so far is on disk
    time.sleep(2)
    server.start()  # same port, same directory
    for gen in (busy, queued):
        done = final(svc, gen["id"])
        assert done["status"] == "succeeded", done
        assert stored_images(svc, gen["id"]) == {"0.png"}
    assert w.proc.poll() is None, "the worker must ride out the outage"


def wait_requeued(svc: Service, gen_id: str, attempt: int = 2) -> None:
    wait_for(lambda: record(svc, gen_id).get("attempt") == str(attempt), 60, f"{gen_id} attempt {attempt}",
             interval=0.1)


def assert_rerun_here(svc: Service, gen_id: str, w: Proc) -> None:
    """The requeued attempt ran on the same worker and finished: one set of images, no worker_lost."""
    done = final(svc, gen_id)
    assert done["status"] == "succeeded" and done["attempt"] == 2, (done, w.output()[-3000:])
    assert record(svc, gen_id)["worker_id"] == w.worker_id  # type: ignore[attr-defined]
    assert len(done["images"]) == 1 and stored_images(svc, gen_id) == {"0.png"}
    assert metric(svc, "requeue|lease_expired") == 1
    assert w.proc.poll() is None


@pytest.mark.slow
def test_a_stalled_worker_runs_its_own_requeued_attempt(stack: Stack) -> None:
    """SIGSTOP past the lease: cleanup requeues as attempt 2; after SIGCONT the same worker drops attempt 1
    and runs attempt 2 to the end (a mark kept by generation id would abort attempt 2 at its first step)."""
    svc = stack(SDXL_CLEANUP_INTERVAL_SECONDS="1")
    w = svc.start_worker()
    svc.start_cleanup()
    gen = submit(svc, LONGER)
    wait_running(svc, gen["id"])
    w.signal(signal.SIGSTOP)
    try:
        wait_requeued(svc, gen["id"])
        assert record(svc, gen["id"])["status"] == "queued"
    finally:
        w.signal(signal.SIGCONT)
    assert_rerun_here(svc, gen["id"], w)


@pytest.mark.slow
def test_a_redis_kill_longer_than_the_lease_ends_on_attempt_2(stack: Stack) -> None:
    """kill -9 of Redis for longer than the lease: the lease has lapsed when Redis is back, so the attempt is
    lost for good (never renewed behind a reaper's back); it runs again, on the same worker, and succeeds."""
    svc = stack(appendonly=True, SDXL_CLEANUP_INTERVAL_SECONDS="1")
    w = svc.start_worker()
    svc.start_cleanup()
    gen = submit(svc, LONGER)
    wait_running(svc, gen["id"])
    server: RedisServer = svc.redis_server  # type: ignore[attr-defined]
    server.kill()
    time.sleep(int(svc.env()["SDXL_LEASE_SECONDS"]) + 4)
    server.start()  # same port, same directory: the lease's absolute expiry has passed
    assert_rerun_here(svc, gen["id"], w)


# --- start-up ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a worker start (imports and all) only to fail: many seconds
def test_worker_with_a_broken_model_path_exits_2(stack: Stack, tmp_path: Path) -> None:
    svc = stack()
    w = svc.start_worker(wait_ready=False, SDXL_BASE_MODEL=str(tmp_path / "no-such-model"))
    assert w.proc.wait(180) == 2
    assert "could not load the models" in w.output()
    assert not rclient(svc).exists(keys.worker(w.worker_id))  # type: ignore[attr-defined]


def test_api_starts_without_workers_and_readyz_follows_redis(stack: Stack) -> None:
    svc = stack()
    ready = httpx.get(f"{svc.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["workers"] == [], ready.text
    gen = submit(svc, SMALL)
    assert gen["status"] == "queued"

    server: RedisServer = svc.redis_server  # type: ignore[attr-defined]
    server.stop()
    down = httpx.get(f"{svc.url}/readyz", timeout=10)
    assert down.status_code == 503
    assert down.headers["content-type"] == "application/problem+json" and down.headers["retry-after"]
    assert down.json()["type"].endswith("not-ready")
    assert httpx.get(f"{svc.url}/healthz", timeout=10).status_code == 200  # alive, just not ready
    server.start()
    wait_for(lambda: httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200, 30, "readyz back to 200")


def test_readiness_transitions_loading_warming_ready(stack: Stack) -> None:
    svc = stack()
    port = free_port()
    w = svc.start_worker(wait_ready=False, SDXL_METRICS_PORT=str(port), SDXL_METRICS_HOST="127.0.0.1")
    wid = w.worker_id  # type: ignore[attr-defined]
    seen: list[tuple[str, bool, bool]] = []
    deadline = time.monotonic() + 180
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline and w.proc.poll() is None:
            body = client.get(f"{svc.url}/readyz").json()
            mine = [x for x in body["workers"] if x["id"] == wid]
            if mine:
                entry = (mine[0]["state"], mine[0]["models_loaded"], mine[0]["ready"])
                if not seen or seen[-1] != entry:
                    seen.append(entry)
                if entry[0] == "ready":
                    break
            time.sleep(0.01)
    assert [s for s, _, _ in seen] == ["loading", "warming", "ready"], seen
    assert seen == [("loading", False, False), ("warming", True, False), ("ready", True, True)]
    assert health_probe(svc, SDXL_WORKER_ID=wid).returncode == 0
    # the worker's own endpoint (SDXL_METRICS_PORT) has its process numbers
    assert "process_resident_memory_bytes" in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert w.stop() == 0
    assert health_probe(svc, SDXL_WORKER_ID=wid).returncode == 1


# --- the API under SIGTERM -------------------------------------------------------------------------------------


def test_api_sigterm_answers_an_in_flight_long_poll(stack: Stack) -> None:
    svc = stack()  # no worker: the generation stays queued and the long-poll would wait its full 30 s
    gen = submit(svc, SMALL)
    result: dict[str, Any] = {}

    def long_poll() -> None:
        try:
            result["response"] = httpx.get(
                f"{svc.url}/v1/generations/{gen['id']}", headers={"Prefer": "wait=30"}, timeout=60
            )
        except httpx.HTTPError as exc:  # a reset or a cut connection lands here
            result["error"] = exc

    t = threading.Thread(target=long_poll)
    t.start()
    r = rclient(svc)
    wait_for(lambda: any(c.get("cmd") == "xread" for c in r.client_list()), 20, "the long-poll blocked in XREAD")
    api = svc.apis[0]
    api.signal(signal.SIGTERM)
    t.join(60)
    assert "error" not in result, result
    resp = result["response"]
    assert resp.status_code == 200 and resp.json()["status"] == "queued"  # a complete answer, not a reset
    assert api.proc.wait(30) in (0, -signal.SIGTERM)


# --- worker health probe (Docker HEALTHCHECK) ------------------------------------------------------------------


def health_probe(svc: Service, **env: str) -> subprocess.CompletedProcess[str]:
    full = base_env(svc.redis_url, svc.model_dir, svc.data_dir, **env)
    return subprocess.run([PY, "-m", "worker.health"], env=full, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_worker_health_probe_reads_the_registry(stack: Stack) -> None:
    svc = stack(api=False)  # the probe reads Redis only
    r = rclient(svc)
    host = socket.gethostname()

    def register(wid: str, state: str, age: float) -> None:
        r.hset(keys.worker(wid), mapping={"id": wid, "state": state, "heartbeat": str(time.time() - age)})
        r.zadd(keys.WORKERS, {wid: time.time() - age})

    assert health_probe(svc).returncode == 1  # nothing registered for this host
    register(f"{host}-aaaaaa", "ready", 0)
    ok = health_probe(svc)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["worker"] == f"{host}-aaaaaa"
    register(f"{host}-aaaaaa", "busy", 0)
    assert health_probe(svc).returncode == 0
    for state, age in (("loading", 0), ("warming", 0), ("stopping", 0), ("ready", 60)):
        register(f"{host}-aaaaaa", state, age)
        assert health_probe(svc).returncode == 1, (state, age)
    register("elsewhere-bbbbbb", "ready", 0)
    assert health_probe(svc, SDXL_WORKER_ID="elsewhere-bbbbbb").returncode == 0
    assert health_probe(svc, SDXL_WORKER_ID="nobody").returncode == 1
    # the probe runs every 30 s inside the worker container: it must stay light (no torch)
    code = "import sys, worker.health; sys.exit(1 if 'torch' in sys.modules or 'diffusers' in sys.modules else 0)"
    assert subprocess.run([PY, "-c", code], cwd=ROOT, env=os.environ.copy(), timeout=60).returncode == 0


# --- the reaper ------------------------------------------------------------------------------------------------


def test_reaper_requeues_once_then_fails_worker_lost(redis_client: redis.Redis) -> None:
    r = redis_client
    gid = "gen_" + "L" * 22
    params = resolve(GenerationCreate(prompt="x", **SMALL), Settings(refiner_model=None), False).model_dump(mode="json")
    r.hset(
        keys.generation(gid),
        mapping={
            "id": gid,
            "status": "running",
            "owner": "open",
            "attempt": "1",
            "token": "t1",
            "params": json.dumps(params),
            "rq_job_id": f"{gid}-1",
            "progress": json.dumps({"step": 10, "total_steps": 30, "stage": "base", "eta_seconds": 4.0}),
        },
    )
    r.sadd(keys.RUNNING, gid)  # running, and no lease: its worker is gone
    reaper = Reaper(r, CommonSettings(max_attempts=2, job_timeout_seconds=3600, generation_ttl_seconds=600))
    assert reaper.sweep() == [(gid, "requeued")]
    rec = {k.decode(): v.decode() for k, v in r.hgetall(keys.generation(gid)).items()}
    assert rec["status"] == "queued" and rec["attempt"] == "2" and rec["token"] != "t1"
    # back in line: the resource says queued, not the lost attempt's step
    assert render(decode(r.hgetall(keys.generation(gid))), lambda *_: "")["progress"] == {
        "step": 0, "total_steps": 0, "stage": "queued", "eta_seconds": None}
    r.hset(keys.generation(gid), "progress",
           json.dumps({"step": 10, "total_steps": 30, "stage": "base", "eta_seconds": 4.0}))
    assert int(r.hget(keys.METRICS, "requeue|lease_expired") or 0) == 1
    # the second attempt's worker dies too: failed worker_lost, never a third run
    r.hset(keys.generation(gid), mapping={"status": "running"})
    r.sadd(keys.RUNNING, gid)
    assert reaper.sweep() == [(gid, "failed")]
    rec = {k.decode(): v.decode() for k, v in r.hgetall(keys.generation(gid)).items()}
    assert rec["status"] == "failed" and json.loads(rec["error"])["type"] == "worker_lost"
    assert not r.sismember(keys.RUNNING, gid)
    # a terminal resource says where it ended: step 10 of 30, and nothing more is coming
    assert render(decode(r.hgetall(keys.generation(gid))), lambda *_: "")["progress"] == {
        "step": 10, "total_steps": 30, "stage": "done", "eta_seconds": 0}


def test_reaper_puts_back_a_job_dequeued_but_never_started(redis_client: redis.Redis) -> None:
    r = redis_client
    inter = IntermediateQueue.get_intermediate_queue_key(keys.RQ_QUEUE_KEY)
    stranded, started = "gen_" + "S" * 22, "gen_" + "R" * 22
    r.hset(keys.generation(stranded), mapping={"id": stranded, "status": "queued", "rq_job_id": f"{stranded}-1"})
    r.hset(keys.generation(started), mapping={"id": started, "status": "running", "rq_job_id": f"{started}-1"})
    r.rpush(inter, f"{stranded}-1", f"{started}-1")  # rq moved both off the queue; one worker died right then
    reaper = Reaper(r, CommonSettings(max_attempts=2, job_timeout_seconds=3600, generation_ttl_seconds=600),
                    stranded_after=0)
    assert reaper.rescue_stranded() == []  # first sighting only
    assert reaper.rescue_stranded() == [stranded]
    assert [j.decode() for j in r.lrange(keys.RQ_QUEUE_KEY, 0, -1)] == [f"{stranded}-1"]
    assert [j.decode() for j in r.lrange(inter, 0, -1)] == [f"{started}-1"]  # a started job is left alone
    assert reaper.rescue_stranded() == []  # once


@pytest.mark.parametrize("status", ["succeeded", "failed", "canceled"])
def test_every_terminal_status_reports_progress_done_where_it_ended(status: str) -> None:
    rec = {"id": "gen_" + "T" * 22, "status": status, "attempt": "1",
           "progress": {"step": 7, "total_steps": 20, "stage": "refiner", "eta_seconds": 1.5}}
    assert render(rec, lambda *_: "")["progress"] == {"step": 7, "total_steps": 20, "stage": "done",
                                                      "eta_seconds": 0}
    rec["status"] = "running"
    assert render(rec, lambda *_: "")["progress"]["stage"] == "refiner"
