"""The rq layout common/rq_internals.py relies on, checked against the pinned rq: if an rq upgrade changes how it
keeps queues, jobs or dequeued jobs in Redis, these fail instead of the service."""

import json

import redis
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app.enqueue import rq_job_fields
from common import rq_internals


def double(x: int) -> int:
    return 2 * x


def test_the_key_names_are_rqs_own(redis_client: redis.Redis) -> None:
    queue = Queue(rq_internals.GENERATION_QUEUE, connection=redis_client, serializer=JSONSerializer)
    assert queue.key == rq_internals.QUEUE_KEY
    assert queue.intermediate_queue_key == rq_internals.INTERMEDIATE_KEY
    assert Job("some-id", connection=redis_client).key == rq_internals.job_key("some-id")
    queue.enqueue(double, 1)
    assert redis_client.smembers(rq_internals.QUEUES_SET) == {queue.key.encode()}


def test_a_job_written_as_the_service_writes_it_is_run_by_rq(redis_client: redis.Redis) -> None:
    """CREATE's way: the hash from rq's `Job.to_dict` with HSET, the id pushed onto the list, the queue key added
    to the queues set. A real rq worker finds it, runs it and stores its result."""
    queue = Queue(rq_internals.GENERATION_QUEUE, connection=redis_client, serializer=JSONSerializer)
    fields, data = rq_job_fields(queue, "job-1", 21, timeout=60, ttl=600, func=f"{__name__}.double")
    mapping = {**json.loads(fields), "data": data}
    redis_client.hset(rq_internals.job_key("job-1"), mapping=mapping)
    redis_client.rpush(rq_internals.QUEUE_KEY, "job-1")
    redis_client.sadd(rq_internals.QUEUES_SET, rq_internals.QUEUE_KEY)
    assert queue.get_job_ids() == ["job-1"]
    SimpleWorker([queue], connection=redis_client, serializer=JSONSerializer).work(burst=True)
    done = Job.fetch("job-1", connection=redis_client, serializer=JSONSerializer)
    assert done.get_status() == JobStatus.FINISHED and done.return_value() == 42


def test_rqs_dequeue_parks_the_id_in_the_intermediate_list(redis_client: redis.Redis) -> None:
    """What the reaper's rescue looks for: a dequeued, unstarted job's id in INTERMEDIATE_KEY."""
    queue = Queue(rq_internals.GENERATION_QUEUE, connection=redis_client, serializer=JSONSerializer)
    job = queue.enqueue(double, 2)
    found = Queue.dequeue_any([queue], timeout=None, connection=redis_client, serializer=JSONSerializer)
    assert found is not None and found[0].id == job.id
    assert [j.decode() for j in redis_client.lrange(rq_internals.INTERMEDIATE_KEY, 0, -1)] == [job.id]
    assert queue.get_job_ids() == []
