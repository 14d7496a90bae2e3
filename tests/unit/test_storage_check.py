"""The stores' start-up and readiness check (`ObjectStore.check`), and the error codes in storage messages.

LocalStore against a real temporary directory; S3Store's error mapping with botocore's Stubber on its probe
client (every S3 answer the check can meet, including those moto's server gives only with authentication on:
tests/e2e/test_storage_check.py drives that server); the API's cached, single-flight readiness check
(app/routes/health.py StorageReadiness) and the worker's wait for a usable store with small fake stores.
"""

import asyncio
import errno
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from app.routes.health import StorageReadiness
from common.storage import (
    LocalStore,
    StoragePermanentError,
    StorageStatus,
    StorageUnavailable,
    StoredObject,
    check_storage,
    put_with_retry,
)
from common.storage_s3 import S3Store
from tests.e2e.test_storage_s3 import AWS_ENV
from tests.procs import free_port

BUCKET = "sdxl-check-unit"
ENDPOINT = "http://127.0.0.1:9"  # never contacted: the Stubber answers, or nothing listens (connection refused)


# --- LocalStore ------------------------------------------------------------------------------------------


def test_local_check_creates_the_directory_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "images" / "nested"
    store = LocalStore(root)
    store.check()  # raises when the store is not usable
    assert root.is_dir() and list(root.iterdir()) == []  # the test file is removed
    assert check_storage(store).ok and check_storage(store).describe() == "ok"
    assert store.location == f"local directory {root}"


def test_local_check_on_a_file_is_permanent_and_names_the_path(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.write_text("not a directory")
    with pytest.raises(StoragePermanentError, match="EEXIST") as raised:
        LocalStore(root).check()
    assert str(root) in str(raised.value) and raised.value.code == "EEXIST"
    status = check_storage(LocalStore(root))
    assert not status.ok and status.permanent and status.code == "EEXIST" and str(root) in status.describe()


@pytest.mark.parametrize(("code", "permanent"), [(errno.EACCES, True), (errno.EROFS, True), (errno.ENOSPC, False)])
def test_local_check_write_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int,
                                  permanent: bool) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, "refused by the test")

    # the write, not the directory: tests run as root, where chmod would not stop it
    monkeypatch.setattr("common.storage.tempfile.mkstemp", refuse)
    with pytest.raises(StorageUnavailable, match=errno.errorcode[code]) as raised:
        LocalStore(tmp_path).check()
    assert isinstance(raised.value, StoragePermanentError) is permanent
    assert str(tmp_path) in str(raised.value)


# --- S3Store: the error mapping --------------------------------------------------------------------------


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def store(aws: None) -> S3Store:
    return S3Store(BUCKET, endpoint_url=ENDPOINT, addressing_style="path")


@pytest.fixture
def probe(store: S3Store) -> Iterator[Stubber]:
    with Stubber(store.probe) as stub:
        yield stub
        stub.assert_no_pending_responses()


def head_fails(probe: Stubber, status: int) -> None:
    """A HEAD answer has no body: botocore names the error by its status alone."""
    probe.add_client_error("head_bucket", service_error_code=str(status), service_message="Forbidden"
                           if status == 403 else "Not Found", http_status_code=status,
                           expected_params={"Bucket": BUCKET})


def test_a_bucket_that_answers_its_head_is_usable(store: S3Store, probe: Stubber) -> None:
    probe.add_response("head_bucket", {}, {"Bucket": BUCKET})
    store.check()  # raises when the store is not usable
    assert store.location == f"s3 bucket `{BUCKET}` at {ENDPOINT}"


@pytest.mark.parametrize(
    ("head", "code", "message", "hint"),
    [
        (404, "NoSuchBucket", "The specified bucket does not exist", "create the bucket or fix SDXL_S3_BUCKET"),
        (403, "AccessDenied", "Access Denied", "s3:ListBucket"),
        (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.",
         "AWS_ACCESS_KEY_ID"),
        (403, "SignatureDoesNotMatch", "The request signature we calculated does not match", "AWS_SECRET_ACCESS_KEY"),
        (400, "AuthorizationHeaderMalformed", "the region 'us-east-1' is wrong", "SDXL_S3_REGION"),
    ],
)
def test_a_refused_head_is_named_by_a_listing(store: S3Store, probe: Stubber, head: int, code: str, message: str,
                                              hint: str) -> None:
    head_fails(probe, head)
    probe.add_client_error("list_objects_v2", service_error_code=code, service_message=message,
                           http_status_code=head, expected_params={"Bucket": BUCKET, "MaxKeys": 1})
    with pytest.raises(StoragePermanentError) as raised:
        store.check()
    text = str(raised.value)
    assert raised.value.code == code
    assert f"`{BUCKET}`" in text and ENDPOINT in text and f"{code} (HTTP {head})" in text and message in text
    assert hint in text


