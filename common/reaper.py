"""Finds generations whose worker died (lease expired) and requeues them once, or fails them `worker_lost`.

Runs in every worker's heartbeat thread and in the cleanup process; no torch, so either can import it.
"""

import logging
import secrets
import time

import redis
from rq import Queue
from rq.intermediate_queue import IntermediateQueue
from rq.serializers import JSONSerializer

from common.contract import keys, queueing, stats
from common.contract.params import JobPayload
from common.contract.records import as_str, decode
from common.settings import CommonSettings

log = logging.getLogger("common.reaper")

# KEYS: rq intermediate list, rq queue list, gen hash. ARGV: rq job id. A worker killed between rq's dequeue
# (LMOVE into the intermediate list) and its start CAS leaves a queued generation nobody will run: put its job
# back at the front of the queue, once (LREM == 1 decides between racing reapers).
RESCUE = """
if redis.call('HGET', KEYS[3], 'status') ~= 'queued' or redis.call('HGET', KEYS[3], 'rq_job_id') ~= ARGV[1] then
  return 0
end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
return 1
"""


# where rq's dequeue (and a worker's own claim) parks a job until it starts
INTERMEDIATE_KEY = IntermediateQueue.get_intermediate_queue_key(keys.RQ_QUEUE_KEY)


class Reaper:
    def __init__(self, r: redis.Redis, settings: CommonSettings, stranded_after: float | None = None) -> None:
        self.r = r
        self.max_attempts = settings.max_attempts
        self.job_timeout = settings.job_timeout_seconds
        self.ttl = settings.generation_ttl_seconds
        # seconds a dequeued job may go unstarted before it is put back
        self.stranded_after = settings.lease_seconds if stranded_after is None else stranded_after
        self.queue = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
        self._requeue = r.register_script(queueing.REQUEUE)
        self._rescue = r.register_script(RESCUE)

    def orphans(self) -> list[str]:
        ids = [m.decode() for m in self.r.smembers(keys.RUNNING)]  # type: ignore[union-attr]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for gid in ids:
            pipe.exists(keys.lease(gid))
        return [gid for gid, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def requeue(self, gen_id: str, expected_token: str = "", reason: str = "lease expired",
                kind: str = "lease_expired", spare_attempt: bool = False) -> str:
        """Put a running generation back in line with a fresh ownership token (or fail it after max).

        `spare_attempt`: a graceful shutdown's requeue does not use up the lost-worker budget."""
        raw = self.r.hgetall(keys.generation(gen_id))
        if not raw:
            self.r.srem(keys.RUNNING, gen_id)
            return ""
        rec = decode(raw)
        attempt = int(rec.get("attempt") or 1) + 1
        token = secrets.token_hex(8)
        rq_job_id = f"{gen_id}-{attempt}"
        payload = JobPayload(generation_id=gen_id, token=token, attempt=attempt, params=rec["params"],
                             request_id=rec.get("request_id") or None)
        job = self.queue.create_job(keys.RQ_FUNCTION, args=[payload.model_dump(mode="json")],
                                    job_id=rq_job_id, timeout=self.job_timeout, result_ttl=600, ttl=self.ttl)
        job.save()
        res = self._requeue(keys=[keys.generation(gen_id), keys.ACTIVE_OWNERS],
                            args=[expected_token, token, rq_job_id, keys.PREFIX,
                                  self.max_attempts + int(spare_attempt), time.time()])
        outcome = as_str(res)
        if outcome != "requeued":
            job.delete()
        else:
            stats.count_requeue(self.r, kind)
        log.warning("generation %s %s: %s", gen_id, reason, outcome,
                    extra={"generation_id": gen_id, "outcome": outcome, "request_id": rec.get("request_id")})
        return outcome

    def rescue_stranded(self) -> list[str]:
        """Jobs seen in rq's intermediate list on two sweeps `stranded_after` apart, still unstarted."""
        ids = [j.decode() for j in self.r.lrange(INTERMEDIATE_KEY, 0, -1)]  # type: ignore[union-attr]
        seen = {k.decode(): float(v) for k, v in self.r.hgetall(keys.STRANDED).items()}  # type: ignore[union-attr]
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        gone = [j for j in seen if j not in ids]
        if gone:
            pipe.hdel(keys.STRANDED, *gone)
        rescued = []
        for job_id in ids:
            first = seen.get(job_id)
            if first is None:
                pipe.hsetnx(keys.STRANDED, job_id, now)
                continue
            if now - first < self.stranded_after:
                continue
            gen_id = job_id.rsplit("-", 1)[0]
            if self._rescue(keys=[INTERMEDIATE_KEY, keys.RQ_QUEUE_KEY, keys.generation(gen_id)], args=[job_id]):
                rescued.append(gen_id)
                log.warning("generation %s was dequeued but never started: put back in line", gen_id,
                            extra={"generation_id": gen_id, "rq_job_id": job_id})
            pipe.hdel(keys.STRANDED, job_id)
        pipe.execute()
        return rescued

    def sweep(self) -> list[tuple[str, str]]:
        out = [(gid, self.requeue(gid)) for gid in self.orphans()]
        return out + [(gid, "rescued") for gid in self.rescue_stranded()]
