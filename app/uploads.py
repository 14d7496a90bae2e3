"""Input images: stored once in the object store, referenced by id from any number of generations.

Every image a request carries (multipart part, `data:` URI, fetched URL) becomes an upload of the caller's key
too, so the worker has one way to read inputs and the per-key limits cover them all. An upload belongs to the
key that made it (others get 404), expires on its own clock (`SDXL_UPLOAD_TTL_SECONDS`), and cannot be deleted
while an unfinished generation uses it (409). Cleanup deletes expired bytes once no unfinished generation
refers to them.
"""

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aredis
from starlette.concurrency import run_in_threadpool

from app.auth import Principal
from app.errors import Problem, field_error
from app.image_fetch import FetchRefused, ImageFetcher
from app.settings import Settings
from common import images, scripts, ssrf
from common.contract import keys
from common.contract.params import InputImage
from common.contract.records import as_str, rfc3339
from common.contract.status import TERMINAL_STATUSES
from common.storage import ObjectNotFound, ObjectStore, StorageUnavailable, put_with_retry

UPLOAD_ID_RE = re.compile(r"^upl_[A-Za-z0-9_-]{22}$")
DATA_URI_RE = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[^,;]*)*),", re.ASCII)
FIELDS = ("owner", "key", "sha256", "bytes", "width", "height", "content_type", "created_at", "expires_at")
TERMINAL = {s.value for s in TERMINAL_STATUSES}
PUT_BUDGET_SECONDS = 10.0  # a client waits on this put: retry briefly, then 503


def new_upload_id() -> str:
    return "upl_" + secrets.token_urlsafe(16)


def upload_not_found(upload_id: str) -> Problem:
    return Problem(404, f"image upload `{upload_id}` does not exist", kind="upload-not-found")


def resource(upload_id: str, rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": upload_id,
        "content_type": rec["content_type"],
        "width": int(rec["width"]),
        "height": int(rec["height"]),
        "bytes": int(rec["bytes"]),
        "sha256": rec["sha256"],
        "created_at": rfc3339(float(rec["created_at"])),
        "expires_at": rfc3339(float(rec["expires_at"])),
    }


