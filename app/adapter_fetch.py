"""`loras: [{url}]`: a LoRA adapter by URL, fetched at submit and stored once by sha256 (common/adapter_urls.py).

Only from the hosts the operator allows (SDXL_ADAPTER_URL_HOSTS), only `https`; the fetch itself is the image
inputs' (app/image_fetch.py): every hop checked against the SSRF policy and pinned to its approved address,
bounded in bytes, time and redirects. The bytes must be a complete safetensors file holding LoRA weights for this
deployment's model family. They go to the object store under their sha256, where every worker reads them; a URL
fetched in the last SDXL_ADAPTER_URL_TTL_SECONDS is not fetched again (Redis remembers its file's sha256).
"""

import hashlib
import json
from typing import Any

import redis.asyncio as aredis
from starlette.concurrency import run_in_threadpool

from app.adapters import DEPLOYMENT_BASE
from app.errors import Problem, field_error
from app.image_fetch import FetchRefused, ImageFetcher
from app.schemas import GenerationCreate
from app.settings import Settings
from common import ssrf
from common.adapter_urls import LoraFileError, adapter_key, check_lora_file, file_base, url_name
from common.contract import keys, stats
from common.contract.params import LoraRef
from common.storage import ObjectStore, StorageUnavailable, put_with_retry

STORE_RETRY_SECONDS = 10.0


class AdapterUrls:
    def __init__(self, ar: aredis.Redis, settings: Settings, store: ObjectStore) -> None:
        self.ar = ar
        self.settings = settings
        self.store = store
        self.fetcher = ImageFetcher(
            ssrf.Policy.build(ssrf.split_list(settings.adapter_fetch_allow_addresses),
                              settings.adapter_fetch_allow_http),
            settings.adapter_url_max_bytes, settings.adapter_fetch_timeout_seconds,
            settings.adapter_fetch_max_redirects, accept="application/octet-stream, */*", content_types=None,
            settings_prefix="SDXL_ADAPTER_FETCH_", user_agent="sdxl-service-adapter-fetch/1",
            limit_setting="SDXL_ADAPTER_URL_MAX_BYTES")

    async def aclose(self) -> None:
        await self.fetcher.aclose()

    async def resolve(self, req: GenerationCreate) -> dict[int, LoraRef]:
        """The request's adapters by URL, by their index in `loras`: fetched (or known) and stored. Their URLs have
        passed app/adapters.py's checks (allowed host, https, named once) in the cheap pass before this."""
        refs: dict[int, LoraRef] = {}
        for i, lora in enumerate(req.loras):
            if lora.url is not None:
                sha256 = await self.fetch(lora.url, f"loras[{i}].url")
                refs[i] = LoraRef(name=url_name(lora.url), sha256=sha256, scale=lora.scale, url=lora.url)
        return refs

    async def fetch(self, url: str, field: str) -> str:
        """The sha256 of the LoRA file at `url`, stored in the object store; 422 naming `field` if it is not one."""
        memo = keys.adapter_url(hashlib.sha256(url.encode()).hexdigest())
        known = await self.ar.get(memo)
        if known is not None:
            await self._count("cached")
            return str(json.loads(known)["sha256"])
        try:
            data = await self.fetcher.fetch(url)
        except FetchRefused as exc:
            raise field_error(field, f"URL {exc}", url) from None
        sha256, header = await run_in_threadpool(self._inspect, data, field, url)
        key = adapter_key(self.settings.adapter_prefix, sha256)
        try:
            await run_in_threadpool(put_with_retry, self.store, key, data, "application/octet-stream",
                                    {"sha256": sha256}, STORE_RETRY_SECONDS)
        except StorageUnavailable as exc:
            raise Problem(503, "object storage is unavailable; the adapter could not be stored",
                          kind="storage-unavailable", headers={"Retry-After": "5"}) from exc
        if self.settings.adapter_url_ttl_seconds > 0:
            await self.ar.set(memo, json.dumps({"sha256": sha256, "bytes": len(data), "base": file_base(header)}),
                              ex=self.settings.adapter_url_ttl_seconds)
        await self._count("fetched")
        return sha256

    @staticmethod
    def _inspect(data: bytes, field: str, url: str) -> tuple[str, dict[str, Any]]:
        try:
            header = check_lora_file(data)
        except LoraFileError as exc:
            raise field_error(field, f"URL {exc}", url) from None
        base = file_base(header)
        if base is not None and base != DEPLOYMENT_BASE:
            raise field_error(field, f"URL is an adapter for `{base}` (from its metadata); this deployment serves "
                              f"`{DEPLOYMENT_BASE}`", url)
        return hashlib.sha256(data).hexdigest(), header

    async def _count(self, result: str) -> None:
        pipe = self.ar.pipeline(transaction=False)
        stats.count_adapter_url(pipe, result)
        await pipe.execute()
