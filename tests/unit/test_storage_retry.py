"""common.storage.put_with_retry: transient failures are retried within a time budget, permanent ones never.

Unit tests run against a small fake store; the S3 tests run against moto's S3 server on loopback (a real HTTP
endpoint) and a stub HTTP server that answers every request with one S3 error.
"""

import errno
import logging
import re
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from common.storage import (
    LocalStore,
    ObjectNotFound,
    StoragePermanentError,
    StorageUnavailable,
    StoredObject,
    get_with_retry,
    put_with_retry,
)
from common.storage_s3 import S3Store
from tests.e2e.test_storage_s3 import AWS_ENV, BUCKET, Moto, _ErrorHandler, s3
from tests.procs import free_port

KEY = "generations/gen_x/0.png"
META = {"sha256": "abc", "generation-id": "gen_x"}


class FakeStore:
    """Fails `put` with the given exceptions in turn, then succeeds; counts the calls."""

    def __init__(self, *failures: Exception, always: Exception | None = None) -> None:
        self.failures = list(failures)
        self.always = always
        self.calls = 0
        self.stored: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        self.calls += 1
        if self.always is not None:
            raise self.always
        if self.failures:
            raise self.failures.pop(0)
        self.stored[key] = data

    def get(self, key: str) -> StoredObject:
        return StoredObject(self.stored[key], "image/png")

    def delete_prefix(self, prefix: str) -> int:
        return 0

    def presigned_url(self, key: str) -> str | None:
        return None


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "common.storage" and r.levelno == logging.WARNING]


# --- a fake store ----------------------------------------------------------------------------------------


def test_transient_failures_then_success(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(StorageUnavailable("SlowDown (HTTP 503)"), StorageUnavailable("ConnectionClosedError"))
    with caplog.at_level(logging.WARNING, logger="common.storage"):
        put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=10)
    assert store.calls == 3 and store.stored == {KEY: b"img"}
    warnings = retry_warnings(caplog)
    assert len(warnings) == 2  # one per retry, each saying why
    assert "SlowDown (HTTP 503)" in warnings[0].getMessage() and KEY in warnings[0].getMessage()
    assert "ConnectionClosedError" in warnings[1].getMessage()
    assert all(f"storage put failed for {KEY}" in w.getMessage() for w in warnings)  # the worker's log line
    # exponential with jitter: 0.1-0.2 s, then 0.2-0.4 s (as logged, rounded to 10 ms)
    first, second = (float(re.findall(r"retrying in ([0-9.]+)s", w.getMessage())[0]) for w in warnings)
    assert 0.1 <= first <= 0.2 and 0.2 <= second <= 0.4


@pytest.mark.parametrize(
    "exc",
    [
        StoragePermanentError("s3 put of `k` failed: NoSuchBucket (HTTP 404)"),
        StoragePermanentError("s3 put of `k` failed: AccessDenied (HTTP 403)"),
    ],
)
def test_permanent_error_is_raised_at_once(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(always=exc)
    with caplog.at_level(logging.WARNING, logger="common.storage"):
        with pytest.raises(StoragePermanentError) as raised:
            put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=10)
    assert raised.value is exc
    assert store.calls == 1
    assert retry_warnings(caplog) == []


def test_permanent_error_after_transient_ones_stops_the_retries() -> None:
    store = FakeStore(StorageUnavailable("InternalError (HTTP 500)"), StoragePermanentError("AccessDenied (HTTP 403)"))
    with pytest.raises(StoragePermanentError, match="AccessDenied"):
        put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=10)
    assert store.calls == 2


def test_budget_spent_raises_storage_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(always=StorageUnavailable("s3 put of `k` failed: EndpointConnectionError"))
    with caplog.at_level(logging.WARNING, logger="common.storage"):
        with pytest.raises(StorageUnavailable) as raised:
            put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=0.5)
    assert not isinstance(raised.value, StoragePermanentError)
    assert "EndpointConnectionError" in str(raised.value) and "gave up after" in str(raised.value)
    assert store.calls >= 2  # 0.1-0.2 s, then 0.2-0.4 s fit some of it; never a wait past the budget
    assert len(retry_warnings(caplog)) == store.calls - 1


def test_zero_budget_is_one_attempt() -> None:
    store = FakeStore(always=StorageUnavailable("down"))
    with pytest.raises(StorageUnavailable, match="down"):
        put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=0)
    assert store.calls == 1


def test_other_exceptions_are_not_retried() -> None:
    store = FakeStore(always=ValueError("a bug, not an outage"))
    with pytest.raises(ValueError, match="a bug"):
        put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=10)
    assert store.calls == 1


# --- LocalStore ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "permanent"),
    [(errno.EROFS, True), (errno.EACCES, True), (errno.EPERM, True), (errno.ENOSPC, False), (errno.EIO, False)],
)
def test_local_store_permission_and_read_only_errors_are_permanent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, permanent: bool
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, "refused by the test")

    # the file write, not directory creation: tests run as root, where chmod would not stop a write
    monkeypatch.setattr("common.storage.tempfile.mkstemp", refuse)
    store = LocalStore(tmp_path)
    with pytest.raises(StorageUnavailable, match=errno.errorcode[code]) as raised:
        store.put(KEY, b"img", "image/png", META)
    assert isinstance(raised.value, StoragePermanentError) is permanent


