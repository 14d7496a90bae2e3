"""One job (or micro-batch of compatible jobs): claim -> pipeline -> encode -> store -> finish -> events.

Every state change goes through the compare-and-set scripts with this attempt's ownership token, so a
worker that lost its job (lease expired during a Redis outage, job handed to another worker) stores
nothing and finishes nothing.
"""

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from common import logs
from common.contract import keys
from common.contract.events import (
    EventType,
)
from common.contract.params import PAYLOAD_VERSION, GenerationParams, JobPayload
from common.contract.records import as_str
from common.contract.status import ErrorType
from common.reaper import Reaper
from common.state import GenerationState
from common.storage import ObjectStore, StorageUnavailable, image_key, image_url, put_with_retry
from worker import encode as encoding
from worker.finisher import Finisher
from worker.pipeline import Engine, ImageSpec, NonFiniteOutput, Progress, PromptTooLong, StepAbort, is_oom
from worker.settings import WorkerSettings

log = logging.getLogger("worker.runner")

@dataclass
class Member:
    """One generation inside the current pipeline call."""

    payload: JobPayload
    rq_job_id: str
    record: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None  # canceled / superseded / finishing once decided
    step: int = 0  # latest progress, kept in memory (Redis sees it throttled)
    total_steps: int = 0
    # False once a change's answer was lost (the script may have run): `record` may then be behind the hash
    record_exact: bool = True
    # marks on this attempt, not on the generation id: a later attempt of the same generation on this worker
    # starts clean (a mark keyed by id would abort it at its first step)
    cancel_requested: bool = False
    superseded: bool = False

    @property
    def gen_id(self) -> str:
        return self.payload.generation_id

    @property
    def token(self) -> str:
        return self.payload.token