def test_a_server_error_is_not_permanent(store: S3Store, probe: Stubber) -> None:
    probe.add_client_error("head_bucket", service_error_code="503", http_status_code=503)
    probe.add_client_error("list_objects_v2", service_error_code="SlowDown", service_message="Reduce your rate",
                           http_status_code=503)
    with pytest.raises(StorageUnavailable, match="SlowDown") as raised:
        store.check()
    assert not isinstance(raised.value, StoragePermanentError)
    status = check_storage(store)  # no stub left: botocore raises, and the status says so without raising
    assert not status.ok


def test_a_head_refused_where_a_listing_works_is_usable(store: S3Store, probe: Stubber) -> None:
    head_fails(probe, 403)
    probe.add_response("list_objects_v2", {"KeyCount": 0}, {"Bucket": BUCKET, "MaxKeys": 1})
    store.check()  # raises when the store is not usable


def test_connection_refused_is_transient_and_says_why(aws: None) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StorageUnavailable) as raised:
        S3Store(BUCKET, endpoint_url=dead, addressing_style="path").check()
    assert not isinstance(raised.value, StoragePermanentError)
    text = str(raised.value)
    assert raised.value.code == "EndpointConnectionError" and "Could not connect" in text and dead in text
    assert "SDXL_S3_ENDPOINT_URL" in text


def test_no_credentials_at_all_is_permanent(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoragePermanentError, match="NoCredentialsError") as raised:
        S3Store(BUCKET, endpoint_url=f"http://127.0.0.1:{free_port()}", addressing_style="path").check()
    assert f"`{BUCKET}`" in str(raised.value)


def test_the_probe_client_makes_one_short_attempt(store: S3Store) -> None:
    config = store.probe.meta.config
    assert config.retries["total_max_attempts"] == 1
    assert config.connect_timeout == 2 and config.read_timeout == 5
    assert store.client.meta.config.retries["total_max_attempts"] == 3  # the jobs' client keeps its retries


