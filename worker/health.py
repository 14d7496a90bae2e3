"""`python -m worker.health`: exit 0 while this container's worker is alive and ready, else 1.

The Dockerfile's HEALTHCHECK runs it. It reads the worker's registry entry in Redis (`sdxl:worker:<id>`:
state and heartbeat, written by the worker's heartbeat thread) rather than asking the worker process, so it
costs the worker nothing and needs no torch. Which worker: SDXL_WORKER_ID, or else the freshest entry whose
id starts with this host's name (the default worker id is `<hostname>-<random>`). Healthy means a heartbeat
younger than SDXL_LEASE_SECONDS and state `ready` or `busy`; loading, warming and stopping are not healthy
(the image's start period covers loading). A worker `waiting_for_storage` (its object store fails its check)
is not healthy either, and the report's reason carries the store's error.

`--live` asks a narrower question, for a Kubernetes liveness probe: is the heartbeat fresh, in any state
(loading, warming, waiting for storage and stopping included)? Those states end by themselves, and a restart
would only throw the loaded models away. Redis unreachable counts as alive there: the worker rides out Redis
outages by itself (SDXL_REDIS_RETRY_SECONDS) and exits when they last longer, and restarting every worker
because Redis is away would reload every model for nothing.
"""

import argparse
import json
import socket
import sys
import time

import redis

from common.contract import keys
from worker.settings import WorkerSettings


def find_worker(r: redis.Redis, host: str) -> str | None:
    ids = [_text(w) for w in r.zrange(keys.WORKERS, 0, -1)]  # type: ignore[union-attr,arg-type]
    ids = [w for w in ids if w.startswith(f"{host}-")]
    best: tuple[float, str] | None = None
    for wid in ids:
        beat = r.hget(keys.worker(wid), "heartbeat")
        if beat is not None and (best is None or float(beat) > best[0]):
            best = (float(beat), wid)
    return best[1] if best else None


def check(r: redis.Redis, worker_id: str | None, lease_seconds: float, host: str,
          live: bool = False) -> tuple[bool, dict]:
    wid = worker_id or find_worker(r, host)
    if not wid:
        return False, {"healthy": False, "reason": f"no worker registered for host {host!r}"}
    raw = {_text(k): _text(v) for k, v in r.hgetall(keys.worker(wid)).items()}  # type: ignore[union-attr]
    if not raw:
        return False, {"healthy": False, "worker": wid, "reason": "no registry entry (not started, or expired)"}
    state = raw.get("state", "unknown")
    age = time.time() - float(raw.get("heartbeat") or 0)
    healthy = age <= lease_seconds and (live or state in ("ready", "busy"))
    report = {"healthy": healthy, "worker": wid, "state": state, "heartbeat_age_seconds": round(age, 3)}
    if not healthy:
        reason = f"state {state}" if age <= lease_seconds else f"heartbeat {age:.0f}s old"
        if raw.get("storage") not in (None, "ok"):
            reason += f"; storage: {raw['storage']}"
        report["reason"] = reason
    return healthy, report


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health")
    parser.add_argument("--live", action="store_true", help="alive: a fresh heartbeat in any state (liveness)")
    live = parser.parse_args(argv).live
    settings = WorkerSettings()
    r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=3)
    try:
        healthy, report = check(r, settings.worker_id or None, settings.lease_seconds, socket.gethostname(), live)
    except redis.RedisError as exc:
        healthy = live  # see the module docstring: Redis away is not this worker's failure
        report = {"healthy": healthy, "reason": f"redis unreachable: {type(exc).__name__}"}
    print(json.dumps(report))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
