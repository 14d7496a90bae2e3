"""Object stores. Keys derive from the generation id and image index, so a re-run overwrites.

Used by the worker (put) and the API (get, delete, presign); imports no torch.
"""

import errno
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential,
    wait_random_exponential,
)

log = logging.getLogger("common.storage")


class StorageUnavailable(Exception):
    """The store could not be reached or refused the operation; callers may retry.

    `code` is the store's own name for the failure (`NoSuchBucket`, `SlowDown`, `EndpointConnectionError`,
    `EACCES`...), for log fields and the retry log line; the message says it too, with the bucket or directory.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class StoragePermanentError(StorageUnavailable):
    """The store refused in a way no retry can fix (missing bucket, bad credentials, no permission).

    A subclass, so every `except StorageUnavailable` still catches it; `put_with_retry` raises it at once.
    """


class ObjectNotFound(Exception):
    pass


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    content_type: str


def image_key(prefix: str, gen_id: str, index: int, ext: str) -> str:
    return f"{prefix}{gen_id}/{index}.{ext}"


def generation_prefix(prefix: str, gen_id: str) -> str:
    return f"{prefix}{gen_id}/"


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None: ...

    def get(self, key: str) -> StoredObject: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def presigned_url(self, key: str) -> str | None:
        """A time-limited GET URL, or None when the backend cannot make one."""
        ...

    def check(self) -> None:
        """Whether the store is usable, with one cheap request (S3: a HEAD on the bucket; local: a test write).

        Returns None when it is; raises StoragePermanentError for what an operator must fix (missing bucket,
        refused or unknown credentials, no permission, read-only directory) and StorageUnavailable for what
        may clear by itself (connection refused, timeouts, 5xx). The message names the bucket or directory,
        the endpoint and the error code. The API's /readyz and the worker's start run it.
        """
        ...

    @property
    def location(self) -> str:
        """Where the objects go, for log lines: `s3 bucket `b` at <endpoint>`, `local directory <path>`."""
        ...


# LocalStore keeps no content type: a key's extension names it (`image_key` ends in the output format's)
EXTENSION_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def extension_type(key: str) -> str | None:
    """The content type a key's extension names, or None when the extension is not one of ours."""
    _, dot, ext = key.rpartition(".")
    return EXTENSION_TYPES.get(ext.lower()) if dot and "/" not in ext else None


def reads_inline(store: object) -> bool:
    """Whether `store.get` is a cheap local read an event loop may run itself (no thread hop); default no."""
    return bool(getattr(store, "reads_inline", False))


class LocalStore:
    """Files under a root directory; the embedded default for one machine."""

    # a page-cache read of one image costs less than handing it to a thread (app.generations.image)
    reads_inline: ClassVar[bool] = True

    def __init__(self, root: Path) -> None:
        self.root = root
        # resolved once: every key is then checked by string logic, not an lstat per path component
        self._root = os.path.realpath(root)
        self._root_prefix = self._root if self._root.endswith(os.sep) else self._root + os.sep

    def _file(self, key: str) -> str:
        """The file for `key`; ObjectNotFound when it would lie outside the root (`..`, absolute keys)."""
        path = os.path.normpath(os.path.join(self._root, key))
        if path != self._root and not path.startswith(self._root_prefix):
            raise ObjectNotFound(key)
        return path

    def _path(self, key: str) -> Path:
        return Path(self._file(key))

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        path = self._file(key)
        try:
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            # write-then-rename: a reader never sees half an image, a crash leaves no partial file
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:  # full disk, read-only mount, permissions
            raise _local_error(f"local store write failed for {key}", exc) from exc

    def get(self, key: str) -> StoredObject:
        path = self._file(key)
        try:
            data = _read_file(path)
            ctype = extension_type(key) or "application/octet-stream"
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise _local_error(f"local store read failed for {key}", exc) from exc
        return StoredObject(data=data, content_type=ctype)

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix.rstrip("/"))
        if not path.exists():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file())
        shutil.rmtree(path, ignore_errors=True)
        return count

    def presigned_url(self, key: str) -> str | None:
        return None

    @property
    def location(self) -> str:
        return f"local directory {self._root}"

    def check(self) -> None:
        """The root exists (created when missing, as `put` would) and takes a file: a test file is written
        and removed, so a read-only mount or a directory owned by another user shows here, not at a job's end."""
        try:
            os.makedirs(self._root, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._root, prefix=".check-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as exc:
            raise _local_error(f"local store directory {self._root} is not writable", exc) from exc


# no permission, a read-only filesystem, a file where a directory must be: an operator has to fix the mount or
# the path; a full disk (ENOSPC) or an I/O error may clear
LOCAL_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST}


def _local_error(what: str, exc: OSError) -> StorageUnavailable:
    code = errno.errorcode.get(exc.errno or 0, "OSError")
    cls = StoragePermanentError if exc.errno in LOCAL_PERMANENT_ERRNOS else StorageUnavailable
    return cls(f"{what}: {code} ({exc.strerror or exc})", code=code)


def _read_file(path: str) -> bytes:
    """Unbuffered: FileIO.readall sizes its buffer from fstat, without the buffered layer's isatty probe."""
    with open(path, "rb", buffering=0) as f:
        return f.readall()


MAX_RETRY_DELAY = 5.0  # seconds between two attempts at most


