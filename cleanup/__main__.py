"""`python -m cleanup`: the periodic housekeeping process (no torch: it runs from the API image).

Every SDXL_CLEANUP_INTERVAL_SECONDS it
  * removes expired generations (the `sdxl:expiry` zset, by score) with their images, events and index entries;
  * requeues generations whose worker died (common.reaper.Reaper.sweep), as the workers' heartbeats also do, so
    a dead worker's job is found even when no worker is left alive;
  * fails queued generations whose `deadline_at` passed with `deadline_exceeded`, so a caller waiting on an
    empty fleet gets an answer (a worker also checks the deadline when it starts a job);
  * deletes expired image uploads (the `sdxl:upload-expiry` zset) with their bytes, once no unfinished
    generation uses them (app/uploads.py).
It is its own process because rq's --with-scheduler would fork the GPU worker. `--once` runs one sweep.
"""

import argparse
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import redis

from common.contract import keys
from common.contract.records import as_str, decode
from common.contract.status import TERMINAL_STATUSES, ErrorType, GenerationStatus
from common.logs import configure
from common.reaper import Reaper
from common.settings import CommonSettings
from common.state import GenerationState
from common.storage import ObjectStore, StorageUnavailable, build_store, image_url

log = logging.getLogger("cleanup")


class CleanupSettings(CommonSettings):
    cleanup_interval_seconds: float = 60.0  # seconds between sweeps

BATCH = 200  # expired ids handled per Redis round trip
UPLOAD_RECHECK_SECONDS = 60.0  # an expired upload an unfinished generation still uses is looked at again then
TERMINAL = {s.value for s in TERMINAL_STATUSES}


