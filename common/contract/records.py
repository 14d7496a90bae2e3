"""The generation record: the service's own Redis hash, with its own TTL (not rq's job result).

State transitions are compare-and-set Lua scripts, so an API cancel, a worker finish and a reaper requeue
can never interleave into an impossible state, and a worker whose ownership token is stale writes nothing.
"""

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from common.contract.queueing import lua_function

JSON_FIELDS = ("params", "progress", "images", "error", "timings", "webhook", "token_counts", "manifest")


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(fields: Mapping[str, Any]) -> dict[str, str]:
    """Python values -> hash fields (JSON for structures, str for scalars)."""
    out: dict[str, str] = {}
    for name, value in fields.items():
        if name in JSON_FIELDS:
            out[name] = json.dumps(value, separators=(",", ":"))
        elif value is None:
            out[name] = ""
        else:
            out[name] = str(value)
    return out


def flatten(fields: Mapping[str, Any]) -> list[str]:
    """Python values -> the field/value list a script's ARGV (or HSET) takes."""
    return [part for pair in encode(fields).items() for part in pair]


def as_str(value: Any) -> str:
    """redis-py answers bytes (or str with decode_responses): one spelling for both."""
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(raw: Mapping[Any, Any]) -> dict[str, Any]:
    """Hash fields -> Python values; accepts bytes or str from either redis client."""
    rec: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        val = v.decode() if isinstance(v, bytes) else v
        if key in JSON_FIELDS:
            rec[key] = json.loads(val) if val else None
        else:
            rec[key] = val
    return rec


def ts_or_none(value: str | None) -> float | None:
    return float(value) if value else None


# KEYS[1] = generation hash. ARGV[1] = expected token ("" = any), ARGV[2] = comma list of allowed current
# statuses, ARGV[3..] = field/value pairs. Returns "OK" or the refusing status ("" when the record is gone).
TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return '' end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 'stale:' .. status end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do if s == status then ok = true end end
if not ok then return status end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
return 'OK'
"""

# TRANSITION that also answers the record it wrote: {"OK", {field, value, ...}} or {refusing status}. The
# worker renders the event from it instead of reading the hash again (one round trip per state change).
TRANSITION_READ = lua_function("transition", TRANSITION) + """
local res = transition(KEYS, ARGV)
if res ~= 'OK' then return {res} end
return {'OK', redis.call('HGETALL', KEYS[1])}
"""

# The worker's start, atomically: queued -> running with this attempt's token, the lease and the RUNNING entry
# (so the reaper can always find a running generation), unless its deadline has passed. KEYS: generation hash,
# lease key, RUNNING set. ARGV: token, worker id, lease seconds, now, field/value pairs. Answers as
# TRANSITION_READ, or {"deadline"}.
START = lua_function("transition", TRANSITION) + """
local check = transition({KEYS[1]}, {ARGV[1], 'queued'})  -- no fields: checks token and status, writes nothing
if check ~= 'OK' then return {check} end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline_at') or '')
if deadline and deadline < tonumber(ARGV[4]) then return {'deadline'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('SADD', KEYS[3], string.match(KEYS[1], '[^:]+$'))
return {'OK', redis.call('HGETALL', KEYS[1])}
"""


def read_answer(res: Any) -> tuple[str, dict[str, Any] | None]:
    """(outcome, decoded record or None) from TRANSITION_READ / START."""
    outcome = as_str(res[0])
    if outcome != "OK":
        return outcome, None
    flat = res[1]
    return outcome, decode(dict(zip(flat[::2], flat[1::2], strict=True)))
