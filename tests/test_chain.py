"""Chaining (worker/runner.py `run_job`): after its rq job the worker takes the jobs queued behind it straight
off the rq queue, skipping rq's per-job bookkeeping, without losing one to a crash, a cancel or a stop.

Stand-in engine (no GPU here); Redis, rq's job hashes and lists, the local store, the state machine and the
reaper are real.
"""

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from app.enqueue import Enqueuer
from app.settings import Settings
from common.contract import keys
from common.contract.params import GenerationParams
from common.reaper import INTERMEDIATE_KEY
from common.storage import LocalStore
from tests.test_runner_oom import OOMEngine, record
from worker.runner import NotClaimable, Runner
from worker.settings import WorkerSettings


def queue_jobs(r: Any, n: int) -> list[str]:
    """n generations fed into the rq queue (feed depth raised so all of them are there), oldest first."""
    enq = Enqueuer(r, Settings(queue_feed_depth=n + 1))
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1)
    return [enq.submit(params, owner="open").gen_id for _ in range(n)]


def dequeue(r: Any) -> tuple[dict[str, Any], str]:
    """What rq's dequeue hands the worker: the head job, moved to the intermediate list."""
    job_id = r.lmove(keys.RQ_QUEUE_KEY, INTERMEDIATE_KEY, "LEFT", "RIGHT").decode()
    return Job.fetch(job_id, connection=r, serializer=JSONSerializer).args[0], job_id


def make_runner(r: Any, tmp_path: Path, engine: OOMEngine | None = None, **settings: Any) -> Runner:
    settings.setdefault("chain_idle_seconds", 0)  # the idle wait has its own tests below
    return Runner(r, engine or OOMEngine(fits=4), LocalStore(tmp_path),  # type: ignore[arg-type]
                  WorkerSettings(**settings), "test-worker")


def test_one_rq_job_runs_the_jobs_queued_behind_it(redis_client: Any, tmp_path: Path) -> None:
    ids = queue_jobs(redis_client, 3)
    engine = OOMEngine(fits=4)
    runner = make_runner(redis_client, tmp_path, engine)
    payload, job_id = dequeue(redis_client)
    result = runner.run_job(payload, job_id)
    assert result["generations"] == [ids[0]]  # rq's result is its own job's
    assert engine.calls == [1, 1, 1]
    assert [record(redis_client, g)["status"] for g in ids] == ["succeeded"] * 3
    # the claimed jobs left no trace in rq: queue and intermediate list empty, their job hashes gone
    assert redis_client.llen(keys.RQ_QUEUE_KEY) == 0
    redis_client.lrem(INTERMEDIATE_KEY, 1, job_id)  # rq's own prepare does this for the dequeued job
    assert redis_client.llen(INTERMEDIATE_KEY) == 0
    assert [redis_client.exists(Job.key_for(f"{g}-1")) for g in ids[1:]] == [0, 0]
    assert redis_client.exists(Job.key_for(job_id)) == 1  # rq still owns (and finishes) its own job
    assert redis_client.scard(keys.RUNNING) == 0


def test_chaining_off_or_stopping_runs_only_the_rq_job(redis_client: Any, tmp_path: Path) -> None:
    ids = queue_jobs(redis_client, 3)
    off = make_runner(redis_client, tmp_path, chain_seconds=0)
    off.run_job(*dequeue(redis_client))
    stopping = make_runner(redis_client, tmp_path)
    stopping.stopping.set()  # SIGTERM: the job in hand is the last
    stopping.run_job(*dequeue(redis_client))
    assert [record(redis_client, g)["status"] for g in ids] == ["succeeded", "succeeded", "queued"]
    assert redis_client.llen(keys.RQ_QUEUE_KEY) == 1


