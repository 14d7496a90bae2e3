"""worker/weights.py without the hub: what `download` asks diffusers and huggingface_hub for (the hub calls are
the one thing faked: this machine cannot reach the hub), and the marker that workers wait for.
tests/e2e/test_worker_k8s_commands.py runs the commands for real on local model folders."""

import json
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import pytest

from worker import weights
from worker.previews import HUB_TAESD_XL
from worker.settings import WorkerSettings


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict[str, Any]]]:
    seen: list[tuple[str, str, dict[str, Any]]] = []
    for cls in (diffusers.StableDiffusionXLPipeline, diffusers.StableDiffusionXLImg2ImgPipeline):
        monkeypatch.setattr(cls, "download",
                            classmethod(lambda c, name, **kw: seen.append((c.__name__, name, kw)) or "/x"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda name, **kw: seen.append(("snapshot_download", name, kw)) or "/x")
    return seen


def test_downloads_what_the_worker_loads(calls: list[tuple[str, str, dict[str, Any]]], tmp_path: Path) -> None:
    settings = WorkerSettings(base_model="org/base", refiner_model="org/refiner", variant="fp16", revision="r1",
                              inpaint_model="org/inpaint", preview_vae="auto")
    marker = weights.download(settings, tmp_path)
    assert calls == [
        ("StableDiffusionXLPipeline", "org/base", {"revision": "r1", "variant": "fp16"}),
        # the refiner borrows the base's text_encoder_2 and VAE (worker/pipeline.py): their folders are skipped
        ("StableDiffusionXLImg2ImgPipeline", "org/refiner",
         {"revision": "r1", "variant": "fp16", "text_encoder_2": None, "vae": None}),
        ("snapshot_download", "org/inpaint", {"revision": None, "allow_patterns": ["unet/*"]}),
        ("snapshot_download", HUB_TAESD_XL, {}),
    ]
    assert marker == weights.marker(settings, tmp_path) and marker.parent == tmp_path / "sdxl-weights"
    assert json.loads(marker.read_text())["base_model"] == "org/base"
    assert not list(marker.parent.glob("*.tmp"))


def test_local_folders_and_no_refiner_need_no_download(calls: list[tuple[str, str, dict[str, Any]]],
                                                       tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    settings = WorkerSettings(base_model=str(tmp_path / "base"), refiner_model=None, preview_vae="none")
    assert weights.download(settings, tmp_path / "hf").is_file()
    assert calls == []


def test_the_marker_changes_with_what_the_workers_load(tmp_path: Path) -> None:
    one = WorkerSettings(base_model="org/base", variant="fp16")
    assert weights.marker(one, tmp_path) == weights.marker(WorkerSettings(base_model="org/base", variant="fp16"),
                                                           tmp_path)
    for other in (WorkerSettings(base_model="org/base"), WorkerSettings(base_model="org/base2", variant="fp16"),
                  WorkerSettings(base_model="org/base", variant="fp16", revision="abc")):
        assert weights.marker(other, tmp_path) != weights.marker(one, tmp_path)
    assert not weights.wait(one, tmp_path, timeout=0)
