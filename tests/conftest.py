"""Fixtures of every layer: the tiny model (built once) and the session's private Redis.

The layers: tests/unit/ (in-process code and checks of the tree; no service processes), tests/api/ (in-process
apps on the private Redis), tests/e2e/ (real API, worker and helper processes; their stacks in
tests/e2e/conftest.py). `make test` runs all but the fault drills marked `slow`; `make chaos` runs those.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT, Proc, RedisServer, Service

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS = ("tests/unit/", "tests/api/")  # run first, in this order; everything else (end-to-end) after them


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit, then in-process API, then end-to-end tests (each in collection order): the quick layers answer
    first, and the workers tests/e2e/conftest.py starts when collection ends load while they run."""

    def layer(item: pytest.Item) -> int:
        path = Path(str(item.path)).resolve().relative_to(ROOT).as_posix()
        return next((i for i, prefix in enumerate(LAYERS) if path.startswith(prefix)), len(LAYERS))

    items.sort(key=layer)  # stable: module and test order within a layer stay as collected


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Processes a fixture started and forgot (an API of a `view` nobody stopped) are stopped here and named, so
    a run never leaves servers behind on the machine."""
    left = Proc.stop_leftovers()
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"stopped {len(left)} process(es) the tests left running: " + "; ".join(left))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The project's own tiny random-weight SDXL (base + refiner) in the hub layout."""
    target = Path(os.environ.get("SDXL_TEST_MODEL_DIR", ROOT / ".models" / "tiny"))
    if not (target / "base" / "model_index.json").exists() or not (target / "refiner" / "model_index.json").exists():
        from tools.models import build_tiny

        build_tiny(target)
    if not (target / "taesd" / "config.json").exists():  # a tiny model built before previews existed
        from tools.models import build_tiny_taesd

        build_tiny_taesd(target / "taesd")
    return target


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer):  # type: ignore[no-untyped-def]
    r = redis_server.client()
    r.flushdb()  # our own private server: flushing it is ours to do
    yield r
    r.close()


@pytest.fixture
def r(svc: Service):  # type: ignore[no-untyped-def]
    """The private Redis of a module's `svc` service, flushed before each test (no worker may be mid-job)."""
    client = svc.redis_server.client()  # type: ignore[attr-defined]
    client.flushdb()
    yield client
    client.close()
