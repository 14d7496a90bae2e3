"""One job (or micro-batch of compatible jobs): claim -> pipeline -> encode -> store -> finish -> events.

Every state change goes through the compare-and-set scripts with this attempt's ownership token, so a
worker that lost its job (lease expired during a Redis outage, job handed to another worker) stores
nothing and finishes nothing.
"""

import functools
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from common import logs
from common.contract import keys, queueing, stats
from common.contract.events import (
    STREAM_MAXLEN,
    TERMINAL_EVENT,
    TRANSITION_EMIT,
    EventType,
    emit,
    emit_record,
    enqueue_webhook,
)
from common.contract.params import PAYLOAD_VERSION, GenerationParams, JobPayload
from common.contract.records import START, TRANSITION, TRANSITION_READ, as_str, decode, encode, flatten, read_answer
from common.contract.resource import render
from common.contract.status import ErrorType
from common.reaper import INTERMEDIATE_KEY, Reaper
from common.storage import ObjectStore, StorageUnavailable, image_key, image_url
from worker import encode as encoding
from worker.finisher import Finisher
from worker.pipeline import Engine, ImageSpec, NonFiniteOutput, Progress, PromptTooLong, StepAbort, is_oom
from worker.settings import WorkerSettings

log = logging.getLogger("worker.runner")

# The start and the FEED that refills the rq queue behind the job just taken: one round trip. A job this
# worker claimed itself (CLAIM_NEXT, ARGV[3] = '1') also leaves rq's intermediate list and its rq job hash
# goes: from here on the generation record, its lease and RUNNING entry are what the reaper watches.
# KEYS: START's three, FEED's two, the intermediate list, the rq job hash. ARGV: FEED's two (depth, prefix),
# the claimed flag, the rq job id, then START's.
START_AND_FEED = queueing.lua_function("start", START) + queueing.lua_function("feed", queueing.FEED) + """
local res = start({KEYS[1], KEYS[2], KEYS[3]}, {unpack(ARGV, 5)})
if ARGV[3] == '1' then
  redis.call('LREM', KEYS[6], 1, ARGV[4])
  redis.call('DEL', KEYS[7])
end
feed({KEYS[4], KEYS[5]}, {ARGV[1], ARGV[2]})
return res
"""

IDLE_SLICE_SECONDS = 0.5  # one blocking wait for the next job in a chain: a stop request is seen within this

# The next job straight off the rq queue, without rq's per-job bookkeeping (about a dozen round trips): moved
# into rq's intermediate list as rq's own dequeue does, so a worker killed before its start leaves it where
# the reaper's rescue finds it. KEYS: rq queue, intermediate list. ARGV: rq job key prefix.
# Returns {job id, job data} or nil.
CLAIM_NEXT = """
local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
if not id then return nil end
return {id, redis.call('HGET', ARGV[1] .. id, 'data')}
"""


class NotClaimable(Exception):
    """The queue's head is a job rq must handle itself (claim_next put it back)."""


