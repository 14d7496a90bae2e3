"""common/state.py `progress` and `finish`, driven by the worker's runner: a change and its event in one
script (TRANSITION_EMIT), the event rendered from the record START answered; nothing appended when the
generation is no longer this worker's. Stand-in engine; Redis, the records and the scripts are real."""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.enqueue import Enqueuer
from app.settings import Settings
from common.contract import keys
from common.contract.params import GenerationParams, JobPayload
from common.contract.resource import render
from common.contract.status import ErrorType
from tests.procs import RedisServer
from tests.unit.test_runner_oom import OOMEngine, make_runner, record, submit
from worker.attempt import Member, progress_value
from worker.pipeline import Progress, StageTimes
from worker.runner import Runner


def prog(step: int, total: int, stage: str) -> dict[str, Any]:
    return progress_value(Progress(step=step, total_steps=total, stage=stage))

def submit_hooked(r: Any, events: list[str]) -> tuple[str, dict[str, Any]]:
    """`submit`, with a webhook subscribed to `events`."""
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1)
    Enqueuer(r, Settings()).submit(params, owner="open", webhook={"url": "http://127.0.0.1:9/hook", "events": events})
    job_id = r.lpop(keys.RQ_QUEUE_KEY).decode()
    return job_id, Job.fetch(job_id, connection=r, serializer=JSONSerializer).args[0]


def started(r: Any, tmp_path: Path, hook_events: list[str] | None = None) -> tuple[Runner, Member]:
    if hook_events is None:
        job_id, payload = submit(r, n_images=1)
        payload.pop("_gen")
    else:
        job_id, payload = submit_hooked(r, hook_events)
    runner = make_runner(r, OOMEngine(fits=4), tmp_path)
    m = Member(JobPayload.model_validate(payload), job_id)
    assert runner.start(m)
    return runner, m


def test_progress_and_its_event_go_in_one_round_trip(redis_client: Any, tmp_path: Path) -> None:
    runner, m = started(redis_client, tmp_path)
    assert runner.state.progress(m, prog(1, 20, "base")) == ("OK", -1)  # loads the script
    sent: list[Any] = []
    execute = runner.r.execute_command

    def counting(*args: Any, **kw: Any) -> Any:
        sent.append(args[0])
        return execute(*args, **kw)

    runner.r.execute_command = counting  # type: ignore[method-assign]
    assert runner.state.progress(m, prog(3, 20, "base")) == ("OK", -1)
    assert sent == ["EVALSHA"]
    runner.r.execute_command = execute  # type: ignore[method-assign]
    rec = record(redis_client, m.gen_id)
    assert rec["progress"]["step"] == 3 and rec["progress"]["stage"] == "base"
    _id, fields = redis_client.xrange(keys.events(m.gen_id))[-1]
    assert fields[b"type"] == b"generation.progress"
    # the worker's own rendering is exactly what rendering the stored record gives
    assert json.loads(fields[b"data"]) == render(rec, runner.image_url)
    assert redis_client.ttl(keys.events(m.gen_id)) > 0


def test_no_event_once_the_generation_is_not_this_workers(redis_client: Any, tmp_path: Path) -> None:
    runner, m = started(redis_client, tmp_path)
    events = redis_client.xlen(keys.events(m.gen_id))
    redis_client.hset(keys.generation(m.gen_id), "token", "another-attempt")  # requeued and taken by another
    assert runner.state.progress(m, progress_value(Progress(step=5, total_steps=20)))[0].startswith("stale")
    redis_client.hset(keys.generation(m.gen_id), mapping={"token": m.payload.token, "status": "canceled"})
    assert runner.state.progress(m, progress_value(Progress(step=6, total_steps=20))) == ("canceled", -1)
    assert redis_client.xlen(keys.events(m.gen_id)) == events
    assert record(redis_client, m.gen_id)["progress"]["step"] == 0


def test_the_encoding_stage_also_answers_how_many_jobs_wait(redis_client: Any, tmp_path: Path) -> None:
    """What decides between finishing inline and in the background, without a round trip of its own."""
    runner, m = started(redis_client, tmp_path)
    assert runner.state.progress(m, prog(20, 20, "encoding"), queue_length=True) == ("OK", 0)
    redis_client.rpush(keys.RQ_QUEUE_KEY, "another-job")
    assert runner.state.progress(m, prog(20, 20, "encoding"), queue_length=True) == ("OK", 1)
    assert runner.publish_progress([m], Progress(step=20, total_steps=20, stage="encoding"), queue_length=True) == 1


# --- final_emit: the last change and its event ----------------------------------------------------------------
def encoded(runner: Runner, m: Member) -> None:
    """Where `execute` leaves a member before finishing: the `encoding` stage (which also loads the script)."""
    m.step = m.total_steps = 2
    assert runner.state.progress(m, prog(2, 2, "encoding"))[0] == "OK"


