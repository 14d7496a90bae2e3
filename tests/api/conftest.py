"""In-process API tests: apps built by `create_app(Settings(...))`, run with their lifespan, on the session's
private Redis (tests/conftest.py `redis_server`, flushed before each test), the tiny model's tokenizers and a
temporary storage dir. No uvicorn and no worker: what a test submits stays queued unless it writes the records.

`api` is an `httpx.Client` bound to a default app through `httpx.ASGITransport`; `make_api(**settings)` builds
another one (API keys, CORS origins, limits...), as many as a test needs (replicas on one Redis). The apps and
their clients run on one event loop in a background thread (an anyio blocking portal), so tests stay plain
functions and the apps' background tasks (the worker-registry watch) run while a test sleeps.
"""

import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
import redis
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from app.main import create_app
from app.settings import Settings
from common.contract import keys
from common.contract.records import encode
from common.storage import LocalStore, image_key
from tests.procs import RedisServer

BASE_URL = "http://test"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # a stand-in image: served as stored, never decoded


class ApiClient(httpx.Client):
    """An httpx.Client on an in-process app; `app` and `settings` are that app's."""

    app: FastAPI
    settings: Settings


class _AsyncBody(httpx.AsyncByteStream):
    """A sync request body (an iterator of chunks) handed to ASGITransport, which reads bodies asynchronously."""

    def __init__(self, stream: httpx.SyncByteStream) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.stream:
            yield chunk


class PortalTransport(httpx.BaseTransport):
    """A sync transport that sends each request through `httpx.ASGITransport` on the portal's event loop."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, app: Any) -> None:
        self.portal = portal
        self.asgi = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.portal.call(self._send, request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.AsyncByteStream):
            assert isinstance(request.stream, httpx.SyncByteStream)
            request.stream = _AsyncBody(request.stream)
        response = await self.asgi.handle_async_request(request)
        body = await response.aread()  # ASGITransport has the whole answer once the app has sent it
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(body),
                              extensions=response.extensions, request=request)


def api_settings(redis_url: str, model_dir: Path, storage_dir: Path, **overrides: Any) -> Settings:
    """What tests/procs.py base_env gives an API process, as Settings, plus a test's own."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "base_model": str(model_dir / "base"),
        "refiner_model": str(model_dir / "refiner"),
        "storage_dir": storage_dir,
        "lease_seconds": 5,
        **overrides,
    }
    return Settings(**values)


async def lifespan_of(app: FastAPI) -> LifespanManager:
    """The manager that runs the app's lifespan as uvicorn would (it must be made on the loop it runs on)."""
    return LifespanManager(app, startup_timeout=30, shutdown_timeout=30)


@pytest.fixture(scope="session")
def portal() -> Iterator[anyio.from_thread.BlockingPortal]:
    """The event loop every in-process app and its requests run on (a thread of its own)."""
    with anyio.from_thread.start_blocking_portal() as p:
        yield p


@pytest.fixture(autouse=True)
def _clean(redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Before each test: the private Redis flushed (`redis_client` does it), and no SDXL_* from the environment
    in Settings (as base_env keeps a developer's own out of the API processes)."""
    for name in [n for n in os.environ if n.startswith("SDXL_")]:
        monkeypatch.delenv(name)
    yield


@pytest.fixture
def r(redis_client: redis.Redis) -> redis.Redis:
    """The private Redis the apps use (flushed before the test)."""
    return redis_client


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    return tmp_path / "images"


@pytest.fixture
def make_api(portal: anyio.from_thread.BlockingPortal, redis_server: RedisServer, tiny_model: Path,
             storage_dir: Path) -> Iterator[Callable[..., ApiClient]]:
    """`make_api(**settings)`: a started app with these Settings over the defaults, and a client on it; all of
    them stop when the test ends. `redis_url=` points one elsewhere (a server the test may stop)."""
    with ExitStack() as stack:

        def make(**overrides: Any) -> ApiClient:
            settings = api_settings(overrides.pop("redis_url", redis_server.url), tiny_model, storage_dir,
                                    **overrides)
            app = create_app(settings)
            lifespan = portal.call(lifespan_of, app)
            stack.enter_context(portal.wrap_async_context_manager(lifespan))
            client = stack.enter_context(ApiClient(transport=PortalTransport(portal, lifespan.app), base_url=BASE_URL))
            client.app, client.settings = app, settings
            return client

        yield make


@pytest.fixture
def api(make_api: Callable[..., ApiClient]) -> ApiClient:
    """A client on an app with the default settings (open mode on loopback, refiner configured)."""
    return make_api()


@pytest.fixture
def succeed(r: redis.Redis, storage_dir: Path) -> Callable[[str], None]:
    """`succeed(gen_id)`: the record and image a worker leaves for a finished one-image generation, written
    (status `succeeded`, one PNG in the local store) where no worker runs."""

    def write(gen_id: str) -> None:
        key = image_key("generations/", gen_id, 0, "png")
        LocalStore(storage_dir).put(key, PNG, "image/png", {"generation-id": gen_id})
        now = time.time()
        fields: dict[Any, Any] = encode({
            "status": "succeeded", "started_at": now, "finished_at": now, "worker_id": "w-written",
            "images": [{"index": 0, "seed": 1, "width": 128, "height": 128, "content_type": "image/png",
                        "bytes": len(PNG), "sha256": hashlib.sha256(PNG).hexdigest(), "key": key}],
            "progress": {"step": 4, "total_steps": 4, "stage": "done", "eta_seconds": 0},
        })
        r.hset(keys.generation(gen_id), mapping=fields)

    return write