@dataclass
class Member:
    """One generation inside the current pipeline call."""

    payload: JobPayload
    rq_job_id: str
    claimed: bool = False  # taken off the rq queue by this worker (CLAIM_NEXT), not dequeued by rq
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
        self.webhook_queue = Queue(keys.WEBHOOK_QUEUE, connection=r, serializer=JSONSerializer)
        # called directly, never inside a pipeline: redis-py then sends EVALSHA alone, not SCRIPT EXISTS first
        self._transition = r.register_script(TRANSITION)
        self._transition_read = r.register_script(TRANSITION_READ)
        self._transition_emit = r.register_script(TRANSITION_EMIT)
        self._start = r.register_script(START_AND_FEED)
        self._claim_next = r.register_script(CLAIM_NEXT)
        self.stopping = threading.Event()  # set on SIGTERM: no more chained jobs
        self.on_state: Callable[[str], None] = lambda _state: None  # the worker's registry state (worker.py)
        self._feed = r.register_script(queueing.FEED)
        # one per worker process: the heartbeat's sweeps and the shutdown requeue share it
        self.reaper = Reaper(r, settings)
        self.lock = threading.Lock()
        self.current: dict[str, Member] = {}  # gen id -> the attempt running here, read by the heartbeat thread
        self.shutdown_abort = threading.Event()
        self.jobs_done = 0
        self.images_done = 0
        self.busy_seconds = 0.0

    # --- helpers ----------------------------------------------------------------------------------
    def image_url(self, gen_id: str, img: dict[str, Any]) -> str:
        return image_url(self.settings, self.store, gen_id, img)

    def emit(self, gen_id: str, event: EventType) -> None:
        try:
            emit(self.r, gen_id, event, self.image_url, self.settings.generation_ttl_seconds, self.webhook_queue,
                 self.settings.webhook_progress_interval_seconds)
        except redis.RedisError:
            log.exception("could not emit %s for %s", event, gen_id)  # events never fail a job

    def emit_record(self, rec: dict[str, Any], event: EventType, also: Any = None) -> None:
        try:
            emit_record(self.r, rec, event, self.image_url, self.settings.generation_ttl_seconds, self.webhook_queue,
                        self.settings.webhook_progress_interval_seconds, also=also)
        except redis.RedisError:
            log.exception("could not emit %s for %s", event, rec.get("id"))  # events never fail a job

    def transition(self, gen_id: str, token: str, allowed: str, fields: dict[str, Any]) -> str:
        res = self._transition(keys=[keys.generation(gen_id)], args=[token, allowed, *flatten(fields)])
        return as_str(res)

    def transition_emit(self, gen_id: str, token: str, fields: dict[str, Any], event: EventType,
                        release: bool = False) -> str:
        """Change a running generation and append its event: two round trips (the script answers the record).

        `release`: a final change, so the RUNNING entry and the lease go too (not when another worker now owns
        the generation: those are its entries)."""
        outcome, rec = read_answer(self._transition_read(keys=[keys.generation(gen_id)],
                                                         args=[token, "running", *flatten(fields)]))

        also = functools.partial(drop_entries, gen_id) if release and not outcome.startswith("stale") else None
        if rec is not None:
            self.emit_record(rec, event, also)
        elif also is not None:
            self.release(gen_id)
        return outcome

    def change_and_emit(self, m: Member, fields: dict[str, Any], event: EventType, queue_length: bool = False
                        ) -> tuple[str, str, int, dict[str, Any], dict[str, Any]]:
        """A running generation's change and its event in one round trip (TRANSITION_EMIT): the resource is
        rendered from the record START answered plus this change, as no one else writes a running record but
        its owner (a cancel or a requeue fails the compare-and-set, and then no event is appended). The change
        goes through encode/decode first, so the event is exactly what rendering the stored record gives.

        (outcome, event id, jobs waiting in the rq queue when `queue_length` else -1, record, resource)."""
        stored = encode(fields)
        rec = {**m.record, **decode(stored)}
        resource = render(rec, self.image_url)
        try:
            res = self._transition_emit(
                keys=[keys.generation(m.gen_id), keys.events(m.gen_id),
                      *([keys.RQ_QUEUE_KEY] if queue_length else [])],
                args=[m.payload.token, "running", STREAM_MAXLEN, self.settings.generation_ttl_seconds, event.value,
                      json.dumps(resource, separators=(",", ":")), *(x for pair in stored.items() for x in pair)])
        except redis.RedisError:
            m.record_exact = False  # the change may have been written anyway: final_emit reads the hash instead
            raise
        outcome = as_str(res[0])
        if outcome == "OK":
            m.record = rec
        return outcome, as_str(res[1]), int(res[2]), rec, resource

    def progress_emit(self, m: Member, progress: Progress, queue_length: bool = False) -> tuple[str, int]:
        """New progress and its event in one round trip (`change_and_emit`), then the progress webhook.

        (outcome, jobs waiting in the rq queue when `queue_length`, else -1)."""
        outcome, event_id, length, rec, resource = self.change_and_emit(
            m, {"progress": progress_value(progress)}, EventType.progress, queue_length)
        if outcome == "OK":
            try:
                enqueue_webhook(self.r, rec, EventType.progress, event_id, resource, self.webhook_queue,
                                self.settings.webhook_progress_interval_seconds)
            except redis.RedisError:
                log.exception("could not enqueue the progress webhook for %s", m.gen_id)  # never fails a job
        return outcome, length

    def final_emit(self, m: Member, fields: dict[str, Any], event: EventType) -> str:
        """End a running generation and append its final event in one round trip (`change_and_emit`); only
        then, off the caller's critical path (the event already woke the waiting clients), drop the RUNNING
        entry and lease, count the metrics and enqueue the webhook. A refusal: `stale*` (another worker's now)
        touches nothing, any other releases.

        Falls back to `transition_emit` when `m.record` may be behind the hash (never started, or a change
        whose answer was lost)."""
        if not m.record or not m.record_exact:
            return self.transition_emit(m.gen_id, m.payload.token, fields, event, release=True)
        outcome, event_id, _length, rec, resource = self.change_and_emit(m, fields, event)
        if outcome != "OK":
            if not outcome.startswith("stale"):
                self.release(m.gen_id)
            return outcome
        try:
            pipe = self.r.pipeline(transaction=False)
            drop_entries(m.gen_id, pipe)
            stats.record_event(pipe, event.value, rec)
            pipe.execute()
            enqueue_webhook(self.r, rec, event, event_id, resource, self.webhook_queue,
                            self.settings.webhook_progress_interval_seconds)
        except redis.RedisError:
            # as emit_record: never fails a job (entries left behind: the reaper's requeue drops them, not running)
            log.exception("could not finish the bookkeeping of %s for %s", event, m.gen_id)
        return outcome

    def release(self, gen_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        drop_entries(gen_id, pipe)
        pipe.execute()

    def feed(self) -> None:
        self._feed(keys=[keys.RQ_QUEUE_KEY, keys.ACTIVE_OWNERS], args=[self.settings.queue_feed_depth, keys.PREFIX])

    # --- entry point (rq calls this through worker.tasks.run_generation) -------------------------
    def run_job(self, raw_payload: dict[str, Any], rq_job_id: str, rq_timeout: float | None = None
                ) -> dict[str, Any]:
        """The rq job, then (`SDXL_CHAIN_SECONDS`) the jobs queued behind it, taken straight off the rq queue
        so the model does not wait on rq's bookkeeping between two generations. With the queue empty, the
        chain waits up to `SDXL_CHAIN_IDLE_SECONDS` for the next job (a blocking move, as rq's own dequeue
        does), so steady traffic skips rq's bookkeeping too, not only a backlog.

        rq's timeout for the first job bounds the whole call, so no job is claimed past a quarter of it: the
        last one claimed still has three quarters, more than one generation is allowed."""
        t0 = time.monotonic()
        result = self.run_bound(raw_payload, rq_job_id, claimed=False)
        budget = self.settings.chain_seconds
        if rq_timeout is not None and rq_timeout > 0:
            budget = min(budget, rq_timeout / 4)
        until = t0 + budget
        idle_until = time.monotonic() + self.settings.chain_idle_seconds
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= until:
                break
            wait = min(idle_until, until) - now
            try:
                claimed = self.claim_next(wait=min(wait, IDLE_SLICE_SECONDS) if wait > 0 else 0.0)
            except redis.exceptions.RedisError as exc:  # e.g. Redis restarting: rq's own loop copes with that
                log.warning("taking the next job failed (%s); the chain ends", type(exc).__name__)
                break
            except NotClaimable:
                break  # back at the head of the queue for rq's own dequeue, which fails or drops it
            if claimed is None:
                if wait > 0:
                    continue  # nothing yet: wait on while the idle window lasts (the loop sees a stop)
                break
            payload, job_id = claimed
            try:
                self.run_bound(payload, job_id, claimed=True)
            except Exception as exc:
                # not rq's job: rq would fail the first generation for it. This one fails, typed; the chain ends.
                log.exception("claimed job %s failed", job_id)
                self.fail_record(str(payload.get("generation_id", "")), str(payload.get("token", "")),
                                 ErrorType.pipeline_error, f"{type(exc).__name__} in the worker")
                self.drop_claim(job_id)
                break
            idle_until = time.monotonic() + self.settings.chain_idle_seconds
        return result

    def claim_next(self, wait: float = 0.0) -> tuple[dict[str, Any], str] | None:
        """The next generation job off the rq queue, or None; `wait` > 0 blocks that long for one. A job this
        worker must not run (not a generation, or its rq hash gone) goes back to the head for rq, and
        NotClaimable says so: taking it again would only bounce it."""
        res = self._claim_next(keys=[keys.RQ_QUEUE_KEY, INTERMEDIATE_KEY], args=[Job.redis_job_namespace_prefix])
        if not res and wait > 0:
            self.on_state("ready")  # idle while it waits: the registry and /metrics say so
            try:
                moved = self.r.blmove(keys.RQ_QUEUE_KEY, INTERMEDIATE_KEY, wait,  # type: ignore[arg-type]
                                     "LEFT", "RIGHT")  # seconds as a decimal: Redis 6+
            finally:
                self.on_state("busy")
            if moved is not None:
                res = [moved, self.r.hget(Job.key_for(as_str(moved)), "data")]
        if not res:
            return None
        job_id, data = as_str(res[0]), res[1]
        try:
            if data is None:
                raise ValueError("no rq job hash")
            func, _instance, args, _kwargs = JSONSerializer.loads(zlib.decompress(data))
            if func != keys.RQ_FUNCTION or not args or not isinstance(args[0], dict):
                raise ValueError(f"not a generation job: {func}")
        except Exception:
            # not ours to run: back to the head of the queue for rq, which fails it through its own handler
            log.warning("job %s cannot be claimed; left to rq", job_id)
            pipe = self.r.pipeline(transaction=True)  # this id, not whatever another worker moved in meanwhile
            pipe.lrem(INTERMEDIATE_KEY, 1, job_id)
            pipe.lpush(keys.RQ_QUEUE_KEY, job_id)
            pipe.execute()
            raise NotClaimable(job_id) from None
        return args[0], job_id

    def drop_claim(self, job_id: str) -> None:
        """A claimed job that never reached its start (which drops the claim itself)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.lrem(INTERMEDIATE_KEY, 1, job_id)
        pipe.delete(Job.key_for(job_id))
        pipe.execute()

    def run_bound(self, raw_payload: dict[str, Any], rq_job_id: str, claimed: bool) -> dict[str, Any]:
        # every line logged for this job carries its ids (common/logs.py), so it can be followed from the API
        with logs.bind(request_id=raw_payload.get("request_id"), generation_id=raw_payload.get("generation_id")):
            return self._run_job(raw_payload, rq_job_id, claimed)

    def _run_job(self, raw_payload: dict[str, Any], rq_job_id: str, claimed: bool = False) -> dict[str, Any]:
        version = int(raw_payload.get("v", 0))
        gen_id = str(raw_payload.get("generation_id", ""))
        if version > PAYLOAD_VERSION or not gen_id:
            # a newer API during a rolling upgrade: put it back for a newer worker rather than guess
            log.error("payload version %s not supported (max %s)", version, PAYLOAD_VERSION)
            self.fail_record(gen_id, raw_payload.get("token", ""), ErrorType.invalid_payload,
                             f"payload version {version} is newer than this worker understands")
            if claimed:
                self.drop_claim(rq_job_id)
            return {"status": "failed"}
        payload = JobPayload.model_validate(raw_payload)
        members = [Member(payload, rq_job_id, claimed)]
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
            for m in members[1:]:
                Job(m.rq_job_id, connection=self.r, serializer=JSONSerializer).delete()
            if len(members) > 1:
                self.feed()  # the batch took more than one job off the rq queue
        return {"generations": [m.gen_id for m in members]}

    def rq_exception_handler(self, job: Job, exc_type: type, exc_value: BaseException, tb: Any) -> bool:
        """rq failed the job outside our code (bad payload, lost import): never leave the generation queued."""
        gen_id = job.id.rsplit("-", 1)[0]
        log.error("rq could not run job %s: %s", job.id, exc_type.__name__)
        self.fail_record(gen_id, "", ErrorType.invalid_payload, f"the job could not be run: {exc_type.__name__}")
        self.r.srem(keys.RUNNING, gen_id)
        return True

    def claim_compatible(self, params: GenerationParams) -> list[Member]:
        """Take queued jobs with the same batch key straight off the rq list (LREM == 1 means ours)."""
        want = params.batch_key()
        claimed: list[Member] = []
        budget = sum(1 for _ in range(params.num_images_per_prompt))
        deadline = time.monotonic() + self.settings.batch_wait_ms / 1000
        while True:
            self.feed()
            for raw in self.r.lrange(keys.RQ_QUEUE_KEY, 0, self.settings.batch_max * 4):
                if budget >= self.settings.batch_max:
                    return claimed
                job_id = as_str(raw)
                gen_id = job_id.rsplit("-", 1)[0]
                if as_str(self.r.hget(keys.generation(gen_id), "batch_key") or b"") != want:
                    continue
                if self.r.lrem(keys.RQ_QUEUE_KEY, 1, job_id) != 1:
                    continue
                job = Job.fetch(job_id, connection=self.r, serializer=JSONSerializer)
                payload = JobPayload.model_validate(job.args[0])
                claimed.append(Member(payload, job_id))
                budget += payload.params.num_images_per_prompt
            if budget >= self.settings.batch_max or time.monotonic() >= deadline:
                return claimed
            time.sleep(0.005)

    def start(self, m: Member) -> bool:
        """queued -> running, lease and RUNNING entry (and a FEED) in one script; then the `started` event."""
        now = time.time()
        outcome, rec = read_answer(self._start(
            keys=[keys.generation(m.gen_id), keys.lease(m.gen_id), keys.RUNNING, keys.RQ_QUEUE_KEY,
                  keys.ACTIVE_OWNERS, INTERMEDIATE_KEY, Job.key_for(m.rq_job_id)],
            args=[self.settings.queue_feed_depth, keys.PREFIX, int(m.claimed), m.rq_job_id,
                  m.payload.token, self.worker_id, self.settings.lease_seconds, now, *flatten({
                "status": "running", "started_at": now, "worker_id": self.worker_id,
                "progress": {"step": 0, "total_steps": 0, "stage": "base", "eta_seconds": None},
            })],
        ))
        if outcome == "deadline":
            self.fail_record(m.gen_id, m.payload.token, ErrorType.deadline_exceeded,
                             "the generation could not start before its deadline", allowed="queued")
            return False
        if rec is None:
            return False
        m.record = rec
        with self.lock:
            self.current[m.gen_id] = m
        self.emit_record(rec, EventType.started)
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
                    length = max(length, self.progress_emit(m, progress, queue_length)[1])
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
        outcome, _ = self.progress_emit(m, uploading)
        if outcome.startswith("stale"):
            log.warning("generation %s was handed to another worker; dropping this copy", m.gen_id)
            return
        if outcome != "OK":
            self.release(m.gen_id)
            self.after_final(m, outcome, EventType.succeeded)
            return
        t1 = time.monotonic()
        records = []
        try:
            for i, data, ctype, w, h in encoded:
                key = image_key(self.settings.storage_prefix, m.gen_id, i, params.output_format.value)
                digest = encoding.sha256(data)
                self.put_with_retry(key, data, ctype, {"sha256": digest, "generation-id": m.gen_id})
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
        outcome = self.final_emit(m, {
            "status": "succeeded", "finished_at": now, "images": records, "timings": timings,
            "manifest": manifest,
            "progress": {"step": total, "total_steps": total, "stage": "done", "eta_seconds": 0},
        }, EventType.succeeded)
        self.after_final(m, outcome, EventType.succeeded)
        if outcome == "OK":
            self.jobs_done += 1
            self.images_done += len(records)

    def put_with_retry(self, key: str, data: bytes, ctype: str, meta: dict[str, str]) -> None:
        deadline = time.monotonic() + self.settings.storage_retry_seconds
        delay = 0.2
        while True:
            try:
                self.store.put(key, data, ctype, meta)
                return
            except StorageUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("storage put failed for %s; retrying in %.1fs", key, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def finish_canceled(self, m: Member) -> None:
        outcome = self.final_emit(m, {"status": "canceled", "finished_at": time.time()}, EventType.canceled)
        self.after_final(m, outcome, EventType.canceled)

    def fail_all(self, members: list[Member], etype: ErrorType, message: str) -> None:
        for m in members:
            outcome = self.final_emit(m, {
                "status": "failed", "finished_at": time.time(), "error": {"type": etype.value, "message": message},
            }, EventType.failed)
            self.after_final(m, outcome, EventType.failed)

    def fail_record(self, gen_id: str, token: str, etype: ErrorType, message: str, allowed: str = "queued,running"
                    ) -> None:
        if not gen_id:
            return
        outcome = self.transition(gen_id, token, allowed, {
            "status": "failed", "finished_at": time.time(), "error": {"type": etype.value, "message": message},
        })
        if outcome == "OK":
            self.emit(gen_id, EventType.failed)

    def after_final(self, m: Member, outcome: str, event: EventType) -> None:
        """Local bookkeeping once `final_emit` has ended the generation."""
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
        outcome = self.reaper.requeue(m.gen_id, expected_token=m.payload.token, reason=reason, kind="shutdown",
                                      spare_attempt=True)
        self.r.delete(keys.lease(m.gen_id))
        if outcome == "failed":
            self.emit(m.gen_id, TERMINAL_EVENT["failed"])


def progress_value(progress: Progress) -> dict[str, Any]:
    return {"step": progress.step, "total_steps": progress.total_steps, "stage": progress.stage,
            "eta_seconds": progress.eta()}


def drop_entries(gen_id: str, pipe: Any) -> None:
    """A generation this worker no longer runs: its RUNNING entry and lease go."""
    pipe.srem(keys.RUNNING, gen_id)
    pipe.delete(keys.lease(gen_id))
