"""Helpers for the access, limits and fair-share tests: keys, a started service with extra env, blockers."""

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from app.auth import hash_key
from tests.procs import RedisServer, Service, running_service

TINY = {"width": 128, "height": 128, "num_inference_steps": 4, "refiner": {"mode": "none"}}
# occupies the single worker until canceled (far longer than any test needs it); cancel stops it within a step
BLOCKER = {"prompt": "blocker", "width": 768, "height": 768, "num_inference_steps": 100, "refiner": {"mode": "none"}}


class Key:
    def __init__(self, name: str, **limits: int) -> None:
        self.name = name
        self.secret = f"sdxl_test_{name}_{secrets.token_hex(8)}"
        self.entry: dict[str, Any] = {"name": name, "sha256": hash_key(self.secret), **limits}
        self.owner = f"key:{name}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def keys_env(*keys: Key) -> str:
    return json.dumps([k.entry for k in keys])


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


def post(url: str, body: dict[str, Any], key: Key | None = None, **headers: str) -> httpx.Response:
    h = {**(key.headers if key else {}), **{k.replace("_", "-"): v for k, v in headers.items()}}
    return httpx.post(f"{url}/v1/generations", json=body, headers=h, timeout=30)


def get(url: str, path: str, key: Key | None = None, **params: Any) -> httpx.Response:
    return httpx.get(f"{url}{path}", headers=key.headers if key else {}, params=params, timeout=30)


def wait_status(url: str, gen_id: str, key: Key | None, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = get(url, f"/v1/generations/{gen_id}", key).json()
        if res["status"] in statuses:
            return res
        time.sleep(0.05)
    raise AssertionError(f"{gen_id} did not reach {statuses} in {timeout}s")


def wait_final(url: str, gen_id: str, key: Key | None, timeout: float = 120) -> dict[str, Any]:
    """Long-polls (Prefer: wait) rather than spinning: the API answers when the generation is final."""
    deadline = time.monotonic() + timeout
    headers = {**(key.headers if key else {}), "Prefer": "wait=30"}
    while time.monotonic() < deadline:
        res = httpx.get(f"{url}/v1/generations/{gen_id}", headers=headers, timeout=60).json()
        if res["status"] in ("succeeded", "failed", "canceled"):
            return dict(res)
    raise AssertionError(f"{gen_id} not final after {timeout}s")


def cancel(url: str, gen_id: str, key: Key | None) -> httpx.Response:
    return httpx.post(f"{url}/v1/generations/{gen_id}/cancel", headers=key.headers if key else {}, timeout=30)


def started(gen: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(gen["started_at"].replace("Z", "+00:00"))
