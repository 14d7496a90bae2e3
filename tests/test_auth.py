"""API keys end to end, where a worker or the API process itself is needed: another key cannot cancel work a
worker is running, and `python -m app` exits with the reason when told to serve without keys on a non-loopback
address. The rest of the access tests run in-process: tests/api/test_auth.py."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.access import BLOCKER, Key, cancel, get, keys_env, post, service_with, wait_status
from tests.procs import Proc, Service, base_env, free_port, wait_for

ALICE = Key("alice")
BOB = Key("bob")


@pytest.fixture(scope="module")
def svc(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with service_with(tiny_model, tmp_path_factory.mktemp("auth"), 1, {"SDXL_API_KEYS": keys_env(ALICE, BOB)}) as s:
        yield s


def test_another_key_cannot_cancel_running_work(svc: Service) -> None:
    gid = post(svc.url, BLOCKER, ALICE).json()["id"]
    wait_status(svc.url, gid, ALICE, {"running"})
    assert cancel(svc.url, gid, BOB).status_code == 404
    assert get(svc.url, f"/v1/generations/{gid}", ALICE).json()["status"] == "running"
    assert cancel(svc.url, gid, ALICE).status_code == 202
    assert wait_status(svc.url, gid, ALICE, {"canceled", "succeeded", "failed"})["status"] == "canceled"


def test_open_non_loopback_api_process_exits_with_the_reason(tmp_path: Path, tiny_model: Path) -> None:
    port = free_port()
    env = base_env("redis://127.0.0.1:1/0", tiny_model, tmp_path, SDXL_HOST="0.0.0.0", SDXL_PORT=str(port))
    api = Proc([sys.executable, "-m", "app"], env, tmp_path / "api.log")
    try:
        wait_for(lambda: api.proc.poll() is not None, 30, "the API to refuse to start")
        assert api.proc.returncode != 0
        assert "refusing to start" in api.output() and "SDXL_HOST='0.0.0.0'" in api.output()
    finally:
        api.stop()
