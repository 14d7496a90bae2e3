"""GET /v1/adapters and the `loras` / `preset` fields at submit, in process (no worker: what is accepted queues)."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.unit.test_adapters import manifest, write_safetensors

OK: dict[str, Any] = {"prompt": "a lighthouse", "width": 128, "height": 128}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    root = tmp_path / "adapters"
    root.mkdir()
    write_safetensors(root / "style.safetensors")
    write_safetensors(root / "old.safetensors", {"ss_base_model_version": "sd_v1"})
    write_safetensors(root / "fast.safetensors")
    manifest(root, {"adapters": {"style": {"scale_min": 0, "scale_max": 1.5}},
                    "presets": {"lcm": {"adapter": "fast", "scheduler": "lcm", "steps": 4, "steps_min": 2,
                                        "steps_max": 8, "guidance_scale": 1.0}}})
    return root


@pytest.fixture
def api(make_api: Callable[..., httpx.Client], registry: Path) -> httpx.Client:
    return make_api(adapters_dir=registry, max_loras=2)


def error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    return r.json()["errors"][0]  # type: ignore[no-any-return]


def test_the_listing_has_adapters_then_presets(api: httpx.Client) -> None:
    body = api.get("/v1/adapters").json()
    assert body["max_loras"] == 2
    names = [(a["name"], a["kind"]) for a in body["data"]]
    assert names == [("style", "adapter"), ("fast", "adapter"), ("old", "adapter"), ("lcm", "preset")]
    old = body["data"][2]
    assert (old["base"], old["base_source"], old["scale_min"], old["scale_max"]) == ("sd1", "metadata", -2.0, 2.0)
    assert "steps" not in old  # nulls left out: each kind shows its own fields
    lcm = body["data"][3]
    assert (lcm["adapter"], lcm["scheduler"], lcm["steps"], lcm["sha256"]) == \
        ("fast", "lcm", 4, body["data"][1]["sha256"])


def test_loras_resolve_to_names_hashes_and_scales(api: httpx.Client) -> None:
    listed = {a["name"]: a["sha256"] for a in api.get("/v1/adapters").json()["data"]}
    r = api.post("/v1/generations", json={**OK, "loras": [{"name": "style", "scale": 0.5}, {"name": "fast"}]})
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    assert params["loras"] == [{"name": "style", "sha256": listed["style"], "scale": 0.5},
                               {"name": "fast", "sha256": listed["fast"], "scale": 1.0}]
    assert params["preset"] is None and params["refiner"]["mode"] == "ensemble"


def test_a_preset_sets_scheduler_steps_guidance_and_no_refiner(api: httpx.Client) -> None:
    params = api.post("/v1/generations", json={**OK, "preset": "lcm", "loras": [{"name": "style"}]}).json()["params"]
    assert (params["preset"], params["scheduler"], params["num_inference_steps"], params["guidance_scale"]) == \
        ("lcm", "lcm", 4, 1.0)
    assert [lora["name"] for lora in params["loras"]] == ["fast", "style"]  # the preset's adapter first
    assert params["refiner"]["mode"] == "none"
    own = api.post("/v1/generations", json={**OK, "preset": "lcm", "num_inference_steps": 8, "guidance_scale": 0.5,
                                           "refiner": {"mode": "ensemble"}}).json()["params"]
    assert (own["num_inference_steps"], own["guidance_scale"], own["refiner"]["mode"]) == (8, 0.5, "ensemble")


@pytest.mark.parametrize(("body", "field", "value", "message"), [
    ({"loras": [{"name": "nope"}]}, "loras[0].name", "nope", "is not an adapter of this deployment"),
    ({"loras": [{"name": "lcm"}]}, "loras[0].name", "lcm", "is a preset: send it as `preset`"),
    ({"loras": [{"name": "style"}, {"name": "old"}]}, "loras[1].name", "old", "is an adapter for `sd1`"),
    ({"loras": [{"name": "style", "scale": 1.6}]}, "loras[0].scale", 1.6, "between 0.0 and 1.5"),
    ({"loras": [{"name": "style"}, {"name": "style"}]}, "loras[1].name", "style", "named twice"),
    ({"loras": [{"name": "style"}] * 3}, "loras", 3, "at most 2 adapters"),
    ({"preset": "lcm", "loras": [{"name": "fast"}]}, "loras[0].name", "fast", "the preset `lcm` applies it"),
    ({"preset": "turbo"}, "preset", "turbo", "is not a preset"),
    ({"preset": "style"}, "preset", "style", "is an adapter: send it in `loras`"),
    ({"preset": "lcm", "num_inference_steps": 1}, "num_inference_steps", 1, "between 2 and 8 with preset `lcm`"),
    ({"preset": "lcm", "scheduler": "euler"}, "scheduler", "euler", "is set by preset `lcm`"),
])
def test_refused_at_submit_naming_the_field(api: httpx.Client, body: dict[str, Any], field: str, value: Any,
                                            message: str) -> None:
    err = error(api.post("/v1/generations", json={**OK, **body}))
    assert (err["field"], err["value"]) == (field, value) and message in err["message"], err


def test_without_a_registry_there_is_nothing_to_name(make_api: Callable[..., httpx.Client]) -> None:
    bare = make_api()
    assert bare.get("/v1/adapters").json() == {"data": [], "max_loras": 4}
    err = error(bare.post("/v1/generations", json={**OK, "loras": [{"name": "style"}]}))
    assert "it has none: SDXL_ADAPTERS_DIR" in err["message"]
    assert bare.post("/v1/generations", json=OK).status_code == 202  # requests without adapters never read it


def test_a_broken_manifest_answers_503_naming_it(make_api: Callable[..., httpx.Client], registry: Path) -> None:
    (registry / "adapters.json").write_text(json.dumps({"adapters": {"style": {"scale": 1}}}))
    broken = make_api(adapters_dir=registry)
    r = broken.get("/v1/adapters")
    assert r.status_code == 503 and "adapter `style`: unknown keys" in r.json()["detail"]
    assert broken.post("/v1/generations", json={**OK, "loras": [{"name": "style"}]}).status_code == 503
