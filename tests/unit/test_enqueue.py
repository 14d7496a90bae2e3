"""The one-round-trip submit (app/enqueue.py CREATE): what it stores is what rq and the old multi-step path
stored, so the worker, the reaper and rq's tools read it as before; admission refuses without writing."""

import asyncio
import zlib
from typing import Any

import redis
import redis.asyncio as aredis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from app.enqueue import Enqueuer
from app.settings import Settings
from common import scripts
from common.contract import keys
from common.contract.keys import RQ_FUNCTION
from common.contract.params import GenerationParams, JobPayload
from common.contract.records import decode

PARAMS = GenerationParams(prompt="a lighthouse \u2014 \u706f\u53f0 \U0001f30a \\ \"quoted\"\n", width=64,
                          height=64, num_inference_steps=2, guidance_scale=5.0, seed=7)  # JSON-hostile text


def text_hash(raw: dict[bytes, bytes]) -> dict[str, bytes]:
    return {k.decode(): v for k, v in raw.items()}


def test_job_hash_matches_rq(redis_client: redis.Redis) -> None:
    settings = Settings()
    sub = Enqueuer(redis_client, settings).submit(PARAMS, owner="open", request_id="req_1")
    rec = decode(redis_client.hgetall(keys.generation(sub.gen_id)))
    job_id = rec["rq_job_id"]
    ours = text_hash(redis_client.hgetall(Job.key_for(job_id)))  # type: ignore[arg-type]

    # what Queue.create_job(...).save() writes for the same call, as the reaper still does
    payload = JobPayload(generation_id=sub.gen_id, token=rec["token"], attempt=1, params=PARAMS,
                         request_id="req_1").model_dump(mode="json")
    queue = Queue(keys.GENERATION_QUEUE, connection=redis_client, serializer=JSONSerializer)
    ttl = settings.generation_ttl_seconds
    ref = queue.create_job(RQ_FUNCTION, args=[payload], job_id="ref-1", timeout=settings.job_timeout_seconds,
                           result_ttl=600, failure_ttl=ttl, ttl=ttl)
    ref.save()
    theirs = text_hash(redis_client.hgetall(Job.key_for("ref-1")))  # type: ignore[arg-type]
    assert ours.keys() == theirs.keys()
    for name in ours:
        if name not in ("created_at",):
            assert ours[name] == theirs[name], name
    assert zlib.decompress(ours["data"]) == zlib.decompress(theirs["data"])

    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert job.func_name == RQ_FUNCTION
    assert job.args == [payload]
    assert job.get_status() == JobStatus.QUEUED
    assert job.origin == keys.GENERATION_QUEUE
    assert abs(job.created_at.timestamp() - float(rec["created_at"])) < 5


def test_record_and_line(redis_client: redis.Redis) -> None:
    settings = Settings()
    enq = Enqueuer(redis_client, settings)
    subs, positions = [], []
    for _ in range(6):
        subs.append(enq.submit(PARAMS, owner="key:a", priority=0, deadline=30, token_counts={"text_encoder": 4}))
        # the position in the answer is POSITION's, as GET computes it
        positions.append(redis_client.eval(scripts.source("position"), 2, keys.generation(subs[-1].gen_id),
                                           keys.RQ_QUEUE_KEY))
    first = subs[0]
    rec = decode(redis_client.hgetall(keys.generation(first.gen_id)))
    assert rec == decode({k: v for k, v in _encoded(first.record).items()})
    assert rec["status"] == "queued" and rec["owner"] == "key:a" and rec["rq_job_id"] == f"{first.gen_id}-1"
    assert float(rec["deadline_at"]) == float(rec["created_at"]) + 30
    ttl = redis_client.ttl(keys.generation(first.gen_id))
    assert ttl > settings.generation_ttl_seconds  # record TTL includes the retention grace
    assert redis_client.zscore(keys.owner_index("key:a"), first.gen_id) == float(rec["created_at"])
    assert redis_client.zscore(keys.EXPIRY, first.gen_id) == float(rec["expires_at"])
    assert redis_client.sismember(keys.RQ_QUEUES_SET, keys.RQ_QUEUE_KEY)
    # FEED ran: the rq list holds queue_feed_depth jobs, the rest wait in the owner's line
    depth = settings.queue_feed_depth
    assert [j.decode() for j in redis_client.lrange(keys.RQ_QUEUE_KEY, 0, -1)] == [
        f"{s.gen_id}-1" for s in subs[:depth]]
    assert redis_client.zcard(keys.pending("key:a")) == len(subs) - depth
    assert [s.position for s in subs] == positions
    assert positions[:depth] == list(range(depth))
    assert not redis_client.exists(keys.active("key:a"))  # the blocking submit does not admit


def _encoded(fields: dict[str, Any]) -> dict[str, str]:
    from common.contract.records import encode

    return encode(fields)


def test_admission_refuses_without_writing(redis_server: Any, redis_client: redis.Redis) -> None:
    settings = Settings()

    async def run() -> list[tuple[int, int]]:
        ar = aredis.Redis.from_url(redis_server.url)
        try:
            enq = Enqueuer(redis_client, settings, ar)
            out = []
            for limits in ((2, 100), (2, 100), (2, 100), (100, 2)):
                fields, ks, args = enq.prepare(PARAMS, "key:b", limits=limits)
                sub = await enq.submit_async(fields, ks, args)
                out.append((sub.admitted, sub.count))
            return out
        finally:
            await ar.aclose()

    assert asyncio.run(run()) == [(0, 1), (0, 2), (1, 2), (2, 2)]
    assert len(redis_client.keys("sdxl:gen:*")) == 2
    assert len(redis_client.keys("rq:job:*")) == 2
    assert redis_client.zcard(keys.active("key:b")) == 2
