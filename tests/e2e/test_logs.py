"""Structured logs: one JSON line per event, a request id that follows a generation from the API through the
worker, and no prompt in any log unless SDXL_LOG_PROMPTS is on."""

import json
import logging
import secrets

import httpx

from common.logs import JsonFormatter, bind
from tests.procs import Proc, Service, wait_for

SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}


def json_lines(proc: Proc) -> list[dict]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_request_id_follows_the_generation_and_prompts_stay_out(service: Service) -> None:
    rid = f"it-{secrets.token_hex(6)}"
    prompt = f"a secret turquoise walrus {secrets.token_hex(4)}"
    r = httpx.post(
        f"{service.url}/v1/generations",
        json={"prompt": prompt, **SMALL},
        headers={"X-Request-ID": rid, "Prefer": "wait=60"},
        timeout=70,
    )
    assert r.status_code == 201, r.text
    assert r.headers["x-request-id"] == rid  # accepted and echoed
    gen_id = r.json()["id"]

    api, worker = service.apis[0], service.workers[0]

    def api_line() -> dict | None:
        hits = [e for e in json_lines(api) if e.get("logger") == "app.access" and e.get("request_id") == rid]
        return hits[0] if hits else None

    line = wait_for(api_line, 10, "the API's request line")
    assert line["method"] == "POST" and line["route"] == "/v1/generations" and line["status"] == 201
    assert line["duration_ms"] > 0 and line["process"] == "api" and line["level"] == "info"

    def worker_lines() -> list[dict] | None:
        hits = [e for e in json_lines(worker) if e.get("request_id") == rid]
        # rq logs its own "job OK" line just after our job function returns: wait for both
        done = any(e["msg"] == "generation succeeded" for e in hits) and any(
            e["logger"] == "rq.worker" and "OK" in e["msg"] for e in hits)
        return hits if done else None

    lines = wait_for(worker_lines, 10, "the worker's lines for this request")
    assert all(e["generation_id"] == gen_id for e in lines), lines
    msgs = [e["msg"] for e in lines]
    assert "generation started" in msgs and "generation succeeded" in msgs, msgs
    assert any(e["logger"] == "rq.worker" for e in lines), "rq's own lines about the job carry the ids too"
    started = next(e for e in lines if e["msg"] == "generation started")
    assert started["attempt"] == 1 and started["width"] == 128 and "prompt" not in started

    # prompts are not logged by default, not even through rq's job description
    for proc in (api, worker):
        text = proc.output()
        assert prompt not in text and "turquoise walrus" not in text, f"prompt leaked into {proc.log.name}"
        assert "'token'" not in text  # nor the job payload with its ownership token


def test_bad_request_id_is_replaced_and_every_request_gets_one(service: Service) -> None:
    bad = httpx.get(f"{service.url}/healthz", headers={"X-Request-ID": "spaces are not allowed"}, timeout=10)
    minted = bad.headers["x-request-id"]
    assert minted != "spaces are not allowed" and minted.startswith("req_")
    plain = httpx.get(f"{service.url}/v1/generations/gen_nope", timeout=10)
    assert plain.status_code == 404 and plain.headers["x-request-id"].startswith("req_")

    def line() -> dict | None:
        hits = [e for e in json_lines(service.apis[0]) if e.get("request_id") == plain.headers["x-request-id"]]
        return hits[0] if hits else None

    # the route template, not the raw path, and the real status
    got = wait_for(line, 10, "the 404's request line")
    assert got["route"] == "/v1/generations/{gen_id}" and got["status"] == 404
    assert got["path"] == "/v1/generations/gen_nope"


def test_api_log_is_json_lines(service: Service) -> None:
    lines = [ln for ln in service.apis[0].output().splitlines() if ln.strip()]
    assert lines
    not_json = [ln for ln in lines if not ln.startswith("{")]
    assert not not_json, not_json[:5]  # uvicorn's own lines go through the same formatter
    assert any(json.loads(ln).get("logger", "").startswith("uvicorn") for ln in lines)


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("worker.runner", logging.INFO, __file__, 1, "generation started", None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_formatter_drops_prompts_unless_asked() -> None:
    payload = {"prompt": "a cat", "token": "abc"}
    quiet = json.loads(JsonFormatter("worker").format(record(prompt="a cat", arguments=[payload], width=64)))
    assert "prompt" not in quiet and "arguments" not in quiet and quiet["width"] == 64
    loud = json.loads(JsonFormatter("worker", log_prompts=True).format(record(prompt="a cat")))
    assert loud["prompt"] == "a cat"


def test_bound_context_reaches_every_line_and_extra_wins() -> None:
    from common.logs import ContextFilter

    f = ContextFilter()
    with bind(request_id="r1", generation_id="g1"):
        rec = record()
        f.filter(rec)
        assert (rec.request_id, rec.generation_id) == ("r1", "g1")  # type: ignore[attr-defined]
        own = record(generation_id="g2")
        f.filter(own)
        assert own.generation_id == "g2"  # type: ignore[attr-defined]
    after = record()
    f.filter(after)
    assert not hasattr(after, "request_id")
