"""GET /v1/generations: the caller's generations, newest first, from its index zset (written at submit).

Pages are keyed by position, not offset: the cursor is the (created_at score, id) of the last row consumed,
so generations created meanwhile never shift or repeat a page. Ids whose record expired or was deleted are
skipped (and dropped from the index). One page scans at most SCAN_BUDGET ids, so a rare `status` filter can
answer a short page with a `next_cursor`.
"""

import base64
import binascii
import time
from typing import Any

from app.auth import Principal
from app.errors import field_error
from common.contract import keys
from common.contract.records import decode

BATCH = 100
SCAN_BUDGET = 1000

Position = tuple[float, str]


def encode_cursor(pos: Position) -> str:
    return base64.urlsafe_b64encode(f"{pos[0]!r}|{pos[1]}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, gen_id = raw.split("|", 1)
        return float(score), gen_id
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise field_error("cursor", "is not a cursor this API returned", cursor[:64]) from exc


async def _rows_after(service: Any, index: str, pos: Position | None, n: int) -> list[Position]:
    """Up to n (score, id) rows that come after `pos` in newest-first order."""
    top: float | str = "+inf" if pos is None else repr(pos[0])
    # rows sharing pos's score come in descending id order; those with id >= pos's id were already consumed
    skip = 0
    while True:
        raw = await service.ar.zrevrangebyscore(index, top, "-inf", start=0, num=n + skip, withscores=True)
        rows = [(float(s), m.decode()) for m, s in raw]
        if pos is not None:
            rows = [r for r in rows if not (r[0] == pos[0] and r[1] >= pos[1])]
        if rows or len(raw) < n + skip:
            return rows[:n]
        skip += n  # a whole batch of equal scores already consumed (practically never)


async def list_generations(
    service: Any, principal: Principal, limit: int, cursor: str | None, status: str | None
) -> dict[str, Any]:
    index = keys.owner_index(principal.owner)
    pos = decode_cursor(cursor) if cursor else None
    data: list[dict[str, Any]] = []
    scanned = 0
    more = False
    now = time.time()
    while not more:
        rows = await _rows_after(service, index, pos, min(BATCH, limit - len(data) + 1))
        if not rows:
            break
        pipe = service.ar.pipeline(transaction=False)
        for _score, gen_id in rows:
            pipe.hgetall(keys.generation(gen_id))
        gone = []
        for row, raw in zip(rows, await pipe.execute(), strict=True):
            if len(data) == limit or scanned >= SCAN_BUDGET:
                more = True  # this row is the next page's first candidate
                break
            pos = row
            scanned += 1
            if not raw:
                gone.append(row[1])  # deleted, or expired with its record
                continue
            rec = decode(raw)
            expires = rec.get("expires_at")
            if rec.get("owner") != principal.owner or (expires and float(expires) < now):
                continue
            if status is None or rec.get("status") == status:
                data.append(await service.resource(rec))
        if gone:
            await service.ar.zrem(index, *gone)
    return {"data": data, "next_cursor": encode_cursor(pos) if more and pos else None}
