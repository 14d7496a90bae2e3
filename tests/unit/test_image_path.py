"""The two hot API paths of one generation: POST with `Prefer: wait` and the image download.

LocalStore checks keys by string logic (no per-call `Path.resolve`) and writes no `.type` sidecar; the image
download reads three record fields (HMGET) and a local file without a thread hop; the POST's wait starts
reading events at once yet answers the current state on a timeout. Real Redis (tests/conftest.py)."""

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis

import app.generations as generations_module
from app.auth import OPEN, Principal
from app.errors import Problem
from app.generations import GenerationService
from app.main import create_app
from app.schemas import GenerationCreate
from app.settings import Settings
from common.contract import keys
from common.contract.records import encode
from common.storage import LocalStore, ObjectNotFound, StoredObject, reads_inline
from common.storage_s3 import S3Store
from tests.procs import RedisServer

GEN_ID = "gen_" + "A" * 22
KEY = f"generations/{GEN_ID}/0.png"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64


@pytest.fixture(autouse=True)
def _no_leaked_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings read SDXL_* from the environment: keep a developer's own out of these tests."""
    for name in [n for n in os.environ if n.startswith("SDXL_")]:
        monkeypatch.delenv(name)
    yield


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStore:
    """A LocalStore whose operations may not resolve paths once it is built (a syscall per component)."""
    built = LocalStore(tmp_path / "store")

    def no_resolve(self: Path, strict: bool = False) -> Path:
        raise AssertionError(f"Path.resolve({self}) called after construction")

    monkeypatch.setattr(Path, "resolve", no_resolve)
    return built


def sidecars(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".type")]


# --- LocalStore -------------------------------------------------------------------------------------------


def test_keys_outside_the_root_are_refused_without_resolving(store: LocalStore, tmp_path: Path) -> None:
    sibling = f"../{store.root.name}-evil/x"  # shares the root's name as a string prefix
    for key in ("../x", "/etc/passwd", "a/../../x", sibling, "a/../../../etc/passwd"):
        with pytest.raises(ObjectNotFound):
            store.get(key)
        with pytest.raises(ObjectNotFound):
            store.put(key, b"x", "image/png", {})
        with pytest.raises(ObjectNotFound):
            store.delete_prefix(key + "/")
    assert not (tmp_path / "x").exists() and not (tmp_path / f"{store.root.name}-evil").exists()
    # `..` that stays inside the root is only a spelling
    store.put("a/../b/0.png", b"inside", "image/png", {})
    assert store.get("b/0.png").data == b"inside"


