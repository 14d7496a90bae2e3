"""Finds generations whose worker died (lease expired) and requeues them once, or fails them `worker_lost`.

Runs in every worker's heartbeat thread and in the cleanup process; no torch, so either can import it.
"""

import logging
import time

import redis

from common import scripts
from common.contract import keys
from common.settings import CommonSettings
from common.state import GenerationState, no_image_urls

log = logging.getLogger("common.reaper")

class Reaper:
    def __init__(self, r: redis.Redis, settings: CommonSettings, state: GenerationState | None = None,
                 stranded_after: float | None = None) -> None:
        self.r = r
        # a reaper's own state needs no image URLs: what it requeues or fails has none
        self.state = state or GenerationState(r, settings, no_image_urls)
        # seconds a dequeued job may go unstarted before it is put back
        self.stranded_after = settings.lease_seconds if stranded_after is None else stranded_after
        self._rescue = scripts.register(r, "rescue")

    def orphans(self) -> list[str]:
        ids = [m.decode() for m in self.r.smembers(keys.RUNNING)]  # type: ignore[union-attr]
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for gid in ids:
            pipe.exists(keys.lease(gid))
        return [gid for gid, alive in zip(ids, pipe.execute(), strict=True) if not alive]

    def requeue(self, gen_id: str) -> str:
        return self.state.requeue(gen_id)

    def rescue_stranded(self) -> list[str]:
        """Jobs seen in rq's intermediate list on two sweeps `stranded_after` apart, still unstarted."""
        ids = [j.decode() for j in self.r.lrange(keys.RQ_INTERMEDIATE_KEY, 0, -1)]  # type: ignore[union-attr]
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
            if self._rescue(keys=[keys.RQ_INTERMEDIATE_KEY, keys.RQ_QUEUE_KEY, keys.generation(gen_id)], args=[job_id]):
                rescued.append(gen_id)
                log.warning("generation %s was dequeued but never started: put back in line", gen_id,
                            extra={"generation_id": gen_id, "rq_job_id": job_id})
            pipe.hdel(keys.STRANDED, job_id)
        pipe.execute()
        return rescued

    def sweep(self) -> list[tuple[str, str]]:
        out = [(gid, self.requeue(gid)) for gid in self.orphans()]
        return out + [(gid, "rescued") for gid in self.rescue_stranded()]