def error_code(exc: BaseException | None) -> str:
    """The store's name for a failure (StorageUnavailable.code), else the exception's type."""
    return getattr(exc, "code", None) or type(exc).__name__


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, StorageUnavailable) and not isinstance(exc, StoragePermanentError)


def put_with_retry(
    store: ObjectStore, key: str, data: bytes, content_type: str, meta: dict[str, str], budget_seconds: float
) -> None:
    """`store.put`, retried on transient failures until `budget_seconds` (from the first attempt) is spent.

    Backoff is exponential with equal jitter: the n-th wait is between half and all of 0.2 s * 2^(n-1),
    capped at 5 s, and no wait starts that would end past the budget. Each retry logs one warning with the
    error. StoragePermanentError is raised at once; other exceptions (programming errors) pass through
    unretried; when the budget is spent the last failure is raised as StorageUnavailable.
    """
    _retrying("put", key, budget_seconds)(store.put, key, data, content_type, meta)


def get_with_retry(store: ObjectStore, key: str, budget_seconds: float) -> StoredObject:
    """`store.get` with the same retries (a worker reading an input image); ObjectNotFound passes through."""
    obj: StoredObject = _retrying("get", key, budget_seconds)(store.get, key)
    return obj


def _retrying(op: str, key: str, budget_seconds: float) -> Retrying:
    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        code = error_code(exc)
        log.warning(
            "storage %s failed for %s (attempt %d, %s): %s; retrying in %.2fs",
            op,
            key,
            state.attempt_number,
            code,
            exc,
            state.upcoming_sleep,
            extra={"storage_op": op, "key": key, "attempt": state.attempt_number, "error_code": code},
        )

    def give_up(state: RetryCallState) -> NoReturn:
        exc = state.outcome.exception() if state.outcome else None
        raise StorageUnavailable(
            f"{exc} (gave up after {state.attempt_number} attempts in {state.seconds_since_start or 0:.1f}s)",
            code=error_code(exc),
        ) from exc

    return Retrying(
        retry=retry_if_exception(_transient),
        stop=stop_before_delay(budget_seconds),
        # half fixed, half random: 0.1-0.2 s, 0.2-0.4 s, ... 2.5-5 s
        wait=wait_exponential(multiplier=0.1, max=MAX_RETRY_DELAY / 2)
        + wait_random_exponential(multiplier=0.1, max=MAX_RETRY_DELAY / 2),
        before_sleep=log_retry,
        retry_error_callback=give_up,
    )


class StorageSettings(BaseSettings):
    """Storage and URL settings every process shares (same `SDXL_*` names in the API, worker and cleanup)."""

    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path(".data/images")
    storage_prefix: str = "generations/"
    upload_prefix: str = "uploads/"  # input images (POST /v1/image-uploads, and every image a request carries)
    adapter_prefix: str = "adapters/"  # LoRA adapters given by URL, stored once by sha256 (common/adapter_urls.py)
    image_url_mode: Literal["api", "presigned"] = "api"
    # S3-compatible store (storage_backend="s3"); credentials come from the standard AWS chain
    s3_bucket: str = ""
    s3_region: str | None = None  # None: the AWS chain's region, else us-east-1
    s3_endpoint_url: str | None = None  # MinIO, Ceph, R2...; None: AWS
    s3_public_endpoint_url: str | None = None  # endpoint clients reach, used only to sign presigned URLs
    s3_addressing_style: Literal["path", "virtual", "auto"] = "auto"
    presign_expiry_seconds: int = Field(default=3600, ge=1, le=604800)  # SigV4 caps presigned URLs at 7 days
    public_base_url: str | None = Field(default=None, description="External URL of the API (Location, image URLs)")
    generation_ttl_seconds: int = 7 * 24 * 3600


def build_store(settings: StorageSettings) -> ObjectStore:
    """The store the settings name; shared by the API and the worker."""
    if settings.storage_backend == "s3":
        from common.storage_s3 import S3Store

        return S3Store.from_settings(settings)
    return LocalStore(settings.storage_dir)


@dataclass(frozen=True)
class StorageStatus:
    """One `check()` of a store: `error` is None when it passed; `permanent` when only an operator can fix it."""

    error: str | None
    permanent: bool = False
    code: str | None = None
    checked_at: float = 0.0  # time.monotonic() when the check ended

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """`ok`, or the error: what /readyz and the worker's registry entry show."""
        return self.error or "ok"


def check_storage(store: ObjectStore) -> StorageStatus:
    """`store.check()` as a status: never raises for a store failure (a programming error still passes)."""
    try:
        store.check()
    except StoragePermanentError as exc:
        return StorageStatus(str(exc), permanent=True, code=exc.code, checked_at=time.monotonic())
    except StorageUnavailable as exc:
        return StorageStatus(str(exc), permanent=False, code=exc.code, checked_at=time.monotonic())
    return StorageStatus(None, checked_at=time.monotonic())


def image_url(settings: StorageSettings, store: ObjectStore, gen_id: str, img: dict[str, Any]) -> str:
    """A presigned URL in presigned mode (when the store can make one), else the API's own image URL."""
    if settings.image_url_mode == "presigned" and img.get("key"):
        url = store.presigned_url(img["key"])
        if url:
            return url
    base = (settings.public_base_url or "").rstrip("/")
    return f"{base}/v1/generations/{gen_id}/images/{img['index']}"
