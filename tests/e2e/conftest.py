"""The end-to-end stacks: real redis-server, API (`python -m app`) and worker processes (tests/procs.py).

Starting a worker (torch, diffusers, the tiny model, a warm-up run) is the cost of this layer, so two stacks
serve every module that can share them; each starts on first use and stops at the end of the run.

- `shared_stack`: a Redis, one worker and an open (keyless) API. `service` is that stack itself; a module whose
  settings are the API's own (keys, TTLs, limits, another app factory) starts its own API processes on it with
  `shared_stack.view(...)`. Before every test that uses it, the stack is waited on until nothing is queued or
  running there, so no test sees work another one left in flight.
- `idle_stack`: a Redis and an API, no worker: what is submitted stays queued. `idle_service` flushes it before
  each test.

A module that changes what the worker does (micro-batching, S3 storage, webhooks and their dispatcher) starts a
stack of its own, and so does every fault drill that stops, kills or restarts a process or Redis.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import RedisServer, Service, running_service

# The shared worker writes progress at every step: the SSE, CLI and playground tests follow a generation's
# progress events one by one (the default, 0.25 s, would merge the tiny model's steps into one or two).
SHARED_WORKER_ENV = {"SDXL_PROGRESS_INTERVAL_SECONDS": "0"}


@pytest.fixture(scope="session")
def shared_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    server = RedisServer()
    server.start()
    try:
        with running_service(server.url, tiny_model, tmp_path_factory.mktemp("shared"), workers=1,
                             env=SHARED_WORKER_ENV) as svc:
            svc.redis_server = server
            yield svc
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _shared_stack_idle(request: pytest.FixtureRequest) -> None:
    """A test on the shared stack starts with nothing queued or running there."""
    if "shared_stack" in request.fixturenames:
        request.getfixturevalue("shared_stack").wait_idle()


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
        svc.stop()
        server.stop()


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
