"""The one owner of generation state: every transition, each with its event, for every process.

A transition is a compare-and-set Lua script (common/lua/, loaded by common/scripts.py), so an API
cancel, a worker's finish and a reaper's requeue never interleave into an impossible state, and a worker whose
ownership token is stale writes nothing. Events (the Redis stream behind SSE and long-polls, plus the webhook
job) are appended by the same calls; an event or webhook failure never fails a generation.

    worker:  start -> progress* -> finish (succeeded | failed | canceled), or fail (never started)
    reaper:  requeue (a lost worker's attempt: queued again with a new token, or failed `worker_lost`)
    API:     submit; cancel (queued: canceled at once; running: flagged, and the worker finishes it canceled);
             delete
    cleanup: fail (past its deadline while queued); delete (expired)
"""

import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from common import scripts
from common.contract import keys, stats
from common.contract.events import STREAM_MAXLEN, EventType, emit_record, enqueue_webhook
from common.contract.params import JobPayload
from common.contract.records import as_str, decode, encode, flatten, read_answer
from common.contract.resource import ImageUrl, render
from common.contract.status import TERMINAL_STATUSES, ErrorType, GenerationStatus, Stage
from common.retention import purge
from common.settings import CommonSettings
from common.storage import ObjectStore
from common.usage import Success

log = logging.getLogger("common.state")

RUNNING = GenerationStatus.running.value
QUEUED_PROGRESS = {"step": 0, "total_steps": 0, "stage": Stage.queued.value, "eta_seconds": None}


class Owned(Protocol):
    """An attempt as the worker that owns it sees it: the record as of its own last change."""

    @property
    def gen_id(self) -> str: ...

    @property
    def token(self) -> str: ...

    record: dict[str, Any]
    # False once a change's answer was lost (the script may have run): `record` may then be behind the hash
    record_exact: bool


@dataclass
class Change:
    outcome: str  # "OK", or the refusing status ("stale:<status>" when another attempt owns it)
    event_id: str
    queue_length: int  # jobs waiting in the rq queue when asked, else -1
    record: dict[str, Any]
    resource: dict[str, Any]


