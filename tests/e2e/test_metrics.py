"""GET /metrics end to end: real generations on a real worker, then one scrape of the API shows the cluster.

The worker-side numbers (final statuses, stage histograms, images, per-worker gauges) are written to Redis
by the worker and read back by the API at scrape time; the HTTP numbers are the API process's own. The cluster
is the shared stack (one worker) and, for the queue numbers, the idle one (no worker, flushed): tests/e2e/conftest.py.
"""

import re
import time
from datetime import datetime

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Service, wait_for

SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{base}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def final(svc: Service, gen_id: str) -> dict:
    def done() -> dict | None:
        body = httpx.get(f"{svc.url}/v1/generations/{gen_id}", headers={"Prefer": "wait=20"}, timeout=30).json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    return wait_for(done, 120, f"{gen_id} final", interval=0.1)


def test_generations_counted_by_status_with_stage_histograms_and_worker_gauges(service: Service) -> None:
    before = scrape(service.url)
    post = f"{service.url}/v1/generations"
    first = httpx.post(post, json={"prompt": "metrics one", **SMALL}, timeout=30).json()
    # queued behind the first with a 1 ms deadline: it can only start after its deadline -> failed
    late = httpx.post(post, json={"prompt": "metrics late", "deadline": 0.001, **SMALL}, timeout=30).json()
    doomed = httpx.post(post, json={"prompt": "metrics canceled", **SMALL}, timeout=30).json()
    assert httpx.post(f"{post}/{doomed['id']}/cancel", timeout=30).status_code in (200, 202)
    waited = httpx.post(post, json={"prompt": "metrics two", **SMALL}, headers={"Prefer": "wait=60"}, timeout=70)
    assert waited.status_code == 201, waited.text
    assert final(service, first["id"])["status"] == "succeeded"
    late_final = final(service, late["id"])
    assert late_final["status"] == "failed" and late_final["error"]["type"] == "deadline_exceeded", late_final
    assert final(service, doomed["id"])["status"] == "canceled"

    wid = service.workers[0].worker_id  # type: ignore[attr-defined]
    jobs_before = value(before, "sdxl_worker_jobs_done_total", worker=wid)

    def refreshed() -> Samples | None:
        # per-worker numbers come from the registry, which the heartbeat refreshes every second here
        s = scrape(service.url)
        return s if value(s, "sdxl_worker_jobs_done_total", worker=wid) - jobs_before >= 2 else None

    after = wait_for(refreshed, 20, "worker jobs_done to reach the registry")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sdxl_generations_total", status="succeeded", error_type="") == 2
    assert delta("sdxl_generations_total", status="failed", error_type="deadline_exceeded") == 1
    assert delta("sdxl_generations_total", status="canceled", error_type="") == 1
    assert delta("sdxl_images_generated_total") == 2
    for stage in ("base", "refiner", "decoding", "encoding", "uploading"):
        assert delta("sdxl_generation_stage_seconds_count", stage=stage) == 2, stage
        assert value(after, "sdxl_generation_stage_seconds_sum", stage=stage) > 0, stage
    assert delta("sdxl_generation_stage_seconds_count", stage="queue_wait") >= 2  # every start
    assert delta("sdxl_generation_duration_seconds_count") == 2
    # buckets are cumulative and end with +Inf == count
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "sdxl_generation_stage_seconds_bucket" and dict(labels)["stage"] == "base"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    assert buckets[-1] == (float("inf"), value(after, "sdxl_generation_stage_seconds_count", stage="base"))

    assert value(after, "sdxl_cluster_scrape_ok") == 1
    assert value(after, "sdxl_workers_live") == 1 and value(after, "sdxl_workers_ready") == 1
    assert value(after, "sdxl_worker_up", worker=wid) == 1
    assert value(after, "sdxl_worker_ready", worker=wid) == 1
    assert value(after, "sdxl_worker_model_loads_total", worker=wid) == 1  # loaded once, not per job
    assert value(after, "sdxl_worker_images_total", worker=wid) >= 2
    assert value(after, "sdxl_worker_busy_seconds_total", worker=wid) > 0
    assert value(after, "sdxl_generations_running") == 0

    # HTTP numbers by route template, never by raw path (ids would explode the series count)
    assert delta("sdxl_http_requests_total", method="POST", route="/v1/generations", status="201") == 1
    assert delta("sdxl_http_requests_total", method="POST", route="/v1/generations", status="202") == 3
    assert delta("sdxl_http_requests_total", method="GET", route="/v1/generations/{gen_id}", status="200") >= 3
    assert delta("sdxl_http_request_duration_seconds_count", method="POST", route="/v1/generations") == 4
    leaked = [k for k in after if any(re.search(r"gen_[A-Za-z0-9_-]{22}", v) for _, v in k[1])]
    assert not leaked, "a raw generation id leaked into a label"


def created(gen: dict) -> float:
    return datetime.fromisoformat(gen["created_at"].replace("Z", "+00:00")).timestamp()


def test_queue_depth_and_oldest_age_per_queue(idle_service: Service) -> None:
    post = f"{idle_service.url}/v1/generations"
    gens = [httpx.post(post, json={"prompt": f"q{i}", **SMALL}, timeout=30).json() for i in range(5)]
    urgent = httpx.post(post, json={"prompt": "urgent", "priority": 2, **SMALL}, timeout=30).json()
    t0 = time.time()
    s = scrape(idle_service.url)
    t1 = time.time()
    # the rq queue holds `queue_feed_depth` (4) ids; the rest wait in the fair-share line
    assert value(s, "sdxl_queue_depth", queue="sdxl-generations") == 4
    assert value(s, "sdxl_queue_depth", queue="pending") == 2
    assert value(s, "sdxl_queue_depth", queue="sdxl-webhooks") == 0
    assert value(s, "sdxl_generations_running") == 0
    assert value(s, "sdxl_workers_live") == 0
    # oldest in the rq queue: the first submitted; oldest pending: the 5th (older than the urgent one,
    # though the urgent one is ahead of it in line). ms resolution on both sides.
    head, oldest_pending = created(gens[0]), created(gens[4])
    assert created(urgent) >= oldest_pending
    gen_age = value(s, "sdxl_queue_oldest_age_seconds", queue="sdxl-generations")
    pending_age = value(s, "sdxl_queue_oldest_age_seconds", queue="pending")
    assert t0 - head - 0.002 <= gen_age <= t1 - head + 0.002
    assert t0 - oldest_pending - 0.002 <= pending_age <= t1 - oldest_pending + 0.002
    assert value(s, "sdxl_queue_oldest_age_seconds", queue="sdxl-webhooks") == 0


def test_metrics_token_required_when_set(idle_service: Service) -> None:
    guarded = idle_service.start_api(SDXL_METRICS_TOKEN="s3cret-metrics")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-metrics"}):
        r = httpx.get(f"{guarded}/metrics", headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "s3cret" not in r.text
    assert value(scrape(guarded, token="s3cret-metrics"), "sdxl_cluster_scrape_ok") == 1
    # the replica without a token stays open (for a private scrape network)
    assert value(scrape(idle_service.url), "sdxl_cluster_scrape_ok") == 1
    # /metrics is an operator endpoint: not part of the public API description
    assert "/metrics" not in httpx.get(f"{guarded}/openapi.json", timeout=10).json()["paths"]
