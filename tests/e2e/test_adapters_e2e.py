"""LoRA adapters and few-step presets end to end: the real API and worker on the tiny model and the tiny test
adapters (tools/models.py build-tiny-adapters); the shared stack's adapter cache holds two (tests/e2e/conftest.py)."""

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.procs import Service

SMALL = {"width": 64, "height": 64, "num_inference_steps": 3, "seed": 11}


@pytest.fixture(autouse=True)
def _adapters(tiny_adapters: Path) -> None:
    """The registry is read when first used: built before the first request names an adapter."""


def generate(svc: Service, **body: Any) -> dict[str, Any]:
    payload = {k: v for k, v in {"prompt": "a red door", **SMALL, **body}.items() if v is not None}
    r = httpx.post(f"{svc.url}/v1/generations", json=payload,
                   headers={"Prefer": "wait=60"}, timeout=70)
    assert r.status_code == 201, r.text
    gen = r.json()
    assert gen["status"] == "succeeded", gen
    return gen  # type: ignore[no-any-return]


def sha(gen: dict[str, Any]) -> str:
    return str(gen["images"][0]["sha256"])


def adapter_events(svc: Service) -> dict[str, float]:
    """Adapter cache events by `event` and by `event/tier` (load/file, load/cpu, evict/device, ...)."""
    text = httpx.get(f"{svc.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for m in re.finditer(r'^sdxl_adapter_events_total\{event="(\w+)",tier="(\w*)"\} (\S+)$', text, re.M):
        out[m[1]] = out.get(m[1], 0.0) + float(m[3])
        out[f"{m[1]}/{m[2]}"] = float(m[3])
    return out


def test_adapters_and_presets_are_listed(service: Service) -> None:
    body = httpx.get(f"{service.url}/v1/adapters", timeout=10).json()
    by_name = {a["name"]: a for a in body["data"]}
    assert body["max_loras"] == 4
    style, kohya, lcm = by_name["tiny-style"], by_name["tiny-kohya"], by_name["lcm"]
    assert style["kind"] == "adapter" and style["base"] == "sdxl" and style["base_source"] == "manifest"
    assert (style["scale_min"], style["scale_max"], style["refiner"]) == (-1.0, 1.5, True)
    assert re.fullmatch(r"[0-9a-f]{64}", style["sha256"]) and style["bytes"] > 0
    assert kohya["base_source"] == "metadata" and (kohya["scale_min"], kohya["scale_max"]) == (-2.0, 2.0)
    assert lcm["kind"] == "preset" and lcm["adapter"] == "tiny-lcm" and lcm["scheduler"] == "lcm"
    assert (lcm["steps"], lcm["steps_min"], lcm["steps_max"]) == (4, 2, 8)


def test_a_lora_changes_the_image_and_the_manifest_records_it(service: Service) -> None:
    plain = generate(service)
    styled = generate(service, loras=[{"name": "tiny-style", "scale": 0.8}])
    kohya = generate(service, loras=[{"name": "tiny-kohya"}])
    assert len({sha(plain), sha(styled), sha(kohya)}) == 3  # PEFT and kohya files both load and both change it
    listed = {a["name"]: a for a in httpx.get(f"{service.url}/v1/adapters", timeout=10).json()["data"]}
    assert styled["manifest"]["adapters"] == [{"name": "tiny-style", "sha256": listed["tiny-style"]["sha256"],
                                               "scale": 0.8}]
    assert styled["params"]["loras"] == styled["manifest"]["adapters"]
    assert "adapters" not in plain["manifest"] and plain["params"]["loras"] == []


def test_the_same_request_gives_the_same_bytes_whatever_ran_before(service: Service) -> None:
    a = {"loras": [{"name": "tiny-style", "scale": 0.8}]}
    b = {"loras": [{"name": "tiny-kohya", "scale": 1.2}, {"name": "tiny-style", "scale": -0.5}]}
    first_plain = generate(service)
    first_a = generate(service, **a)
    generate(service, **b)
    assert sha(generate(service, **a)) == sha(first_a)
    generate(service, **b)
    assert sha(generate(service)) == sha(first_plain)  # adapters fully off again: the pristine weights


def test_unknown_adapter_bad_scale_and_too_many_are_refused(service: Service) -> None:
    def refused(body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{service.url}/v1/generations", json={"prompt": "x", **SMALL, **body}, timeout=10)
        assert r.status_code == 422, r.text
        return r.json()["errors"][0]  # type: ignore[no-any-return]

    err = refused({"loras": [{"name": "tiny-style"}, {"name": "no-such-adapter"}]})
    assert err["field"] == "loras[1].name" and err["value"] == "no-such-adapter" and "tiny-kohya" in err["message"]
    err = refused({"loras": [{"name": "tiny-style", "scale": 1.6}]})
    assert err["field"] == "loras[0].scale" and "between -1.0 and 1.5" in err["message"]
    err = refused({"loras": [{"name": "tiny-kohya"}] * 5})
    assert err["field"] == "loras" and "at most 4" in err["message"]
    err = refused({"preset": "lcm", "num_inference_steps": 20})
    assert err["field"] == "num_inference_steps" and "between 2 and 8" in err["message"]
    assert refused({"preset": "nope"})["field"] == "preset"
    assert refused({"preset": "lcm", "scheduler": "euler"})["field"] == "scheduler"


def test_the_lru_evicts_at_its_limit_and_reloads(service: Service) -> None:
    before = adapter_events(service)
    for name in ("tiny-style", "tiny-kohya", "tiny-lightning", "tiny-style"):  # the cache holds two
        generate(service, loras=[{"name": name}])
    after = adapter_events(service)
    assert after.get("evict/device", 0) - before.get("evict/device", 0) >= 2
    # tiny-style was evicted from the device by the third and came back for the fourth from the CPU tier,
    # without reading its file
    assert after.get("load/cpu", 0) - before.get("load/cpu", 0) >= 1
    again = adapter_events(service)
    generate(service, loras=[{"name": "tiny-style"}])
    assert adapter_events(service).get("load", 0) == again["load"]  # resident now: no load


def test_a_preset_runs_its_steps_with_its_scheduler(service: Service) -> None:
    lcm = generate(service, preset="lcm", num_inference_steps=None)
    p = lcm["params"]
    assert (p["preset"], p["scheduler"], p["num_inference_steps"], p["guidance_scale"]) == ("lcm", "lcm", 4, 1.0)
    assert p["refiner"]["mode"] == "none" and p["loras"][0]["name"] == "tiny-lcm"
    assert lcm["manifest"]["scheduler_config"]["_class_name"] == "LCMScheduler"
    assert lcm["progress"]["total_steps"] == 4
    fast = generate(service, preset="lightning", num_inference_steps=2)
    assert fast["progress"]["total_steps"] == 2 and fast["params"]["guidance_scale"] == 0.0
    config = fast["manifest"]["scheduler_config"]
    assert config["_class_name"] == "EulerDiscreteScheduler" and config["timestep_spacing"] == "trailing"
    # a preset with the refiner asked for explicitly runs it too
    refined = generate(service, preset="lcm", refiner={"mode": "ensemble"})
    assert refined["params"]["refiner"]["mode"] == "ensemble" and sha(refined) != sha(lcm)
