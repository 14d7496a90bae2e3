"""Usage per API key: images produced and GPU time per UTC day, kept in Redis for a retention period.

Counted by the scripts themselves (common/lua/succeed.lua, create.lua), so the figures are exact under
concurrency and survive any process's restart:
- a success counts its images and its share of the pipeline call in the same script as the `succeeded`
  transition: a refused or repeated finish counts nothing;
- a submit counts the images it asks for (`admitted`, the daily quota's figure) in the same script as admission.

GPU time is the pipeline call (base, refiner, decoding) in integer microseconds. A micro-batch's call is split
over its images evenly: a generation of `n` of the call's `batch_images` images gets `pipeline * n //
batch_images`, from the `pipeline` seconds its record shows (rounded there to 0.1 ms), so anyone can recompute
a day's sum from the generations' own timings.
"""

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

DAY_SECONDS = 86400
FIELDS = ("images", "gpu_us", "generations", "admitted")


def utc_day(ts: float) -> str:
    """The UTC day of a unix time, `YYYY-MM-DD`: the day usage is counted on."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


def day_start(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def day_expires_at(day: str, retention_days: int) -> int:
    """When a day's usage hash goes: once that day has left the last `retention_days` UTC days."""
    return day_start(dt.date.fromisoformat(day)) + retention_days * DAY_SECONDS


def seconds_to_next_day(now: float) -> int:
    """Whole seconds until the next UTC midnight (at least 1): when a daily quota starts afresh."""
    return max(1, math.ceil(day_start(dt.datetime.fromtimestamp(now, dt.UTC).date()) + DAY_SECONDS - now))


def gpu_share_us(pipeline_seconds: float, images: int, batch_images: int) -> int:
    """A generation's GPU microseconds: its `images` of the call's `batch_images`, of the call's pipeline time as
    the record shows it (`timings.pipeline`)."""
    return round(pipeline_seconds * 1_000_000) * images // max(batch_images, images, 1)


@dataclass(frozen=True)
class Success:
    """What a success counts: its UTC day, images and GPU microseconds, and when that day's figures expire."""

    day: str
    images: int
    gpu_us: int
    expires_at: int

    @classmethod
    def of(cls, finished_at: float, images: int, pipeline_seconds: float, batch_images: int,
           retention_days: int) -> "Success":
        day = utc_day(finished_at)
        return cls(day, images, gpu_share_us(pipeline_seconds, images, batch_images),
                   day_expires_at(day, retention_days))

    def args(self) -> list[Any]:
        """count_usage.lua's ARGV."""
        return [self.day, self.images, self.gpu_us, self.expires_at]


@dataclass(frozen=True)
class DayUsage:
    day: str
    images: int = 0
    gpu_us: int = 0
    generations: int = 0
    admitted: int = 0

    @classmethod
    def parse(cls, day: str, raw: dict[Any, Any]) -> "DayUsage":
        text = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
        return cls(day, **{f: text.get(f, 0) for f in FIELDS})


def days_between(first: dt.date, last: dt.date) -> list[str]:
    return [(first + dt.timedelta(days=i)).isoformat() for i in range((last - first).days + 1)]