class GenerationState:
    def __init__(self, r: redis.Redis, settings: CommonSettings, image_url: ImageUrl, ar: Any = None) -> None:
        self.r = r
        self.ar = ar  # the API's asyncio client: its submit runs on the event loop
        self.settings = settings
        self.image_url = image_url
        self.webhook_queue = Queue(keys.WEBHOOK_QUEUE, connection=r, serializer=JSONSerializer)
        self.queue = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
        # called directly, never inside a pipeline: redis-py then sends EVALSHA alone, not SCRIPT EXISTS first
        self._transition = scripts.register(r, "transition")
        self._transition_read = scripts.register(r, "transition_read")
        self._transition_emit = scripts.register(r, "transition_emit")
        self._succeed = scripts.register(r, "succeed")  # transition_emit + the usage it counts
        self._succeed_read = scripts.register(r, "succeed_read")
        self._start = scripts.register(r, "start_and_feed")
        self._feed = scripts.register(r, "feed")
        self._cancel = scripts.register(r, "cancel")
        self._requeue = scripts.register(r, "requeue")
        self._create = scripts.register(r, "create")
        self._acreate = scripts.register(ar, "create") if ar is not None else None

    def load_success_scripts(self) -> None:
        """A worker's successes go through their own scripts (usage counted in them): loaded at its start, so its
        first success is one round trip like every other change (not NOSCRIPT, then SCRIPT LOAD, then again).
        Redis down now: they load on first use instead."""
        try:
            for script in (self._succeed, self._succeed_read):
                self.r.script_load(script.script)
        except redis.RedisError:
            log.warning("could not load the success scripts now; they load on first use")

    # --- the API's transitions -------------------------------------------------------------------
    def submit(self, create_keys: list[str], args: list[Any]) -> list[Any]:
        """A new generation, queued, in one atomic script (common/lua/create.lua): admission (a refused submit
        writes nothing), the rq job, the record and its indexes, the owner's fair-share line, FEED and the
        position. app/enqueue.py prepares the keys and arguments. {admitted, count, position}."""
        return list(self._create(keys=create_keys, args=args))

    async def submit_async(self, create_keys: list[str], args: list[Any]) -> list[Any]:
        if self._acreate is None:
            raise RuntimeError("GenerationState was built without an asyncio Redis client")
        return list(await self._acreate(keys=create_keys, args=args))

    def delete(self, store: ObjectStore, gen_id: str, rec: dict[str, Any] | None) -> int:
        """Remove a generation (DELETE, or its expiry): one not yet final is canceled first (a running one's
        worker stops within a step), then its images, record, events, index entries and rq jobs go
        (common/retention.py). That worker may be past its last step and still upload: an expiry entry makes
        cleanup sweep the prefix again once the job has timed out. StorageUnavailable: the store is down."""
        worker_active = False
        if rec is not None and rec.get("status") not in TERMINAL_STATUSES:
            worker_active = self.cancel(gen_id) == RUNNING
        again = time.time() + self.settings.job_timeout_seconds if worker_active else None
        return purge(self.r, store, self.settings.storage_prefix, gen_id, rec, worker_active, again)

    # --- events -----------------------------------------------------------------------------------
    def emit(self, gen_id: str, event: EventType) -> None:
        """The event for the record as stored now (after a transition that did not answer the record)."""
        try:
            raw = self.r.hgetall(keys.generation(gen_id))
            if raw:
                self.emit_record(decode(raw), event)  # type: ignore[arg-type]
        except redis.RedisError:
            log.exception("could not emit %s for %s", event, gen_id)  # events never fail a job

    def emit_record(self, rec: dict[str, Any], event: EventType, also: Callable[[Any], None] | None = None) -> None:
        try:
            emit_record(self.r, rec, event, self.image_url, self.settings.generation_ttl_seconds, self.webhook_queue,
                        self.settings.webhook_progress_interval_seconds, also=also)
        except redis.RedisError:
            log.exception("could not emit %s for %s", event, rec.get("id"))  # events never fail a job

    def feed(self) -> int:
        """Refill the rq queue from the per-owner lines (fair share)."""
        return int(self._feed(keys=[keys.RQ_QUEUE_KEY, keys.ACTIVE_OWNERS],
                              args=[self.settings.queue_feed_depth]))

    # --- the worker's transitions -----------------------------------------------------------------
    def start(self, a: Owned, worker_id: str, now: float) -> str:
        """queued -> running with the lease and RUNNING entry (and a FEED), then `started`. "OK", "deadline"
        (past its deadline: failed `deadline_exceeded` here) or the refusing status."""
        outcome, rec = read_answer(self._start(
            keys=[keys.generation(a.gen_id), keys.lease(a.gen_id), keys.RUNNING, keys.RQ_QUEUE_KEY,
                  keys.ACTIVE_OWNERS],
            args=[self.settings.queue_feed_depth, a.token, worker_id, self.settings.lease_seconds, now,
                  *flatten({"status": RUNNING, "started_at": now, "worker_id": worker_id,
                            "progress": {"step": 0, "total_steps": 0, "stage": Stage.base.value,
                                         "eta_seconds": None}})],
        ))
        if outcome == "deadline":
            self.fail(a.gen_id, a.token, ErrorType.deadline_exceeded,
                      "the generation could not start before its deadline", allowed=GenerationStatus.queued)
            return outcome
        if rec is None:
            return outcome
        a.record = rec
        self.emit_record(rec, EventType.started)
        return outcome

    def change(self, a: Owned, fields: dict[str, Any], event: EventType, queue_length: bool = False,
               usage: Success | None = None) -> Change:
        """A running generation's change and its event in one script: the resource is rendered from the owner's
        record plus this change, as no one else writes a running record but its owner (a cancel or a requeue
        fails the compare-and-set, and then no event is appended). The change goes through encode/decode
        first, so the event is exactly what rendering the stored record gives. `usage`: a success's, counted
        in the same script (common/lua/succeed.lua), only when the change is made."""
        stored = encode(fields)
        rec = {**a.record, **decode(stored)}
        resource = render(rec, self.image_url)
        args = [a.token, RUNNING, STREAM_MAXLEN, self.settings.generation_ttl_seconds, event.value,
                json.dumps(resource, separators=(",", ":")), *(x for pair in stored.items() for x in pair)]
        try:
            if usage is not None:
                res = self._succeed(keys=[keys.generation(a.gen_id), keys.events(a.gen_id)],
                                    args=[*usage.args(), *args])
            else:
                res = self._transition_emit(
                    keys=[keys.generation(a.gen_id), keys.events(a.gen_id),
                          *([keys.RQ_QUEUE_KEY] if queue_length else [])], args=args)
        except redis.RedisError:
            a.record_exact = False  # the change may have been written anyway: finish reads the hash instead
            raise
        outcome = as_str(res[0])
        if outcome == "OK":
            a.record = rec
        return Change(outcome, as_str(res[1]), int(res[2]), rec, resource)

    def progress(self, a: Owned, progress: dict[str, Any], queue_length: bool = False) -> tuple[str, int]:
        """New progress and its event, then the progress webhook: (outcome, queue length or -1)."""
        c = self.change(a, {"progress": progress}, EventType.progress, queue_length)
        if c.outcome == "OK":
            self._webhook(c, EventType.progress)
        return c.outcome, c.queue_length

    def preview(self, a: Owned, data: dict[str, Any]) -> str:
        """A `generation.preview` event (data: worker/previews.py `event_data`) while this attempt owns the running
        generation; it changes no field and goes to no webhook. "OK" or the refusal."""
        res = self._transition_emit(
            keys=[keys.generation(a.gen_id), keys.events(a.gen_id)],
            args=[a.token, RUNNING, STREAM_MAXLEN, self.settings.generation_ttl_seconds, EventType.preview.value,
                  json.dumps(data, separators=(",", ":"))])
        return as_str(res[0])

    def finish(self, a: Owned, fields: dict[str, Any], event: EventType, usage: Success | None = None) -> str:
        """End a running generation with its final event; then, off the waiting clients' path (the event has
        woken them), drop the RUNNING entry and lease, count the metrics and enqueue the webhook. A refusal:
        `stale*` (another attempt's now) touches nothing, any other releases. `usage`: what a success counts
        for its owner (common/usage.py), in the transition's own script."""
        if not a.record or not a.record_exact:
            return self._finish_from_hash(a, fields, event, usage)
        c = self.change(a, fields, event, usage=usage)
        if c.outcome != "OK":
            if not c.outcome.startswith("stale"):
                self.release(a.gen_id)
            return c.outcome
        try:
            pipe = self.r.pipeline(transaction=False)
            drop_entries(a.gen_id, pipe)
            stats.record_event(pipe, event.value, c.record)
            pipe.execute()
        except redis.RedisError:
            # never fails a job (entries left behind: the reaper's requeue drops them, the status is final)
            log.exception("could not finish the bookkeeping of %s for %s", event, a.gen_id)
        self._webhook(c, event)
        return c.outcome

    def _finish_from_hash(self, a: Owned, fields: dict[str, Any], event: EventType,
                          usage: Success | None = None) -> str:
        """`finish` when the owner's record may be behind the hash: the script answers the record it wrote."""
        args = [a.token, RUNNING, *flatten(fields)]
        if usage is not None:
            answer = self._succeed_read(keys=[keys.generation(a.gen_id)], args=[*usage.args(), *args])
        else:
            answer = self._transition_read(keys=[keys.generation(a.gen_id)], args=args)
        outcome, rec = read_answer(answer)
        also = (lambda pipe: drop_entries(a.gen_id, pipe)) if not outcome.startswith("stale") else None
        if rec is not None:
            self.emit_record(rec, event, also)
        elif also is not None:
            self.release(a.gen_id)
        return outcome

    def _webhook(self, c: Change, event: EventType) -> None:
        try:
            enqueue_webhook(self.r, c.record, event, c.event_id, c.resource, self.webhook_queue,
                            self.settings.webhook_progress_interval_seconds)
        except redis.RedisError:
            log.exception("could not enqueue the %s webhook for %s", event, c.record.get("id"))  # never fails a job

    def release(self, gen_id: str) -> None:
        """This worker no longer runs the generation: its RUNNING entry and lease go."""
        pipe = self.r.pipeline(transaction=False)
        drop_entries(gen_id, pipe)
        pipe.execute()

    # --- any process ------------------------------------------------------------------------------
    def fail(self, gen_id: str, token: str, etype: ErrorType, message: str,
             allowed: str = f"{GenerationStatus.queued},{GenerationStatus.running}") -> str:
        """Fail a generation that is not (or no longer) in a worker's hands, with its event."""
        if not gen_id:
            return ""
        outcome = as_str(self._transition(keys=[keys.generation(gen_id)], args=[token, allowed, *flatten({
            "status": GenerationStatus.failed.value, "finished_at": time.time(),
            "error": {"type": etype.value, "message": message}})]))
        if outcome == "OK":
            self.emit(gen_id, EventType.failed)
        return outcome

    def requeue(self, gen_id: str, expected_token: str = "", reason: str = "lease expired",
                kind: str = "lease_expired", spare_attempt: bool = False) -> str:
        """Put a running generation back in line with a fresh ownership token, or fail it `worker_lost` once its
        attempts are spent (with its event). 'requeued', 'failed', 'stale' or the refusing status.

        `spare_attempt`: a graceful shutdown's requeue does not use up the lost-worker budget."""
        raw = self.r.hgetall(keys.generation(gen_id))
        if not raw:
            self.r.srem(keys.RUNNING, gen_id)
            return ""
        rec = decode(raw)  # type: ignore[arg-type]
        attempt = int(rec.get("attempt") or 1) + 1
        token = secrets.token_hex(8)
        rq_job_id = f"{gen_id}-{attempt}"
        payload = JobPayload(generation_id=gen_id, token=token, attempt=attempt, params=rec["params"],
                             request_id=rec.get("request_id") or None)
        ttl = self.settings.generation_ttl_seconds
        job = generation_job(self.queue, rq_job_id, payload.model_dump(mode="json"),
                             self.settings.job_timeout_seconds, ttl)
        job.save()
        outcome = as_str(self._requeue(keys=[keys.generation(gen_id), keys.ACTIVE_OWNERS],
                                       args=[expected_token, token, rq_job_id,
                                             self.settings.max_attempts + int(spare_attempt), time.time()]))
        if outcome != "requeued":
            job.delete()
        else:
            stats.count_requeue(self.r, kind)
        log.warning("generation %s %s: %s", gen_id, reason, outcome,
                    extra={"generation_id": gen_id, "outcome": outcome, "request_id": rec.get("request_id")})
        if outcome == "failed":
            self.emit(gen_id, EventType.failed)
        elif outcome == "requeued":
            self.feed()
        return outcome

    def cancel(self, gen_id: str) -> str:
        """The API's cancel: a queued generation is canceled at once (event, and its place in line goes to the
        next); a running one is flagged, and its worker hears it by pub/sub within a step. The status after the
        call: 'canceled', 'running', '' (gone) or the final status that makes a cancel a conflict."""
        result = as_str(self._cancel(keys=[keys.generation(gen_id), keys.RQ_QUEUE_KEY],
                                     args=[time.time()]))
        if result == "canceled:new":
            self.emit(gen_id, EventType.canceled)
            self.feed()
            return GenerationStatus.canceled.value
        if result == RUNNING:
            self.r.publish(keys.CANCEL_CHANNEL, gen_id)
        return result


def generation_job(queue: Queue, job_id: str, payload: Any, timeout: int, ttl: int,
                   func: str = keys.RQ_FUNCTION) -> Job:
    """The rq job of one attempt (unsaved): a submit's and a requeue's are built the same way."""
    return queue.create_job(func, args=[payload], job_id=job_id, timeout=timeout, result_ttl=600,
                            failure_ttl=ttl, ttl=ttl)


def no_image_urls(gen_id: str, img: dict[str, Any]) -> str:
    """The image URL maker of a state that renders no images (the reaper's requeues and failures, a submit)."""
    raise AssertionError(f"no image URL expected here ({gen_id})")


def drop_entries(gen_id: str, pipe: Any) -> None:
    """A generation no worker runs any more: its RUNNING entry and lease go."""
    pipe.srem(keys.RUNNING, gen_id)
    pipe.delete(keys.lease(gen_id))
