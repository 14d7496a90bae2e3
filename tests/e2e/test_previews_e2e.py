"""Live previews end to end on the tiny model (its TAESD-XL stand-in built beside it): `generation.preview` events
on SSE in step order before the terminal event, each a decodable image of the preview size, one set per image of
a batch; none unless asked; the stored-preview route; the CLI's `--previews DIR`."""

import base64
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.test_events_sse import TERMINAL, create, id_key, sse_events
from tests.procs import Service

SMALL = {"width": 128, "height": 96, "num_inference_steps": 12, "refiner": {"mode": "none"}}


@pytest.fixture(scope="module")
def svc(shared_stack: Service) -> Iterator[Service]:
    service = shared_stack.view()
    try:
        service.start_api()
        yield service
    finally:
        service.stop()


def events_of(svc: Service, body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    gen = create(svc.url, {**SMALL, **body})
    return gen, sse_events(f"{svc.url}/v1/generations/{gen['id']}/events")


def previews_in(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "generation.preview"]


def decoded(p: dict[str, Any]) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(p["b64"])))
    img.load()
    return img


def test_previews_arrive_in_order_before_the_terminal_event(svc: Service) -> None:
    gen, events = events_of(svc, {"previews": True, "preview_every": 3})
    assert gen["params"]["preview_every"] == 3
    previews = previews_in(events)
    assert [p["data"]["step"] for p in previews] == [3, 6, 9, 12]
    keys = [id_key(e["id"]) for e in events]
    assert keys == sorted(keys)
    assert events[-1]["event"] == "generation.succeeded" and events[-1]["data"]["status"] == "succeeded"
    assert not any(e["event"] in TERMINAL for e in events[:-1])
    for p in (e["data"] for e in previews):
        assert p["generation_id"] == gen["id"] and p["index"] == 0 and p["stage"] == "base"
        assert p["total_steps"] == 12 and p["url"] is None and p["content_type"] == "image/webp"
        img = decoded(p)
        assert img.format == "WEBP" and img.size == (128, 96) == (p["width"], p["height"])
        assert len(base64.b64decode(p["b64"])) == p["bytes"]
    # the final resource does not depend on previews: the manifest leaves them out
    assert "preview_every" not in events[-1]["data"]["manifest"]["params"]


def test_default_cadence_and_each_image_of_a_batch(svc: Service) -> None:
    gen, events = events_of(svc, {"previews": True, "num_images_per_prompt": 2})
    assert gen["params"]["preview_every"] == 5
    by_index: dict[int, list[int]] = {}
    for p in previews_in(events):
        by_index.setdefault(p["data"]["index"], []).append(p["data"]["step"])
    assert by_index == {0: [5, 10], 1: [5, 10]}
    first = [decoded(p["data"]).tobytes() for p in previews_in(events) if p["data"]["step"] == 10]
    assert first[0] != first[1]  # each image its own preview


def test_refiner_steps_are_previewed_too(svc: Service) -> None:
    _, events = events_of(svc, {"previews": True, "preview_every": 2,
                                "refiner": {"mode": "ensemble", "denoising_start": 0.5}})
    previews = [p["data"] for p in previews_in(events)]
    assert [p["step"] for p in previews] == [2, 4, 6, 8, 10, 12]
    assert {p["stage"] for p in previews} == {"base", "refiner"}


def test_no_previews_unless_asked(svc: Service) -> None:
    gen, events = events_of(svc, {})
    assert gen["params"]["preview_every"] is None
    assert previews_in(events) == [] and events[-1]["event"] == "generation.succeeded"
    res = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "p", "preview_every": 2}, timeout=10)
    assert res.status_code == 422 and res.json()["errors"][0]["field"] == "preview_every"


def test_a_stored_preview_is_served_to_its_owner_and_deleted_with_the_generation(svc: Service) -> None:
    """Previews over SDXL_PREVIEW_INLINE_MAX_BYTES are stored under the generation's prefix (the worker's side is
    tests/unit/test_previews.py); the API serves them at the event's `url`."""
    gen, _ = events_of(svc, {})
    path = svc.data_dir / "images" / "generations" / gen["id"] / "previews" / "0-5.webp"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="WEBP")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    url = f"{svc.url}/v1/generations/{gen['id']}/previews/0-5.webp"
    res = httpx.get(url, timeout=10)
    assert res.status_code == 200 and res.content == buf.getvalue()
    assert res.headers["content-type"] == "image/webp"
    for name in ("0-10.webp", "x.webp", "0-5.png"):
        res = httpx.get(f"{svc.url}/v1/generations/{gen['id']}/previews/{name}", timeout=10)
        assert res.status_code == 404 and res.json()["type"].endswith("preview-not-found")
    assert httpx.delete(f"{svc.url}/v1/generations/{gen['id']}", timeout=10).status_code == 204
    assert not path.exists()


def test_cli_writes_previews_to_a_directory(svc: Service, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")} | {"SDXL_URL": svc.url}
    out = tmp_path / "previews"
    r = subprocess.run(
        [sys.executable, "-m", "cli.sdxl", "generate", "a lighthouse", "--width", "128", "--height", "128",
         "--steps", "10", "--refiner", "none", "--previews", str(out), "-o", str(tmp_path / "final.png")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0-0005.webp", "0-0010.webp"]
    for name in files:
        assert Image.open(out / name).size == (128, 128)
    assert (tmp_path / "final.png").exists()