def test_a_put_to_a_missing_bucket_names_the_bucket_and_is_not_retried(store: S3Store,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    with Stubber(store.client) as stub:
        stub.add_client_error("put_object", service_error_code="NoSuchBucket",
                              service_message="The specified bucket does not exist", http_status_code=404)
        with caplog.at_level(logging.WARNING, logger="common.storage"):
            with pytest.raises(StoragePermanentError) as raised:
                put_with_retry(store, "generations/g/0.png", b"img", "image/png", {}, budget_seconds=10)
    # what a job's `storage_unavailable` message carries (worker/finish.py: "object storage unavailable: ...")
    text = str(raised.value)
    assert "NoSuchBucket (HTTP 404)" in text and f"`{BUCKET}`" in text and ENDPOINT in text
    assert "generations/g/0.png" in text and raised.value.code == "NoSuchBucket"
    assert [r for r in caplog.records if r.name == "common.storage"] == []  # no retry, no retry line


# --- the retry log line names the error --------------------------------------------------------------------


class FailingStore:
    """Fails `put` with the given exceptions in turn, then succeeds."""

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        if self.failures:
            raise self.failures.pop(0)

    def get(self, key: str) -> StoredObject:
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        return 0

    def presigned_url(self, key: str) -> str | None:
        return None

    def check(self) -> None:
        pass

    @property
    def location(self) -> str:
        return "test store"


def test_the_retry_line_names_the_error_code(caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore(StorageUnavailable("s3 put of `k` failed: SlowDown (HTTP 503)", code="SlowDown"),
                         StorageUnavailable("an error without a code"))
    with caplog.at_level(logging.WARNING, logger="common.storage"):
        put_with_retry(store, "k", b"img", "image/png", {}, budget_seconds=10)
    first, second = (r for r in caplog.records if r.name == "common.storage")
    assert "storage put failed for k (attempt 1, SlowDown): s3 put of `k` failed: SlowDown" in first.getMessage()
    assert first.error_code == "SlowDown" and first.attempt == 1  # type: ignore[attr-defined]
    assert "(attempt 2, StorageUnavailable): an error without a code" in second.getMessage()


def test_an_unreachable_endpoint_is_named_in_the_retry_line(aws: None, caplog: pytest.LogCaptureFixture) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = S3Store(BUCKET, endpoint_url=dead, addressing_style="path", max_attempts=1)
    with caplog.at_level(logging.WARNING, logger="common.storage"):
        with pytest.raises(StorageUnavailable) as raised:
            put_with_retry(store, "k/0.png", b"x", "image/png", {}, budget_seconds=0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "common.storage"]
    assert lines and all("EndpointConnectionError" in m and "Could not connect" in m for m in lines)
    assert raised.value.code == "EndpointConnectionError" and "gave up after" in str(raised.value)


# --- the API's readiness check: cached, one at a time, bounded -------------------------------------------


class CheckStore(FailingStore):
    """A store whose `check` answers from a list (None: fine), sleeping `delay` seconds first; counts calls."""

    def __init__(self, *answers: Exception | None, delay: float = 0.0) -> None:
        super().__init__()
        self.answers = list(answers)
        self.delay = delay
        self.calls = 0

    def check(self) -> None:
        self.calls += 1
        time.sleep(self.delay)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer is not None:
            raise answer


def test_readiness_is_cached_then_checked_again() -> None:
    store = CheckStore(StoragePermanentError("NoSuchBucket here", code="NoSuchBucket"), None)
    readiness = StorageReadiness(store, max_age=0.2)  # type: ignore[arg-type]

    async def scenario() -> tuple[StorageStatus, StorageStatus, int, StorageStatus]:
        first = await readiness.refresh()
        cached = await readiness.status()
        calls = store.calls
        await asyncio.sleep(0.25)
        return first, cached, calls, await readiness.status()

    first, cached, calls, later = asyncio.run(scenario())
    assert first.permanent and first.code == "NoSuchBucket" and first.error == "NoSuchBucket here"
    assert cached is first and calls == 1
    assert later.ok and store.calls == 2  # the bucket was fixed: ready again, no restart


def test_concurrent_probes_share_one_check() -> None:
    store = CheckStore(None, delay=0.2)
    readiness = StorageReadiness(store, max_age=10)  # type: ignore[arg-type]

    async def scenario() -> list[StorageStatus]:
        return await asyncio.gather(*(readiness.status() for _ in range(8)))

    answers = asyncio.run(scenario())
    assert store.calls == 1 and all(a.ok for a in answers)


def test_a_slow_check_answers_with_the_previous_result() -> None:
    store = CheckStore(StoragePermanentError("AccessDenied there", code="AccessDenied"), None, delay=0.0)
    readiness = StorageReadiness(store, max_age=0.0, wait=0.05)  # type: ignore[arg-type]

    async def scenario() -> tuple[StorageStatus, StorageStatus, StorageStatus]:
        first = await readiness.refresh()
        store.delay = 0.3  # the next check hangs past `wait`
        during = await readiness.status()
        await asyncio.sleep(0.35)
        return first, during, await readiness.status()

    first, during, after = asyncio.run(scenario())
    assert during is first  # the previous answer, not a hung probe
    assert after.ok


def test_a_slow_first_check_is_reported_but_not_permanent() -> None:
    readiness = StorageReadiness(CheckStore(None, delay=0.3), wait=0.05)  # type: ignore[arg-type]

    async def scenario() -> StorageStatus:
        status = await readiness.status()
        await asyncio.sleep(0.3)  # let the check finish before the loop closes
        return status

    status = asyncio.run(scenario())
    assert not status.ok and not status.permanent and "no answer" in status.describe()


def test_a_check_that_raises_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    readiness = StorageReadiness(CheckStore(RuntimeError("a bug")))  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="app.health"):
        status = asyncio.run(readiness.refresh())
    assert not status.ok and not status.permanent and "RuntimeError" in status.describe()
    assert any(r.getMessage() == "storage check raised" for r in caplog.records)


def test_each_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    broken = StoragePermanentError("s3 bucket `b` is not usable: NoSuchBucket (HTTP 404)", code="NoSuchBucket")
    store = CheckStore(broken, broken, broken, None, None)
    readiness = StorageReadiness(store, max_age=0.0)  # type: ignore[arg-type]

    async def scenario() -> None:
        for _ in range(5):
            await readiness.status()

    with caplog.at_level(logging.INFO, logger="app.health"):
        asyncio.run(scenario())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "app.health"]
    assert store.calls == 5
    assert lines == [
        ("ERROR", "storage check failed: s3 bucket `b` is not usable: NoSuchBucket (HTTP 404); /readyz answers 503 "
                  "until it is fixed (checked again every 0s, no restart needed)"),
        ("INFO", "storage ok: test store (recovered)"),
    ]


# --- the worker waits for a usable store -----------------------------------------------------------------


class FakeRegistry:
    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def update(self, **fields: Any) -> None:
        self.updates.append(fields)


def test_the_worker_waits_for_storage_then_goes_on(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    import worker.__main__ as worker_main

    monkeypatch.setattr(worker_main, "STORAGE_RECHECK_SECONDS", 0.01)
    broken = StoragePermanentError("s3 bucket `b` is not usable: NoSuchBucket (HTTP 404)", code="NoSuchBucket")
    store = CheckStore(broken, broken, None)
    registry = FakeRegistry()
    with caplog.at_level(logging.INFO, logger="worker"):
        worker_main.wait_for_storage(store, registry, state="warming")  # type: ignore[arg-type]
    assert store.calls == 3
    assert registry.updates == [
        {"state": "waiting_for_storage", "storage": str(broken)},
        {"state": "waiting_for_storage", "storage": str(broken)},
        {"state": "warming", "storage": "ok"},
    ]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "worker"]
    assert lines[0] == ("ERROR", f"storage check failed: {broken}; this worker takes no job until it passes "
                                 "(checked again every 0.01s)")
    assert len(lines) == 2 and lines[1][0] == "INFO" and lines[1][1].startswith("storage ok: test store (after")


def test_a_usable_store_does_not_change_the_worker_state() -> None:
    import worker.__main__ as worker_main

    registry = FakeRegistry()
    worker_main.wait_for_storage(CheckStore(None), registry, state="warming")  # type: ignore[arg-type]
    assert registry.updates == [{"storage": "ok"}]
