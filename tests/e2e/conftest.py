"""The end-to-end stacks: real redis-server, API (`python -m app`) and worker processes (tests/procs.py).

Starting a worker (torch, diffusers, the tiny model, a warm-up run) is the cost of this layer, so every module
that can shares one:

- `shared_stack`: a Redis, one worker and an open (keyless) API, for the whole run. `service` is that stack
  itself; a module whose settings are the API's own (keys, TTLs, limits, another app factory) starts API
  processes of its own on it with `shared_stack.view(...)`.
- `batching_stack`: the same with a micro-batching worker (tests/e2e/test_engine_e2e.py), for one module.
- `webhooks_stack`: a Redis and a worker with the webhook tests' worker setting, no API: tests/e2e/
  test_webhooks_e2e.py starts its API and dispatcher on it (their settings name the module's receiver).
- `idle_stack`: a Redis and an API, no worker: what is submitted stays queued. `idle_service` flushes it before
  each test.

The workers of the first three start as soon as collection ends (where a collected test uses the stack and the
tiny model is built), so they load while the tests before them run (the root conftest orders the end-to-end
layer last). Before every test on one of them, the stack is waited on until nothing is queued or running there:
no test sees work another one left in flight.

tests/e2e/test_storage_s3.py (a worker on S3 storage, whose endpoint is known only once moto runs) starts a stack
of its own, and so does every fault drill that stops, kills or restarts a process or Redis.
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ROOT, Proc, RedisServer, Service

# tools/models.py build-tiny-adapters: beside the tiny model, as `make model` builds it (`tiny_adapters`)
ADAPTERS_DIR = Path(os.environ.get("SDXL_TEST_MODEL_DIR", ROOT / ".models" / "tiny")).resolve() / "adapters"

# The stacks whose worker starts early: fixture name -> the worker's settings (the stack's `extra`: its API
# processes and views get them too).
WORKER_ENV = {
    # progress written at every step: the SSE, CLI and playground tests follow a generation's progress events
    # one by one (the default, 0.25 s, would merge the tiny model's steps into one or two)
    # the tiny test adapters (`tiny_adapters`), with an adapter cache of two: tests/e2e/test_adapters_e2e.py
    # watches it evict
    "shared_stack": {"SDXL_PROGRESS_INTERVAL_SECONDS": "0", "SDXL_ADAPTERS_DIR": str(ADAPTERS_DIR),
                     "SDXL_ADAPTER_CACHE_MAX": "2"},
    "batching_stack": {"SDXL_BATCH_MAX": "4", "SDXL_BATCH_WAIT_MS": "300", "SDXL_PROGRESS_INTERVAL_SECONDS": "0"},
    # the one webhook setting the worker reads: how often a generation may enqueue a progress webhook
    "webhooks_stack": {"SDXL_WEBHOOK_PROGRESS_INTERVAL_SECONDS": "0.2"},
}
WITH_OPEN_API = {"shared_stack", "batching_stack"}  # the others get their API processes from their module

_early: dict[str, tuple[Service, Proc]] = {}  # started when collection ended, not yet taken by the fixture


def _start(model_dir: Path, data_dir: Path, name: str) -> tuple[Service, Proc]:
    """A private Redis and a worker (not waited for) with WORKER_ENV[name]; no API yet."""
    server = RedisServer()
    server.start()
    svc = Service(server.url, model_dir, data_dir, WORKER_ENV[name])
    svc.redis_server = server
    return svc, svc.start_worker(wait_ready=False)


def _stop(svc: Service) -> None:
    try:
        svc.stop()
    finally:
        assert svc.redis_server is not None
        svc.redis_server.stop()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the workers of the stacks the collected tests use: each takes seconds to load."""
    model_dir = Path(os.environ.get("SDXL_TEST_MODEL_DIR", ROOT / ".models" / "tiny"))
    if session.config.option.collectonly or not (model_dir / "base" / "model_index.json").exists():
        return  # the fixtures start them when first used (after `tiny_model` has built the model)
    factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's own, as `tmp_path_factory`
    for name in WORKER_ENV:
        if any(name in getattr(item, "fixturenames", ()) for item in session.items):
            data_dir = factory.mktemp(name) if factory is not None else Path(tempfile.mkdtemp(prefix=f"{name}-"))
            _early[name] = _start(model_dir, data_dir, name)


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _early:  # started early and never used (the run ended first)
        _stop(_early.popitem()[1][0])


def _stack(name: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc, worker = _early.pop(name, None) or _start(tiny_model, tmp_path_factory.mktemp(name), name)
    try:
        if name in WITH_OPEN_API:
            svc.start_api()  # while the worker loads its models, if it still does
        svc.wait_worker_ready(worker.worker_id)  # type: ignore[attr-defined]
        yield svc
    finally:
        _stop(svc)


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model: Path) -> Path:
    """The tiny LoRA adapters and presets the shared stack serves (its registry is read when first used)."""
    if not (ADAPTERS_DIR / "adapters.json").exists():
        from tools.models import build_tiny_adapters

        build_tiny_adapters(ADAPTERS_DIR)
    return ADAPTERS_DIR


@pytest.fixture(scope="session")
def shared_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _stack("shared_stack", tiny_model, tmp_path_factory)


@pytest.fixture(scope="module")
def batching_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _stack("batching_stack", tiny_model, tmp_path_factory)


@pytest.fixture(scope="module")
def webhooks_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _stack("webhooks_stack", tiny_model, tmp_path_factory)


@pytest.fixture(autouse=True)
def _stack_idle(request: pytest.FixtureRequest) -> None:
    """A test on a shared worker stack starts with nothing queued or running there."""
    for name in WORKER_ENV:
        if name in request.fixturenames:
            request.getfixturevalue(name).wait_idle()


@pytest.fixture(scope="module")
def service(shared_stack: Service) -> Iterator[Service]:
    """The shared stack's open API and its worker; API processes a module's tests add stop with the module."""
    before = len(shared_stack.apis)
    yield shared_stack
    added = shared_stack.apis[before:]
    del shared_stack.apis[before:]
    shared_stack.stop(added)


@pytest.fixture(scope="session")
def idle_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    server = RedisServer()
    server.start()
    svc = Service(server.url, tiny_model, tmp_path_factory.mktemp("idle"))
    svc.redis_server = server
    try:
        svc.start_api()
        yield svc
    finally:
        _stop(svc)


@pytest.fixture
def idle_service(idle_stack: Service) -> Iterator[Service]:
    """An API with no worker on a Redis flushed for this test; API processes the test adds stop after it."""
    client = idle_stack.redis_server.client()  # type: ignore[union-attr]
    client.flushdb()
    client.close()
    before = len(idle_stack.apis)
    yield idle_stack
    added = idle_stack.apis[before:]
    del idle_stack.apis[before:]
    idle_stack.stop(added)


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """The test credentials and region (tests/e2e/test_storage_s3.py AWS_ENV) in this process's environment, for
    the modules that talk to moto's S3 server."""
    from tests.e2e.test_storage_s3 import AWS_ENV

    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        yield
