"""GET /metrics/scaling end to end: the JSON KEDA's metrics-api scaler reads (deploy/kubernetes, docs/kubernetes.md).

Real API processes and Redis; for running work, the shared stack's real worker holding a long generation.
"""

import hashlib
import json

import httpx

from tests.procs import Service, wait_for

SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
# long enough on the tiny model that the worker is still inside it when the test reads the numbers; the test
# checks that it was (still running after the read) rather than assuming a duration
LONG = {"width": 512, "height": 512, "num_inference_steps": 100, "refiner": {"mode": "none"}}
FIELDS = {"work", "queued", "pending", "fed", "running", "workers_live", "workers_ready"}


def scaling(base: str, token: str | None = None) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{base}/metrics/scaling", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == FIELDS and all(isinstance(v, int) for v in body.values()), body
    return body  # type: ignore[no-any-return]


def submit(base: str, prompt: str, body: dict) -> str:
    r = httpx.post(f"{base}/v1/generations", json={"prompt": prompt, **body}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]  # type: ignore[no-any-return]


def status(base: str, gen_id: str) -> str:
    return httpx.get(f"{base}/v1/generations/{gen_id}", timeout=10).json()["status"]  # type: ignore[no-any-return]


def test_queued_work_counts_the_fair_share_lines_and_the_rq_list(idle_service: Service) -> None:
    base = idle_service.url
    assert scaling(base) == dict.fromkeys(FIELDS, 0)
    for i in range(5):
        submit(base, f"scale {i}", SMALL)
    other = idle_service.start_api()  # a second replica reads the same numbers
    submit(base, "urgent", {**SMALL, "priority": 2})
    # the rq list holds SDXL_QUEUE_FEED_DEPTH (4) ids; the other two wait in the fair-share line. No worker here.
    expected = {"work": 6, "queued": 6, "pending": 2, "fed": 4, "running": 0, "workers_live": 0,
                "workers_ready": 0}
    assert scaling(base) == expected
    assert scaling(other) == expected


def test_running_work_is_counted_until_it_ends(service: Service) -> None:
    base = service.url
    long_id = submit(base, "scale long", LONG)
    wait_for(lambda: status(base, long_id) == "running", 120, f"{long_id} running", interval=0.05)
    waiting = [submit(base, f"scale behind {i}", SMALL) for i in range(2)]
    numbers = scaling(base)
    still_running = status(base, long_id) == "running"
    try:
        assert still_running, "the long generation ended before the numbers were read: make LONG longer"
        assert numbers["running"] == 1
        assert numbers["queued"] == 2 and numbers["pending"] + numbers["fed"] == 2
        assert numbers["work"] == 3
        assert numbers["workers_live"] == 1 and numbers["workers_ready"] == 1
    finally:
        for gen_id in (long_id, *waiting):
            httpx.post(f"{base}/v1/generations/{gen_id}/cancel", timeout=30)
    wait_for(lambda: scaling(base)["work"] == 0, 120, "work back to 0 after the cancels", interval=0.1)


def test_token_required_when_set_and_route_kept_out_of_the_public_spec(idle_service: Service) -> None:
    # as on Kubernetes: API keys and the metrics token both set; KEDA holds the token, not an API key
    key = "sdxl_scaling-test-key"
    keys_json = json.dumps([{"name": "scaler-test", "sha256": hashlib.sha256(key.encode()).hexdigest()}])
    guarded = idle_service.start_api(SDXL_METRICS_TOKEN="s3cret-scaling", SDXL_API_KEYS=keys_json)
    r = httpx.post(f"{guarded}/v1/generations", json={"prompt": "guarded", **SMALL},
                   headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 202, r.text
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-scaling"}):
        r = httpx.get(f"{guarded}/metrics/scaling", headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["www-authenticate"].startswith("Bearer")
        problem = r.json()
        assert "/metrics/scaling" in problem["detail"] and "s3cret" not in json.dumps(problem)
    assert scaling(guarded, token="s3cret-scaling")["queued"] == 1
    # operator-only, as /metrics: not part of the public API description
    assert "/metrics/scaling" not in httpx.get(f"{guarded}/openapi.json", timeout=10).json()["paths"]


def test_redis_unreachable_is_an_error_never_zero_work(idle_service: Service) -> None:
    """KEDA must see a failure (and keep its fallback replicas), not `work: 0`, which would scale to zero."""
    dead = idle_service.start_api(SDXL_REDIS_URL="redis://127.0.0.1:1/0")
    r = httpx.get(f"{dead}/metrics/scaling", timeout=30)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "2"
