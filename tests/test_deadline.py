"""Per-request deadline end to end: a generation that cannot start within `deadline` seconds fails with
`deadline_exceeded` instead of running late; one with room to wait runs normally."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.access import BLOCKER, TINY, cancel, post, service_with, wait_final, wait_status
from tests.procs import Service


@pytest.fixture(scope="module")
def svc(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with service_with(tiny_model, tmp_path_factory.mktemp("deadline"), 1, {}) as s:
        yield s


def test_a_job_that_starts_after_its_deadline_fails_deadline_exceeded(svc: Service) -> None:
    blocker = post(svc.url, BLOCKER, None).json()["id"]
    wait_status(svc.url, blocker, None, {"running"})  # the only worker is busy from here on
    hurried = post(svc.url, {"prompt": "in a hurry", **TINY, "deadline": 0.5}, None)
    patient = post(svc.url, {"prompt": "can wait", **TINY, "deadline": 600}, None)
    assert hurried.status_code == patient.status_code == 202
    time.sleep(1.0)  # let the 0.5 s deadline pass while the worker is still busy
    assert cancel(svc.url, blocker, None).status_code == 202  # so it was still running: nothing else started

    late = wait_final(svc.url, hurried.json()["id"], None)
    assert late["status"] == "failed", late
    assert late["error"]["type"] == "deadline_exceeded"
    assert late["started_at"] is None and late["images"] == []
    assert wait_final(svc.url, patient.json()["id"], None)["status"] == "succeeded"
