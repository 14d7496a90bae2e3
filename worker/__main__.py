"""`python -m worker`: register, check the store, load the models once, warm up, then serve rq jobs until SIGTERM.

The object store is checked at the start (a log line either way) and again just before the worker would
become ready. A worker whose store fails that check takes no job, because it could not store the result: it
stays registered as `waiting_for_storage` (its registry entry's `storage` field, /readyz and
`python -m worker.health` say why), logs the reason, and re-checks every STORAGE_RECHECK_SECONDS until the
bucket, credentials or directory are fixed, then becomes ready without a restart (its models stay loaded).
Storage settings that cannot even build a store (S3 without a bucket name, a malformed endpoint) stop it
with exit 2, as a broken model path does.
"""

import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer

from common.contract import keys
from common.logs import configure
from common.storage import ObjectStore, StorageStatus, build_store, check_storage
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.worker import Registry

log = logging.getLogger("worker")

STORAGE_RECHECK_SECONDS = 5.0  # while the store fails its check
STORAGE_REMIND_SECONDS = 60.0  # the same failure is logged again this often


def redis_client(url: str, retry_seconds: float) -> redis.Redis:
    # ride out Redis restarts (stock rq quits with exit 0 and strands the job): cap 2 s per try
    retries = max(1, int(retry_seconds / 2))
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2, base=0.1), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=5,
        socket_connect_timeout=2,
        socket_timeout=30,
    )


