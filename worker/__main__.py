"""`python -m worker`: register, load the models once, warm up, then serve rq jobs until SIGTERM."""

import logging
import os
import signal
import sys
from types import FrameType

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq.exceptions import StopRequested
from rq.serializers import JSONSerializer

from common.logs import configure
from common.storage import build_store
from worker.settings import WorkerSettings

log = logging.getLogger("worker")


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
    runner = Runner(r, engine, build_store(settings), settings, worker_id, finisher)
    state.set_runner(runner)
    registry.update(state="warming", has_refiner=int(engine.refiner is not None), model_loads=engine.load_count,
                    load_seconds=round(engine.load_seconds, 3))
    if settings.warmup:
        engine.warmup()
    worker = SDXLWorker([make_queue(r)], connection=r, name=worker_id, serializer=JSONSerializer,
                        exception_handlers=[runner.rq_exception_handler])
    worker.attach(runner, registry, settings)
    Heartbeat(worker, settings).start()
    loading_beat.set()
    CancelListener(r, runner).start()
    registry.update(state="ready", warm=1)
    log.info("worker ready", extra={"worker_id": worker_id})
    try:
        worker.work(logging_level=os.environ.get("SDXL_LOG_LEVEL", "INFO"))
    except StopRequested:
        pass  # a second signal while rq was tearing down: the warm shutdown is already done
    finally:
        if not runner.drain(settings.shutdown_grace_seconds):
            log.warning("results still being stored at exit: their leases lapse and they run again")
        registry.remove()
    log.info("worker stopped", extra={"worker_id": worker_id})
    return 0


if __name__ == "__main__":
    sys.exit(main())
