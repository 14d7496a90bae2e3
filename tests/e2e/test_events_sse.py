"""Live events over SSE through real API processes: order, ids, end after the terminal event, resume with
Last-Event-ID after a dropped connection, and a second API replica on the same Redis."""

import json
import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from app.auth import hash_key
from tests.procs import Service

LONG = {"width": 128, "height": 128, "num_inference_steps": 12}  # many progress events (one per step here)
TERMINAL = {"generation.succeeded", "generation.failed", "generation.canceled"}


@pytest.fixture(scope="module")
def svc(shared_stack: Service) -> Iterator[Service]:
    """This module's API on the shared stack, whose worker sends a progress event per step."""
    assert shared_stack.extra.get("SDXL_PROGRESS_INTERVAL_SECONDS") == "0"
    service = shared_stack.view()
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def second_api(svc: Service) -> str:
    return svc.start_api()


def sse_events(url: str, last_event_id: str | None = None, stop_after: int | None = None) -> list[dict[str, Any]]:
    """Read an SSE stream until the server ends it, or disconnect after `stop_after` events."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    current: dict[str, str] = {}
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(30)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line == "":
                if "event" in current:
                    events.append({**current, "data": json.loads(current["data"])})
                current = {}
                if stop_after is not None and len(events) >= stop_after:
                    break  # leaving the block closes the connection mid-stream
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            current[name] = value[1:] if value.startswith(" ") else value
    return events


def id_key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


def stream_ids(svc: Service, gen_id: str) -> list[str]:
    r = redis.Redis.from_url(svc.redis_url)
    entries: Any = r.xrange(f"sdxl:events:{gen_id}")
    return [eid.decode() for eid, _ in entries]


def create(base: str, body: dict[str, Any]) -> dict[str, Any]:
    res = httpx.post(f"{base}/v1/generations", json={"prompt": "events", **body}, timeout=10)
    assert res.status_code == 202, res.text
    return res.json()


def assert_well_formed(events: list[dict[str, Any]], gen_id: str, final: str = "generation.succeeded") -> None:
    keys = [id_key(e["id"]) for e in events]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), "ids strictly increase"
    assert events[-1]["event"] == final and events[-1]["data"]["status"] == final.split(".")[1]
    assert all(e["event"] not in TERMINAL for e in events[:-1])
    assert all(e["data"]["id"] == gen_id for e in events)


def test_live_stream_is_ordered_and_ends_after_the_terminal_event(svc: Service) -> None:
    gen = create(svc.url, LONG)
    events = sse_events(f"{svc.url}/v1/generations/{gen['id']}/events")  # returns only because the server ends it
    assert_well_formed(events, gen["id"])
    names = [e["event"] for e in events]
    assert names[0] == "generation.started" and names.count("generation.progress") >= 10
    steps = [e["data"]["progress"]["step"] for e in events if e["data"]["progress"]["stage"] == "base"]
    assert steps == sorted(steps)
    assert [e["id"] for e in events] == stream_ids(svc, gen["id"])  # every entry, nothing invented


def test_a_final_generation_sends_its_history_and_ends(svc: Service) -> None:
    gen = httpx.post(
        f"{svc.url}/v1/generations",
        json={"prompt": "done", "width": 128, "height": 128, "num_inference_steps": 4},
        headers={"Prefer": "wait=30"},
        timeout=40,
    ).json()
    assert gen["status"] == "succeeded"
    events = sse_events(f"{svc.url}/v1/generations/{gen['id']}/events")
    assert_well_formed(events, gen["id"])
    assert [e["id"] for e in events] == stream_ids(svc, gen["id"])
    # a client that reconnects after the terminal event is told to stop: 204, the SSE way to end reconnects
    r = httpx.get(
        f"{svc.url}/v1/generations/{gen['id']}/events", headers={"Last-Event-ID": events[-1]["id"]}, timeout=10
    )
    assert r.status_code == 204 and r.content == b""
    # resuming from an earlier event replays exactly what followed it
    assert sse_events(f"{svc.url}/v1/generations/{gen['id']}/events", last_event_id=events[0]["id"]) == events[1:]


def test_resume_with_last_event_id_loses_and_repeats_nothing(svc: Service) -> None:
    gen = create(svc.url, LONG)
    url = f"{svc.url}/v1/generations/{gen['id']}/events"
    first = sse_events(url, stop_after=3)  # the client drops the connection mid-stream
    assert len(first) == 3 and first[-1]["event"] not in TERMINAL
    rest = sse_events(url, last_event_id=first[-1]["id"])
    combined = first + rest
    assert_well_formed(combined, gen["id"])
    assert [e["id"] for e in combined] == stream_ids(svc, gen["id"])  # no loss, no duplicates


def test_a_second_api_replica_serves_and_resumes_the_same_stream(svc: Service, second_api: str) -> None:
    gen = create(svc.url, LONG)  # created through the first API
    first = sse_events(f"{second_api}/v1/generations/{gen['id']}/events", stop_after=2)
    rest = sse_events(f"{svc.url}/v1/generations/{gen['id']}/events", last_event_id=first[-1]["id"])
    assert_well_formed(first + rest, gen["id"])
    assert [e["id"] for e in first + rest] == stream_ids(svc, gen["id"])
    whole = sse_events(f"{second_api}/v1/generations/{gen['id']}/events")
    assert [e["id"] for e in whole] == [e["id"] for e in first + rest]


def test_a_cancel_ends_the_stream_with_the_canceled_event(svc: Service) -> None:
    gen = create(svc.url, {"width": 256, "height": 256, "num_inference_steps": 100})
    url = f"{svc.url}/v1/generations/{gen['id']}/events"
    first = sse_events(url, stop_after=1)  # it has started (or is about to): now cancel it
    assert httpx.post(f"{svc.url}/v1/generations/{gen['id']}/cancel", timeout=10).status_code == 202
    rest = sse_events(url, last_event_id=first[-1]["id"])
    assert_well_formed(first + rest, gen["id"], final="generation.canceled")


def test_the_stream_belongs_to_the_key_that_created_the_generation(svc: Service) -> None:
    alice, bob = "sk-alice-" + secrets.token_hex(8), "sk-bob-" + secrets.token_hex(8)
    ring = [{"name": "alice", "sha256": hash_key(alice)}, {"name": "bob", "sha256": hash_key(bob)}]
    keyed = svc.start_api(SDXL_API_KEYS=json.dumps(ring))  # another API process, with keys, same Redis
    as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
    gen = httpx.post(
        f"{keyed}/v1/generations",
        json={"prompt": "mine", "width": 128, "height": 128, "num_inference_steps": 4},
        headers={**as_alice, "Prefer": "wait=30"},
        timeout=40,
    ).json()
    url = f"{keyed}/v1/generations/{gen['id']}/events"
    with httpx.stream("GET", url, headers=as_alice, timeout=30) as r:
        assert r.status_code == 200 and "event: generation.succeeded" in r.read().decode()
    for other in (
        httpx.get(url, headers=as_bob, timeout=10),
        httpx.get(f"{svc.url}/v1/generations/{gen['id']}/events"),
    ):
        assert other.status_code == 404 and other.headers["content-type"] == "application/problem+json"


def test_unknown_generation_and_bad_last_event_id_are_problems(svc: Service) -> None:
    missing = "gen_" + secrets.token_urlsafe(16)
    r = httpx.get(f"{svc.url}/v1/generations/{missing}/events", timeout=10)
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    gen = httpx.post(
        f"{svc.url}/v1/generations",
        json={"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 4},
        headers={"Prefer": "wait=30"},
        timeout=40,
    ).json()
    r = httpx.get(f"{svc.url}/v1/generations/{gen['id']}/events", headers={"Last-Event-ID": "yesterday"}, timeout=10)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "Last-Event-ID"
