"""Runner unit tests with a stand-in engine (the GPU cannot run here): CUDA OOM handling.

The engine is the only fake; Redis, the rq job records, the local store and the state machine are real.
"""

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from app.enqueue import Enqueuer
from app.settings import Settings
from common.contract import keys
from common.contract.records import decode
from common.storage import LocalStore
from worker.pipeline import ImageSpec, StageTimes
from worker.runner import Runner
from worker.settings import WorkerSettings


class OOMEngine:
    """Raises torch.cuda.OutOfMemoryError for batches larger than `fits`; counts frees."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.calls: list[int] = []
        self.freed = 0

    def run(self, params: Any, specs: list[ImageSpec], hook: Any, inputs: Any = None
            ) -> tuple[list[Image.Image], StageTimes]:
        self.calls.append(len(specs))
        if len(specs) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [Image.new("RGB", (params.width, params.height), (s.seed % 255, 0, 0)) for s in specs], StageTimes()

    def free_memory(self) -> None:
        self.freed += 1

    def scheduler_config(self, name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"_class_name": "EulerDiscreteScheduler"}

    def model_info(self) -> dict[str, Any]:
        return {"base_model": "fake", "versions": {}}


def submit(r: Any, n_images: int) -> tuple[str, dict[str, Any]]:
    from common.contract.params import GenerationParams

    settings = Settings()
    enq = Enqueuer(r, settings)
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1,
                              num_images_per_prompt=n_images)
    sub = enq.submit(params, owner="open")
    job_id = r.lpop(keys.RQ_QUEUE_KEY).decode()
    from rq.job import Job
    from rq.serializers import JSONSerializer

    return job_id, Job.fetch(job_id, connection=r, serializer=JSONSerializer).args[0] | {"_gen": sub.gen_id}


def make_runner(r: Any, engine: OOMEngine, tmp_path: Path) -> Runner:
    return Runner(r, engine, LocalStore(tmp_path), WorkerSettings(), "test-worker")  # type: ignore[arg-type]


def record(r: Any, gen_id: str) -> dict[str, Any]:
    return decode(r.hgetall(keys.generation(gen_id)))


def test_oom_on_a_batch_retries_one_image_at_a_time(redis_client: Any, tmp_path: Path) -> None:
    engine = OOMEngine(fits=1)
    runner = make_runner(redis_client, engine, tmp_path)
    job_id, payload = submit(redis_client, n_images=3)
    gen_id = payload.pop("_gen")
    runner.run_job(payload, job_id)
    rec = record(redis_client, gen_id)
    assert rec["status"] == "succeeded" and len(rec["images"]) == 3
    assert engine.calls == [3, 1, 1, 1] and engine.freed == 1


def test_oom_alone_fails_typed_frees_memory_and_the_worker_goes_on(redis_client: Any, tmp_path: Path) -> None:
    engine = OOMEngine(fits=0)
    runner = make_runner(redis_client, engine, tmp_path)
    job_id, payload = submit(redis_client, n_images=1)
    gen_id = payload.pop("_gen")
    runner.run_job(payload, job_id)
    rec = record(redis_client, gen_id)
    assert rec["status"] == "failed" and rec["error"]["type"] == "out_of_memory"
    assert "Traceback" not in rec["error"]["message"] and engine.freed >= 1
    assert redis_client.sismember(keys.RUNNING, gen_id) == 0
    # the same runner serves the next job once memory allows
    engine.fits = 4
    job_id, payload = submit(redis_client, n_images=2)
    gen2 = payload.pop("_gen")
    runner.run_job(payload, job_id)
    assert record(redis_client, gen2)["status"] == "succeeded"


def test_newer_payload_version_fails_instead_of_guessing(redis_client: Any, tmp_path: Path) -> None:
    runner = make_runner(redis_client, OOMEngine(fits=4), tmp_path)
    job_id, payload = submit(redis_client, n_images=1)
    gen_id = payload.pop("_gen")
    runner.run_job({**payload, "v": 99}, job_id)
    rec = record(redis_client, gen_id)
    assert rec["status"] == "failed" and rec["error"]["type"] == "invalid_payload"


@pytest.mark.parametrize("stale", [True])
def test_a_superseded_worker_stores_nothing(redis_client: Any, tmp_path: Path, stale: bool) -> None:
    """Ownership token changed (job handed to another worker): this copy is dropped before storing."""
    engine = OOMEngine(fits=4)
    runner = make_runner(redis_client, engine, tmp_path)
    job_id, payload = submit(redis_client, n_images=1)
    gen_id = payload.pop("_gen")
    original_run = engine.run

    def run_then_lose_ownership(params: Any, specs: Any, hook: Any, inputs: Any = None) -> Any:
        out = original_run(params, specs, hook, inputs)
        redis_client.hset(keys.generation(gen_id), "token", "someone-else")
        return out

    engine.run = run_then_lose_ownership  # type: ignore[method-assign]
    runner.run_job(payload, job_id)
    time.sleep(0.1)
    rec = record(redis_client, gen_id)
    assert rec["status"] == "running" and rec["images"] == []  # left to the new owner
    assert not any(tmp_path.rglob("*.png"))
