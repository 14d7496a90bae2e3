"""cleanup's upload expiry (cleanup/__main__.py `Cleanup.expire_uploads`): an expired upload's bytes and keys go
once no unfinished generation uses it. Uploads and generations are made through in-process apps, on the real
Redis and a LocalStore in the test's storage dir; the sweep is the cleanup process's own code, called here."""

import io
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import redis
from PIL import Image

from cleanup.__main__ import UPLOAD_RECHECK_SECONDS, Cleanup, CleanupSettings
from common.contract import keys
from common.storage import LocalStore, StorageUnavailable
from tests.procs import RedisServer

OWNER = "open"  # the principal of an app without keys


def png(w: int = 64, h: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def cleanup(redis_client: redis.Redis, redis_server: RedisServer, storage_dir: Path) -> Cleanup:
    settings = CleanupSettings(redis_url=redis_server.url, storage_dir=storage_dir)
    return Cleanup(redis_client, LocalStore(storage_dir), settings)


def make_upload(api: httpx.Client) -> str:
    res = api.post("/v1/image-uploads", content=png(), headers={"content-type": "image/png"})
    assert res.status_code == 201, res.text
    return str(res.json()["id"])


def files_of(storage_dir: Path, upload_id: str) -> list[Path]:
    folder = storage_dir / "uploads" / upload_id
    return sorted(folder.iterdir()) if folder.exists() else []


def wait_expired(r: redis.Redis, upload_id: str) -> None:
    expires = float(r.hget(keys.upload(upload_id), "expires_at") or 0)
    time.sleep(max(0.0, expires - time.time()) + 0.05)


def assert_gone(r: redis.Redis, storage_dir: Path, upload_id: str) -> None:
    assert files_of(storage_dir, upload_id) == []
    assert not r.exists(keys.upload(upload_id), keys.upload_users(upload_id))
    assert r.zscore(keys.owner_uploads(OWNER), upload_id) is None
    assert not r.hexists(keys.owner_upload_bytes(OWNER), upload_id)
    assert r.zscore(keys.UPLOAD_EXPIRY, upload_id) is None


def assert_kept(r: redis.Redis, storage_dir: Path, upload_id: str) -> None:
    assert len(files_of(storage_dir, upload_id)) == 1
    assert r.exists(keys.upload(upload_id))
    assert r.hexists(keys.owner_upload_bytes(OWNER), upload_id)
    assert r.zscore(keys.UPLOAD_EXPIRY, upload_id) is not None


def test_expired_unused_upload_is_deleted(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                          storage_dir: Path, cleanup: Cleanup) -> None:
    short, long = make_api(upload_ttl_seconds=1), make_api()  # two replicas, one Redis, one store
    expiring, live = make_upload(short), make_upload(long)
    assert cleanup.sweep()["uploads_expired"] == 0  # not yet
    assert_kept(r, storage_dir, expiring)
    wait_expired(r, expiring)
    counts = cleanup.sweep()
    assert counts["uploads_expired"] == 1 and counts["errors"] == 0, counts
    assert_gone(r, storage_dir, expiring)
    assert_kept(r, storage_dir, live)
    assert [u["id"] for u in long.get("/v1/image-uploads").json()["data"]] == [live]
    assert cleanup.sweep()["uploads_expired"] == 0  # nothing left to do


def test_expired_upload_used_by_a_queued_generation_survives_until_it_is_final(
        make_api: Callable[..., httpx.Client], r: redis.Redis, storage_dir: Path, cleanup: Cleanup) -> None:
    api = make_api(upload_ttl_seconds=1)
    upload_id = make_upload(api)
    res = api.post("/v1/generations", json={"prompt": "x", "num_inference_steps": 4, "image": upload_id})
    assert res.status_code == 202, res.text
    gen_id = res.json()["id"]
    wait_expired(r, upload_id)
    before = time.time()
    assert cleanup.sweep()["uploads_expired"] == 0
    assert_kept(r, storage_dir, upload_id)  # the worker has yet to read it
    assert (r.zscore(keys.UPLOAD_EXPIRY, upload_id) or 0) >= before + UPLOAD_RECHECK_SECONDS - 1  # looked at later
    assert cleanup.expire_uploads(time.time() + 2 * UPLOAD_RECHECK_SECONDS) == 0  # still queued: still kept
    assert_kept(r, storage_dir, upload_id)

    assert api.post(f"/v1/generations/{gen_id}/cancel").status_code in (200, 202)
    assert api.get(f"/v1/generations/{gen_id}").json()["status"] == "canceled"
    assert cleanup.expire_uploads(time.time() + 3 * UPLOAD_RECHECK_SECONDS) == 1
    assert_gone(r, storage_dir, upload_id)


def test_a_user_without_a_record_does_not_hold_an_upload(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                                          storage_dir: Path, cleanup: Cleanup) -> None:
    """A generation that was purged (its record expired) no longer uses anything."""
    api = make_api(upload_ttl_seconds=1)
    upload_id = make_upload(api)
    r.sadd(keys.upload_users(upload_id), "gen_" + "P" * 22)
    wait_expired(r, upload_id)
    assert cleanup.sweep()["uploads_expired"] == 1
    assert_gone(r, storage_dir, upload_id)


class DownStore(LocalStore):
    def delete_prefix(self, prefix: str) -> int:
        raise StorageUnavailable("the store is down")


def test_storage_down_keeps_the_upload_for_the_next_sweep(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                                          redis_server: RedisServer, storage_dir: Path,
                                                          cleanup: Cleanup) -> None:
    api = make_api(upload_ttl_seconds=1)
    first, second = make_upload(api), make_upload(api)
    wait_expired(r, second)
    down = Cleanup(r, DownStore(storage_dir), cleanup.settings)
    counts = down.sweep()
    assert counts["uploads_expired"] == 0 and counts["errors"] == 0, counts  # not an error: retried next time
    assert_kept(r, storage_dir, first)
    assert_kept(r, storage_dir, second)
    assert cleanup.sweep()["uploads_expired"] == 2  # the store is back
    assert_gone(r, storage_dir, first)
    assert_gone(r, storage_dir, second)


def test_a_record_that_says_later_is_rescheduled(make_api: Callable[..., httpx.Client], r: redis.Redis,
                                                 storage_dir: Path, cleanup: Cleanup) -> None:
    api = make_api()
    upload_id = make_upload(api)
    expires = float(r.hget(keys.upload(upload_id), "expires_at") or 0)
    r.zadd(keys.UPLOAD_EXPIRY, {upload_id: time.time() - 10})  # an index entry older than the record
    assert cleanup.sweep()["uploads_expired"] == 0
    assert_kept(r, storage_dir, upload_id)
    assert r.zscore(keys.UPLOAD_EXPIRY, upload_id) == pytest.approx(expires)
    assert api.get(f"/v1/image-uploads/{upload_id}").status_code == 200


def test_an_empty_sweep_logs_at_debug(make_api: Callable[..., httpx.Client], r: redis.Redis, cleanup: Cleanup,
                                      caplog: pytest.LogCaptureFixture) -> None:
    """`make run` runs cleanup: a line a minute saying nothing happened was noise; a sweep that did something
    is still INFO."""
    caplog.set_level("DEBUG", logger="cleanup")
    cleanup.sweep()
    assert [r.levelname for r in caplog.records if r.getMessage() == "cleanup sweep"] == ["DEBUG"]
    caplog.clear()
    upload = make_upload(make_api(upload_ttl_seconds=1))
    wait_expired(r, upload)
    assert cleanup.sweep()["uploads_expired"] == 1
    assert [r.levelname for r in caplog.records if r.getMessage() == "cleanup sweep"] == ["INFO"]
