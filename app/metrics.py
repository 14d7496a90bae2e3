"""Prometheus metrics for `GET /metrics`: this API process's HTTP numbers plus the cluster view from Redis.

Two kinds of numbers:
- per process (this replica): HTTP requests by route template and status, latency histograms, requests in
  flight, and the standard process/Python collectors. Kept in memory by a pure-ASGI middleware, which also
  writes the one JSON log line per request.
- cluster-wide, read from Redis at scrape time by `ClusterCollector`: queue depths and oldest-job ages,
  generations by final status and error type, stage-duration histograms, images, requeues and webhook
  outcomes (counters the workers, reapers and dispatcher add to `sdxl:metrics`, common/contract/stats.py), and
  per-worker gauges from the worker registry hashes. Every replica shows the same cluster view, so one
  scrape of any replica is enough; aggregate with `max without (instance)` when scraping several.
"""

import hmac
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from rq.utils import utcparse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Problem
from common import logs, scripts
from common.contract import keys, queueing, stats

log = logging.getLogger("app.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/metrics/scaling"})  # logged at debug: polled every few seconds
WEBHOOK_QUEUE_KEY = f"rq:queue:{keys.WEBHOOK_QUEUE}"



class HttpMetrics:
    """This process's HTTP metrics, in the app's own registry (create_app may run more than once)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sdxl_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sdxl_http_request_duration_seconds",
            "HTTP request latency (to the last body byte) by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "sdxl_http_requests_in_flight", "HTTP requests being served by this process", registry=registry
        )


class ObservabilityMiddleware:
    """Pure ASGI: per request, a counter and a latency observation by route template, and one log line."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        request_id = scope.get("state", {}).get("request_id")
        self.metrics.in_flight.inc()
        try:
            with logs.bind(request_id=request_id):
                await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            duration = time.perf_counter() - start
            # the router leaves the matched route in the scope: label by its template, never the raw path
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(duration)
            log.log(
                logging.DEBUG if route in PROBES else logging.INFO,
                "%s %s %d",
                method,
                route,
                status,
                extra={
                    "request_id": request_id,
                    "method": method,
                    "route": route,
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(duration * 1000, 2),
                },
            )


