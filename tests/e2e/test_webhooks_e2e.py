"""Webhooks end to end: real API, worker and dispatcher processes, a real receiver on 127.0.0.1 that verifies
every delivery with standardwebhooks; retries, timeouts, Retry-After, 410, redirects, SSRF refusal at submit."""

import base64
import json
import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from app.auth import hash_key
from tests.procs import Service, wait_for
from tests.webhook_receiver import Receiver

SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
SECRET_A = "whsec_" + base64.b64encode(os.urandom(32)).decode()
SECRET_B = "whsec_" + base64.b64encode(os.urandom(24)).decode()  # rotation: both sign every delivery
SCHEDULE = [0.2, 0.4, 0.6]  # three retries after the first attempt
TERMINAL = ["generation.succeeded", "generation.failed", "generation.canceled"]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rcv = Receiver([SECRET_A, SECRET_B])
    rcv.start()
    yield rcv
    rcv.stop()


@pytest.fixture(scope="module")
def svc(webhooks_stack: Service, receiver: Receiver) -> Iterator[Service]:
    """An API and a dispatcher with these webhook settings on the webhooks stack's Redis and worker, whose own
    setting (a progress webhook at most every 0.2 s) is in tests/e2e/conftest.py."""
    assert webhooks_stack.extra == {"SDXL_WEBHOOK_PROGRESS_INTERVAL_SECONDS": "0.2"}
    env = {
        "SDXL_WEBHOOK_SECRETS": f"{SECRET_A},{SECRET_B}",
        "SDXL_WEBHOOK_ALLOW_ADDRESSES": f"127.0.0.1:{receiver.port}",  # the receiver only, nothing else local
        "SDXL_WEBHOOK_ALLOW_HTTP": "true",
        "SDXL_WEBHOOK_RETRY_SCHEDULE": ",".join(map(str, SCHEDULE)),
        "SDXL_WEBHOOK_TIMEOUT_SECONDS": "1",
        "SDXL_WEBHOOK_PUMP_INTERVAL_SECONDS": "0.05",
    }
    service = webhooks_stack.view(**env)
    try:
        service.start_api()
        service.start_dispatcher()
        yield service
    finally:
        service.stop()


def tag() -> str:
    return uuid.uuid4().hex[:10]


def submit(svc: Service, url: str, events: list[str] | None = None, wait: bool = True) -> dict[str, Any]:
    hook: dict[str, Any] = {"url": url}
    if events is not None:
        hook["events"] = events
    headers = {"Prefer": "wait=30"} if wait else {}
    r = httpx.post(
        f"{svc.url}/v1/generations", json={"prompt": "a hook", **SMALL, "webhook": hook}, headers=headers, timeout=40
    )
    assert r.status_code in (201, 202), r.text
    return r.json()


def attempts(svc: Service, gen_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{svc.url}/v1/generations/{gen_id}/webhooks", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def attempts_until(
    svc: Service, gen_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 30
) -> list[dict[str, Any]]:
    box: list[list[dict[str, Any]]] = []

    def check() -> bool:
        box[:] = [attempts(svc, gen_id)]
        return done(box[0])

    try:
        wait_for(check, timeout, f"webhook attempts of {gen_id}", interval=0.1)
    except TimeoutError as exc:
        raise AssertionError(f"attempts so far: {box[0] if box else None}") from exc
    return box[0]


def final(
    outcomes: tuple[str, ...] = ("delivered", "failed", "gone", "skipped", "refused", "dropped"), n: int = 1
) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda log: sum(1 for a in log if a["outcome"] in outcomes) >= n