class Runner:
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
        # one per worker process: the heartbeat's sweeps and the shutdown requeue share it
        self.reaper = Reaper(r, settings, self.state)
        self.lock = threading.Lock()
        self.current: dict[str, Member] = {}  # gen id -> the attempt running here, read by the heartbeat thread
        self.shutdown_abort = threading.Event()
        self.jobs_done = 0
        self.images_done = 0
        self.busy_seconds = 0.0

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
            return {"status": "failed"}
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

    def claim_compatible(self, params: GenerationParams) -> list[Member]:
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

    def start(self, m: Member) -> bool:
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

    # --- the pipeline call ------------------------------------------------------------------------
    def execute(self, members: list[Member]) -> None:
        t_start = time.monotonic()
        params = members[0].payload.params
        last_flush: list[Any] = [0.0, ""]

        def hook(progress: Progress) -> None:
            if self.shutdown_abort.is_set():
                raise StepAbort("shutdown")
            with self.lock:
                hit = [m for m in members if m.outcome is None and (m.cancel_requested or m.superseded)]
            if hit:
                for m in hit:
                    m.outcome = "superseded" if m.superseded else "canceled"
                raise StepAbort("cancel")
            for m in members:
                m.step, m.total_steps = progress.step, progress.total_steps
            now = time.monotonic()
            if now - last_flush[0] >= self.settings.progress_interval_seconds or progress.stage != last_flush[1]:
                last_flush[0], last_flush[1] = now, progress.stage
                self.publish_progress(members, progress)

        active = members
        while active:
            specs = [ImageSpec(m.payload.params.prompt, m.payload.params.prompt_2, m.payload.params.negative_prompt,
                               m.payload.params.negative_prompt_2, m.payload.params.image_seed(i))
                     for m in active for i in range(m.payload.params.num_images_per_prompt)]
            try:
                images, times = self.run_with_oom_fallback(params, specs, hook)
            except StepAbort as abort:
                if str(abort) == "shutdown":
                    for m in active:
                        self.requeue(m, "worker shutting down past its grace period")
                    return
                for m in active:
                    if m.outcome == "canceled":
                        self.finish_canceled(m)
                # the others run again without the canceled member: none is lost to another's cancel
                active = [m for m in active if m.outcome is None]
                continue
            except NonFiniteOutput as exc:
                self.fail_all(active, ErrorType.nan_output, str(exc))
                return
            except PromptTooLong as exc:
                self.fail_all(active, ErrorType.prompt_too_long, str(exc))
                return
            except Exception as exc:
                if is_oom(exc):
                    self.engine.free_memory()
                    self.fail_all(active, ErrorType.out_of_memory, "the GPU ran out of memory for this request")
                else:
                    log.exception("pipeline failed")
                    self.fail_all(active, ErrorType.pipeline_error, f"{type(exc).__name__} in the pipeline")
                return
            pipeline_seconds = time.monotonic() - t_start
            self.busy_seconds += pipeline_seconds
            manifest = self.manifest(params)  # here: the engine belongs to this thread
            parts = []
            offset = 0
            for m in active:
                n = m.payload.params.num_images_per_prompt
                parts.append((m, images[offset:offset + n]))
                offset += n
            # the `encoding` stage, which also says whether another job waits: only then does finishing go to
            # the background; with nothing to overlap, finishing here is quicker (no hand-off, and rq's
            # bookkeeping does not compete with it for the GIL)
            waiting = self.publish_progress(active, Progress(step=active[0].step, total_steps=active[0].total_steps,
                                                             stage="encoding"), queue_length=True)
            if self.finisher is None or waiting <= 0:
                for m, imgs in parts:
                    self.store_and_finish(m, imgs, manifest, pipeline_seconds, times, len(images))
                return
            for m, _ in parts:
                m.outcome = "finishing"
            self.finisher.submit(functools.partial(self.finish_in_background, parts, manifest, pipeline_seconds,
                                                   times, len(images)))
            return

    def finish_in_background(self, parts: list[tuple[Member, list[Any]]], manifest: dict[str, Any],
                             pipeline_seconds: float, times: Any, batch_images: int) -> None:
        for m, imgs in parts:
            with logs.bind(request_id=m.payload.request_id, generation_id=m.gen_id):
                try:
                    self.store_and_finish(m, imgs, manifest, pipeline_seconds, times, batch_images)
                except Exception:
                    # as when a job raises: the lease lapses and the reaper runs the generation again
                    log.exception("finishing generation %s failed; its lease will lapse", m.gen_id)
                finally:
                    self.forget(m)

    def drain(self, timeout: float) -> bool:
        """Shutdown: let results already computed be stored and finished."""
        return self.finisher is None or self.finisher.close(timeout)

    def manifest(self, params: GenerationParams) -> dict[str, Any]:
        return {
            "params": params.model_dump(mode="json"),
            "scheduler_config": self.engine.scheduler_config(params.scheduler),
            **self.engine.model_info(),
        }

    def run_with_oom_fallback(self, params: GenerationParams, specs: list[ImageSpec],
                              hook: Any) -> tuple[list[Any], Any]:
        try:
            return self.engine.run(params, specs, hook)
        except Exception as exc:
            if not is_oom(exc) or len(specs) == 1:
                raise
            self.engine.free_memory()
            log.warning("out of memory at batch %d: retrying one image at a time", len(specs))
            images: list[Any] = []
            times = None
            for spec in specs:
                imgs, times = self.engine.run(params, [spec], hook)
                images += imgs
            return images, times

    def publish_progress(self, members: list[Member], progress: Progress, queue_length: bool = False) -> int:
        """Progress events never fail a job. Answers the rq queue's length when asked (-1: unknown)."""
        length = -1
        try:
            for m in members:
                if m.outcome in (None, "finishing"):
                    length = max(length, self.state.progress(m, progress_value(progress), queue_length)[1])
        except redis.RedisError:
            log.warning("progress update failed", exc_info=True)
        return length

    # --- endings ----------------------------------------------------------------------------------
    def store_and_finish(self, m: Member, images: list[Any], manifest: dict[str, Any], pipeline_seconds: float,
                         times: Any, batch_images: int = 1) -> None:
        params = m.payload.params  # the caller published the `encoding` stage
        t0 = time.monotonic()
        encoded = []
        for i, img in enumerate(images):
            data, ctype = encoding.encode(img, params.output_format, params.output_quality,
                                          {**manifest, "seed": params.image_seed(i), "index": i},
                                          self.settings.png_compress_level)
            encoded.append((i, data, ctype, img.width, img.height))
        encoding_seconds = time.monotonic() - t0
        # the `uploading` change is also the ownership check before writing: a superseded worker must not
        # store a second result, and one deleted or failed meanwhile (deadline sweep) stores nothing
        uploading = Progress(step=m.step, total_steps=m.total_steps, stage="uploading")
        outcome, _ = self.state.progress(m, progress_value(uploading))
        if outcome.startswith("stale"):
            log.warning("generation %s was handed to another worker; dropping this copy", m.gen_id)
            return
        if outcome != "OK":
            self.state.release(m.gen_id)
            self.after_final(m, outcome, EventType.succeeded)
            return
        t1 = time.monotonic()
        records = []
        try:
            for i, data, ctype, w, h in encoded:
                key = image_key(self.settings.storage_prefix, m.gen_id, i, params.output_format.value)
                digest = encoding.sha256(data)
                put_with_retry(self.store, key, data, ctype, {"sha256": digest, "generation-id": m.gen_id},
                               self.settings.storage_retry_seconds)
                records.append({"index": i, "seed": params.image_seed(i), "width": w, "height": h,
                                "content_type": ctype, "bytes": len(data), "sha256": digest, "key": key})
        except StorageUnavailable as exc:
            self.fail_all([m], ErrorType.storage_unavailable, f"object storage unavailable: {exc}")
            return
        uploading_seconds = time.monotonic() - t1
        now = time.time()
        created = float(m.record.get("created_at") or now)
        started = float(m.record.get("started_at") or now)
        timings = {
            "queued": round(started - created, 4),
            "pipeline": round(pipeline_seconds, 4),
            "base": round(times.base, 4),
            "refiner": round(times.refiner, 4),
            "decoding": round(times.decoding, 4),
            "encoding": round(encoding_seconds, 4),
            "uploading": round(uploading_seconds, 4),
            "total": round(now - created, 4),
            "batch_images": batch_images,  # images computed in the same pipeline call
        }
        total = m.total_steps
        outcome = self.state.finish(m, {
            "status": "succeeded", "finished_at": now, "images": records, "timings": timings,
            "manifest": manifest,
            "progress": {"step": total, "total_steps": total, "stage": "done", "eta_seconds": 0},
        }, EventType.succeeded)
        self.after_final(m, outcome, EventType.succeeded)
        if outcome == "OK":
            self.jobs_done += 1
            self.images_done += len(records)

    def finish_canceled(self, m: Member) -> None:
        outcome = self.state.finish(m, {"status": "canceled", "finished_at": time.time()}, EventType.canceled)
        self.after_final(m, outcome, EventType.canceled)

    def fail_all(self, members: list[Member], etype: ErrorType, message: str) -> None:
        for m in members:
            outcome = self.state.finish(m, {
                "status": "failed", "finished_at": time.time(), "error": {"type": etype.value, "message": message},
            }, EventType.failed)
            self.after_final(m, outcome, EventType.failed)

    def after_final(self, m: Member, outcome: str, event: EventType) -> None:
        """Local bookkeeping once `state.finish` has ended the generation."""
        self.forget(m)
        if outcome == "OK":
            log.info("generation %s", event.value.rpartition(".")[2], extra={
                "generation_id": m.gen_id, "request_id": m.payload.request_id, "attempt": m.payload.attempt})
        elif outcome.startswith("canceled") and event != EventType.canceled:
            log.info("generation %s was canceled while finishing; result dropped", m.gen_id)

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


def progress_value(progress: Progress) -> dict[str, Any]:
    return {"step": progress.step, "total_steps": progress.total_steps, "stage": progress.stage,
            "eta_seconds": progress.eta()}
