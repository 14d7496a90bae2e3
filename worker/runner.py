"""One rq job (or micro-batch of compatible jobs): claim (worker/claim.py) -> execute (worker/execute.py) ->
finish (worker/finish.py); every state change through common/state.py.

Every state change goes through the compare-and-set scripts with this attempt's ownership token, so a
worker that lost its job (lease expired during a Redis outage, job handed to another worker) stores
nothing and finishes nothing.
"""

import logging
import threading
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from common import logs
from common.contract import keys
from common.contract.params import PAYLOAD_VERSION, JobPayload
from common.contract.status import ErrorType, GenerationStatus
from common.reaper import Reaper
from common.state import GenerationState
from common.storage import ObjectStore, image_url
from worker.attempt import Member
from worker.claim import Claiming
from worker.execute import Executing
from worker.finish import Finishing
from worker.finisher import Finisher
from worker.pipeline import Engine
from worker.previews import Previewer
from worker.settings import WorkerSettings

log = logging.getLogger("worker.runner")


class Runner(Claiming, Executing, Finishing):
    def __init__(self, r: redis.Redis, engine: Engine, store: ObjectStore, settings: WorkerSettings,
                 worker_id: str, finisher: Finisher | None = None) -> None:
        self.r = r
        self.finisher = finisher  # None: encode/store/finish inline, before the job returns
        self.engine = engine
        self.store = store
        self.settings = settings
        self.worker_id = worker_id
        self.queue = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
        self.state = GenerationState(r, settings, self.image_url)
        self.state.load_success_scripts()
        # one per worker process: the heartbeat's sweeps and the shutdown requeue share it
        self.reaper = Reaper(r, settings, self.state)
        self.lock = threading.Lock()
        self.current: dict[str, Member] = {}  # gen id -> the attempt running here, read by the heartbeat thread
        self.shutdown_abort = threading.Event()
        self.jobs_done = 0
        self.images_done = 0
        self.busy_seconds = 0.0
        self.previewer: Previewer | None = None  # live previews: worker/__main__.py loads it (Previewer.load)

    # --- helpers ----------------------------------------------------------------------------------
    def image_url(self, gen_id: str, img: dict[str, Any]) -> str:
        return image_url(self.settings, self.store, gen_id, img)

    def feed(self) -> None:
        self.state.feed()

    # --- entry point (rq calls this through worker.tasks.run_generation) -------------------------
    def run_job(self, raw_payload: dict[str, Any], rq_job_id: str) -> dict[str, Any]:
        # every line logged for this job carries its ids (common/logs.py), so it can be followed from the API
        with logs.bind(request_id=raw_payload.get("request_id"), generation_id=raw_payload.get("generation_id")):
            return self._run_job(raw_payload, rq_job_id)

    def _run_job(self, raw_payload: dict[str, Any], rq_job_id: str) -> dict[str, Any]:
        version = int(raw_payload.get("v", 0))
        gen_id = str(raw_payload.get("generation_id", ""))
        if version > PAYLOAD_VERSION or not gen_id:
            # a newer API during a rolling upgrade: put it back for a newer worker rather than guess
            log.error("payload version %s not supported (max %s)", version, PAYLOAD_VERSION)
            self.state.fail(gen_id, raw_payload.get("token", ""), ErrorType.invalid_payload,
                            f"payload version {version} is newer than this worker understands")
            return {"status": GenerationStatus.failed.value}
        payload = JobPayload.model_validate(raw_payload)
        members = [Member(payload, rq_job_id)]
        if self.settings.batch_max > 1:
            members += self.claim_compatible(payload.params)
        started = [m for m in members if self.start(m)]  # each start also refills the rq queue (FEED)
        try:
            if started:
                self.execute(started)
        finally:
            for m in members:  # one still finishing keeps its lease (heartbeat) until after_final
                if m.outcome != "finishing":
                    self.forget(m)
            for m in members[1:]:  # taken off the queue by this worker: rq never saw them run
                Job(m.rq_job_id, connection=self.r, serializer=JSONSerializer).delete()
            if len(members) > 1:
                self.feed()  # the batch took more than one job off the rq queue
        return {"generations": [m.gen_id for m in members]}

    def rq_exception_handler(self, job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        """rq failed the job outside our code (bad payload, lost import): never leave the generation queued."""
        gen_id = job.id.rsplit("-", 1)[0]
        log.error("rq could not run job %s: %s", job.id, exc_type.__name__)
        self.state.fail(gen_id, "", ErrorType.invalid_payload, f"the job could not be run: {exc_type.__name__}")
        self.r.srem(keys.RUNNING, gen_id)
        return True

    def forget(self, m: Member) -> None:
        """This attempt is over here: no more lease renewal. Only this attempt's entry goes: a later attempt
        of the same generation may already run on this worker while this one finishes in the background."""
        with self.lock:
            if self.current.get(m.gen_id) is m:
                del self.current[m.gen_id]

    def requeue(self, m: Member, reason: str) -> None:
        outcome = self.state.requeue(m.gen_id, expected_token=m.token, reason=reason, kind="shutdown",
                                     spare_attempt=True)
        if outcome != "stale":  # not another attempt's lease
            self.r.delete(keys.lease(m.gen_id))