def test_signed_deliveries_verify_with_every_secret_and_carry_the_resource(svc: Service, receiver: Receiver) -> None:
    path = f"/ok/{tag()}"
    gen = submit(svc, receiver.url(path), ["generation.started", "generation.progress", "generation.succeeded"])
    assert gen["status"] == "succeeded", gen
    assert gen["webhook"]["address"] == "127.0.0.1"  # the address approved at submit, pinned for delivery
    log = attempts_until(svc, gen["id"], lambda log: any(a["type"] == "generation.succeeded" for a in log))
    assert all(a["outcome"] == "delivered" and a["status_code"] == 204 and a["attempt"] == 1 for a in log), log
    got = receiver.to(path)
    assert len(got) == len(log)
    for d in got:
        assert d.verified == [True, True], "every delivery verifies with each of the rotating secrets"
        assert len(d.headers["webhook-signature"].split(" ")) == 2
        assert d.headers["content-type"] == "application/json"
        assert set(d.json) == {"type", "timestamp", "data"} and d.json["timestamp"].endswith("Z")
    types = [d.json["type"] for d in got]
    assert types[0] == "generation.started" and types[-1] == "generation.succeeded"
    assert "generation.progress" in types
    assert len({d.webhook_id for d in got}) == len(got)  # one id per event
    assert {d.webhook_id for d in got} == {a["event_id"] for a in log}
    resource = httpx.get(f"{svc.url}/v1/generations/{gen['id']}", timeout=10).json()
    assert got[-1].json["data"] == resource  # the body's data is the resource as GET returns it


def test_a_failing_receiver_is_retried_with_the_same_webhook_id(svc: Service, receiver: Receiver) -> None:
    path = f"/fail/2/{tag()}"
    gen = submit(svc, receiver.url(path))
    log = attempts_until(svc, gen["id"], final())
    assert [(a["attempt"], a["status_code"], a["outcome"]) for a in log] == [
        (1, 500, "retrying"),
        (2, 500, "retrying"),
        (3, 204, "delivered"),
    ]
    assert all(a["next_attempt_at"] for a in log[:2]) and log[2]["next_attempt_at"] is None
    assert len({a["event_id"] for a in log}) == 1
    got = receiver.to(path)
    assert len(got) == 3 and len({d.webhook_id for d in got}) == 1 == len({d.body for d in got})
    assert all(d.verified == [True, True] for d in got)
    assert int(got[0].headers["webhook-timestamp"]) <= int(got[-1].headers["webhook-timestamp"])


def test_a_slow_receiver_times_out_and_is_retried(svc: Service, receiver: Receiver) -> None:
    path = f"/slow/3/{tag()}"
    gen = submit(svc, receiver.url(path))
    log = attempts_until(svc, gen["id"], final())
    assert log[0]["status_code"] is None and "timed out" in log[0]["error"] and log[0]["outcome"] == "retrying"
    assert log[-1]["outcome"] == "delivered" and log[-1]["status_code"] == 204 and len(log) == 2
    got = receiver.to(path)
    assert len(got) == 2 and got[0].webhook_id == got[1].webhook_id


def test_retry_after_is_honoured(svc: Service, receiver: Receiver) -> None:
    path = f"/retry-after/2/{tag()}"
    gen = submit(svc, receiver.url(path))
    log = attempts_until(svc, gen["id"], final())
    assert [(a["status_code"], a["outcome"]) for a in log] == [(503, "retrying"), (204, "delivered")]
    first, second = receiver.to(path)
    # the schedule alone would retry after ~0.2 s; the receiver asked for 2 s (a lower bound, not a speed)
    assert second.received_at - first.received_at >= 2.0


def test_gone_stops_every_further_delivery_to_that_url(svc: Service, receiver: Receiver) -> None:
    path = f"/gone/{tag()}"
    gen = submit(svc, receiver.url(path), ["generation.started", "generation.succeeded"])
    log = attempts_until(svc, gen["id"], final(n=2))
    assert [(a["type"], a["outcome"]) for a in log] == [
        ("generation.started", "gone"),
        ("generation.succeeded", "skipped"),
    ]
    assert log[0]["status_code"] == 410 and log[1]["status_code"] is None
    again = submit(svc, receiver.url(path))
    log2 = attempts_until(svc, again["id"], final())
    assert [a["outcome"] for a in log2] == ["skipped"]
    assert len(receiver.to(path)) == 1  # only the delivery that got the 410
    other = submit(svc, receiver.url(f"/ok/{tag()}"))  # other URLs are unaffected
    assert [a["outcome"] for a in attempts_until(svc, other["id"], final())] == ["delivered"]


