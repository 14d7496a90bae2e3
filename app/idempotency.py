"""`Idempotency-Key` on POST /v1/generations: a retried submit gets the first generation back, not a second one.

`sdxl:idem:<owner>:<sha256 of the key>` holds "<sha256 of the canonical body> <generation id> <claimed ms>".
CLAIM writes it only when absent (SET NX semantics, in one script that also returns the holder), so of two
concurrent identical requests exactly one submits; the other waits briefly for that generation to appear.
The entry lives as long as a generation (SDXL_GENERATION_TTL_SECONDS) and is scoped per owner: two API keys
may use the same Idempotency-Key independently.
"""

import asyncio
import hashlib
import json
import re
import time
from typing import Any

import redis.asyncio as aredis

from app.auth import Principal
from app.enqueue import new_generation_id
from app.errors import Problem
from app.schemas import GenerationCreate
from common import scripts
from common.contract import keys
from common.contract.records import as_str

KEY_RE = re.compile(r"^[\x20-\x7e]{1,255}$")
IN_FLIGHT_WAIT_SECONDS = 2.0  # how long a repeat waits for the first request's generation to be written
STALE_CLAIM_SECONDS = 30.0  # a claim this old without a generation: the first request died, or it was deleted

def fingerprint(raw_body: bytes) -> str:
    """sha256 of the body as canonical JSON (sorted keys, no whitespace): formatting does not matter."""
    canonical = json.dumps(json.loads(raw_body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    def __init__(self, ar: aredis.Redis, ttl_seconds: int) -> None:
        self.ar = ar
        self.ttl = ttl_seconds
        self._claim = scripts.register(ar, "idempotency_claim")
        self._release = scripts.register(ar, "idempotency_release")

    @staticmethod
    def entry(owner: str, key: str) -> str:
        return keys.idempotency(owner, hashlib.sha256(key.encode()).hexdigest())

    async def claim(self, owner: str, key: str, fp: str, gen_id: str) -> tuple[str, str, float] | None:
        """None when this call now holds the key; else the holder's (fingerprint, generation id, claimed ms)."""
        held = await self._claim(
            keys=[self.entry(owner, key)], args=[f"{fp} {gen_id} {int(time.time() * 1000)}", self.ttl]
        )
        if held is None:
            return None
        held_fp, held_id, claimed = as_str(held).split(" ")
        return held_fp, held_id, float(claimed)

    async def release(self, owner: str, key: str, gen_id: str) -> None:
        await self._release(keys=[self.entry(owner, key)], args=[gen_id])


async def create_once(
    service: Any, req: GenerationCreate, principal: Principal, request_id: str | None, key: str, raw_body: bytes,
    files: dict[str, bytes] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Create the generation, or return the one this key already created: (resource, replayed)."""
    if not KEY_RE.match(key):
        raise Problem(
            422,
            "`Idempotency-Key` must be 1 to 255 printable ASCII characters",
            errors=[
                {
                    "field": "Idempotency-Key",
                    "message": "must be 1 to 255 printable ASCII characters",
                    "value": key[:64],
                }
            ],
        )
    store: IdempotencyStore = service.idempotency
    fp = fingerprint(raw_body)
    give_up = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
    while True:
        gen_id = new_generation_id()
        held = await store.claim(principal.owner, key, fp, gen_id)
        if held is None:
            try:
                return await service.create(req, principal, request_id, gen_id=gen_id, files=files), False
            except Exception:
                await store.release(principal.owner, key, gen_id)  # refused or failed: a retry may try again
                raise
        held_fp, held_id, claimed_ms = held
        if held_fp != fp:
            raise Problem(
                409,
                "this Idempotency-Key was already used with a different request body; use a new key "
                "for a different request",
                kind="idempotency-key-reused",
            )
        try:
            return await service.get(held_id, principal), True
        except Problem as exc:
            if exc.status != 404:
                raise
        if time.time() * 1000 - claimed_ms > STALE_CLAIM_SECONDS * 1000:
            await store.release(principal.owner, key, held_id)  # its generation is gone: start afresh
            continue
        if time.monotonic() > give_up:
            raise Problem(
                409,
                "a request with this Idempotency-Key is still being processed; retry shortly",
                kind="idempotency-key-in-use",
                headers={"Retry-After": "1"},
            )
        await asyncio.sleep(0.02)
