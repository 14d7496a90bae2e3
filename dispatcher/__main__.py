"""`python -m dispatcher`: the webhook dispatcher. An rq SimpleWorker on `sdxl-webhooks` plus a pump
thread that moves due retries from a Redis zset onto that queue. No torch, no diffusers: it runs anywhere.

Why our own due-zset pump rather than rq's scheduler: rq's scheduler polls once a second from a forked process
and holds a per-queue lock for interval + 60 s, so when the dispatcher holding it dies, retries stall for over
a minute; the pump runs in every dispatcher, claims entries atomically with a lease, and its interval is a
setting (short in tests). SimpleWorker (no fork per job) because the pump thread shares the process: forking
beside a thread that may hold the Redis pool's lock is how children deadlock.

Scale by running more dispatchers: each delivers one webhook at a time, so a slow receiver (up to
SDXL_WEBHOOK_TIMEOUT_SECONDS) holds up only the dispatcher that is calling it.
"""

import logging
import os
import secrets
import socket
import sys

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from common.contract import keys
from common.logs import configure as configure_logs
from dispatcher import delivery as webhooks

log = logging.getLogger("dispatcher")


def redis_client(url: str) -> redis.Redis:
    # ride out short Redis restarts instead of dropping a delivery's log entry or retry
    return redis.Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=2, base=0.1), 30),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=5,
        socket_connect_timeout=2,
        socket_timeout=30,
    )


def main() -> int:
    level = os.environ.get("SDXL_LOG_LEVEL", "INFO")
    configure_logs("dispatcher", level)
    try:
        settings = webhooks.DispatcherSettings()
    except ValidationError as exc:  # a bad secret or schedule stops the start, with the reason
        log.error("invalid dispatcher settings: %s", exc)
        return 2
    if not settings.webhook_secrets:
        log.error("SDXL_WEBHOOK_SECRETS is empty: refusing to send unsigned webhooks. Make a secret with "
                  "`python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(24)).decode())\"` "
                  "and give the same value to your receivers (`make run` makes one for you)")
        return 2
    name = settings.dispatcher_name or f"dispatcher-{socket.gethostname()}-{secrets.token_hex(3)}"
    r = redis_client(settings.redis_url)
    webhooks.configure(webhooks.Deliverer(r, settings))
    pump = webhooks.DuePump(redis_client(settings.redis_url), settings.webhook_pump_interval_seconds)
    pump.start()
    queue = Queue(keys.WEBHOOK_QUEUE, connection=r, serializer=JSONSerializer)
    worker = SimpleWorker([queue], connection=r, name=name, serializer=JSONSerializer,
                          log_job_description=False)  # payloads carry the prompt
    log.info(
        "dispatcher ready",
        extra={
            "dispatcher": name,
            "retry_schedule": settings.webhook_retry_schedule,
            "secrets": len(settings.webhook_secrets),
        },
    )
    try:
        worker.work(logging_level=level)
    finally:
        pump.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
