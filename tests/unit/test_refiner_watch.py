"""app/generations.py: whether a refiner request can be served comes from the worker registry, re-read once a
second in the background (`watch_workers`), so a submit does not wait for it; a stale answer (no watcher, or
it stalled) is read inline. Real Redis; the registry entries are written as workers write them."""

import asyncio
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aredis

from app.generations import GenerationService
from app.settings import Settings
from common.contract import keys
from common.storage import LocalStore
from tests.procs import RedisServer


def register(r: Any, wid: str, has_refiner: bool) -> None:
    r.hset(keys.worker(wid), mapping={"id": wid, "state": "ready", "has_refiner": "1" if has_refiner else "0"})
    r.zadd(keys.WORKERS, {wid: time.time()})


def test_the_watcher_answers_without_a_read_and_follows_the_registry(
        redis_server: RedisServer, redis_client: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        ar = aredis.Redis.from_url(redis_server.url)
        svc = GenerationService(redis_client, ar, Settings(redis_url=redis_server.url, refiner_model="refiner"),
                                LocalStore(tmp_path))
        register(redis_client, "w-without", has_refiner=False)
        assert await svc.refiner_available() is False  # nothing read yet: the submit reads the registry itself
        watcher = asyncio.create_task(svc.watch_workers())
        reads = 0
        live_workers = svc.live_workers

        async def counted() -> Any:
            nonlocal reads
            reads += 1
            return await live_workers()

        svc.live_workers = counted  # type: ignore[method-assign]
        try:
            register(redis_client, "w-with", has_refiner=True)
            await asyncio.sleep(1.5)  # one background read
            before = reads
            assert [await svc.refiner_available() for _ in range(20)] == [True] * 20
            assert reads == before  # the submits themselves read nothing
        finally:
            watcher.cancel()
        svc._refiner_checked = (time.monotonic() - 5, True)  # the watcher stopped long ago: stale
        redis_client.delete(keys.worker("w-with"))
        redis_client.zrem(keys.WORKERS, "w-with")
        assert await svc.refiner_available() is False  # read inline, and right
        await ar.aclose()

    asyncio.run(scenario())