# --- S3 --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws() -> Iterator[None]:
    """Test credentials, and never the machine's AWS files or the instance metadata address."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in AWS_ENV.items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="module")
def moto_s3(aws: None) -> Iterator[Moto]:
    server = Moto()
    server.start()
    s3(server).create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        server.stop()


class CountingStore:
    """Counts `put` calls on a real store, and the HTTP requests its client sends."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.calls = 0
        self.requests = 0
        store.client.meta.events.register("before-send.s3.PutObject", self._sent)

    def _sent(self, **kwargs: Any) -> None:
        self.requests += 1

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        self.calls += 1
        self.store.put(key, data, content_type, metadata)

    def get(self, key: str) -> StoredObject:
        return self.store.get(key)

    def delete_prefix(self, prefix: str) -> int:
        return self.store.delete_prefix(prefix)

    def presigned_url(self, key: str) -> str | None:
        return self.store.presigned_url(key)


def test_s3_missing_bucket_is_permanent_and_not_retried(moto_s3: Moto, caplog: pytest.LogCaptureFixture) -> None:
    budget = 10.0
    store = CountingStore(S3Store("sdxl-no-such-bucket", endpoint_url=moto_s3.url, addressing_style="path"))
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="common.storage"):
        with pytest.raises(StoragePermanentError, match="NoSuchBucket") as raised:
            put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=budget)
    elapsed = time.monotonic() - t0
    assert store.calls == 1 and store.requests == 1  # neither put_with_retry nor botocore retried it
    assert "HTTP 404" in str(raised.value)
    assert retry_warnings(caplog) == []
    assert elapsed < budget / 2  # well under the budget


def test_s3_existing_bucket_puts_on_the_first_attempt(moto_s3: Moto) -> None:
    store = CountingStore(S3Store(BUCKET, endpoint_url=moto_s3.url, addressing_style="path"))
    put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=0.5)
    assert store.calls == 1 and store.get(KEY).data == b"img"


def test_s3_unreachable_endpoint_is_retried_until_the_budget(aws: None) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = CountingStore(S3Store(BUCKET, endpoint_url=dead, addressing_style="path", max_attempts=1))
    with pytest.raises(StorageUnavailable, match="EndpointConnectionError") as raised:
        put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=1.5)  # room for a slow first call
    assert not isinstance(raised.value, StoragePermanentError)
    assert store.calls >= 2


@pytest.mark.parametrize(
    ("status", "code", "permanent"),
    [
        (403, "AccessDenied", True),
        (403, "InvalidAccessKeyId", True),
        (403, "SignatureDoesNotMatch", True),
        (404, "NoSuchBucket", True),
        (503, "SlowDown", False),
        (500, "InternalError", False),
    ],
)
def test_s3_error_codes(aws: None, status: int, code: str, permanent: bool) -> None:
    """A stub endpoint answering every request with one S3 error: the permanent codes get exactly one request."""
    seen: list[str] = []

    class Handler(_ErrorHandler):  # HTTP/1.1, as _ErrorHandler: no second's wait on `Expect: 100-continue`
        def _answer(self) -> None:
            seen.append(self.command)
            super()._answer()

        do_GET = do_PUT = do_DELETE = do_HEAD = _answer

    Handler.status, Handler.code = status, code
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown() within 50 ms
    try:
        # botocore's own retries (standard mode, 3 attempts) stay on, as in production, for the permanent codes;
        # the transient ones get one attempt per call so the test does not wait out botocore's backoff
        attempts = 3 if permanent else 1
        endpoint = f"http://127.0.0.1:{server.server_port}"
        store = CountingStore(S3Store(BUCKET, endpoint_url=endpoint, addressing_style="path", max_attempts=attempts))
        expected = StoragePermanentError if permanent else StorageUnavailable
        with pytest.raises(expected, match=code) as raised:
            put_with_retry(store, KEY, b"img", "image/png", META, budget_seconds=1.5)
        assert isinstance(raised.value, StoragePermanentError) is permanent
        if permanent:
            assert store.calls == 1 and seen == ["PUT"]
        else:
            assert store.calls >= 2 and len(seen) == store.calls
    finally:
        server.shutdown()
        server.server_close()


class FlakyReads(FakeStore):
    """Fails `get` with the given exceptions in turn, then reads what was stored."""

    def get(self, key: str) -> StoredObject:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return super().get(key)


def test_input_reads_are_retried_like_puts(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyReads(StorageUnavailable("blip"), StorageUnavailable("blip"))
    store.stored["uploads/u/image.png"] = b"png"
    obj = get_with_retry(store, "uploads/u/image.png", budget_seconds=5)
    assert obj.data == b"png" and store.calls == 3
    assert [r.getMessage().split(" (")[0] for r in retry_warnings(caplog)] == ["storage get failed for "
                                                                               "uploads/u/image.png"] * 2


def test_a_missing_input_is_not_retried() -> None:
    store = FlakyReads(ObjectNotFound("uploads/gone/image.png"), ObjectNotFound("again"))
    with pytest.raises(ObjectNotFound):
        get_with_retry(store, "uploads/gone/image.png", budget_seconds=5)
    assert store.calls == 1  # a deleted upload stays deleted: the job fails `input_missing` at once
