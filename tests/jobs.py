"""Generation jobs in a test's own Redis, for unit tests of the worker's runner (no API, no worker process)."""

from typing import Any

from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.enqueue import Enqueuer
from app.settings import Settings
from common.contract import keys
from common.contract.params import GenerationParams


def queue_jobs(r: Any, n: int) -> list[str]:
    """n generations fed into the rq queue (feed depth raised so all of them are there), oldest first."""
    enq = Enqueuer(r, Settings(queue_feed_depth=n + 1))
    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1)
    return [enq.submit(params, owner="open").gen_id for _ in range(n)]


def dequeue(r: Any) -> tuple[dict[str, Any], str]:
    """What rq hands the worker: the head job's payload and id."""
    job_id = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer).pop_job_id()
    assert job_id is not None, "no job queued"
    return Job.fetch(job_id, connection=r, serializer=JSONSerializer).args[0], job_id
