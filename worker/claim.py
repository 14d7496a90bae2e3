"""Claiming: the start of the rq job's generation, and the queued jobs that may share its pipeline call."""

# The methods are Runner's (worker/runner.py), typed with `self: "Runner"`: mypy's "misc" refuses such a self
# type on a class that is not yet its base, and checks the bodies against Runner all the same.
# mypy: disable-error-code="misc"

import logging
import time
from typing import TYPE_CHECKING

from rq.job import Job
from rq.serializers import JSONSerializer

from common.contract import keys
from common.contract.params import GenerationParams, JobPayload
from common.contract.records import as_str
from worker.attempt import Member

if TYPE_CHECKING:
    from worker.runner import Runner

log = logging.getLogger("worker.claim")


class Claiming:
    def claim_compatible(self: "Runner", params: GenerationParams) -> list[Member]:
        """Queued jobs with the same batch key, taken off the rq queue (`Queue.remove` answers 1: ours)."""
        want = params.batch_key()
        claimed: list[Member] = []
        budget = params.num_images_per_prompt
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            self.feed()
            for job_id in self.queue.get_job_ids(0, self.settings.batch_max * 4):
                if budget >= self.settings.batch_max:
                    return claimed
                gen_id = job_id.rsplit("-", 1)[0]
                if as_str(self.r.hget(keys.generation(gen_id), "batch_key") or b"") != want:
                    continue
                if self.queue.remove(job_id) != 1:
                    continue  # another worker took it first
                job = Job.fetch(job_id, connection=self.r, serializer=JSONSerializer)
                payload = JobPayload.model_validate(job.args[0])
                claimed.append(Member(payload, job_id))
                budget += payload.params.num_images_per_prompt
            if budget >= self.settings.batch_max or time.monotonic() >= deadline:
                return claimed
            time.sleep(0.005)

    def start(self: "Runner", m: Member) -> bool:
        """queued -> running (common/state.py); the attempt is then this worker's to renew and finish."""
        now = time.time()
        if self.state.start(m, self.worker_id, now) != "OK":
            return False
        with self.lock:
            self.current[m.gen_id] = m
        p = m.payload.params
        # the formatter drops `prompt` unless SDXL_LOG_PROMPTS is on
        log.info("generation started", extra={
            "generation_id": m.gen_id, "request_id": m.payload.request_id, "attempt": m.payload.attempt,
            "width": p.width, "height": p.height, "steps": p.num_inference_steps, "images": p.num_images_per_prompt,
            "queued_seconds": round(now - float(m.record.get("created_at") or now), 3), "prompt": p.prompt})
        return True
