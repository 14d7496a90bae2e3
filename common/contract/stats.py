"""Cluster-wide metric counters in one Redis hash (`sdxl:metrics`), added where things happen.

Generations finish in worker processes, requeues happen in any process's reaper, webhooks are delivered by
the dispatcher: each adds its numbers to a pipeline it already sends, and every API replica's /metrics reads
the hash back (app/metrics.py), so one scrape of any replica shows the whole cluster. Hash fields:

    gen|<status>|<error type>   generations that reached a final status ("" error type unless failed)
    images                      images stored by succeeded generations
    requeue|<reason>            generations put back in line (lease_expired, shutdown)
    webhook|<outcome>           webhook delivery attempts by outcome
    adapter|<event>|<tier>      LoRA adapter cache events on the workers (load from file or cpu; swap on the
                                device; evict from device or cpu)
    adapter_url|<result>        adapters by URL at submit: fetched, or cached (the URL's file known already)
    h|<name>|<i>                observations that fell in bucket i of histogram <name> (not cumulative)
    h|<name>|sum                sum of the observations

Stdlib only: the API, the worker, the dispatcher and the cleanup process all import it.
"""

from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

from common.contract.keys import METRICS
from common.contract.records import as_str
from common.contract.status import TERMINAL_STATUSES, GenerationStatus

# seconds; upper bounds of the histogram buckets (a last, implicit +Inf bucket follows)
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
STAGES = ("queue_wait", "base", "refiner", "decoding", "encoding", "uploading")
TOTAL = "total"  # creation to final status, succeeded generations


def observe(pipe: Any, name: str, seconds: float) -> None:
    seconds = max(0.0, float(seconds))
    pipe.hincrby(METRICS, f"h|{name}|{bisect_left(BUCKETS, seconds)}", 1)
    pipe.hincrbyfloat(METRICS, f"h|{name}|sum", seconds)


def record_event(pipe: Any, event_type: str, rec: Mapping[str, Any]) -> None:
    """Count a started or final generation event; `rec` is the decoded record the event carries."""
    kind = event_type.rpartition(".")[2]
    if kind == "started":
        created, started = _num(rec.get("created_at")), _num(rec.get("started_at"))
        if created is not None and started is not None:
            observe(pipe, "queue_wait", started - created)
        return
    if kind not in TERMINAL_STATUSES:
        return
    error = rec.get("error") if kind == GenerationStatus.failed else None
    etype = str(error.get("type", "")) if isinstance(error, dict) else ""
    pipe.hincrby(METRICS, f"gen|{kind}|{etype}", 1)
    if kind != GenerationStatus.succeeded:
        return
    pipe.hincrby(METRICS, "images", len(rec.get("images") or []))
    timings = rec.get("timings") or {}
    for stage in STAGES[1:]:
        value = _num(timings.get(stage))
        if value is not None and (value > 0 or stage != "refiner"):  # no refiner ran: nothing to observe
            observe(pipe, stage, value)
    total = _num(timings.get("total"))
    if total is not None:
        observe(pipe, TOTAL, total)


def count_requeue(pipe: Any, reason: str) -> None:
    pipe.hincrby(METRICS, f"requeue|{reason}", 1)


def count_webhook(pipe: Any, outcome: str) -> None:
    """For the dispatcher: one delivery attempt ended with `outcome` (delivered, retrying, failed, gone...)."""
    pipe.hincrby(METRICS, f"webhook|{outcome}", 1)


ADAPTER_EVENTS = ("load", "swap", "evict")
ADAPTER_TIERS = {"load": ("file", "cpu"), "swap": ("device",), "evict": ("device", "cpu")}


def count_adapter(pipe: Any, event: str, tier: str, seconds: float | None = None) -> None:
    """For the workers: one adapter `event` in `tier` (worker/adapters.py); load and swap also observe their
    seconds."""
    pipe.hincrby(METRICS, f"adapter|{event}|{tier}", 1)
    if seconds is not None:
        observe(pipe, f"adapter_{event}_{tier}", seconds)


def count_adapter_url(pipe: Any, result: str) -> None:
    """For the API: an adapter URL at submit was `fetched`, or `cached` (its file known from an earlier fetch)."""
    pipe.hincrby(METRICS, f"adapter_url|{result}", 1)


def _num(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class Histogram:
    """One histogram read back from the hash: cumulative bucket counts for Prometheus."""

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip([*map(str, BUCKETS), "+Inf"], self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


def parse(raw: Mapping[Any, Any]) -> tuple[dict[str, float], dict[str, Histogram]]:
    """The hash -> (plain counters by field, histograms by name)."""
    counters: dict[str, float] = {}
    hists: dict[str, Histogram] = {}
    for k, v in raw.items():
        field = as_str(k)
        value = float(as_str(v))
        if not field.startswith("h|"):
            counters[field] = value
            continue
        _, name, slot = field.split("|", 2)
        h = hists.setdefault(name, Histogram())
        if slot == "sum":
            h.sum = value
        elif slot.isdigit() and int(slot) < len(h.counts):
            h.counts[int(slot)] += int(value)
    return counters, hists