@pytest.mark.parametrize(("ext", "ctype"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
def test_put_then_get_round_trips_without_a_sidecar(store: LocalStore, ext: str, ctype: str) -> None:
    key = f"generations/{GEN_ID}/1.{ext}"
    store.put(key, PNG, ctype, {"sha256": "unused"})
    assert store.get(key) == StoredObject(data=PNG, content_type=ctype)
    assert sidecars(store.root) == []  # the extension names the type: no extra file per image
    store.put(key, b"", ctype, {})  # a re-run overwrites; an empty object is still an object
    assert store.get(key) == StoredObject(data=b"", content_type=ctype)
    with pytest.raises(ObjectNotFound):
        store.get(f"generations/{GEN_ID}/9.{ext}")


def test_a_key_without_an_image_extension_reads_as_octet_stream(store: LocalStore) -> None:
    """The extension names the type; nothing else is kept next to the file."""
    store.put(f"generations/{GEN_ID}/3.bin", b"x", "image/gif", {})
    assert store.get(f"generations/{GEN_ID}/3.bin") == StoredObject(b"x", "application/octet-stream")
    assert sidecars(store.root) == []
    assert store.delete_prefix(f"generations/{GEN_ID}/") == 1
    assert store.delete_prefix(f"generations/{GEN_ID}/") == 0


def test_only_local_stores_read_inline() -> None:
    assert reads_inline(LocalStore(Path("unused"))) is True
    assert reads_inline(S3Store.__new__(S3Store)) is False  # no attribute: the thread pool, as before
    assert reads_inline(object()) is False


# --- GenerationService ------------------------------------------------------------------------------------


class CommandLog:
    """Names of the commands the async client sends, in order."""

    def __init__(self, ar: aredis.Redis) -> None:
        self.names: list[str] = []
        inner = ar.execute_command

        async def counted(*args: Any, **options: Any) -> Any:
            self.names.append(str(args[0]).upper())
            return await inner(*args, **options)

        ar.execute_command = counted  # type: ignore[method-assign]

    def clear(self) -> None:
        self.names.clear()


def settings_for(server: RedisServer, tmp_path: Path) -> Settings:
    return Settings(redis_url=server.url, refiner_model=None, storage_dir=tmp_path / "store",
                    public_base_url="http://api.test")


def write_record(r: Any, owner: str = OPEN.owner, expires_at: float | None = None, **fields: Any) -> None:
    rec = {"id": GEN_ID, "owner": owner, "status": "succeeded", "created_at": time.time(),
           "expires_at": expires_at if expires_at is not None else time.time() + 3600,
           "images": [{"index": 0, "key": KEY, "content_type": "image/png", "bytes": len(PNG)}], **fields}
    r.hset(keys.generation(GEN_ID), mapping=encode(rec))


def run(scenario: Callable[[GenerationService, CommandLog], Awaitable[None]], server: RedisServer, r: Any,
        tmp_path: Path, store: Any = None) -> None:
    async def main() -> None:
        ar = aredis.Redis.from_url(server.url)
        settings = settings_for(server, tmp_path)
        svc = GenerationService(r, ar, settings, store if store is not None else LocalStore(settings.storage_dir))
        try:
            await scenario(svc, CommandLog(ar))
        finally:
            await ar.aclose()

    asyncio.run(main())


async def problem_of(call: Awaitable[Any]) -> tuple[int, str, str]:
    with pytest.raises(Problem) as info:
        await call
    return info.value.status, info.value.kind, info.value.detail


def test_image_reads_three_fields_with_the_same_404s(
        redis_server: RedisServer, redis_client: Any, tmp_path: Path) -> None:
    other = Principal(owner="someone-else", name="other")

    async def scenario(svc: GenerationService, log: CommandLog) -> None:
        svc.store.put(KEY, PNG, "image/png", {})
        write_record(redis_client, progress={"stage": "done"}, params={"prompt": "p" * 5000})
        log.clear()
        assert await svc.image(GEN_ID, 0, OPEN) == (PNG, "image/png")
        assert log.names == ["HMGET"]  # no HGETALL of the whole record, prompt and all

        missing = (404, "generation-not-found", f"generation `{GEN_ID}` does not exist")
        assert await problem_of(svc.image(GEN_ID, 0, other)) == missing  # never reveals another key's work
        assert await problem_of(svc.image(GEN_ID, 1, OPEN)) == (
            404, "image-not-found", f"generation `{GEN_ID}` has no image 1")
        bad = "not-an-id"
        assert await problem_of(svc.image(bad, 0, OPEN)) == (
            404, "generation-not-found", f"generation `{bad}` does not exist")
        write_record(redis_client, expires_at=time.time() - 1)
        assert await problem_of(svc.image(GEN_ID, 0, OPEN)) == missing
        assert await problem_of(svc.record(GEN_ID, OPEN)) == missing  # the full read says the same
        redis_client.delete(keys.generation(GEN_ID))
        assert await problem_of(svc.image(GEN_ID, 0, OPEN)) == missing
        write_record(redis_client, images=None)  # succeeded without images: no index to serve
        assert await problem_of(svc.image(GEN_ID, 0, OPEN)) == (
            404, "image-not-found", f"generation `{GEN_ID}` has no image 0")
        write_record(redis_client)
        (tmp_path / "store" / KEY).unlink()
        assert await problem_of(svc.image(GEN_ID, 0, OPEN)) == (
            404, "image-not-found", f"image 0 of `{GEN_ID}` is gone from storage")

    run(scenario, redis_server, redis_client, tmp_path)


class RemoteStore:
    """A store as S3Store is to the service: no `reads_inline`, so its reads must leave the event loop."""

    def __init__(self, inner: LocalStore) -> None:
        self.inner = inner

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        self.inner.put(key, data, content_type, metadata)

    def get(self, key: str) -> StoredObject:
        return self.inner.get(key)

    def delete_prefix(self, prefix: str) -> int:
        return self.inner.delete_prefix(prefix)

    def presigned_url(self, key: str) -> str | None:
        return None


def test_local_reads_skip_the_thread_pool_and_remote_ones_use_it(
        redis_server: RedisServer, redis_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hops: list[Any] = []

    async def recording_pool(func: Callable[..., Any], *args: Any) -> Any:
        hops.append(func)
        return func(*args)

    async def scenario(svc: GenerationService, log: CommandLog) -> None:
        svc.store.put(KEY, PNG, "image/png", {})
        write_record(redis_client)
        assert await svc.image(GEN_ID, 0, OPEN) == (PNG, "image/png")

    monkeypatch.setattr(generations_module, "run_in_threadpool", recording_pool)
    run(scenario, redis_server, redis_client, tmp_path)
    assert hops == []  # LocalStore: read on the loop
    monkeypatch.setattr(generations_module, "INLINE_READ_MAX_BYTES", len(PNG) - 1)
    run(scenario, redis_server, redis_client, tmp_path)
    assert len(hops) == 1  # a local file over the inline size: the thread pool, the loop stays free
    hops.clear()
    monkeypatch.setattr(generations_module, "INLINE_READ_MAX_BYTES", len(PNG))
    remote = RemoteStore(LocalStore(tmp_path / "store"))
    run(scenario, redis_server, redis_client, tmp_path, store=remote)
    assert hops == [remote.get]


def test_wait_from_a_create_answers_the_current_state_on_timeout(
        redis_server: RedisServer, redis_client: Any, tmp_path: Path) -> None:
    async def scenario(svc: GenerationService, log: CommandLog) -> None:
        req = GenerationCreate.model_validate({"prompt": "a quiet harbour", "width": 128, "height": 128})
        created = await svc.create(req, OPEN, None)
        assert created["status"] == "queued"
        # a worker takes it without an event reaching the stream (the wait must not answer "queued")
        redis_client.hset(keys.generation(created["id"]), mapping={"status": "running", "started_at": time.time()})
        log.clear()
        t0 = time.monotonic()
        answer = await svc.wait(created["id"], OPEN, 1, created=created)
        assert 0.9 < time.monotonic() - t0 < 5
        assert answer["status"] == "running" and answer["started_at"]
        assert log.names[0] == "XREAD" and "HGETALL" in log.names  # events first, the record for the answer

        # deleted meanwhile: the POST answers what it created rather than a 404
        redis_client.delete(keys.generation(created["id"]))
        assert await svc.wait(created["id"], OPEN, 1, created=created) == created

        # a GET's wait still reads (and checks) the record before anything else
        log.clear()
        with pytest.raises(Problem) as info:
            await svc.wait(created["id"], OPEN, 1)
        assert info.value.status == 404 and log.names == ["HGETALL"]

    run(scenario, redis_server, redis_client, tmp_path)


def test_post_with_prefer_wait_reads_events_before_the_record(
        redis_server: RedisServer, redis_client: Any, tmp_path: Path) -> None:
    async def main() -> None:
        app = create_app(settings_for(redis_server, tmp_path))
        async with app.router.lifespan_context(app):
            log = CommandLog(app.state.service.ar)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
                res = await c.post("/v1/generations", headers={"Prefer": "wait=1"},
                                   json={"prompt": "a slow one", "width": 128, "height": 128})
        assert res.status_code == 202, res.text  # no worker: the wait times out
        assert "Preference-Applied" not in res.headers
        body = res.json()
        assert body["status"] == "queued" and body["queue_position"] is not None
        first_xread = log.names.index("XREAD")
        assert "HGETALL" not in log.names[:first_xread], log.names
        stored = redis_client.hgetall(keys.generation(body["id"]))
        assert json.loads(stored[b"params"])["prompt"] == "a slow one"

    asyncio.run(main())