def test_a_worker_killed_between_claim_and_start_loses_nothing(redis_client: Any, tmp_path: Path) -> None:
    (gen,) = queue_jobs(redis_client, 1)
    dead = make_runner(redis_client, tmp_path)
    claimed = dead.claim_next()  # ... and the worker dies here, before its start
    assert claimed is not None and redis_client.llen(keys.RQ_QUEUE_KEY) == 0
    assert record(redis_client, gen)["status"] == "queued"
    reaper = make_runner(redis_client, tmp_path).reaper
    reaper.stranded_after = 0
    assert reaper.rescue_stranded() == []  # first sighting
    assert reaper.rescue_stranded() == [gen]  # still unstarted on the next sweep: back in line
    survivor = make_runner(redis_client, tmp_path)
    survivor.run_job(*dequeue(redis_client))
    assert record(redis_client, gen)["status"] == "succeeded"


def test_a_claimed_job_canceled_before_its_start_never_runs(redis_client: Any, tmp_path: Path) -> None:
    (gen,) = queue_jobs(redis_client, 1)
    engine = OOMEngine(fits=4)
    runner = make_runner(redis_client, tmp_path, engine)
    claimed = runner.claim_next()
    assert claimed is not None
    # the API's cancel of a queued generation (CANCEL script) lands between claim and start
    redis_client.hset(keys.generation(gen), mapping={"status": "canceled", "cancel": "1"})
    runner.run_bound(*claimed, claimed=True)
    assert engine.calls == [] and record(redis_client, gen)["status"] == "canceled"
    assert redis_client.llen(INTERMEDIATE_KEY) == 0 and not redis_client.exists(Job.key_for(claimed[1]))


def test_a_job_that_is_not_a_generation_is_left_to_rq(redis_client: Any, tmp_path: Path) -> None:
    (gen,) = queue_jobs(redis_client, 1)
    job_id = f"{gen}-1"
    redis_client.hset(Job.key_for(job_id), "data", b"not zlib")
    runner = make_runner(redis_client, tmp_path)
    claim = runner._claim_next

    def claim_then_another_worker_dequeues(**kw: Any) -> Any:
        res = claim(**kw)
        redis_client.rpush(INTERMEDIATE_KEY, "other-job")  # rq's dequeue in another worker, meanwhile
        return res

    runner._claim_next = claim_then_another_worker_dequeues  # type: ignore[assignment]
    with pytest.raises(NotClaimable):
        runner.claim_next()
    assert redis_client.lrange(keys.RQ_QUEUE_KEY, 0, -1) == [job_id.encode()]  # back at the head
    assert redis_client.lrange(INTERMEDIATE_KEY, 0, -1) == [b"other-job"]  # the other worker's stays put


def test_no_job_is_claimed_past_a_quarter_of_the_rq_timeout(redis_client: Any, tmp_path: Path) -> None:
    """rq's timeout covers the whole call: a short one (here 0: already spent) leaves the rest to rq."""
    ids = queue_jobs(redis_client, 2)
    runner = make_runner(redis_client, tmp_path)
    runner.run_job(*dequeue(redis_client), rq_timeout=0.0001)
    assert [record(redis_client, g)["status"] for g in ids] == ["succeeded", "queued"]


def test_a_claimed_job_from_a_newer_api_fails_typed_and_leaves_no_claim(redis_client: Any, tmp_path: Path) -> None:
    ids = queue_jobs(redis_client, 2)
    runner = make_runner(redis_client, tmp_path)
    first = dequeue(redis_client)
    job_id = f"{ids[1]}-1"
    newer = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    newer.args = [{**newer.args[0], "v": 99}]  # a payload version this worker does not know
    newer.save()
    runner.run_job(*first)
    rec = record(redis_client, ids[1])
    assert rec["status"] == "failed" and rec["error"]["type"] == "invalid_payload"
    assert redis_client.lrange(INTERMEDIATE_KEY, 0, -1) == [first[1].encode()]  # only rq's own dequeued job
    assert not redis_client.exists(Job.key_for(job_id))


