"""API-side logic for generations: create, read, wait, cancel, images. Routes stay thin."""

import asyncio
import json
import re
import time
from typing import Any

import redis
import redis.asyncio as aredis
from rq import Queue
from rq.serializers import JSONSerializer
from starlette.concurrency import run_in_threadpool

from app.adapter_fetch import AdapterUrls
from app.auth import Principal
from app.enqueue import Enqueuer, check_input_fields, new_generation_id, resolve, token_counts
from app.errors import Problem, field_error
from app.idempotency import IdempotencyStore
from app.limits import Limiter
from app.model_limits import LimitsCache
from app.schemas import GenerationCreate
from app.settings import Settings
from app.tokens import counter_for
from app.uploads import PendingInput, UploadService
from common import scripts, ssrf
from common.contract import keys
from common.contract.events import EventType
from common.contract.records import as_str, decode
from common.contract.resource import render
from common.contract.status import TERMINAL_STATUSES, GenerationStatus
from common.state import GenerationState
from common.storage import ObjectNotFound, ObjectStore, StorageUnavailable, image_url, reads_inline

ID_RE = re.compile(r"^gen_[A-Za-z0-9_-]{22}$")
TERMINAL = {s.value for s in TERMINAL_STATUSES}
TERMINAL_EVENTS = {e.value for e in EventType if e.is_terminal}
IMAGE_FIELDS = ("owner", "expires_at", "images")  # all an image download reads of the record
INLINE_READ_MAX_BYTES = 512 * 1024  # local images up to this size are read on the event loop


def not_found(gen_id: str) -> Problem:
    return Problem(404, f"generation `{gen_id}` does not exist", kind="generation-not-found")


