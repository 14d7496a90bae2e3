"""Background finishing (worker/finisher.py): the next pipeline call starts while the last result is being
encoded and stored, a result being finished keeps its lease, and a failure while finishing hands the generation
back to the reaper instead of leaving it `running` forever.

Stand-in engine (no GPU here); Redis, rq job records, the local store and the state machine are real.
"""

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from common.contract import keys
from common.storage import LocalStore
from tests.jobs import dequeue, queue_jobs
from tests.unit.test_runner_oom import OOMEngine, record
from worker.finisher import Finisher
from worker.runner import Runner
from worker.settings import WorkerSettings


class GatedStore(LocalStore):
    """A local store whose puts wait for `gate` (a slow upload), or raise `fail` when set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.fail: Exception | None = None
        self.puts = 0

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        if not self.gate.wait(10):
            raise AssertionError("store gate never opened")
        if self.fail is not None:
            raise self.fail
        self.puts += 1
        super().put(key, data, content_type, metadata)


def test_finisher_runs_tasks_in_order_survives_a_failing_one_and_drains() -> None:
    f = Finisher(depth=2)
    done: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom")

    def slow() -> None:
        time.sleep(0.05)
        done.append(3)

    f.submit(lambda: done.append(1))
    f.submit(boom)
    f.submit(slow)
    assert f.close(5) is True
    assert done == [1, 3]


def test_drain_times_out_while_a_task_is_stuck() -> None:
    f = Finisher()
    release = threading.Event()
    f.submit(lambda: None if release.wait(5) else None)
    t0 = time.monotonic()
    assert f.drain(0.2) is False
    assert 0.15 < time.monotonic() - t0 < 2
    release.set()
    assert f.drain(5) is True


def test_next_pipeline_call_overlaps_the_previous_upload(redis_client: Any, tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    stored_when_second_began: list[int] = []

    class Engine(OOMEngine):
        def run(self, params: Any, specs: list[Any], hook: Any, inputs: Any = None) -> Any:
            if len(self.calls) == 1:  # the second pipeline call begins while the first upload is held
                stored_when_second_began.append(store.puts)
                store.gate.set()
            return super().run(params, specs, hook)

    engine = Engine(fits=4)
    runner = Runner(redis_client, engine, store, WorkerSettings(), "test-worker", Finisher())  # type: ignore[arg-type]
    gen1, gen2 = queue_jobs(redis_client, 2)
    runner.run_job(*dequeue(redis_client))  # gen1: gen2 waits, so gen1 is finished in the background
    runner.run_job(*dequeue(redis_client))  # gen2, while gen1's upload is held
    assert runner.drain(10)
    assert engine.calls == [1, 1] and stored_when_second_began == [0]
    r1, r2 = record(redis_client, gen1), record(redis_client, gen2)
    assert r1["status"] == r2["status"] == "succeeded"
    assert store.puts == 2 and len(r1["images"]) == len(r2["images"]) == 1
    assert not runner.current
    assert redis_client.scard(keys.RUNNING) == 0 and not redis_client.exists(keys.lease(gen1))
    # gen2's pipeline started before gen1 was finished: the model did not wait for the upload
    assert float(r2["started_at"]) < float(r1["finished_at"])


def test_with_nothing_waiting_the_result_is_finished_before_the_job_returns(redis_client: Any,
                                                                            tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    store.gate.set()
    finisher = Finisher()
    runner = Runner(redis_client, OOMEngine(fits=4), store, WorkerSettings(), "test-worker",  # type: ignore[arg-type]
                    finisher)
    (gen,) = queue_jobs(redis_client, 1)
    runner.run_job(*dequeue(redis_client))
    assert record(redis_client, gen)["status"] == "succeeded"  # no hand-off: nothing to overlap with
    assert finisher.drain(0)


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), OSError(28, "No space left on device")])
def test_a_failure_while_finishing_lets_the_lease_lapse(redis_client: Any, tmp_path: Path,
                                                        error: Exception) -> None:
    """Like a job that raises: not stuck `running` with a lease renewed forever; the reaper runs it again."""
    store = GatedStore(tmp_path)
    store.fail = error
    store.gate.set()
    runner = Runner(redis_client, OOMEngine(fits=4), store, WorkerSettings(), "test-worker",  # type: ignore[arg-type]
                    Finisher())
    gen, _waiting = queue_jobs(redis_client, 2)  # a second job waits, so the first is finished in the background
    runner.run_job(*dequeue(redis_client))
    assert runner.drain(10)
    assert gen not in runner.current  # no more lease renewals for it
    rec = record(redis_client, gen)
    assert rec["status"] == "running"  # left for the reaper, which requeues it once the lease lapses
    redis_client.delete(keys.lease(gen))  # what the lapse does
    assert runner.reaper.orphans() == [gen]
    assert runner.reaper.requeue(gen) == "requeued"
    assert record(redis_client, gen)["status"] == "queued"