class Cleanup:
    def __init__(self, r: redis.Redis, store: ObjectStore, settings: CleanupSettings) -> None:
        self.r = r
        self.store = store
        self.settings = settings
        self.state = GenerationState(r, settings, self.image_url)
        self.reaper = Reaper(r, settings, self.state)

    def image_url(self, gen_id: str, img: dict[str, Any]) -> str:
        return image_url(self.settings, self.store, gen_id, img)

    # --- expiry -----------------------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Purge every generation whose expiry score has passed; stops early (and retries next sweep)
        while the store is down, so no record is dropped with its images still stored."""
        done = 0
        while True:
            due = [as_str(m) for m in self.r.zrangebyscore(keys.EXPIRY, "-inf", now, start=0, num=BATCH)]
            for gen_id in due:
                raw = self.r.hgetall(keys.generation(gen_id))
                rec = decode(raw) if raw else None
                if rec and rec.get("expires_at") and float(rec["expires_at"]) > now:
                    self.r.zadd(keys.EXPIRY, {gen_id: float(rec["expires_at"])})  # the record says later
                    continue
                try:
                    self.state.delete(self.store, gen_id, rec)
                except StorageUnavailable as exc:
                    log.warning("storage unavailable; expiry resumes next sweep: %s", exc)
                    return done
                done += 1
            if len(due) < BATCH:
                return done

    # --- uploads ----------------------------------------------------------------------------------
    def upload_in_use(self, upload_id: str) -> bool:
        """Whether an unfinished generation refers to the upload (its worker has yet to read it)."""
        users = sorted(as_str(g) for g in self.r.smembers(keys.upload_users(upload_id)))
        if not users:
            return False
        pipe = self.r.pipeline(transaction=False)
        for gen_id in users:
            pipe.hget(keys.generation(gen_id), "status")
        return any(status is not None and as_str(status) not in TERMINAL for status in pipe.execute())

    def expire_uploads(self, now: float) -> int:
        """Delete every upload whose expiry score has passed and that no unfinished generation uses (those are
        looked at again later); stops early (and retries next sweep) while the store is down, so no record is
        dropped with its bytes still stored."""
        done = 0
        while True:
            due = [as_str(m) for m in self.r.zrangebyscore(keys.UPLOAD_EXPIRY, "-inf", now, start=0, num=BATCH)]
            for upload_id in due:
                owner, expires_at = self.r.hmget(keys.upload(upload_id), ["owner", "expires_at"])
                if expires_at is not None and float(expires_at) > now:
                    self.r.zadd(keys.UPLOAD_EXPIRY, {upload_id: float(expires_at)})  # the record says later
                    continue
                if self.upload_in_use(upload_id):
                    self.r.zadd(keys.UPLOAD_EXPIRY, {upload_id: now + UPLOAD_RECHECK_SECONDS})
                    continue
                try:
                    self.store.delete_prefix(f"{self.settings.upload_prefix}{upload_id}/")
                except StorageUnavailable as exc:
                    log.warning("storage unavailable; upload expiry resumes next sweep: %s", exc)
                    return done
                pipe = self.r.pipeline(transaction=True)
                pipe.delete(keys.upload(upload_id), keys.upload_users(upload_id))
                if owner is not None:  # the record outlives its expiry by an hour; later, the owner's zset
                    pipe.zrem(keys.owner_uploads(as_str(owner)), upload_id)  # is pruned by the next upload
                    pipe.hdel(keys.owner_upload_bytes(as_str(owner)), upload_id)
                pipe.zrem(keys.UPLOAD_EXPIRY, upload_id)
                pipe.execute()
                done += 1
            if len(due) < BATCH:
                return done

    # --- deadlines --------------------------------------------------------------------------------
    def queued_ids(self) -> set[str]:
        """Ids still waiting: in some owner's pending zset or already fed to the rq list."""
        ids: set[str] = set()
        for owner in self.r.zrange(keys.ACTIVE_OWNERS, 0, -1):
            ids.update(as_str(m) for m in self.r.zrange(keys.pending(as_str(owner)), 0, -1))
        ids.update(as_str(j).rsplit("-", 1)[0] for j in self.r.lrange(keys.RQ_QUEUE_KEY, 0, -1))
        return ids

    def fail_past_deadline(self, now: float) -> list[str]:
        ids = sorted(self.queued_ids())
        pipe = self.r.pipeline(transaction=False)
        for gen_id in ids:
            pipe.hmget(keys.generation(gen_id), "status", "deadline_at", "owner", "rq_job_id")
        failed = []
        for gen_id, (status, deadline_at, owner, rq_job_id) in zip(ids, pipe.execute(), strict=True):
            if as_str(status or b"") != GenerationStatus.queued or not deadline_at or float(deadline_at) >= now:
                continue
            # compare-and-set: a worker that started it meanwhile wins, and the job runs
            outcome = self.state.fail(gen_id, "", ErrorType.deadline_exceeded,
                                      "the generation could not start before its deadline",
                                      allowed=GenerationStatus.queued)
            if outcome != "OK":
                continue
            pipe2 = self.r.pipeline(transaction=False)
            pipe2.zrem(keys.pending(as_str(owner)), gen_id)
            pipe2.lrem(keys.RQ_QUEUE_KEY, 0, rq_job_id)
            pipe2.execute()
            failed.append(gen_id)
        if failed:  # their places in the rq list go to the next in line
            self.state.feed()
        return failed

    # --- one sweep --------------------------------------------------------------------------------
    def sweep(self) -> dict[str, int]:
        now = time.time()
        counts = {"expired": 0, "uploads_expired": 0, "requeued": 0, "deadline_exceeded": 0, "errors": 0}
        for name, step in (
            ("expired", lambda: self.expire(now)),
            ("uploads_expired", lambda: self.expire_uploads(now)),
            ("requeued", lambda: len(self.reaper.sweep())),
            ("deadline_exceeded", lambda: len(self.fail_past_deadline(now))),
        ):
            try:
                counts[name] = step()
            except redis.RedisError as exc:  # Redis down: the next sweep tries again
                log.warning("cleanup step %s failed: %s", name, exc)
                counts["errors"] += 1
        # a sweep that found nothing is DEBUG: at INFO it would be a line a minute saying nothing
        (log.info if any(counts.values()) else log.debug)("cleanup sweep", extra=counts)
        return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cleanup", description=__doc__.split("\n")[0])
    parser.add_argument("--once", action="store_true", help="run one sweep and exit")
    args = parser.parse_args(argv)
    configure("cleanup", os.environ.get("SDXL_LOG_LEVEL", "INFO"))
    settings = CleanupSettings()
    r = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=30)
    cleanup = Cleanup(r, build_store(settings), settings)
    if args.once:
        return 1 if cleanup.sweep()["errors"] else 0
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("cleanup started", extra={"interval_seconds": settings.cleanup_interval_seconds})
    while not stop.is_set():
        cleanup.sweep()
        stop.wait(settings.cleanup_interval_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
