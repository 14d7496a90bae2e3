"""The generation record: the service's own Redis hash, with its own TTL (not rq's job result).

State transitions are compare-and-set Lua scripts (common/lua/, through common/state.py), so an API
cancel, a worker finish and a reaper requeue can never interleave into an impossible state, and a worker whose
ownership token is stale writes nothing.
"""

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

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


def read_answer(res: Any) -> tuple[str, dict[str, Any] | None]:
    """(outcome, decoded record or None) from TRANSITION_READ / START."""
    outcome = as_str(res[0])
    if outcome != "OK":
        return outcome, None
    flat = res[1]
    return outcome, decode(dict(zip(flat[::2], flat[1::2], strict=True)))
