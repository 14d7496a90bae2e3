"""What a client does with the API, for every layer of tests: keys, request bodies, create / get / cancel, and
polling or long-polling a generation until it reaches a status.

Each helper takes an `httpx.Client` whose base_url is the API: one bound in-process to an app built by
create_app (tests/api/conftest.py), or one pointed at a real API process (`httpx.Client(base_url=svc.url)`;
tests/access.py wraps these helpers for the end-to-end tests, which pass URLs).
"""

import json
import secrets
import time
from datetime import datetime
from typing import Any

import httpx

from app.auth import hash_key

TINY = {"width": 128, "height": 128, "num_inference_steps": 4, "refiner": {"mode": "none"}}
# occupies the single worker until canceled (far longer than any test needs it); cancel stops it within a step
BLOCKER = {"prompt": "blocker", "width": 768, "height": 768, "num_inference_steps": 100, "refiner": {"mode": "none"}}
FINAL = ("succeeded", "failed", "canceled")
TIMEOUT = 30  # seconds per request to a real API process (an in-process client ignores it)


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
    """The SDXL_API_KEYS value (and Settings.api_keys) holding these keys."""
    return json.dumps([k.entry for k in keys])


def create(c: httpx.Client, body: dict[str, Any], key: Key | None = None, **headers: str) -> httpx.Response:
    """POST /v1/generations; `Idempotency_Key="x"` sends the header `Idempotency-Key: x`."""
    h = {**(key.headers if key else {}), **{k.replace("_", "-"): v for k, v in headers.items()}}
    return c.post("/v1/generations", json=body, headers=h, timeout=TIMEOUT)


def get(c: httpx.Client, path: str, key: Key | None = None, **params: Any) -> httpx.Response:
    return c.get(path, headers=key.headers if key else {}, params=params, timeout=TIMEOUT)


def cancel(c: httpx.Client, gen_id: str, key: Key | None) -> httpx.Response:
    return c.post(f"/v1/generations/{gen_id}/cancel", headers=key.headers if key else {}, timeout=TIMEOUT)


def wait_status(c: httpx.Client, gen_id: str, key: Key | None, statuses: set[str],
                timeout: float = 120) -> dict[str, Any]:
    """Polls the generation until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = get(c, f"/v1/generations/{gen_id}", key).json()
        if res["status"] in statuses:
            return dict(res)
        time.sleep(0.05)
    raise AssertionError(f"{gen_id} did not reach {statuses} in {timeout}s")


def wait_final(c: httpx.Client, gen_id: str, key: Key | None, timeout: float = 120) -> dict[str, Any]:
    """Long-polls (Prefer: wait) rather than spinning: the API answers when the generation is final."""
    deadline = time.monotonic() + timeout
    headers = {**(key.headers if key else {}), "Prefer": "wait=30"}
    while time.monotonic() < deadline:
        res = c.get(f"/v1/generations/{gen_id}", headers=headers, timeout=60).json()
        if res["status"] in FINAL:
            return dict(res)
    raise AssertionError(f"{gen_id} not final after {timeout}s")


def started(gen: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(gen["started_at"].replace("Z", "+00:00"))
