"""`image` given as a URL: fetched once at submit, through the SSRF policy webhooks use (common/ssrf.py).

Every hop (the URL and each redirect) is checked and pinned to its approved address before it is connected to,
so neither a redirect nor a DNS answer that changes between check and connect can reach the service's own
network. Bounded in bytes, in time (the whole fetch, body included) and in redirects; only image content types.
"""

import asyncio

import httpx
from starlette.concurrency import run_in_threadpool

from common import ssrf
from common.images import CONTENT_TYPES

REDIRECTS = {301, 302, 303, 307, 308}
ACCEPT = "image/png, image/jpeg, image/webp"
USER_AGENT = "sdxl-service-image-fetch/1"


class FetchRefused(ValueError):
    """The URL was not fetched, or what it answered is not an image we take; the message says which."""


class ImageFetcher:
    """`accept`, `content_types` (None: any) and `settings_prefix` (named in refusals): image inputs' unless
    told; LoRA adapters by URL (app/adapter_fetch.py) use the same fetch with their own."""

    def __init__(self, policy: ssrf.Policy, max_bytes: int, timeout: float, max_redirects: int,
                 resolver: ssrf.Resolver = ssrf.system_resolver, accept: str = ACCEPT,
                 content_types: frozenset[str] | None = frozenset(CONTENT_TYPES),
                 settings_prefix: str = "SDXL_IMAGE_FETCH_", user_agent: str = USER_AGENT,
                 limit_setting: str | None = None) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.resolver = resolver
        self.accept = accept
        self.content_types = content_types
        self.prefix = settings_prefix
        self.user_agent = user_agent
        self.limit_name = f" ({limit_setting})" if limit_setting else ""
        # trust_env=False: a proxy variable must not send the fetch around the pinned address
        self.client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url)
        except TimeoutError:
            raise FetchRefused(f"did not answer within {self.timeout:g} s ({self.prefix}TIMEOUT_SECONDS)") \
                from None

    async def _fetch(self, url: str) -> bytes:
        for _hop in range(self.max_redirects + 1):
            try:
                checked = await run_in_threadpool(ssrf.check_url, url, self.policy, self.resolver)
            except ssrf.UnsafeUrl as exc:
                raise FetchRefused(exc.hint(self.prefix)) from None
            target, host_header, extensions = ssrf.pinned_target(url, checked.address)
            request = self.client.build_request(
                "GET", target, headers={"host": host_header, "accept": self.accept, "user-agent": self.user_agent},
                extensions=extensions)
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise FetchRefused(f"could not be fetched ({type(exc).__name__})") from None
            try:
                if response.status_code in REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchRefused(f"answered {response.status_code} without a Location")
                    url = str(httpx.URL(url).join(location))
                    continue
                if response.status_code != 200:
                    raise FetchRefused(f"answered HTTP {response.status_code}")
                ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if self.content_types is not None and ctype not in self.content_types:
                    raise FetchRefused(f"answered Content-Type {ctype or 'none'!r}; expected one of {self.accept}")
                length = response.headers.get("content-length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise FetchRefused(f"is {length} bytes; the limit is {self.max_bytes}{self.limit_name}")
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise FetchRefused(f"is larger than the limit of {self.max_bytes} bytes{self.limit_name}")
                return bytes(data)
            finally:
                await response.aclose()
        raise FetchRefused(f"redirected more than {self.max_redirects} times ({self.prefix}MAX_REDIRECTS)")