def succeed(runner: Runner, m: Member) -> None:
    runner.store_and_finish(m, [Image.new("RGB", (64, 64), (9, 0, 0))], runner.manifest(m.payload.params), 0.25,
                            StageTimes(base=0.2, refiner=0.0, decoding=0.05))


ENDINGS: dict[str, tuple[str, Callable[[Runner, Member], None], int]] = {
    # ending -> its event, how the runner reaches it, round trips before it (succeeded: the `uploading` check)
    "succeeded": ("generation.succeeded", succeed, 1),
    "canceled": ("generation.canceled", lambda runner, m: runner.finish_canceled(m), 0),
    "failed": ("generation.failed", lambda runner, m: runner.fail_all([m], ErrorType.pipeline_error, "boom"), 0),
}


def events_of(r: Any, gen_id: str, kind: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [(i, f) for i, f in r.xrange(keys.events(gen_id)) if f[b"type"] == kind.encode()]


@contextmanager
def round_trips(runner: Runner, observer: redis.Redis, gen_id: str, kind: str) -> Iterator[list[tuple[str, bool]]]:
    """Each round trip of the runner's client (a pipeline is one: 'PIPELINE SREM DEL ...'), and whether the
    generation's `kind` event was in its stream right after it (read through another connection)."""
    trips: list[tuple[str, bool]] = []
    execute, pipeline = runner.r.execute_command, runner.r.pipeline

    def counting(*args: Any, **kw: Any) -> Any:
        try:
            return execute(*args, **kw)
        finally:
            trips.append((str(args[0]), bool(events_of(observer, gen_id, kind))))

    def counting_pipeline(*args: Any, **kw: Any) -> Any:
        pipe = pipeline(*args, **kw)
        run = pipe.execute

        def counted(*a: Any, **k: Any) -> Any:
            names = " ".join(str(c[0][0]) for c in pipe.command_stack)
            try:
                return run(*a, **k)
            finally:
                trips.append((f"PIPELINE {names}", bool(events_of(observer, gen_id, kind))))

        pipe.execute = counted  # type: ignore[method-assign]
        return pipe

    runner.r.execute_command = counting  # type: ignore[method-assign]
    runner.r.pipeline = counting_pipeline  # type: ignore[method-assign]
    try:
        yield trips
    finally:
        runner.r.execute_command = execute  # type: ignore[method-assign]
        runner.r.pipeline = pipeline  # type: ignore[method-assign]


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_the_final_event_goes_out_in_the_state_change_round_trip(
        redis_client: Any, redis_server: RedisServer, tmp_path: Path, ending: str) -> None:
    kind, finish, before = ENDINGS[ending]
    runner, m = started(redis_client, tmp_path)
    encoded(runner, m)
    with round_trips(runner, redis_server.client(), m.gen_id, kind) as trips:
        finish(runner, m)
    first = next(i for i, (_, seen) in enumerate(trips) if seen)
    # the compare-and-set script appends the event itself: no round trip (answering the record) before it
    assert first == before and trips[first][0] == "EVALSHA", trips
    assert all(name == "EVALSHA" for name, _ in trips[:first]), trips
    # the clean-up follows in one pipeline, once the event is out
    assert len(trips) == first + 2 and trips[first + 1][0].startswith("PIPELINE SREM DEL HINCRBY"), trips


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_the_final_event_is_exactly_the_stored_record_rendered(
        redis_client: Any, tmp_path: Path, ending: str) -> None:
    kind, finish, _ = ENDINGS[ending]
    runner, m = started(redis_client, tmp_path)
    encoded(runner, m)
    finish(runner, m)
    rec = record(redis_client, m.gen_id)
    assert rec["status"] == ending
    [(_id, fields)] = events_of(redis_client, m.gen_id, kind)
    stored = render(rec, runner.image_url)
    # byte for byte: timestamps, timings and the manifest as decoding the hash gives them
    assert fields[b"data"].decode() == json.dumps(stored, separators=(",", ":"))
    assert json.loads(fields[b"data"]) == stored
    assert m.record == rec  # what the worker holds is what Redis holds
    if ending == "succeeded":
        assert stored["images"][0]["url"].endswith(f"/v1/generations/{m.gen_id}/images/0")
        assert stored["progress"] == {"step": 2, "total_steps": 2, "stage": "done", "eta_seconds": 0}
        assert set(stored["timings"]) >= {"queued", "pipeline", "encoding", "uploading", "total"}
    assert redis_client.ttl(keys.events(m.gen_id)) > 0


def metric(r: Any, name: str) -> int:
    return int(r.hget(keys.METRICS, name) or 0)


def test_after_success_the_entries_go_the_metrics_move_and_the_webhook_carries_the_event(
        redis_client: Any, tmp_path: Path) -> None:
    runner, m = started(redis_client, tmp_path, hook_events=["generation.succeeded"])
    assert redis_client.sismember(keys.RUNNING, m.gen_id) and redis_client.exists(keys.lease(m.gen_id))
    encoded(runner, m)
    succeed(runner, m)
    assert not redis_client.sismember(keys.RUNNING, m.gen_id) and not redis_client.exists(keys.lease(m.gen_id))
    assert metric(redis_client, "gen|succeeded|") == 1 and metric(redis_client, "images") == 1
    assert redis_client.hget(keys.METRICS, "h|total|sum") is not None  # the timings were observed
    assert m.gen_id not in runner.current and runner.jobs_done == 1 and runner.images_done == 1
    [(event_id, fields)] = events_of(redis_client, m.gen_id, "generation.succeeded")
    [job] = Queue(keys.WEBHOOK_QUEUE, connection=redis_client, serializer=JSONSerializer).jobs
    delivery = job.args[0]
    assert delivery["event_id"] == f"evt_{m.gen_id}_{event_id.decode()}"
    assert delivery["type"] == "generation.succeeded" and delivery["url"] == "http://127.0.0.1:9/hook"
    assert delivery["data"] == json.loads(fields[b"data"]) == render(record(redis_client, m.gen_id), runner.image_url)


@pytest.mark.parametrize("taken", ["stale", "canceled", "deleted"])
def test_a_generation_lost_while_uploading_gets_no_succeeded_event(
        redis_client: Any, tmp_path: Path, taken: str) -> None:
    """Refused at the final compare-and-set (after the `uploading` check passed): another owner's entries stay,
    otherwise this worker's go; no event, no metrics, no webhook."""
    runner, m = started(redis_client, tmp_path, hook_events=["generation.succeeded"])
    encoded(runner, m)
    put = runner.store.put

    def put_then_lose(*args: Any) -> None:
        put(*args)
        if taken == "stale":  # requeued and started by another worker
            redis_client.hset(keys.generation(m.gen_id), "token", "another-attempt")
        elif taken == "canceled":
            redis_client.hset(keys.generation(m.gen_id), "status", "canceled")
        else:
            redis_client.delete(keys.generation(m.gen_id))

    runner.store.put = put_then_lose  # type: ignore[method-assign]
    succeed(runner, m)
    assert events_of(redis_client, m.gen_id, "generation.succeeded") == []
    assert metric(redis_client, "gen|succeeded|") == 0 and metric(redis_client, "images") == 0
    assert Queue(keys.WEBHOOK_QUEUE, connection=redis_client, serializer=JSONSerializer).count == 0
    assert m.gen_id not in runner.current and runner.jobs_done == 0
    theirs = taken == "stale"
    assert bool(redis_client.sismember(keys.RUNNING, m.gen_id)) == theirs
    assert bool(redis_client.exists(keys.lease(m.gen_id))) == theirs
    if taken != "deleted":
        rec = record(redis_client, m.gen_id)
        assert rec["status"] == ("running" if theirs else "canceled") and rec["images"] == []


def test_a_lost_answer_makes_the_final_event_read_the_stored_record(redis_client: Any, tmp_path: Path) -> None:
    """A progress write whose answer never came may still have been written: `m.record` may be behind the
    hash, so the final change falls back to the script that answers the record (two round trips)."""
    runner, m = started(redis_client, tmp_path)
    encoded(runner, m)
    script = runner.state._transition_emit

    def written_then_lost(*args: Any, **kw: Any) -> Any:
        script(*args, **kw)
        raise redis.ConnectionError("the answer was lost")

    runner.state._transition_emit = written_then_lost  # type: ignore[method-assign]
    runner.publish_progress([m], Progress(step=1, total_steps=2, stage="refiner"))  # never fails the job
    runner.state._transition_emit = script  # type: ignore[method-assign]
    assert not m.record_exact and record(redis_client, m.gen_id)["progress"]["stage"] == "refiner"
    runner.fail_all([m], ErrorType.pipeline_error, "boom")
    rec = record(redis_client, m.gen_id)
    [(_id, fields)] = events_of(redis_client, m.gen_id, "generation.failed")
    assert json.loads(fields[b"data"]) == render(rec, runner.image_url)
    # where it ended: the step of the lost write, read from the hash
    assert json.loads(fields[b"data"])["progress"] == {"step": 1, "total_steps": 2, "stage": "done", "eta_seconds": 0}
    assert not redis_client.sismember(keys.RUNNING, m.gen_id) and not redis_client.exists(keys.lease(m.gen_id))
    assert metric(redis_client, "gen|failed|pipeline_error") == 1
