"""Shared fixtures: the tiny model (built once), a private Redis, a live service."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT, RedisServer, Service, running_service

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The project's own tiny random-weight SDXL (base + refiner) in the hub layout."""
    target = Path(os.environ.get("SDXL_TEST_MODEL_DIR", ROOT / ".models" / "tiny"))
    if not (target / "base" / "model_index.json").exists() or not (target / "refiner" / "model_index.json").exists():
        from tools.models import build_tiny

        build_tiny(target)
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


@pytest.fixture(scope="module")
def service(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API + one worker on a module-private Redis (so modules cannot disturb each other)."""
    server = RedisServer()
    server.start()
    data = tmp_path_factory.mktemp("svc")
    try:
        with running_service(server.url, tiny_model, data, workers=1) as svc:
            svc.redis_server = server  # type: ignore[attr-defined]
            yield svc
    finally:
        server.stop()


@pytest.fixture
def r(svc: Service):  # type: ignore[no-untyped-def]
    """The private Redis of a module's `svc` service, flushed before each test (no worker may be mid-job)."""
    client = svc.redis_server.client()  # type: ignore[attr-defined]
    client.flushdb()
    yield client
    client.close()
