"""Engine features through the live service: cancel, micro-batching, formats and manifest, token counts."""

import io
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.procs import Service, wait_for
from worker.encode import read_manifest

SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
LONG = {"width": 256, "height": 256, "num_inference_steps": 80}


@pytest.fixture
def batching(batching_stack: Service) -> Service:
    """A worker that micro-batches (SDXL_BATCH_MAX=4, SDXL_BATCH_WAIT_MS=300, a progress event per step) and its
    API, on their own Redis (tests/e2e/conftest.py)."""
    return batching_stack


def post(svc: Service, body: dict, prefer: str | None = None) -> httpx.Response:
    return httpx.post(f"{svc.url}/v1/generations", json=body, headers={"Prefer": prefer} if prefer else {},
                      timeout=70)


def get(svc: Service, gen_id: str, wait: int = 0) -> dict:
    headers = {"Prefer": f"wait={wait}"} if wait else {}
    return httpx.get(f"{svc.url}/v1/generations/{gen_id}", headers=headers, timeout=wait + 10).json()


def final(svc: Service, gen_id: str) -> dict:
    for _ in range(10):
        res = get(svc, gen_id, wait=30)
        if res["status"] in ("succeeded", "failed", "canceled"):
            return res
    raise AssertionError(f"{gen_id} never finished")


def pixels(svc: Service, gen: dict, index: int = 0) -> bytes:
    data = httpx.get(f"{svc.url}/v1/generations/{gen['id']}/images/{index}").content
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def stored_files(svc: Service, gen_id: str) -> list[Path]:
    root = svc.data_dir / "images"
    return list(root.rglob(f"{gen_id}/*")) if root.exists() else []


