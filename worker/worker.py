"""The rq worker that owns the GPU: a SimpleWorker (no fork: CUDA and torch's thread pool do not survive it)
with a heartbeat thread that keeps beating during long jobs, a registry entry, leases, and a cancel listener.
"""

import json
import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from common import logs, scripts
from common.contract import keys
from common.reaper import Reaper
from worker.runner import Runner
from worker.settings import WorkerSettings

log = logging.getLogger("worker")

class Registry:
    """`sdxl:worker:<id>` hash + `sdxl:workers` zset of heartbeats: what /readyz and metrics read."""

    def __init__(self, r: redis.Redis, worker_id: str, ttl: int) -> None:
        self.r = r
        self.worker_id = worker_id
        self.ttl = ttl
        self.fields: dict[str, str] = {"id": worker_id, "state": "loading", "has_refiner": "0", "model_loads": "0",
                                       "jobs_done": "0", "images_done": "0", "busy_seconds": "0",
                                       "started_at": str(time.time())}

    def update(self, **fields: Any) -> None:
        self.fields.update({k: str(v) for k, v in fields.items()})
        self.beat()

    def beat(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        mapping: dict[Any, Any] = {**self.fields, "heartbeat": str(time.time())}
        pipe.hset(keys.worker(self.worker_id), mapping=mapping)
        pipe.expire(keys.worker(self.worker_id), self.ttl)
        pipe.zadd(keys.WORKERS, {self.worker_id: time.time()})
        pipe.zremrangebyscore(keys.WORKERS, "-inf", time.time() - 3600)
        pipe.execute()

    def remove(self) -> None:
        self.r.delete(keys.worker(self.worker_id))
        self.r.zrem(keys.WORKERS, self.worker_id)

    def beat_every(self, seconds: float) -> threading.Event:
        """Beat from a thread until the returned event is set: loading weights may take minutes (a first
        download), and a worker that says `loading` must not look dead meanwhile."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(seconds):
                try:
                    self.beat()
                except redis.RedisError as exc:
                    log.warning("registry heartbeat failed: %s", exc)

        threading.Thread(target=loop, name="registry-beat", daemon=True).start()
        return done


class Heartbeat(threading.Thread):
    """Beats while the main thread is busy in the pipeline; renews leases; reaps dead workers' jobs."""

    def __init__(self, worker: "SDXLWorker", settings: WorkerSettings) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.worker = worker
        self.settings = settings
        self.stop = threading.Event()
        self._renew = scripts.register(worker.connection, "renew")  # a lapsed lease stays lapsed

    def run(self) -> None:
        while not self.stop.wait(self.settings.heartbeat_seconds):
            try:
                self.beat_once()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def beat_once(self) -> None:
        w = self.worker
        runner = w.runner
        w.registry.update(jobs_done=runner.jobs_done, images_done=runner.images_done,
                          busy_seconds=round(runner.busy_seconds, 3), **runner.engine.memory())
        w.heartbeat(self.settings.lease_seconds + 60)
        with runner.lock:
            current = list(runner.current.values())
        if current:
            pipe = w.connection.pipeline(transaction=False)
            for m in current:
                self._renew(keys=[keys.lease(m.gen_id), keys.generation(m.gen_id)],
                            args=[runner.worker_id, m.payload.token, self.settings.lease_seconds], client=pipe)
            results = pipe.execute()
            for m, (mine, cancel, renewed) in zip(current, results, strict=True):
                if mine and not renewed:
                    log.warning("the lease of generation %s lapsed; a reaper will run it again", m.gen_id)
                with runner.lock:
                    if not mine:
                        m.superseded = True
                    if cancel:
                        m.cancel_requested = True
        w.reaper.sweep()  # requeues and their events: common/state.py
        runner.feed()


class CancelListener(threading.Thread):
    """Pub/sub: a cancel reaches the step callback within one step, not one heartbeat."""

    def __init__(self, r: redis.Redis, runner: Runner) -> None:
        super().__init__(name="cancel-listener", daemon=True)
        self.r = r
        self.runner = runner

    def run(self) -> None:
        while True:
            try:
                pubsub = self.r.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                for message in pubsub.listen():
                    gen_id = message["data"].decode()
                    with self.runner.lock:
                        m = self.runner.current.get(gen_id)
                        if m is not None:
                            m.cancel_requested = True
            except redis.RedisError:
                time.sleep(1)  # Redis blip: resubscribe; the heartbeat re-reads cancel flags meanwhile


class SDXLWorker(SimpleWorker):
    runner: Runner
    registry: Registry
    reaper: Reaper
    settings: WorkerSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # rq logs each job's description by default: ours is the payload, with the prompt and the ownership token
        kwargs.setdefault("log_job_description", False)
        super().__init__(*args, **kwargs)
        self._grace_timer: threading.Timer | None = None

    def attach(self, runner: Runner, registry: Registry, settings: WorkerSettings) -> None:
        self.runner = runner
        self.registry = registry
        self.settings = settings
        self.reaper = runner.reaper

    def publish_state(self, state: str) -> None:
        """Busy while rq runs a job, ready between jobs; a stop request sticks."""
        self.registry.fields["state"] = "stopping" if self._stop_requested else state

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """Warm shutdown: stop taking jobs; give the current one a grace period, then requeue it.

        Idle, rq raises StopRequested out of its blocking dequeue and the worker exits at once. Busy, the job
        goes on; past the grace period its step callback aborts it and the runner puts it back in line.
        """
        if self._grace_timer is None and self.get_state() == "busy":
            log.info("shutdown requested: finishing the current job within %.0fs", self.settings.shutdown_grace_seconds)
            self._grace_timer = threading.Timer(self.settings.shutdown_grace_seconds, self.runner.shutdown_abort.set)
            self._grace_timer.daemon = True
            self._grace_timer.start()
        # no Redis round trip inside a signal handler (the interrupted code may hold the pool's lock): the
        # heartbeat thread publishes the new state within a beat
        self.registry.fields["state"] = "stopping"
        try:
            super().request_stop(signum, frame)
        finally:
            # rq just armed SIGTERM/SIGINT to raise SystemExit (cold shutdown) mid-job: the grace timer decides
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)

    def execute_job(self, job: Any, queue: Queue) -> None:
        payload = job.args[0] if job.args and isinstance(job.args[0], dict) else {}
        # rq's own lines about this job carry the ids too, not just ours
        with logs.bind(request_id=payload.get("request_id"), generation_id=payload.get("generation_id")):
            # in memory only: the heartbeat thread publishes it within a beat
            self.publish_state("busy")
            try:
                super().execute_job(job, queue)
            finally:
                self.publish_state("ready")


def describe(settings: WorkerSettings) -> str:
    return json.dumps({"base": settings.base_model, "refiner": settings.refiner_model,
                       "device": settings.resolved_device})


def make_queue(r: redis.Redis) -> Queue:
    return Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
