"""Finds generations whose worker died (lease expired) and requeues them once, or fails them `worker_lost`.

Runs in every worker's heartbeat thread and in the cleanup process; no torch, so either can import it.
"""

import logging
import secrets
import time

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from app.contract import keys, queueing
from app.contract.params import JobPayload
from app.contract.records import decode

log = logging.getLogger("app.reaper")


class Reaper:
    def __init__(self, r: "redis.Redis[bytes]", max_attempts: int, job_timeout: int, ttl: int) -> None:
        self.r = r
        self.max_attempts = max_attempts
        self.job_timeout = job_timeout
        self.ttl = ttl
        self.queue = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
        self._requeue = r.register_script(queueing.REQUEUE)

    def orphans(self) -> list[str]:
        ids = [m.decode() for m in self.r.smembers(keys.RUNNING)]  # type: ignore[union-attr]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for gid in ids:
            pipe.exists(keys.lease(gid))
        return [gid for gid, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def requeue(self, gen_id: str, expected_token: str = "", reason: str = "lease expired") -> str:
        """Put a running generation back in line with a fresh ownership token (or fail it after max)."""
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
        job = self.queue.create_job("worker.tasks.run_generation", args=[payload.model_dump(mode="json")],
                                    job_id=rq_job_id, timeout=self.job_timeout, result_ttl=600, ttl=self.ttl)
        job.save()
        res = self._requeue(keys=[keys.generation(gen_id), keys.ACTIVE_OWNERS],
                            args=[expected_token, token, rq_job_id, keys.PREFIX, self.max_attempts, time.time()])
        outcome = res.decode() if isinstance(res, bytes) else str(res)
        if outcome != "requeued":
            job.delete()
        log.warning("generation %s %s: %s", gen_id, reason, outcome,
                    extra={"generation_id": gen_id, "outcome": outcome, "request_id": rec.get("request_id")})
        return outcome

    def sweep(self) -> list[tuple[str, str]]:
        return [(gid, self.requeue(gid)) for gid in self.orphans()]
