"""Object stores. Keys derive from the generation id and image index, so a re-run overwrites.

Used by the worker (put) and the API (get, delete, presign); imports no torch.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageUnavailable(Exception):
    """The store could not be reached or refused the operation; callers may retry."""


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


class LocalStore:
    """Files under a root directory; the embedded default for one machine."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ObjectNotFound(key)
        return path

    def put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str]) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # write-then-rename: a reader never sees half an image, a crash leaves no partial file
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            path.with_name(path.name + ".type").write_text(content_type)
        except OSError as exc:  # full disk, read-only mount, permissions
            raise StorageUnavailable(f"local store write failed for {key}: {exc.strerror}") from exc

    def get(self, key: str) -> StoredObject:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageUnavailable(str(exc)) from exc
        type_file = path.with_name(path.name + ".type")
        ctype = type_file.read_text() if type_file.exists() else "application/octet-stream"
        return StoredObject(data=data, content_type=ctype)

    def delete_prefix(self, prefix: str) -> int:
        path = self._path(prefix.rstrip("/"))
        if not path.exists():
            return 0
        count = sum(1 for p in path.rglob("*") if p.is_file() and not p.name.endswith(".type"))
        shutil.rmtree(path, ignore_errors=True)
        return count

    def presigned_url(self, key: str) -> str | None:
        return None


class StorageSettings(BaseSettings):
    """Storage and URL settings every process shares (same `SDXL_*` names in the API, worker and cleanup)."""

    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path(".data/images")
    storage_prefix: str = "generations/"
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
        from app.storage_s3 import S3Store

        return S3Store.from_settings(settings)
    return LocalStore(settings.storage_dir)


def image_url(settings: StorageSettings, store: ObjectStore, gen_id: str, img: dict[str, Any]) -> str:
    """A presigned URL in presigned mode (when the store can make one), else the API's own image URL."""
    if settings.image_url_mode == "presigned" and img.get("key"):
        url = store.presigned_url(img["key"])
        if url:
            return url
    base = (settings.public_base_url or "").rstrip("/")
    return f"{base}/v1/generations/{gen_id}/images/{img['index']}"