def decode_data_uri(value: str, field: str) -> bytes:
    m = DATA_URI_RE.match(value)
    if not m or ";base64" not in m.group("params").lower():
        raise field_error(field, "must be a base64 `data:` URI (data:image/png;base64,...)", value[:60] + "...")
    try:
        return base64.b64decode(value[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise field_error(field, "holds invalid base64 after `data:...;base64,`", value[:60] + "...") from None


@dataclass(frozen=True)
class PendingInput:
    """An input of a request: an existing upload (`data` None), or checked bytes to store as `ref` says."""

    ref: InputImage
    data: bytes | None = None
    info: images.ImageInfo | None = None


class UploadService:
    def __init__(self, ar: aredis.Redis, settings: Settings, store: ObjectStore) -> None:
        self.ar = ar
        self.settings = settings
        self.store = store
        self._add = scripts.register(ar, "upload_add")
        self.fetcher = ImageFetcher(
            ssrf.Policy.build(ssrf.split_list(settings.image_fetch_allow_addresses), settings.image_fetch_allow_http),
            settings.max_image_body_bytes, settings.image_fetch_timeout_seconds, settings.image_fetch_max_redirects)

    # --- create -----------------------------------------------------------------------------------
    def check(self, data: bytes, field: str) -> images.ImageInfo:
        """Decode fully (a thread: a large PNG takes tens of ms) and describe; 422 naming `field` otherwise."""
        try:
            return images.inspect(data, self.settings.max_input_pixels)
        except images.InvalidImage as exc:
            raise field_error(field, str(exc), f"<{len(data)} bytes>") from None

    async def create(self, principal: Principal, data: bytes, field: str = "file",
                     as_mask: bool = False) -> dict[str, Any]:
        """Validate, store and record `data`; the upload's resource. `as_mask`: also check it reads as a mask."""
        pending = await self.prepare(data, field, as_mask)
        return resource(pending.ref.upload_id, await self._write(principal, pending))

    async def prepare(self, data: bytes, field: str, as_mask: bool) -> PendingInput:
        """Checked (422 naming `field`), its upload id and key chosen, nothing stored yet."""
        info = await run_in_threadpool(self.check, data, field)
        if as_mask:
            await run_in_threadpool(self.check_mask, data, field)
        upload_id = new_upload_id()
        key = f"{self.settings.upload_prefix}{upload_id}/image.{info.format}"
        ref = InputImage(upload_id=upload_id, key=key, sha256=info.sha256, width=info.width, height=info.height)
        return PendingInput(ref, data, info)

    async def save(self, principal: Principal, inputs: list[PendingInput]) -> None:
        """Store and record each input not stored yet, all or none: a refusal (429, 503) of one forgets the
        others this call stored, so a refused request leaves no upload behind."""
        stored: list[PendingInput] = []
        try:
            for pending in inputs:
                if pending.data is not None:
                    await self._write(principal, pending)
                    stored.append(pending)
        except BaseException:
            await self.discard(principal, stored)
            raise

    async def discard(self, principal: Principal, inputs: list[PendingInput], gen_id: str | None = None) -> None:
        """Forget uploads `save` made for a request that was then refused; uploads it named by id stay, no
        longer used by `gen_id`."""
        new = [p.ref.upload_id for p in inputs if p.data is not None]
        pipe = self.ar.pipeline(transaction=True)
        if gen_id is not None:
            for p in inputs:
                if p.data is None:
                    pipe.srem(keys.upload_users(p.ref.upload_id), gen_id)
        for upload_id in new:
            pipe.delete(keys.upload(upload_id), keys.upload_users(upload_id))
            pipe.zrem(keys.owner_uploads(principal.owner), upload_id)
            pipe.hdel(keys.owner_upload_bytes(principal.owner), upload_id)
            pipe.zrem(keys.UPLOAD_EXPIRY, upload_id)
        if len(pipe):
            await pipe.execute()
        for upload_id in new:
            await run_in_threadpool(self._forget_bytes, upload_id)

    async def _write(self, principal: Principal, pending: PendingInput) -> dict[str, Any]:
        info, upload_id, key = pending.info, pending.ref.upload_id, pending.ref.key
        assert info is not None and pending.data is not None
        now = time.time()
        expires = now + self.settings.upload_ttl_seconds
        rec = {"owner": principal.owner, "key": key, "sha256": info.sha256, "bytes": info.bytes,
               "width": info.width, "height": info.height, "content_type": info.content_type,
               "created_at": repr(now), "expires_at": repr(expires)}
        try:
            await run_in_threadpool(put_with_retry, self.store, key, pending.data, info.content_type,
                                    {"upload-id": upload_id, "sha256": info.sha256}, PUT_BUDGET_SECONDS)
        except StorageUnavailable as exc:
            raise Problem(503, "object storage is unavailable; the image was not stored",
                          kind="storage-unavailable", headers={"Retry-After": "5"}) from exc
        flat = [str(x) for kv in rec.items() for x in kv]
        code, count = await self._add(
            keys=[keys.upload(upload_id), keys.owner_uploads(principal.owner),
                  keys.owner_upload_bytes(principal.owner), keys.UPLOAD_EXPIRY],
            args=[repr(now), self.settings.max_uploads_per_key, self.settings.max_upload_bytes_per_key, info.bytes,
                  repr(expires), upload_id, int(expires) + 3600, *flat])
        if int(code) != 0:
            await run_in_threadpool(self._forget_bytes, upload_id)
            if int(code) == 1:
                raise Problem(429, f"this API key has {count} live image uploads; the limit is "
                                   f"{self.settings.max_uploads_per_key} (SDXL_MAX_UPLOADS_PER_KEY): delete some "
                                   "or wait for them to expire", kind="upload-limit")
            raise Problem(429, f"this API key's live image uploads hold {count} bytes; this one ({info.bytes}) "
                               f"would pass the limit of {self.settings.max_upload_bytes_per_key} "
                               "(SDXL_MAX_UPLOAD_BYTES_PER_KEY)", kind="upload-limit")
        return rec

    def check_mask(self, data: bytes, field: str) -> None:
        try:
            images.to_mask(data, self.settings.max_input_pixels)
        except images.InvalidImage as exc:
            raise field_error(field, str(exc), f"<{len(data)} bytes>") from None

    def _forget_bytes(self, upload_id: str) -> None:
        try:
            self.store.delete_prefix(f"{self.settings.upload_prefix}{upload_id}/")
        except StorageUnavailable:
            pass  # no record points at it; a store that is back lets cleanup's prefix sweep find it later

    # --- read -------------------------------------------------------------------------------------
    async def record(self, upload_id: str, principal: Principal) -> dict[str, Any]:
        if not UPLOAD_ID_RE.match(upload_id):
            raise upload_not_found(upload_id[:64])
        values = await self.ar.hmget(keys.upload(upload_id), FIELDS)  # type: ignore[misc]
        rec = {name: as_str(v) for name, v in zip(FIELDS, values, strict=True) if v is not None}
        if rec.get("owner") != principal.owner or float(rec.get("expires_at") or 0) < time.time():
            raise upload_not_found(upload_id)  # another key's upload does not exist for this one
        return rec

    async def get(self, upload_id: str, principal: Principal) -> dict[str, Any]:
        return resource(upload_id, await self.record(upload_id, principal))

    async def list_for(self, principal: Principal) -> list[dict[str, Any]]:
        ids = [as_str(i) for i in await self.ar.zrangebyscore(keys.owner_uploads(principal.owner), time.time(),
                                                               "+inf")]
        out = []
        for upload_id in ids:
            try:
                out.append(await self.get(upload_id, principal))
            except Problem:
                continue  # deleted or expired between the two reads
        return sorted(out, key=lambda u: u["created_at"], reverse=True)

    async def unfinished_users(self, upload_id: str) -> list[str]:
        users = [as_str(g) for g in await self.ar.smembers(keys.upload_users(upload_id))]  # type: ignore[misc]
        busy = []
        for gen_id in users:
            status = await self.ar.hget(keys.generation(gen_id), "status")  # type: ignore[misc]
            if status is not None and as_str(status) not in TERMINAL:
                busy.append(gen_id)
        return busy

    async def delete(self, upload_id: str, principal: Principal) -> None:
        await self.record(upload_id, principal)
        busy = await self.unfinished_users(upload_id)
        if busy:
            raise Problem(409, f"image upload `{upload_id}` is used by unfinished generation `{busy[0]}`; cancel it "
                               "or wait for it to finish", kind="upload-in-use")
        try:
            await run_in_threadpool(self.store.delete_prefix, f"{self.settings.upload_prefix}{upload_id}/")
        except StorageUnavailable as exc:
            raise Problem(503, "object storage is unavailable; the upload was not deleted",
                          kind="storage-unavailable", headers={"Retry-After": "5"}) from exc
        pipe = self.ar.pipeline(transaction=True)
        pipe.delete(keys.upload(upload_id), keys.upload_users(upload_id))
        pipe.zrem(keys.owner_uploads(principal.owner), upload_id)
        pipe.hdel(keys.owner_upload_bytes(principal.owner), upload_id)
        pipe.zrem(keys.UPLOAD_EXPIRY, upload_id)
        await pipe.execute()

    # --- references from a generation request -------------------------------------------------------
    async def load(self, value: str | bytes, field: str, principal: Principal, as_mask: bool = False
                   ) -> PendingInput:
        """An upload id, a `data:` URI, an URL, or raw bytes (multipart) -> the input it names, checked but not
        stored (`save` does that once the whole request has passed its checks)."""
        if isinstance(value, str) and UPLOAD_ID_RE.match(value):
            try:
                rec = await self.record(value, principal)
            except Problem:
                raise field_error(field, f"names image upload `{value}`, which does not exist (or has expired)",
                                  value) from None
            if as_mask:
                try:
                    obj = await run_in_threadpool(self.store.get, rec["key"])
                except ObjectNotFound:
                    raise field_error(field, f"names image upload `{value}`, which does not exist (or has "
                                      "expired)", value) from None
                except StorageUnavailable as exc:
                    raise Problem(503, "object storage is unavailable; the mask could not be read",
                                  kind="storage-unavailable", headers={"Retry-After": "5"}) from exc
                await run_in_threadpool(self.check_mask, obj.data, field)
            return PendingInput(InputImage(upload_id=value, key=rec["key"], sha256=rec["sha256"],
                                           width=int(rec["width"]), height=int(rec["height"])))
        if isinstance(value, bytes):
            data = value
        elif value.startswith("data:"):
            data = decode_data_uri(value, field)
        elif value.lower().startswith(("https://", "http://")):
            try:
                data = await self.fetcher.fetch(value)
            except FetchRefused as exc:
                raise field_error(field, f"URL {exc}", value) from None
        else:
            raise field_error(field, "must be an image upload id (upl_...), a `data:` URI or an https URL",
                              value[:60])
        return await self.prepare(data, field, as_mask)

    async def resolve(self, value: str | bytes, field: str, principal: Principal, as_mask: bool = False
                      ) -> InputImage:
        """`load` and `save` one input: the stored input it names."""
        pending = await self.load(value, field, principal, as_mask)
        await self.save(principal, [pending])
        return pending.ref

    async def mark_used(self, gen_id: str, refs: list[InputImage]) -> None:
        if refs:
            pipe = self.ar.pipeline(transaction=False)
            for ref in refs:
                pipe.sadd(keys.upload_users(ref.upload_id), gen_id)
                pipe.expire(keys.upload_users(ref.upload_id), self.settings.upload_ttl_seconds + 7 * 24 * 3600)
            await pipe.execute()

