"""End-to-end helpers for the access, limits and fair-share tests: a started service with extra env, and the
client helpers of tests/client.py (keys, create / get / cancel / wait) for a service's URL."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests import client
from tests.client import BLOCKER, TINY, Key, keys_env, started
from tests.procs import RedisServer, Service, running_service

__all__ = ["BLOCKER", "TINY", "Key", "keys_env", "started", "service_with", "post", "get", "wait_status",
           "wait_final", "cancel"]


@contextmanager
def service_with(tiny_model: Path, data: Path, workers: int, env: dict[str, str]) -> Iterator[Service]:
    """A module's own Redis + API (+ workers) with extra settings."""
    server = RedisServer()
    server.start()
    try:
        with running_service(server.url, tiny_model, data, workers=workers, env=env) as svc:
            svc.redis_server = server  # type: ignore[attr-defined]
            yield svc
    finally:
        server.stop()


def _at(url: str) -> httpx.Client:
    return httpx.Client(base_url=url)


def post(url: str, body: dict[str, Any], key: Key | None = None, **headers: str) -> httpx.Response:
    with _at(url) as c:
        return client.create(c, body, key, **headers)


def get(url: str, path: str, key: Key | None = None, **params: Any) -> httpx.Response:
    with _at(url) as c:
        return client.get(c, path, key, **params)


def wait_status(url: str, gen_id: str, key: Key | None, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
    with _at(url) as c:
        return client.wait_status(c, gen_id, key, statuses, timeout)


def wait_final(url: str, gen_id: str, key: Key | None, timeout: float = 120) -> dict[str, Any]:
    with _at(url) as c:
        return client.wait_final(c, gen_id, key, timeout)


def cancel(url: str, gen_id: str, key: Key | None) -> httpx.Response:
    with _at(url) as c:
        return client.cancel(c, gen_id, key)