def _stop_before_serving(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # still loading or warming: no job taken, nothing to hand back


def log_storage(store: ObjectStore, status: StorageStatus, waiting: bool) -> None:
    fields = {"storage": store.location, "error_code": status.code}
    if status.ok:
        log.info("storage ok: %s", store.location, extra=fields)
        return
    level = logging.ERROR if status.permanent else logging.WARNING
    if waiting:
        log.log(level, "storage check failed: %s; this worker takes no job until it passes (checked again every "
                "%gs)", status.error, STORAGE_RECHECK_SECONDS, extra=fields)
    else:
        log.log(level, "storage check failed: %s; loading the models meanwhile, the worker will not become ready "
                "until it passes", status.error, extra=fields)


def wait_for_storage(store: ObjectStore, registry: "Registry", state: str) -> None:
    """Returns once the store passes its check; meanwhile the registry says `waiting_for_storage` and why."""
    status = check_storage(store)
    if status.ok:
        registry.update(storage="ok")
        return
    started = logged_at = time.monotonic()
    log_storage(store, status, waiting=True)
    last_error = status.error
    while not status.ok:
        registry.update(state="waiting_for_storage", storage=status.describe())
        time.sleep(STORAGE_RECHECK_SECONDS)  # SIGTERM here exits at once: no job taken
        status = check_storage(store)
        now = time.monotonic()
        if not status.ok and (status.error != last_error or now - logged_at >= STORAGE_REMIND_SECONDS):
            log_storage(store, status, waiting=True)
            last_error, logged_at = status.error, now
    log.info("storage ok: %s (after waiting %.0fs)", store.location, time.monotonic() - started,
             extra={"storage": store.location})
    registry.update(state=state, storage="ok")


def main() -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    configure("worker", os.environ.get("SDXL_LOG_LEVEL", "INFO"))
    settings = WorkerSettings()
    configure("worker", os.environ.get("SDXL_LOG_LEVEL", "INFO"), log_prompts=settings.log_prompts)
    worker_id = settings.resolved_worker_id()
    if settings.metrics_port:
        from prometheus_client import start_http_server

        # process numbers only; the worker's jobs, images, state and GPU memory reach Prometheus through the
        # registry in Redis and any API replica's /metrics (app/metrics.py)
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    r = redis_client(settings.redis_url, settings.redis_retry_seconds)

    from worker.worker import CancelListener, Heartbeat, Registry, SDXLWorker, make_queue

    registry = Registry(r, worker_id, ttl=settings.lease_seconds * 2)
    registry.update(state="loading", has_refiner=int(bool(settings.refiner_model)))
    loading_beat = registry.beat_every(settings.heartbeat_seconds)  # until the heartbeat thread takes over
    signal.signal(signal.SIGTERM, _stop_before_serving)  # rq installs its own handlers once it serves
    signal.signal(signal.SIGINT, _stop_before_serving)
    try:
        store = build_store(settings)
    except ValueError as exc:  # S3 without a bucket, a malformed endpoint: settings to fix, not a state to wait out
        log.error("could not build the object store: %s", exc)
        loading_beat.set()
        registry.remove()
        return 2
    first = check_storage(store)  # at once, not after minutes of loading: the log says it early
    log_storage(store, first, waiting=False)
    registry.update(storage=first.describe())
    try:
        from worker.pipeline import Engine

        engine = Engine(settings)
    except Exception as exc:  # a broken model path must stop the worker loudly, not serve failures
        log.error("could not load the models: %s: %s", type(exc).__name__, exc,
                  extra={"base_model": settings.base_model, "refiner_model": settings.refiner_model})
        loading_beat.set()
        registry.remove()
        return 2
    from worker import state
    from worker.finisher import Finisher
    from worker.runner import Runner

    finisher = Finisher() if settings.finish_in_background else None
    runner = Runner(r, engine, store, settings, worker_id, finisher)
    try:
        from worker.previews import Previewer

        runner.previewer = Previewer.load(settings, engine.device, engine.dtype)
    except Exception as exc:  # an SDXL_PREVIEW_VAE named explicitly that does not load: a setting to fix
        log.error("could not load the preview decoder: %s: %s", type(exc).__name__, exc)
        loading_beat.set()
        registry.remove()
        return 2
    state.set_runner(runner)
    registry.update(state="warming", has_refiner=int(engine.refiner is not None), model_loads=engine.load_count,
                    load_seconds=round(engine.load_seconds, 3))
    if settings.warmup:
        engine.warmup()
    try:
        wait_for_storage(store, registry, state="warming")  # the last step before serving: no job it cannot store
    except SystemExit:  # SIGTERM while waiting: nothing taken, no registry entry left behind
        loading_beat.set()
        registry.remove()
        raise
    worker = SDXLWorker([make_queue(r)], connection=r, name=worker_id, serializer=JSONSerializer,
                        exception_handlers=[runner.rq_exception_handler])
    worker.attach(runner, registry, settings)
    heartbeat = Heartbeat(worker, settings)
    heartbeat.start()
    loading_beat.set()
    CancelListener(r, runner).start()
    registry.update(state="ready", warm=1)
    log.info("worker ready", extra={"worker_id": worker_id})
    from worker.pipeline import freeze_heap

    freeze_heap()  # the long-lived heap out of later full collections (after `ready`: start-up does not wait)
    try:
        worker.work(logging_level=os.environ.get("SDXL_LOG_LEVEL", "INFO"))
    except StopRequested:
        pass  # a second signal while rq was tearing down: the warm shutdown is already done
    finally:
        if not runner.drain(settings.shutdown_grace_seconds):
            log.warning("results still being stored at exit: their leases lapse and they run again")
        heartbeat.stop.set()  # a beat after `remove` would register this worker again while it waits below
        heartbeat.join(timeout=settings.heartbeat_seconds + 5)
        registry.remove()
        wait_for_drain_hook(r, worker_id)
    log.info("worker stopped", extra={"worker_id": worker_id})
    return 0


def wait_for_drain_hook(r: redis.Redis, worker_id: str, limit: float = 10.0) -> None:
    """A preStop hook (worker/drain.py) still running when this process, PID 1 of the container, exits is killed
    with it, and the kubelet reports a failed hook: wait until the hook has seen the drain (it deletes its key)
    and its process has exited (the key holds its pid), for at most `limit` seconds."""
    from worker.drain import alive

    key = keys.worker_drain_hook(worker_id)
    deadline = time.monotonic() + limit
    try:
        hook = r.get(key)
        pid = int(hook) if hook else None
        while time.monotonic() < deadline and (r.exists(key) or (pid is not None and alive(pid))):
            time.sleep(0.05)
    except (redis.RedisError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