class ClusterCollector(Collector):
    """Reads the cluster's numbers from Redis at scrape time (two pipelined round trips)."""

    def __init__(self, get_redis: Callable[[], "redis.Redis | None"]) -> None:
        self.get_redis = get_redis

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to declare up front: the families depend on what Redis holds

    def collect(self) -> Iterable[Metric]:
        ok = GaugeMetricFamily("sdxl_cluster_scrape_ok", "1 when the cluster view could be read from Redis")
        try:
            r = self.get_redis()
            families = self.read(r) if r is not None else []
        except redis.RedisError as exc:
            log.warning("metrics: cluster view unavailable: %s", exc)
            families = []
            r = None
        ok.add_metric([], 1.0 if r is not None else 0.0)
        yield ok
        yield from families

    def read(self, r: redis.Redis) -> list[Metric]:
        now = time.time()
        pipe = r.pipeline(transaction=False)
        pipe.hgetall(keys.METRICS)
        pipe.llen(keys.RQ_QUEUE_KEY)
        pipe.lindex(keys.RQ_QUEUE_KEY, 0)
        pipe.llen(WEBHOOK_QUEUE_KEY)
        pipe.lindex(WEBHOOK_QUEUE_KEY, 0)
        pipe.eval(scripts.source("pending"), 1, keys.ACTIVE_OWNERS, queueing.PRIORITY_SPAN)
        pipe.scard(keys.RUNNING)
        pipe.zrange(keys.WORKERS, 0, -1)
        pipe.hgetall(keys.USAGE_IMAGES)
        pipe.hgetall(keys.USAGE_GPU_US)
        (raw_stats, gen_len, gen_head, hook_len, hook_head, (pending_len, pending_oldest), running, wids,
         usage_images, usage_gpu_us) = pipe.execute()
        pipe = r.pipeline(transaction=False)
        # the heads' ages: a generation counts from its creation, a webhook job from its enqueueing
        gen_id = gen_head.decode().rsplit("-", 1)[0] if gen_head else ""
        pipe.hget(keys.generation(gen_id), "created_at")
        pipe.hget(f"rq:job:{hook_head.decode() if hook_head else ''}", "enqueued_at")
        for wid in wids:
            pipe.hgetall(keys.worker(wid.decode()))
        gen_created, hook_enqueued, *workers = pipe.execute()

        depth = GaugeMetricFamily(
            "sdxl_queue_depth",
            "Jobs waiting, per queue (pending = fair-share lines not yet fed to the rq queue)",
            labels=["queue"],
        )
        age = GaugeMetricFamily(
            "sdxl_queue_oldest_age_seconds", "Age of the oldest waiting job, per queue (0 when empty)", labels=["queue"]
        )
        depth.add_metric(["pending"], float(pending_len))
        age.add_metric(["pending"], max(0.0, now - pending_oldest / 1000) if pending_oldest >= 0 else 0.0)
        depth.add_metric([keys.GENERATION_QUEUE], float(gen_len))
        age.add_metric([keys.GENERATION_QUEUE], _age(now, _float(gen_created)))
        depth.add_metric([keys.WEBHOOK_QUEUE], float(hook_len))
        age.add_metric([keys.WEBHOOK_QUEUE], _age(now, _rq_time(hook_enqueued)))
        out: list[Metric] = [depth, age]
        running_g = GaugeMetricFamily("sdxl_generations_running", "Generations running on some worker now")
        running_g.add_metric([], float(running))
        out.append(running_g)
        out += self.counters(raw_stats)
        out += usage(_text_hash(usage_images), _text_hash(usage_gpu_us))
        out += self.workers([_text_hash(w) for w in workers if w], now)
        return out

    def counters(self, raw: dict[Any, Any]) -> list[Metric]:
        counters, hists = stats.parse(raw)
        gens = CounterMetricFamily(
            "sdxl_generations",
            "Generations that reached a final status, by status and error type (all workers)",
            labels=["status", "error_type"],
        )
        requeues = CounterMetricFamily(
            "sdxl_generation_requeues", "Generations put back in line, by reason", labels=["reason"]
        )
        hooks = CounterMetricFamily(
            "sdxl_webhook_deliveries", "Webhook delivery attempts by outcome", labels=["outcome"]
        )
        images = CounterMetricFamily(
            "sdxl_images_generated", "Images stored by succeeded generations; images per second = rate() of this"
        )
        images.add_metric([], counters.get("images", 0.0))
        adapter_events = CounterMetricFamily(
            "sdxl_adapter_events", "LoRA adapter cache events on the workers: load (tier file: read from its "
            "file; cpu: back from the CPU tier), swap (the weights changed to another adapter set), evict (tier "
            "device: down to the CPU tier; cpu: dropped)", labels=["event", "tier"])
        adapter_urls = CounterMetricFamily(
            "sdxl_adapter_url_fetches", "Adapters by URL at submit: fetched, or cached (the URL's file known from "
            "an earlier fetch)", labels=["result"])
        for field, value in sorted(counters.items()):
            kind, _, rest = field.partition("|")
            if kind == "gen":
                status, _, etype = rest.partition("|")
                gens.add_metric([status, etype], value)
            elif kind == "requeue":
                requeues.add_metric([rest], value)
            elif kind == "webhook":
                hooks.add_metric([rest], value)
            elif kind == "adapter":
                event, _, tier = rest.partition("|")
                adapter_events.add_metric([event, tier], value)
            elif kind == "adapter_url":
                adapter_urls.add_metric([rest], value)
        stages = HistogramMetricFamily(
            "sdxl_generation_stage_seconds",
            "Time spent per stage: queue_wait "
            "(creation to start, every start), then base, refiner, decoding, encoding, "
            "uploading (succeeded generations)",
            labels=["stage"],
        )
        for stage in stats.STAGES:
            h = hists.get(stage, stats.Histogram())
            stages.add_metric([stage], h.cumulative(), h.sum)
        total = HistogramMetricFamily("sdxl_generation_duration_seconds", "Creation to success, succeeded generations")
        h = hists.get(stats.TOTAL, stats.Histogram())
        total.add_metric([], h.cumulative(), h.sum)
        adapter_seconds = HistogramMetricFamily(
            "sdxl_adapter_seconds", "Seconds per adapter load (tier file: file to device; cpu: CPU tier to "
            "device) and swap (fusing into the weights)", labels=["event", "tier"])
        for event in ("load", "swap"):
            for tier in stats.ADAPTER_TIERS[event]:
                h = hists.get(f"adapter_{event}_{tier}", stats.Histogram())
                adapter_seconds.add_metric([event, tier], h.cumulative(), h.sum)
        return [gens, images, requeues, hooks, stages, total, adapter_events, adapter_urls, adapter_seconds]

    def workers(self, hashes: list[dict[str, str]], now: float) -> list[Metric]:
        lab = ["worker"]
        up = GaugeMetricFamily("sdxl_worker_up", "1 while the worker's heartbeat is fresh", labels=lab)
        ready = GaugeMetricFamily(
            "sdxl_worker_ready",
            "1 when models are loaded, warm-up is done and the worker takes jobs (state ready or busy)",
            labels=lab,
        )
        state = GaugeMetricFamily("sdxl_worker_state", "1 for the worker's current state", labels=[*lab, "state"])
        beat = GaugeMetricFamily("sdxl_worker_heartbeat_age_seconds", "Seconds since the last heartbeat", labels=lab)
        jobs = CounterMetricFamily(
            "sdxl_worker_jobs_done", "Generations this worker process finished successfully", labels=lab
        )
        imgs = CounterMetricFamily("sdxl_worker_images", "Images this worker process stored", labels=lab)
        busy = CounterMetricFamily("sdxl_worker_busy_seconds", "Seconds this worker spent in the pipeline", labels=lab)
        loads = CounterMetricFamily(
            "sdxl_worker_model_loads", "Model loads in this worker process (1 = loaded once, as intended)", labels=lab
        )
        load_s = GaugeMetricFamily("sdxl_worker_model_load_seconds", "Seconds the model load took", labels=lab)
        mem = GaugeMetricFamily(
            "sdxl_worker_gpu_memory_allocated_bytes", "GPU memory allocated by torch (CUDA workers)", labels=lab
        )
        peak = GaugeMetricFamily(
            "sdxl_worker_gpu_memory_peak_bytes",
            "Peak GPU memory allocated by torch since the worker started (CUDA workers)",
            labels=lab,
        )
        live_n = ready_n = 0
        for w in hashes:
            wid = w.get("id", "?")
            age = max(0.0, now - (_float(w.get("heartbeat")) or 0.0))
            fresh = age <= keys.WORKER_LIVE_SECONDS
            is_ready = fresh and w.get("state") in ("ready", "busy")
            live_n += fresh
            ready_n += is_ready
            up.add_metric([wid], float(fresh))
            ready.add_metric([wid], float(is_ready))
            state.add_metric([wid, w.get("state", "unknown")], 1.0)
            beat.add_metric([wid], age)
            jobs.add_metric([wid], _float(w.get("jobs_done")) or 0.0)
            imgs.add_metric([wid], _float(w.get("images_done")) or 0.0)
            busy.add_metric([wid], _float(w.get("busy_seconds")) or 0.0)
            loads.add_metric([wid], _float(w.get("model_loads")) or 0.0)
            if "load_seconds" in w:
                load_s.add_metric([wid], _float(w["load_seconds"]) or 0.0)
            if "allocated" in w:
                mem.add_metric([wid], _float(w["allocated"]) or 0.0)
            if "peak" in w:
                peak.add_metric([wid], _float(w["peak"]) or 0.0)
        live = GaugeMetricFamily("sdxl_workers_live", "Workers with a fresh heartbeat")
        live.add_metric([], float(live_n))
        ready_total = GaugeMetricFamily("sdxl_workers_ready", "Workers ready to take jobs (ready or busy)")
        ready_total.add_metric([], float(ready_n))
        return [live, ready_total, up, ready, state, beat, jobs, imgs, busy, loads, load_s, mem, peak]


