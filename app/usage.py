"""GET /v1/usage's logic: the calling key's figures per UTC day (common/usage.py counts them), from Redis."""

import datetime as dt
import time
from typing import Any

import redis.asyncio as aredis

from app.auth import Principal
from app.errors import field_error
from app.settings import Settings
from common.contract import keys
from common.contract.records import rfc3339
from common.usage import DAY_SECONDS, FIELDS, DayUsage, day_start, days_between

DEFAULT_DAYS = 30  # the range when the request names no `from`


def date_range(first: dt.date | None, last: dt.date | None, today: dt.date, retention_days: int
               ) -> tuple[dt.date, dt.date]:
    """The days a request asks for, checked against what is kept; 422 names the field and value."""
    earliest = today - dt.timedelta(days=retention_days - 1)
    last = last or today
    if last > today:
        raise field_error("to", f"is after today ({today.isoformat()} UTC)", last.isoformat())
    if last < earliest:
        raise field_error("to", f"is before the {retention_days} days usage is kept (the earliest is "
                          f"{earliest.isoformat()})", last.isoformat())
    if first is None:
        first = max(earliest, min(last, today - dt.timedelta(days=DEFAULT_DAYS - 1)))
    if first < earliest:
        raise field_error("from", f"is before the {retention_days} days usage is kept (the earliest is "
                          f"{earliest.isoformat()})", first.isoformat())
    if first > last:
        raise field_error("from", f"is after `to` ({last.isoformat()})", first.isoformat())
    return first, last


def figures(days: list[DayUsage]) -> dict[str, Any]:
    sums = {f: sum(getattr(d, f) for d in days) for f in FIELDS}
    return {"images": sums["images"], "gpu_seconds": sums["gpu_us"] / 1_000_000, "gpu_microseconds": sums["gpu_us"],
            "generations": sums["generations"], "images_submitted": sums["admitted"]}


class UsageService:
    def __init__(self, ar: aredis.Redis, settings: Settings) -> None:
        self.ar = ar
        self.settings = settings

    async def days(self, owner: str, names: list[str]) -> list[DayUsage]:
        pipe = self.ar.pipeline(transaction=False)
        for day in names:
            pipe.hgetall(keys.usage_day(owner, day))
        return [DayUsage.parse(day, raw) for day, raw in zip(names, await pipe.execute(), strict=True)]

    async def report(self, principal: Principal, first: dt.date | None, last: dt.date | None) -> dict[str, Any]:
        now = time.time()
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        first, last = date_range(first, last, today, self.settings.usage_retention_days)
        names = days_between(first, last)
        if last != today:
            names.append(today.isoformat())  # the quota's figure, not part of the range
        found = await self.days(principal.owner, names)
        by_day = found[:len(days_between(first, last))]
        quota = None
        if principal.limits.daily_image_quota > 0:
            submitted = found[-1].admitted
            limit = principal.limits.daily_image_quota
            quota = {"daily_images": limit, "submitted_today": submitted,
                     "remaining_today": max(0, limit - submitted),
                     "resets_at": rfc3339(day_start(today) + DAY_SECONDS)}
        return {
            "key": principal.name, "from": first, "to": last,
            "retention_days": self.settings.usage_retention_days,
            "days": [{"date": d.day, **figures([d])} for d in by_day],
            "totals": figures(by_day),
            "quota": quota,
        }