def test_a_dead_receiver_exhausts_the_schedule_and_leaves_the_generation_alone(
    svc: Service, receiver: Receiver
) -> None:
    path = f"/dead/{tag()}"
    gen = submit(svc, receiver.url(path))
    assert gen["status"] == "succeeded"
    log = attempts_until(svc, gen["id"], final(("failed",)))
    assert [a["attempt"] for a in log] == [1, 2, 3, 4]  # 1 + len(SCHEDULE)
    assert [a["outcome"] for a in log] == ["retrying"] * 3 + ["failed"]
    assert all(a["status_code"] == 500 and a["error"] == "HTTP 500" and a["latency_ms"] >= 0 for a in log)
    time.sleep(0.5)  # nothing more is scheduled after the schedule is spent
    assert len(attempts(svc, gen["id"])) == 4 and len(receiver.to(path)) == 4
    after = httpx.get(f"{svc.url}/v1/generations/{gen['id']}", timeout=10).json()
    assert after["status"] == "succeeded" and after["error"] is None


def test_redirects_are_not_followed(svc: Service, receiver: Receiver) -> None:
    t = tag()
    gen = submit(svc, receiver.url(f"/redirect/{t}"))
    log = attempts_until(svc, gen["id"], final(("failed",)))
    assert {a["status_code"] for a in log} == {307}
    assert receiver.to(f"/ok/{t}-target") == []


def test_progress_webhooks_are_best_effort(svc: Service, receiver: Receiver) -> None:
    path = f"/dead/{tag()}"
    gen = submit(svc, receiver.url(path), ["generation.progress"])
    log = attempts_until(svc, gen["id"], final(("dropped",)))
    assert all(a["type"] == "generation.progress" and a["attempt"] == 1 and a["outcome"] == "dropped" for a in log)


def test_queued_deliveries_survive_and_the_status_is_unaffected_without_a_dispatcher(
    svc: Service, receiver: Receiver
) -> None:
    """Deliveries wait in Redis while no dispatcher runs; the generation finishes regardless."""
    d = svc.dispatchers.pop()
    d.stop()
    try:
        path = f"/ok/{tag()}"
        gen = submit(svc, receiver.url(path))
        assert gen["status"] == "succeeded" and attempts(svc, gen["id"]) == []
    finally:
        svc.start_dispatcher()
    assert [a["outcome"] for a in attempts_until(svc, gen["id"], final())] == ["delivered"]
    assert len(receiver.to(path)) == 1


@pytest.mark.parametrize(
    "make_url",
    [
        lambda port: "https://169.254.169.254/latest/meta-data/",
        lambda port: f"http://127.0.0.1:{port + 1}/not-the-receiver",  # same host, port not allowlisted
        lambda port: f"http://2130706433:{port + 1}/",
        lambda port: f"http://0x7f000001:{port + 1}/",
        lambda port: f"http://127.1:{port + 1}/",
        lambda port: f"http://[::ffff:127.0.0.1]:{port + 1}/",
        lambda port: "https://[::1]/",
        lambda port: "https://10.0.0.1/",
        lambda port: "ftp://127.0.0.1/",
    ],
)
def test_unsafe_urls_are_refused_at_submit_and_nothing_is_enqueued(
    svc: Service, receiver: Receiver, make_url: Callable[[int], str]
) -> None:
    url = make_url(receiver.port)
    r = redis.Redis.from_url(svc.redis_url)
    quiet = ("rq:queue:sdxl-webhooks", "sdxl:webhook-due")  # earlier tests' deliveries have all been made
    wait_for(lambda: not r.exists(*quiet) and not r.zcard("rq:wip:sdxl-webhooks"), 30, "idle dispatcher")
    before = (
        len(r.keys("sdxl:gen:*")),
        r.llen("rq:queue:sdxl-generations"),
        r.llen("rq:queue:sdxl-webhooks"),
        r.zcard("sdxl:webhook-due"),
    )
    res = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "x", **SMALL, "webhook": {"url": url}}, timeout=10)
    assert res.status_code == 422, res.text
    assert res.headers["content-type"] == "application/problem+json"
    body = res.json()
    assert body["errors"][0]["field"] == "webhook.url" and body["errors"][0]["value"] == url
    assert "webhook.url" in body["detail"]
    after = (
        len(r.keys("sdxl:gen:*")),
        r.llen("rq:queue:sdxl-generations"),
        r.llen("rq:queue:sdxl-webhooks"),
        r.zcard("sdxl:webhook-due"),
    )
    assert after == before