def test_cancel_queued_never_runs(batching: Service) -> None:
    blocker = post(batching, {"prompt": "blocker", **LONG}).json()
    queued = post(batching, {"prompt": "victim", **SMALL, "guidance_scale": 3.0}).json()
    r = httpx.post(f"{batching.url}/v1/generations/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    again = httpx.post(f"{batching.url}/v1/generations/{queued['id']}/cancel")
    assert again.status_code == 202 and again.json()["status"] == "canceled"  # idempotent
    httpx.post(f"{batching.url}/v1/generations/{blocker['id']}/cancel")
    final(batching, blocker["id"])
    time.sleep(1)
    res = get(batching, queued["id"])
    assert res["status"] == "canceled" and res["started_at"] is None and res["images"] == []
    assert stored_files(batching, queued["id"]) == []


def test_cancel_running_stops_within_a_step_and_next_job_runs(batching: Service) -> None:
    gen = post(batching, {"prompt": "long one", **LONG}).json()
    wait_for(lambda: get(batching, gen["id"])["progress"]["step"] >= 3, 60, "a few steps")
    r = httpx.post(f"{batching.url}/v1/generations/{gen['id']}/cancel")
    assert r.status_code == 202
    step_at_cancel = r.json()["progress"]["step"]
    done = final(batching, gen["id"])
    assert done["status"] == "canceled" and done["images"] == []
    total = done["progress"]["total_steps"]
    # cooperative cancel: at most the step in flight plus one more, never the rest of the schedule
    assert done["progress"]["step"] <= step_at_cancel + 2 < total
    assert stored_files(batching, gen["id"]) == []
    ok = post(batching, {"prompt": "after cancel", **SMALL}, prefer="wait=30").json()
    assert ok["status"] == "succeeded"
    conflict = httpx.post(f"{batching.url}/v1/generations/{ok['id']}/cancel")
    assert conflict.status_code == 409 and conflict.headers["content-type"] == "application/problem+json"


def test_progress_is_monotonic_across_stages(batching: Service) -> None:
    gen = post(batching, {"prompt": "progress", "width": 128, "height": 128, "num_inference_steps": 12},
               prefer="wait=30").json()
    r = batching_redis(batching)
    events = r.xrange(f"sdxl:events:{gen['id']}")
    import json

    seen = [json.loads(f[b"data"])["progress"] for _id, f in events]
    steps = [p["step"] for p in seen]
    assert steps == sorted(steps)
    stages = [p["stage"] for p in seen]
    order = ["queued", "base", "refiner", "decoding", "encoding", "uploading", "done"]
    ranks = [order.index(s) for s in stages]
    assert ranks == sorted(ranks)
    assert {"base", "refiner", "decoding", "encoding", "uploading", "done"} <= set(stages)
    assert seen[-1]["step"] == seen[-1]["total_steps"] == 12


def batching_redis(svc: Service):  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(svc.redis_url)


def test_compatible_jobs_are_batched_with_their_own_seeds(batching: Service) -> None:
    common = {"width": 128, "height": 128, "num_inference_steps": 4, "guidance_scale": 4.0}
    solo = [post(batching, {"prompt": f"member {i}", "seed": 100 + i, **common}, prefer="wait=30").json()
            for i in range(3)]
    assert all(s["timings"]["batch_images"] == 1 for s in solo)
    blocker = post(batching, {"prompt": "blocker", "width": 256, "height": 256, "num_inference_steps": 30}).json()
    batched = [post(batching, {"prompt": f"member {i}", "seed": 100 + i, **common}).json() for i in range(3)]
    final(batching, blocker["id"])
    results = [final(batching, b["id"]) for b in batched]
    assert all(r["status"] == "succeeded" for r in results)
    assert all(r["timings"]["batch_images"] == 3 for r in results), [r["timings"] for r in results]
    for s, b in zip(solo, results, strict=True):
        assert b["images"][0]["seed"] == s["images"][0]["seed"]
        a_px, b_px = pixels(batching, s), pixels(batching, b)
        worst = max(abs(x - y) for x, y in zip(a_px, b_px, strict=True))
        assert worst <= 1  # documented tolerance for batched images: 1/255 per channel


def test_cancel_one_batch_member_reruns_the_others(batching: Service) -> None:
    common = {"width": 256, "height": 256, "num_inference_steps": 40, "guidance_scale": 4.5}
    blocker = post(batching, {"prompt": "blocker", **SMALL, "num_inference_steps": 30, "width": 256,
                              "height": 256}).json()
    members = [post(batching, {"prompt": f"m{i}", "seed": i, **common}).json() for i in range(3)]
    final(batching, blocker["id"])
    wait_for(lambda: get(batching, members[1]["id"])["progress"]["step"] >= 2, 60, "batch running")
    httpx.post(f"{batching.url}/v1/generations/{members[1]['id']}/cancel")
    results = [final(batching, m["id"]) for m in members]
    assert [r["status"] for r in results] == ["succeeded", "canceled", "succeeded"]
    assert results[1]["images"] == []
    assert results[0]["timings"]["batch_images"] == 2


@pytest.mark.parametrize("fmt,ctype,pil", [("png", "image/png", "PNG"), ("webp", "image/webp", "WEBP"),
                                           ("jpeg", "image/jpeg", "JPEG")])
def test_output_formats_carry_the_manifest(service: Service, fmt: str, ctype: str, pil: str) -> None:
    res = post(service, {"prompt": "formats", "seed": 3, "output_format": fmt, "output_quality": 80, **SMALL},
               prefer="wait=30").json()
    assert res["status"] == "succeeded"
    img = res["images"][0]
    assert img["content_type"] == ctype
    data = httpx.get(f"{service.url}/v1/generations/{res['id']}/images/0").content
    assert Image.open(io.BytesIO(data)).format == pil
    manifest = read_manifest(data)
    assert manifest["seed"] == 3 and manifest["params"]["prompt"] == "formats"
    assert manifest["scheduler_config"]["_class_name"] == "EulerDiscreteScheduler"
    assert set(manifest["versions"]) == {"diffusers", "transformers", "torch"}
    assert res["id"] not in repr(manifest)  # nothing run-specific inside the file
    assert res["manifest"]["params"] == manifest["params"]


def test_token_counts_and_long_prompt_policy(service: Service) -> None:
    res = post(service, {"prompt": "a lighthouse at dusk", **SMALL}).json()
    assert res["token_counts"]["text_encoder"] == res["token_counts"]["text_encoder_2"] > 2
    long = "a lighthouse " * 60
    refused = post(service, {"prompt": long, "long_prompt": "reject", **SMALL})
    assert refused.status_code == 422
    body = refused.json()
    assert body["errors"][0]["field"] == "prompt" and body["errors"][0]["value"] > 77
    chunked = post(service, {"prompt": long, **SMALL}, prefer="wait=30").json()
    assert chunked["status"] == "succeeded" and chunked["token_counts"]["text_encoder"] > 77


def test_snap_to_bucket(service: Service) -> None:
    res = post(service, {"prompt": "snap", "width": 1000, "height": 1400, "snap_to_bucket": True,
                         "num_inference_steps": 1})
    assert res.status_code == 202
    assert (res.json()["params"]["width"], res.json()["params"]["height"]) == (832, 1216)
    httpx.post(f"{service.url}/v1/generations/{res.json()['id']}/cancel")