class GenerationService:
    def __init__(
        self, r: redis.Redis, ar: aredis.Redis, settings: Settings, store: ObjectStore
    ) -> None:
        self.r = r
        self.ar = ar
        self.settings = settings
        self.store = store
        self.model_limits = LimitsCache(settings.base_model, settings.refiner_model)
        self.webhook_queue = Queue(keys.WEBHOOK_QUEUE, connection=r, serializer=JSONSerializer)
        self._position = scripts.register(ar, "position")
        self.state = GenerationState(r, settings, self.image_url, ar)
        self.enqueuer = Enqueuer(r, settings, ar, self.state)
        self.uploads = UploadService(ar, settings, store)
        self.adapter_urls = AdapterUrls(ar, settings, store)
        self.limiter = Limiter(ar, settings)  # rate, unfinished-per-key and queue-depth limits (app/limits.py)
        self.idempotency = IdempotencyStore(ar, settings.generation_ttl_seconds)
        self.public_base_url = (settings.public_base_url or "").rstrip("/")
        self._refiner_checked: tuple[float, bool] = (-1e9, True)
        self.stopping = asyncio.Event()  # set on SIGTERM (app/shutdown.py): long-polls answer at once
        self.webhook_policy = ssrf.Policy.build(ssrf.split_list(settings.webhook_allow_addresses),
                                                settings.webhook_allow_http)
        self.resolve_host: ssrf.Resolver = ssrf.system_resolver  # injectable: tests never query DNS

    # --- URLs -------------------------------------------------------------------------------------
    def image_url(self, gen_id: str, img: dict[str, Any]) -> str:
        return image_url(self.settings, self.store, gen_id, img)

    def location(self, gen_id: str) -> str:
        return f"{self.public_base_url}/v1/generations/{gen_id}"

    # --- create -----------------------------------------------------------------------------------
    async def refiner_available(self) -> bool:
        """Whether the live workers can run a refiner (none registered yet: yes, and the request queues).

        `watch_workers` keeps the answer at most about a second old, so a request does not wait for the
        registry; without it (or if it stalled) the request reads the registry itself."""
        if not self.settings.refiner_configured:
            return False
        if time.monotonic() - self._refiner_checked[0] > 2.0:
            await self._read_refiner()
        return self._refiner_checked[1]

    async def _read_refiner(self) -> None:
        now = time.monotonic()
        workers = await self.live_workers()
        self._refiner_checked = (now, not workers or any(w.get("has_refiner") == "1" for w in workers))

    async def watch_workers(self) -> None:
        """Re-read the worker registry once a second for `refiner_available` (run by the app's lifespan)."""
        while self.settings.refiner_configured:
            try:
                await self._read_refiner()
            except redis.RedisError:
                pass  # Redis is down: requests fail on their own round trips meanwhile
            await asyncio.sleep(1.0)

    async def inputs(self, req: GenerationCreate, principal: Principal, files: dict[str, bytes] | None
                     ) -> tuple[PendingInput | None, PendingInput | None]:
        """The request's image and mask, each checked but not yet stored (app/uploads.py), or None: `create`
        stores them once the whole request has passed, so a refused request leaves no upload behind."""
        files = files or {}
        image_src = files.get("image", req.image)
        mask_src = files.get("mask_image", req.mask_image)
        check_input_fields(req, image_src is not None, mask_src is not None)  # before fetching or storing
        image = await self.uploads.load(image_src, "image", principal) if image_src is not None else None
        mask = await self.uploads.load(mask_src, "mask_image", principal, as_mask=True) \
            if mask_src is not None else None
        return image, mask

    async def create(self, req: GenerationCreate, principal: Principal, request_id: str | None,
                     gen_id: str | None = None, files: dict[str, bytes] | None = None,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """`extra`: more fields for the record, written with it (the OpenAI routes' `model`, `quality`, ...)."""
        if req.priority > principal.limits.max_priority:
            raise field_error("priority", f"must be at most {principal.limits.max_priority} for this API key",
                              req.priority)
        refiner_ok = await self.refiner_available()
        resolve(req.model_copy(update={"image": None, "mask_image": None, "strength": None,
                                       "padding_mask_crop": None}), self.settings, refiner_ok)  # cheap 422s first
        by_url = await self.adapter_urls.resolve(req)  # adapters by URL: fetched (or known) and stored
        image_in, mask_in = await self.inputs(req, principal, files)
        image, mask = (p.ref if p else None for p in (image_in, mask_in))
        params = resolve(req, self.settings, refiner_ok, image, mask, by_url)
        self.model_limits.get().check(params)
        counts = token_counts(params, counter_for(self.settings.base_model))
        webhook = req.webhook.model_dump() if req.webhook else None
        if webhook:  # pin the approved address: delivery connects there, never to a fresh DNS answer
            webhook["address"] = await run_in_threadpool(
                approve_webhook_url, webhook["url"], self.webhook_policy, self.resolve_host)
        gen_id = gen_id or new_generation_id()
        inputs = [p for p in (image_in, mask_in) if p is not None]
        await self.uploads.save(principal, inputs)  # every check passed: now the inputs are stored
        # before the record exists: an upload DELETE that runs meanwhile sees this generation as its user
        await self.uploads.mark_used(gen_id, [p.ref for p in inputs])
        # admission, record, rq job, fair-share line, feed and queue position: one round trip, on this loop
        fields, create_keys, args = self.enqueuer.prepare(
            params, principal.owner, req.priority, req.deadline, webhook, counts, request_id, extra=extra,
            gen_id=gen_id, limits=(principal.limits.max_queued, self.settings.max_queue_depth),
            daily_quota=principal.limits.daily_image_quota)
        sub = await self.enqueuer.submit_async(fields, create_keys, args)
        if sub.admitted:  # refused: nothing was written, and the inputs this request stored go too
            await self.uploads.discard(principal, inputs, gen_id)
        await self.limiter.refuse(principal, sub.admitted, sub.count, params.num_images_per_prompt)  # 429 / 503
        rec = dict(sub.record)
        for k in ("created_at", "expires_at"):
            rec[k] = str(rec[k])
        return render(rec, self.image_url, sub.position)

    # --- read -------------------------------------------------------------------------------------
    async def record(self, gen_id: str, principal: Principal) -> dict[str, Any]:
        if not ID_RE.match(gen_id):
            raise not_found(gen_id[:64])
        raw = await self.ar.hgetall(keys.generation(gen_id))  # type: ignore[misc]
        if not raw:
            raise not_found(gen_id)
        return self._visible(gen_id, decode(raw), principal)

    async def _image_record(self, gen_id: str, principal: Principal) -> dict[str, Any]:
        """`record` reduced to IMAGE_FIELDS (HMGET): the same 404s, without decoding the rest of the hash."""
        if not ID_RE.match(gen_id):
            raise not_found(gen_id[:64])
        values = await self.ar.hmget(keys.generation(gen_id), IMAGE_FIELDS)  # type: ignore[misc]
        raw = {name: value for name, value in zip(IMAGE_FIELDS, values, strict=True) if value is not None}
        if not raw:
            raise not_found(gen_id)
        return self._visible(gen_id, decode(raw), principal)

    @staticmethod
    def _visible(gen_id: str, rec: dict[str, Any], principal: Principal) -> dict[str, Any]:
        if rec.get("owner") != principal.owner:
            raise not_found(gen_id)  # never reveal that another key's generation exists
        expires = rec.get("expires_at")
        if expires and float(expires) < time.time():
            raise not_found(gen_id)
        return rec

    async def _queue_position(self, gen_id: str) -> int | None:
        pos = await self._position(keys=[keys.generation(gen_id), keys.RQ_QUEUE_KEY])
        return int(pos) if pos is not None and int(pos) >= 0 else None

    async def resource(self, rec: dict[str, Any]) -> dict[str, Any]:
        pos = await self._queue_position(rec["id"]) if rec["status"] == GenerationStatus.queued else None
        return render(rec, self.image_url, pos)

    async def get(self, gen_id: str, principal: Principal) -> dict[str, Any]:
        return await self.resource(await self.record(gen_id, principal))

    async def wait(self, gen_id: str, principal: Principal, timeout: float,
                   created: dict[str, Any] | None = None) -> dict[str, Any]:
        """Answer as soon as the generation is final or `timeout` passes; woken by its event stream.

        `created`: the resource `create` (or an idempotent replay) has just answered for `principal`; the
        record was written or read a moment ago, so the wait starts reading events at once instead of
        reading it again. Events are read from the stream's start, so none emitted since is missed."""
        rec: dict[str, Any] | None = None
        if created is None:
            rec = await self.record(gen_id, principal)
            status = rec["status"]
        else:
            status = created["status"]
        deadline = time.monotonic() + timeout
        last = "0-0"
        while status not in TERMINAL and not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # at most 1 s per read: a shutting-down replica answers its long-polls instead of having them cut
            res = await self.ar.xread({keys.events(gen_id): last}, block=max(1, int(min(remaining, 1.0) * 1000)),
                                      count=100)
            if not res:
                continue
            streams: list[Any] = res  # type: ignore[assignment]
            for _stream, entries in streams:
                for eid, fields in entries:
                    last = as_str(eid)
                    if as_str(fields.get(b"type", b"")) in TERMINAL_EVENTS and fields.get(b"data"):
                        # the terminal event carries the final resource, as SSE clients receive it: no re-read
                        return json.loads(fields[b"data"])  # type: ignore[no-any-return]
        if rec is None:  # not read at the start: the answer must be the state now, not the one at creation
            try:
                rec = await self.record(gen_id, principal)
            except Problem as exc:
                if exc.status != 404 or created is None:
                    raise
                return created  # deleted meanwhile: what this POST created, not a 404 to the POST itself
        return await self.resource(rec)

    # --- cancel -----------------------------------------------------------------------------------
    def _cancel_sync(self, gen_id: str) -> str:
        return self.state.cancel(gen_id)

    async def cancel(self, gen_id: str, principal: Principal) -> dict[str, Any]:
        rec = await self.record(gen_id, principal)
        outcome = await run_in_threadpool(self._cancel_sync, gen_id)
        if outcome in (GenerationStatus.succeeded, GenerationStatus.failed):
            raise Problem(409, f"generation `{gen_id}` already {outcome}; it cannot be canceled",
                          kind="generation-final")
        rec = await self.record(gen_id, principal)
        return await self.resource(rec)

    # --- delete -----------------------------------------------------------------------------------
    def _delete_sync(self, gen_id: str, rec: dict[str, Any]) -> None:
        try:
            self.state.delete(self.store, gen_id, rec)
        except StorageUnavailable as exc:
            raise Problem(503, "object storage is unavailable; the generation was not deleted",
                          kind="storage-unavailable", headers={"Retry-After": "5"}) from exc

    async def delete(self, gen_id: str, principal: Principal) -> None:
        """Cancel if still in flight, then remove the record, its events, its images and its index entries."""
        rec = await self.record(gen_id, principal)
        await run_in_threadpool(self._delete_sync, gen_id, rec)

    # --- images -----------------------------------------------------------------------------------
    async def image(self, gen_id: str, index: int, principal: Principal, redirect: bool = True
                    ) -> tuple[bytes, str] | str:
        """The image's bytes and content type, or (presigned mode, `redirect`) its presigned URL."""
        rec = await self._image_record(gen_id, principal)
        images = {img["index"]: img for img in rec.get("images") or []}
        if index not in images:
            raise Problem(404, f"generation `{gen_id}` has no image {index}", kind="image-not-found")
        img = images[index]
        if redirect and self.settings.image_url_mode == "presigned":
            url = self.store.presigned_url(img["key"])
            if url:
                return url
        try:
            # a page-cache read of one small image costs less than the hop to a worker thread and back; a large
            # file (a cold disk could take milliseconds and stall every request on this loop) and remote: the hop
            size = int(img.get("bytes") or 0)  # 0: unknown size, read off the loop
            if reads_inline(self.store) and 0 < size <= INLINE_READ_MAX_BYTES:
                obj = self.store.get(img["key"])
            else:
                obj = await run_in_threadpool(self.store.get, img["key"])
        except ObjectNotFound as exc:
            raise Problem(404, f"image {index} of `{gen_id}` is gone from storage", kind="image-not-found") from exc
        except StorageUnavailable as exc:
            raise Problem(503, "object storage is unavailable", kind="storage-unavailable",
                          headers={"Retry-After": "5"}) from exc
        return obj.data, obj.content_type

    # --- workers ----------------------------------------------------------------------------------
    async def live_workers(self) -> list[dict[str, str]]:
        cutoff = time.time() - keys.WORKER_LIVE_SECONDS
        ids = await self.ar.zrangebyscore(keys.WORKERS, cutoff, "+inf")
        workers = []
        for wid in ids:
            raw = await self.ar.hgetall(keys.worker(as_str(wid)))  # type: ignore[misc]
            if raw:
                workers.append({as_str(k): as_str(v) for k, v in raw.items()})
        return workers


def resource_json(resource: dict[str, Any]) -> str:
    return json.dumps(resource, separators=(",", ":"))


def approve_webhook_url(url: str, policy: ssrf.Policy, resolver: ssrf.Resolver = ssrf.system_resolver) -> str:
    """The submit-time check as the API answers it: the pinned address, or a 422 naming `webhook.url`."""
    try:
        return ssrf.check_url(url, policy, resolver).address
    except ssrf.UnsafeUrl as exc:
        raise field_error("webhook.url", exc.hint("SDXL_WEBHOOK_"), url) from exc