def test_attempt_log_belongs_to_the_key_that_created_the_generation(svc: Service, receiver: Receiver) -> None:
    alice, bob = "sk-alice-" + secrets.token_hex(8), "sk-bob-" + secrets.token_hex(8)
    ring = [{"name": "alice", "sha256": hash_key(alice)}, {"name": "bob", "sha256": hash_key(bob)}]
    keyed = svc.start_api(SDXL_API_KEYS=json.dumps(ring))  # a second API process, with keys, same Redis
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    body = {"prompt": "mine", **SMALL, "webhook": {"url": receiver.url(f"/ok/{tag()}")}}
    gen = httpx.post(f"{keyed}/v1/generations", json=body, headers={**as_alice, "Prefer": "wait=30"}, timeout=40)
    gen_id = gen.json()["id"]
    url = f"{keyed}/v1/generations/{gen_id}/webhooks"
    wait_for(lambda: httpx.get(url, headers=as_alice, timeout=10).json()["data"], 30, "alice's attempt log")
    assert httpx.get(url, headers=as_alice, timeout=10).json()["data"][0]["outcome"] == "delivered"
    for other in (httpx.get(url, headers=as_bob, timeout=10), httpx.get(f"{svc.url}/v1/generations/{gen_id}/webhooks")):
        assert other.status_code == 404 and other.headers["content-type"] == "application/problem+json"
    assert httpx.get(url, timeout=10).status_code == 401


def test_attempt_log_is_owner_checked(svc: Service) -> None:
    missing = "gen_" + secrets.token_urlsafe(16)
    r = httpx.get(f"{svc.url}/v1/generations/{missing}/webhooks", timeout=10)
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    gen = httpx.post(
        f"{svc.url}/v1/generations", json={"prompt": "no hook", **SMALL}, headers={"Prefer": "wait=30"}, timeout=40
    ).json()
    assert attempts(svc, gen["id"]) == []


def test_previews_never_go_to_a_webhook(svc: Service, receiver: Receiver) -> None:
    """A webhook subscribed to every event it may name gets no `generation.preview` (SSE only), and cannot name it."""
    from app.schemas import EVENT_TYPES

    every = list(EVENT_TYPES.__args__)
    path = f"/ok/{tag()}"
    r = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "a hook", **SMALL, "previews": True,
                   "preview_every": 1, "webhook": {"url": receiver.url(path), "events": every}},
                   headers={"Prefer": "wait=30"}, timeout=40)
    assert r.status_code == 201 and r.json()["params"]["preview_every"] == 1, r.text
    gen_id = r.json()["id"]
    log = attempts_until(svc, gen_id, lambda log: any(a["type"] == "generation.succeeded" for a in log))
    stream: Any = redis.Redis.from_url(svc.redis_url).xrange(f"sdxl:events:{gen_id}")
    assert sum(1 for _id, f in stream if f[b"type"] == b"generation.preview") == SMALL["num_inference_steps"]
    assert "generation.preview" not in {a["type"] for a in log}
    assert "generation.preview" not in {d.json["type"] for d in receiver.to(path)}
    refused = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "p", "webhook": {
        "url": receiver.url(path), "events": ["generation.preview"]}}, timeout=10)
    assert refused.status_code == 422
