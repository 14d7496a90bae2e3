"""Where the service relies on rq's Redis layout instead of its Python API, all of it, in one module.

rq keeps a queue as a Redis list of job ids, each job as a hash, and a job it has dequeued but not yet started
in an intermediate list. The service's own Lua reads and writes those lists so that a change to a generation
and its place in rq's queue are one atomic step: the fair-share feed (FEED pushes ids from the per-owner lines),
cancel (LREM), queue position (LPOS), the one-script submit (CREATE writes the hash rq's `Job.to_dict` built)
and the reaper's rescue of a job whose worker died between rq's dequeue and our start (RESCUE). Done in Python
through rq's API, each would be two writes with a crash window between them, not a speed-up to give up.

Every name is read from rq's own classes, and tests/unit/test_rq_contract.py checks the layout against the
pinned rq (a job written this way is dequeued and run by a real rq worker), so an rq upgrade that changes it
fails the build instead of the service.
"""

from rq import Queue
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job

GENERATION_QUEUE = "sdxl-generations"  # the rq queue the GPU workers listen on
WEBHOOK_QUEUE = "sdxl-webhooks"  # the rq queue of the webhook dispatcher

QUEUE_KEY = Queue.redis_queue_namespace_prefix + GENERATION_QUEUE  # the list of job ids
QUEUES_SET = Queue.redis_queues_keys  # the set of queue keys rq's workers and tools discover
INTERMEDIATE_KEY = IntermediateQueue.get_intermediate_queue_key(QUEUE_KEY)  # dequeued, not yet started


def job_key(job_id: str) -> str:
    """The hash of one rq job."""
    return Job.key_for(job_id)
