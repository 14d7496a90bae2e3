"""Signed, expiring image URLs: capabilities a client without our key can fetch (OpenAI's `response_format: url`
with local storage; S3 deployments in presigned mode hand out the store's own presigned URLs instead).

A URL names a generation, an image index and an expiry (unix seconds), with an HMAC-SHA256 over the three.
The secret is `SDXL_URL_SIGNING_SECRET`, or else one random secret created once in Redis (SET NX), so every
replica signs and checks with the same one. Like a presigned URL it cannot be revoked before it expires, except
by deleting the generation or changing the secret (which voids every URL signed with the old one).
"""

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any

import redis.asyncio as aredis

from app.auth import Principal
from app.errors import Problem
from app.generations import ID_RE, GenerationService, not_found
from app.settings import Settings
from common.contract import keys
from common.contract.records import as_str

SECRET_KEY = f"{keys.PREFIX}:url-signing-secret"  # the generated secret, when none is configured
PATH = "/v1/signed-images"


def signature(secret: bytes, gen_id: str, index: int, expires: int) -> str:
    mac = hmac.new(secret, f"{gen_id}/{index}/{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


class UrlSigner:
    def __init__(self, ar: aredis.Redis, settings: Settings) -> None:
        self.ar = ar
        self.configured = settings.url_signing_secret.get_secret_value().encode() \
            if settings.url_signing_secret else None
        self.lifetime = settings.signed_url_seconds

    async def secret(self) -> bytes:
        """The configured secret, else the shared one in Redis (created by whichever replica asks first).

        Read on every use rather than cached: one GET is nothing next to a generation, and a replica never
        signs with a secret the others no longer hold."""
        if self.configured is not None:
            return self.configured
        value = await self.ar.get(SECRET_KEY)
        if value is None:
            await self.ar.set(SECRET_KEY, secrets.token_hex(32), nx=True)
            value = await self.ar.get(SECRET_KEY)
        return as_str(value).encode()

    async def url(self, base: str, gen_id: str, index: int, now: float | None = None) -> str:
        expires = int(now if now is not None else time.time()) + self.lifetime
        sig = signature(await self.secret(), gen_id, index, expires)
        return f"{base}{PATH}/{gen_id}/{index}?expires={expires}&signature={sig}"

    async def check(self, gen_id: str, index: int, expires: int, sig: str, now: float | None = None) -> None:
        """403 unless `sig` signs these three and `expires` is still ahead (compared in constant time)."""
        expected = signature(await self.secret(), gen_id, index, expires)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
            raise Problem(403, "the image URL's signature is not valid", kind="bad-signature", title="Forbidden")
        if expires < (now if now is not None else time.time()):
            raise Problem(403, f"the image URL expired at {expires} (unix time); ask for the image again",
                          kind="url-expired", title="Forbidden")


async def signed_image(service: GenerationService, signer: UrlSigner, gen_id: str, index: int, expires: int,
                       sig: str) -> tuple[bytes, str]:
    """The bytes a valid signed URL names: checked first, then read as its owner would read them."""
    if not ID_RE.match(gen_id):
        raise not_found(gen_id[:64])
    await signer.check(gen_id, index, expires, sig)
    owner = await service.ar.hget(keys.generation(gen_id), "owner")  # type: ignore[misc]
    if owner is None:
        raise not_found(gen_id)
    # the signature is the capability: the record's own owner reads it (expiry and deletion still answer 404)
    result = await service.image(gen_id, index, Principal(owner=as_str(owner), name="signed-url"), redirect=False)
    assert not isinstance(result, str)  # redirect=False: always the bytes
    return result


def get_signer(state: Any, service: GenerationService) -> UrlSigner:
    """One signer per app (kept on app.state), built on first use from the service's Redis and settings."""
    signer: UrlSigner | None = getattr(state, "url_signer", None)
    if signer is None:
        signer = state.url_signer = UrlSigner(service.ar, service.settings)
    return signer

