"""`python -m worker.drain`: the GPU worker pod's preStop hook (deploy/kubernetes/base/worker.yaml).

It starts the worker's warm shutdown (SIGTERM to the worker process, PID 1 in its container: no new job, the
current one finishes within SDXL_SHUTDOWN_GRACE_SECONDS or goes back in line, computed results are stored) and
returns once the worker has drained: its registry entry is gone (the worker removes it as its last step) or
the process has exited. So the whole drain runs inside the pod's terminationGracePeriodSeconds, and the hook
usually ends before the container does (a hook still running when the container's main process exits is
reported by the kubelet as a failed hook). The kubelet's own SIGTERM that follows finds a worker already on its
way out, which a repeated signal does not disturb (worker/worker.py `request_stop`).

No torch: it starts in well under a second, as a hook should.
"""

import argparse
import logging
import os
import signal
import socket
import sys
import time

import redis

from common.contract import keys
from common.contract.records import as_str
from common.logs import configure
from worker.health import find_worker
from worker.settings import WorkerSettings

log = logging.getLogger("worker.drain")

POLL_SECONDS = 0.2
REPORT_SECONDS = 30.0
HOOK_KEY_SECONDS = 3600  # outlives any grace period; deleted as soon as the hook has seen the worker drained


def release(r: redis.Redis, wid: str) -> None:
    """Let the worker exit: it lingers after unregistering until this hook has returned its answer."""
    try:
        r.delete(keys.worker_drain_hook(wid))
    except redis.RedisError:
        pass  # the worker stops waiting on its own after a few seconds


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def drain(pid: int, r: redis.Redis, worker_id: str | None, host: str) -> None:
    try:
        wid = worker_id or find_worker(r, host)  # before the signal: the entry goes when the worker is done
    except redis.RedisError:
        wid = None  # Redis away: watch the process alone
    log.info("draining worker %s (pid %d)", wid or "?", pid)
    if wid is not None:
        try:  # the worker waits (briefly) for this to go before exiting: see `release` below
            r.set(keys.worker_drain_hook(wid), str(os.getpid()), ex=HOOK_KEY_SECONDS)
        except redis.RedisError:
            pass
    os.kill(pid, signal.SIGTERM)
    started = reported = time.monotonic()
    while alive(pid):
        if wid is not None:
            try:
                fields = {as_str(k): as_str(v) for k, v in r.hgetall(keys.worker(wid)).items()}  # type: ignore[union-attr]
            except redis.RedisError:
                fields = {"state": "unknown (redis unreachable)"}
            if not fields:
                log.info("worker %s drained after %.1fs", wid, time.monotonic() - started)
                release(r, wid)
                return
            now = time.monotonic()
            if now - reported >= REPORT_SECONDS:
                log.info("worker %s still draining after %.0fs (state %s)", wid, now - started,
                         fields.get("state", "?"))
                reported = now
        time.sleep(POLL_SECONDS)
    log.info("worker process %d exited after %.1fs", pid, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, default=1, help="the worker process (default 1: the container's)")
    args = parser.parse_args(argv)
    settings = WorkerSettings()
    configure("worker", settings.log_level)
    r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=3)
    try:
        drain(args.pid, r, settings.worker_id or None, socket.gethostname())
    except ProcessLookupError:
        log.info("no worker process %d: nothing to drain", args.pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
