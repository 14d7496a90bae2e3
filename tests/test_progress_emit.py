"""worker/runner.py `progress_emit`: a progress change and its event in one round trip (TRANSITION_EMIT), the
event rendered by the worker from the record START answered; nothing appended when the generation is no
longer this worker's. Stand-in engine; Redis, the records and the scripts are real."""

import json
from pathlib import Path
from typing import Any

from app.contract import keys
from app.contract.params import JobPayload
from app.contract.resource import render
from tests.test_runner_oom import OOMEngine, make_runner, record, submit
from worker.pipeline import Progress
from worker.runner import Member, Runner


def started(r: Any, tmp_path: Path) -> tuple[Runner, Member]:
    job_id, payload = submit(r, n_images=1)
    payload.pop("_gen")
    runner = make_runner(r, OOMEngine(fits=4), tmp_path)
    m = Member(JobPayload.model_validate(payload), job_id)
    assert runner.start(m)
    return runner, m


def test_progress_and_its_event_go_in_one_round_trip(redis_client: Any, tmp_path: Path) -> None:
    runner, m = started(redis_client, tmp_path)
    assert runner.progress_emit(m, Progress(step=1, total_steps=20, stage="base")) == ("OK", -1)  # loads the script
    sent: list[Any] = []
    execute = runner.r.execute_command

    def counting(*args: Any, **kw: Any) -> Any:
        sent.append(args[0])
        return execute(*args, **kw)

    runner.r.execute_command = counting  # type: ignore[method-assign]
    assert runner.progress_emit(m, Progress(step=3, total_steps=20, stage="base")) == ("OK", -1)
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
    assert runner.progress_emit(m, Progress(step=5, total_steps=20))[0].startswith("stale")
    redis_client.hset(keys.generation(m.gen_id), mapping={"token": m.payload.token, "status": "canceled"})
    assert runner.progress_emit(m, Progress(step=6, total_steps=20)) == ("canceled", -1)
    assert redis_client.xlen(keys.events(m.gen_id)) == events
    assert record(redis_client, m.gen_id)["progress"]["step"] == 0


def test_the_encoding_stage_also_answers_how_many_jobs_wait(redis_client: Any, tmp_path: Path) -> None:
    """What decides between finishing inline and in the background, without a round trip of its own."""
    runner, m = started(redis_client, tmp_path)
    assert runner.progress_emit(m, Progress(step=20, total_steps=20, stage="encoding"), queue_length=True) == ("OK", 0)
    redis_client.rpush(keys.RQ_QUEUE_KEY, "another-job")
    assert runner.progress_emit(m, Progress(step=20, total_steps=20, stage="encoding"), queue_length=True) == ("OK", 1)
    assert runner.publish_progress([m], Progress(step=20, total_steps=20, stage="encoding"), queue_length=True) == 1
