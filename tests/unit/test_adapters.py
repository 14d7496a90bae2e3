"""The adapter registry (common/adapters.py), without torch: folders, manifests, kohya metadata, hashes; the batch
key of adapter sets (common/contract/params.py); and, last, the worker's adapter cache on the tiny model."""

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from common.adapters import Registry, RegistryError, base_family, safetensors_header
from common.contract.params import GenerationParams, LoraRef


def write_safetensors(path: Path, metadata: dict[str, str] | None = None, payload: bytes = b"\0\0\0\0") -> Path:
    """A minimal valid safetensors file: one float32 tensor, optional `__metadata__`."""
    header: dict[str, Any] = {"w": {"dtype": "F32", "shape": [len(payload) // 4], "data_offsets": [0, len(payload)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def manifest(root: Path, body: dict[str, Any]) -> None:
    (root / "adapters.json").write_text(json.dumps(body))


def test_files_without_a_manifest_are_adapters_named_by_their_stem(tmp_path: Path) -> None:
    f = write_safetensors(tmp_path / "watercolor.safetensors")
    (tmp_path / "notes.txt").write_text("ignored")
    a = Registry(tmp_path).adapters()["watercolor"]
    assert (a.base, a.base_source, a.scale_min, a.scale_max) == ("sdxl", "assumed", -2.0, 2.0)
    assert a.sha256 == hashlib.sha256(f.read_bytes()).hexdigest() and a.bytes == f.stat().st_size
    assert list(Registry(tmp_path).adapters()) == ["watercolor"]


def test_kohya_metadata_names_the_base_model(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "old.safetensors", {"ss_base_model_version": "sd_v1", "ss_network_dim": "8"})
    write_safetensors(tmp_path / "xl.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    write_safetensors(tmp_path / "spec.safetensors", {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    adapters = Registry(tmp_path).adapters()
    assert (adapters["old"].base, adapters["old"].base_source) == ("sd1", "metadata")
    assert adapters["xl"].base == adapters["spec"].base == "sdxl"


@pytest.mark.parametrize(("text", "family"), [
    ("sdxl_base_v1-0", "sdxl"), ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl"), ("sd_v1", "sd1"),
    ("sd_v2_768_v", "sd2"), ("runwayml/stable-diffusion-v1-5", "sd1"), ("black-forest-labs/FLUX.1-dev", "flux"),
    ("stable-diffusion-3.5-large", "sd3"), ("something else", None), (None, None)])
def test_base_families(text: str | None, family: str | None) -> None:
    assert base_family(text) == family


def test_the_manifest_names_bounds_and_declares_presets(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a-file.safetensors", {"ss_base_model_version": "sd_v1"})
    write_safetensors(tmp_path / "fast.safetensors")
    write_safetensors(tmp_path / "fast-refiner.safetensors")
    manifest(tmp_path, {
        "adapters": {"style": {"file": "a-file.safetensors", "base": "sdxl", "scale_min": 0, "scale_max": 1,
                               "description": "d"},
                     "fast": {"refiner_file": "fast-refiner.safetensors"}},
        "presets": {"turbo": {"adapter": "fast", "scheduler": "euler", "scheduler_config":
                              {"timestep_spacing": "trailing"}, "steps": 4, "steps_min": 1, "steps_max": 8,
                              "guidance_scale": 0}}})
    reg = Registry(tmp_path)
    adapters = reg.adapters()
    assert set(adapters) == {"style", "fast"}  # a file a manifest entry names is not listed again by its stem
    assert (adapters["style"].base_source, adapters["style"].scale_max) == ("manifest", 1.0)
    assert adapters["fast"].refiner_path == tmp_path / "fast-refiner.safetensors"
    turbo = reg.presets()["turbo"]
    assert (turbo.adapter, turbo.steps, turbo.guidance_scale, turbo.scheduler_config) == \
        ("fast", 4, 0.0, {"timestep_spacing": "trailing"})
    kinds = [(e["name"], e["kind"]) for e in reg.listing()]
    assert kinds == [("style", "adapter"), ("fast", "adapter"), ("turbo", "preset")]
    assert reg.listing()[2]["sha256"] == adapters["fast"].sha256


@pytest.mark.parametrize(("body", "message"), [
    ({"adapters": {"x": {"file": "missing.safetensors"}}}, "adapter `x`: .*does not exist"),
    ({"adapters": {"x": {"file": "../etc.safetensors"}}}, "adapter `x`: `file` must be"),
    ({"adapters": {"x": {"file": "a.safetensors", "scale": 1}}}, r"adapter `x`: unknown keys \['scale'\]"),
    ({"adapters": {"x": {"file": "a.safetensors", "scale_min": 2, "scale_max": 1}}}, "scale_min 2.0 is above"),
    ({"adapters": {"bad name": {"file": "a.safetensors"}}}, "adapter `bad name`: names are"),
    ({"presets": {"p": {"adapter": "nope"}}}, "preset `p`: adapter `nope` is not in the registry"),
    ({"presets": {"p": {"scheduler": "euler_fast"}}}, "preset `p`: scheduler `euler_fast` is not one of"),
    ({"presets": {"p": {"steps": 4, "steps_min": 5}}}, "preset `p`: steps_min <= steps <= steps_max"),
    ({"presets": {"p": {"scheduler_config": {"timestep_spacin": "trailing"}}}}, "scheduler_config keys"),
    ({"presets": {"p": {"refiner": "ensemble"}}}, "`refiner` can only be `none`"),
    ({"extra": {}}, "with `adapters` and `presets` only"),
])
def test_an_invalid_manifest_is_refused_naming_the_entry(tmp_path: Path, body: dict[str, Any], message: str) -> None:
    write_safetensors(tmp_path / "a.safetensors")
    manifest(tmp_path, body)
    with pytest.raises(RegistryError, match=message):
        Registry(tmp_path).adapters()


def test_a_file_that_is_not_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(RegistryError, match="junk.safetensors is not a safetensors file"):
        Registry(tmp_path).adapters()
    assert safetensors_header(write_safetensors(tmp_path / "ok.bin", {"k": "v"}))["__metadata__"] == {"k": "v"}


def test_hashes_are_computed_once_and_again_when_the_file_changes(tmp_path: Path) -> None:
    f = write_safetensors(tmp_path / "a.safetensors")
    reg = Registry(tmp_path)
    first = reg.adapters()["a"].sha256
    assert len(reg._hashes) == 1
    reg.adapters()
    assert len(reg._hashes) == 1  # nothing changed: not re-read
    write_safetensors(f, payload=b"\1\0\0\0")
    os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)
    assert reg.adapters()["a"].sha256 != first
    f.unlink()
    assert reg.adapters() == {}


def test_no_folder_is_an_empty_registry(tmp_path: Path) -> None:
    assert Registry(None).listing() == [] and Registry(tmp_path / "absent").adapters() == {}


def test_batch_keys_differ_by_adapter_set_order_scale_and_preset() -> None:
    def key(**kw: Any) -> str:
        return GenerationParams(prompt="p", width=64, height=64, num_inference_steps=4, guidance_scale=5, seed=1,
                                **kw).batch_key()

    a, b = LoraRef(name="a", sha256="1" * 64, scale=1.0), LoraRef(name="b", sha256="2" * 64, scale=1.0)
    keys = [key(), key(loras=(a,)), key(loras=(b,)), key(loras=(a, b)), key(loras=(b, a)),
            key(loras=(a.model_copy(update={"scale": 0.5}),)), key(loras=(a.model_copy(update={"sha256": "3" * 64}),)),
            key(loras=(a,), preset="lcm"), key(loras=(a,), scheduler_config={"timestep_spacing": "trailing"})]
    assert len(set(keys)) == len(keys)
    assert key(loras=(a, b)) == GenerationParams(prompt="other", width=64, height=64, num_inference_steps=4,
                                                 guidance_scale=5, seed=9, loras=(a, b)).batch_key()


def test_swapping_fused_adapters_restores_exactly_and_never_recompiles(tiny_model: Path, tmp_path: Path) -> None:
    """worker/adapters.py on the tiny model with torch.compile (the `eager` backend: dynamo's capture and guards,
    which decide recompilation): A, B, none, A again give A's and none's images back, with no new graph. Fails
    when diffusers/PEFT change what the adapter cache reads from them (lora_A/lora_B/scaling, unload)."""
    import torch
    from torch._dynamo.utils import counters

    from tools.models import build_tiny_adapters
    from worker.pipeline import Engine, ImageSpec
    from worker.settings import WorkerSettings

    registry = Registry(build_tiny_adapters(tmp_path / "adapters"))
    torch._dynamo.reset()
    eng = Engine(WorkerSettings(base_model=str(tiny_model / "base"), refiner_model="", watermark=False,
                                compile_mode="default", compile_backend="eager", warmup_sizes="64x64",
                                adapters_dir=str(tmp_path / "adapters")))
    eng.adapters.registry = registry
    eng.warmup()

    def image(*loras: tuple[str, float]) -> bytes:
        refs = tuple(LoraRef(name=n, sha256=registry.adapters()[n].sha256, scale=s) for n, s in loras)
        p = GenerationParams(prompt="x", width=64, height=64, num_inference_steps=3, guidance_scale=5.0, seed=1,
                             loras=refs)
        return bytes(eng.run(p, [ImageSpec("x", None, None, None, 1)], lambda _p: None)[0][0].tobytes())

    before = counters["stats"]["unique_graphs"]
    plain, a = image(), image(("tiny-style", 0.7))
    b = image(("tiny-kohya", 1.0), ("tiny-style", -0.5))
    assert len({plain, a, b}) == 3
    assert image() == plain and image(("tiny-style", 0.7)) == a
    assert counters["stats"]["unique_graphs"] - before == 0
    assert eng.adapters.counts["load"] == 2 and len(eng.adapters._pristine) > 0
    torch._dynamo.reset()


# --- adapters by URL: the checks API and worker share (common/adapter_urls.py) ---------------------------------
def lora_bytes(tmp_path: Path) -> bytes:
    from tools.models import build_tiny_adapters

    folder = tmp_path / "tiny-adapters"
    if not (folder / "tiny-style.safetensors").exists():
        build_tiny_adapters(folder)
    return (folder / "tiny-style.safetensors").read_bytes()


def test_a_lora_file_is_recognised_and_other_bytes_are_refused_saying_why(tmp_path: Path) -> None:
    from common.adapter_urls import LoraFileError, check_lora_file

    good = lora_bytes(tmp_path)
    assert any("lora_A" in k for k in check_lora_file(good, hashlib.sha256(good).hexdigest()))
    plain = write_safetensors(tmp_path / "full.safetensors", payload=b"\0" * 16).read_bytes()
    cases = [(plain, "holds no LoRA weights"), (good[:-4], "not a complete safetensors file"),
             (b"<html>not found</html>", "not a safetensors file"), (b"abc", "not a safetensors file")]
    for data, message in cases:
        with pytest.raises(LoraFileError, match=message):
            check_lora_file(data)
    with pytest.raises(LoraFileError, match="sha256"):
        check_lora_file(good, "0" * 64)


@pytest.mark.parametrize(("url", "hosts", "message"), [
    ("https://cdn.example.com/a.safetensors", [], "off in this deployment"),
    ("https://evil.example.org/a.safetensors", ["cdn.example.com"], "not among the hosts"),
    ("http://cdn.example.com/a.safetensors", ["cdn.example.com"], "must be an https URL"),
    ("ftp://cdn.example.com/a.safetensors", ["cdn.example.com"], "must be an https URL"),
    ("https://u:p@cdn.example.com/a.safetensors", ["cdn.example.com"], "credentials"),
    ("https://cdn.example.com.evil.org/a", ["cdn.example.com"], "not among the hosts"),
    ("https://cdn.example.com/a.safetensors", ["cdn.example.com"], None),
    ("https://x.hf.co/a.safetensors", ["*.hf.co"], None),
])
def test_adapter_urls_come_only_over_https_from_allowed_hosts(url: str, hosts: list[str], message: str | None
                                                              ) -> None:
    from common.adapter_urls import check_adapter_url

    reason = check_adapter_url(url, hosts, allow_http=False)
    assert reason is None if message is None else message in (reason or "")


def test_an_adapter_by_url_is_named_after_its_file() -> None:
    from common.adapter_urls import url_name

    assert url_name("https://h/org/resolve/main/my%20style.safetensors?x=1") == "my-style"
    assert url_name("https://h/") == "url-adapter"


# --- hub ids in the registry: resolved from the local hub cache (HF_HUB_OFFLINE=1) -----------------------------
def fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes], revision: str = "0" * 40) -> None:
    """The layout huggingface_hub reads offline: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    for name, data in files.items():
        (root / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
        (root / "snapshots" / revision / name).write_bytes(data)


def test_hub_ids_in_the_manifest_resolve_from_the_local_hub_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    data = lora_bytes(tmp_path)
    fake_hub_cache(tmp_path / "hub", "org/tiny-lora", {"pytorch_lora_weights.safetensors": data,
                                                       "other.safetensors": data[:100]})
    root = tmp_path / "reg"
    root.mkdir()
    manifest(root, {"adapters": {"hubby": {"hub_id": "org/tiny-lora", "scale_max": 1.0}}})
    a = Registry(root).adapters()["hubby"]
    assert a.sha256 == hashlib.sha256(data).hexdigest() and a.bytes == len(data)
    assert a.path.parent.name == "0" * 40 and a.scale_max == 1.0
    for entry, message in [({"hub_id": "org/missing"}, "could not be resolved"),
                            ({"hub_id": "not a repo"}, "hub repository id"),
                            ({"hub_id": "org/tiny-lora", "file": "x.safetensors"}, "not both"),
                            ({"weight_name": "x.safetensors"}, "go with `hub_id`")]:
        manifest(root, {"adapters": {"hubby": entry}})
        with pytest.raises(RegistryError, match=message):
            Registry(root).adapters()


# --- the worker's two tiers (worker/adapters.py) on the tiny model ---------------------------------------------
def test_the_lru_evicts_at_its_limit_in_both_tiers_and_a_cpu_hit_reads_no_file(tiny_model: Path,
                                                                              tmp_path: Path) -> None:
    from tools.models import build_tiny_adapters
    from worker.pipeline import Engine, ImageSpec
    from worker.settings import WorkerSettings

    folder = build_tiny_adapters(tmp_path / "adapters")
    registry = Registry(folder)
    eng = Engine(WorkerSettings(base_model=str(tiny_model / "base"), refiner_model="", watermark=False,
                                adapters_dir=str(folder), adapter_cache_max=1, adapter_cpu_cache_max=1))
    cache = eng.adapters
    cache.registry = registry
    reads: list[str] = []
    real_read = cache._read

    def counting_read(pipe: Any, source: Any, name: str) -> Any:
        reads.append(name)
        return real_read(pipe, source, name)

    cache._read = counting_read  # type: ignore[method-assign]

    def image(name: str) -> bytes:
        ref = LoraRef(name=name, sha256=registry.adapters()[name].sha256, scale=0.9)
        p = GenerationParams(prompt="x", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1,
                             loras=(ref,))
        return bytes(eng.run(p, [ImageSpec("x", None, None, None, 1)], lambda _p: None)[0][0].tobytes())

    a = image("tiny-style")
    image("tiny-kohya")  # the device holds one: tiny-style goes down to the CPU tier
    assert list(cache.loaded) == [("tiny-kohya", registry.adapters()["tiny-kohya"].sha256)]
    assert [k[0] for k in cache.cpu] == ["tiny-style"] and cache.tier_counts[("evict", "device")] == 1
    reads.clear()
    assert image("tiny-style") == a  # back from the CPU tier: the same weights, no file read
    assert reads == [] and cache.tier_counts[("load", "cpu")] == 1
    assert [k[0] for k in cache.cpu] == ["tiny-kohya"]
    image("tiny-lcm")  # a third: tiny-style down to the CPU tier, which holds one: tiny-kohya dropped
    assert reads == ["tiny-lcm"] and [k[0] for k in cache.cpu] == ["tiny-style"]
    assert cache.tier_counts[("evict", "cpu")] == 1 and cache.tier_counts[("load", "file")] == 3
    image("tiny-kohya")  # dropped from both tiers: read from its file again
    assert reads == ["tiny-lcm", "tiny-kohya"]
    events = cache.take_events()
    assert ("evict", "cpu", None) in events and any(e[:2] == ("load", "cpu") and e[2] is not None for e in events)


def test_adapters_by_url_and_by_hub_id_load_in_the_worker(tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """By URL: from the object store, checked against its sha256. By hub id: hf_hub_download from a local hub
    cache (offline), then diffusers' loader, as for a registry file."""
    from huggingface_hub import constants

    from common.adapter_urls import adapter_key
    from common.storage import LocalStore
    from worker.adapters import AdapterUnavailable
    from worker.pipeline import Engine, ImageSpec
    from worker.settings import WorkerSettings

    data = lora_bytes(tmp_path)
    sha = hashlib.sha256(data).hexdigest()
    settings = WorkerSettings(base_model=str(tiny_model / "base"), refiner_model="", watermark=False,
                              storage_dir=tmp_path / "store")
    store = LocalStore(settings.storage_dir)
    store.put(adapter_key(settings.adapter_prefix, sha), data, "application/octet-stream", {})
    eng = Engine(settings)
    url = "https://cdn.example.com/loras/style.safetensors"

    def image(*loras: LoraRef) -> bytes:
        p = GenerationParams(prompt="x", width=64, height=64, num_inference_steps=2, guidance_scale=5.0, seed=1,
                             loras=loras)
        return bytes(eng.run(p, [ImageSpec("x", None, None, None, 1)], lambda _p: None)[0][0].tobytes())

    assert image(LoraRef(name="style", sha256=sha, scale=0.8, url=url)) != image()
    assert eng.adapters.tier_counts[("load", "file")] == 1
    with pytest.raises(AdapterUnavailable, match="not in the object store"):
        eng.adapters.apply((LoraRef(name="style", sha256="1" * 64, scale=0.8, url=url),))
    store.put(adapter_key(settings.adapter_prefix, "2" * 64), data, "application/octet-stream", {})
    with pytest.raises(AdapterUnavailable, match="do not have the sha256"):
        eng.adapters.apply((LoraRef(name="style", sha256="2" * 64, scale=0.8, url=url),))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "org/tiny-lora", {"style.safetensors": data})
    root = tmp_path / "reg"
    root.mkdir()
    manifest(root, {"adapters": {"hubby": {"hub_id": "org/tiny-lora", "weight_name": "style.safetensors"}}})
    eng.adapters.registry = Registry(root)
    by_hub = image(LoraRef(name="hubby", sha256=sha, scale=0.8))
    assert by_hub == image(LoraRef(name="style", sha256=sha, scale=0.8, url=url))  # the same bytes, the same image
    assert eng.adapters.tier_counts[("load", "file")] == 2