def test_an_idle_chain_runs_the_job_that_arrives_while_it_waits(redis_client: Any, tmp_path: Path) -> None:
    """Steady traffic: the next request comes just after the last one finished, and skips rq's bookkeeping."""
    (first,) = queue_jobs(redis_client, 1)
    engine = OOMEngine(fits=4)
    runner = make_runner(redis_client, tmp_path, engine, chain_idle_seconds=1.0)
    states: list[str] = []
    runner.on_state = states.append
    later: list[str] = []
    arrival = threading.Timer(0.3, lambda: later.extend(queue_jobs(redis_client, 1)))
    arrival.start()
    t0 = time.monotonic()
    runner.run_job(*dequeue(redis_client))
    elapsed = time.monotonic() - t0
    arrival.join()
    assert engine.calls == [1, 1]
    assert [record(redis_client, g)["status"] for g in (first, *later)] == ["succeeded", "succeeded"]
    assert not redis_client.exists(Job.key_for(f"{later[0]}-1"))  # taken by the chain, not dequeued by rq
    assert redis_client.llen(keys.RQ_QUEUE_KEY) == 0 and redis_client.llen(INTERMEDIATE_KEY) == 1  # rq's own
    assert "ready" in states and states[-1] == "busy"  # idle while waiting, busy again when it returns to rq
    assert elapsed >= 1.0 + 0.3  # after the second job it waited the whole idle window again, then gave up


def test_a_stop_ends_the_idle_wait_and_a_later_job_is_left_to_rq(redis_client: Any, tmp_path: Path) -> None:
    queue_jobs(redis_client, 1)
    runner = make_runner(redis_client, tmp_path, chain_idle_seconds=60)
    threading.Timer(0.2, runner.stopping.set).start()
    t0 = time.monotonic()
    runner.run_job(*dequeue(redis_client))
    assert time.monotonic() - t0 < 10  # a wait slice is 0.5 s; far from the 60 s window
    (late,) = queue_jobs(redis_client, 1)
    assert record(redis_client, late)["status"] == "queued"
    assert redis_client.lrange(keys.RQ_QUEUE_KEY, 0, -1) == [f"{late}-1".encode()]


def test_a_redis_error_while_waiting_ends_the_chain_not_the_job(redis_client: Any, tmp_path: Path) -> None:
    (gen,) = queue_jobs(redis_client, 1)
    runner = make_runner(redis_client, tmp_path, chain_idle_seconds=30)

    def down(*_a: Any, **_kw: Any) -> Any:
        raise redis.exceptions.ConnectionError("Redis is restarting")

    runner.r.blmove = down  # type: ignore[method-assign]
    t0 = time.monotonic()
    result = runner.run_job(*dequeue(redis_client))
    assert result["generations"] == [gen] and record(redis_client, gen)["status"] == "succeeded"
    assert time.monotonic() - t0 < 10  # ended at the first failure, did not retry through the 30 s window


def test_an_idle_chain_ends_at_a_job_it_must_leave_to_rq(redis_client: Any, tmp_path: Path) -> None:
    """Not a bounce loop for the whole idle window: the job goes back once and the chain hands over to rq."""
    first, bad = queue_jobs(redis_client, 2)
    redis_client.delete(Job.key_for(f"{bad}-1"))  # its rq job hash is gone: rq's dequeue drops such an id
    runner = make_runner(redis_client, tmp_path, chain_idle_seconds=30)
    moves: list[Any] = []
    claim = runner._claim_next
    runner._claim_next = lambda **kw: moves.append(1) or claim(**kw)  # type: ignore[assignment]
    t0 = time.monotonic()
    runner.run_job(*dequeue(redis_client))
    assert time.monotonic() - t0 < 10 and len(moves) == 1
    assert record(redis_client, first)["status"] == "succeeded"
    assert redis_client.lrange(keys.RQ_QUEUE_KEY, 0, -1) == [f"{bad}-1".encode()]