def usage(images: dict[str, str], gpu_us: dict[str, str]) -> list[Metric]:
    """Usage per API key name, all time (common/usage.py; `GET /v1/usage` has it per day): one series per key
    that has produced anything, so the label's values are bounded by the keys configured."""
    img = CounterMetricFamily("sdxl_usage_images", "Images of succeeded generations, by API key name "
                              "(`open` without keys)", labels=["key"])
    gpu = CounterMetricFamily("sdxl_usage_gpu_seconds", "GPU seconds of succeeded generations (each one's share of "
                              "its pipeline call), by API key name", labels=["key"])
    for owner in sorted(images.keys() | gpu_us.keys()):
        name = owner.removeprefix("key:")
        img.add_metric([name], float(images.get(owner, 0)))
        gpu.add_metric([name], int(gpu_us.get(owner, 0)) / 1_000_000)
    return [img, gpu]


def build_registry(get_redis: Callable[[], "redis.Redis | None"]) -> tuple[CollectorRegistry, HttpMetrics]:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(ClusterCollector(get_redis))
    return registry, HttpMetrics(registry)


def check_token(expected: str | None, authorization: str | None, path: str = "/metrics") -> None:
    """With SDXL_METRICS_TOKEN set, /metrics (and /metrics/scaling) want `Authorization: Bearer <token>`; without
    it, they are open."""
    if not expected:
        return
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Problem(
            401,
            f"{path} needs `Authorization: Bearer <SDXL_METRICS_TOKEN>`",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )


def _float(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _age(now: float, since: float | None) -> float:
    return max(0.0, now - since) if since else 0.0


def _rq_time(value: bytes | None) -> float | None:
    if not value:
        return None
    try:
        return utcparse(value.decode()).timestamp()
    except ValueError:
        return None


def _text_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}
