"""tools.models: SDXL 1.0 parameter counts, the tiny model's hub layout, loading, determinism, tokenizers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before diffusers/huggingface_hub read it

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image
from tokenizers import Tokenizer
from transformers import CLIPTokenizer

from tools import models

# diffusers pipelines are opaque to mypy (components are set dynamically), so they are typed Any here.
Pipes = tuple[Any, Any]

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "",
    "Zebra!! über 42 — 猫, cinematic lighting",
    "word " * 100,  # over the 77-token window: counts must agree untruncated
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return models.build_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def pipes(
    tiny: tuple[Path, Path],
) -> Pipes:
    base_dir, refiner_dir = tiny
    base = StableDiffusionXLPipeline.from_pretrained(base_dir)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_dir, text_encoder_2=base.text_encoder_2, vae=base.vae
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def test_full_parameter_counts_match_published() -> None:
    assert models.count_full_parameters() == models.PUBLISHED_PARAMETER_COUNTS
    assert models.PUBLISHED_PARAMETER_COUNTS == {
        "unet": 2_567_463_684,
        "refiner_unet": 2_259_526_660,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }


def test_full_configs_conditioning_dims() -> None:
    cfg = models.FULL_CONFIGS
    te, te2 = cfg["text_encoder"], cfg["text_encoder_2"]
    assert cfg["unet"]["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert cfg["unet"]["projection_class_embeddings_input_dim"] == 256 * 6 + te2["projection_dim"]
    assert cfg["refiner_unet"]["cross_attention_dim"] == te2["hidden_size"]
    assert cfg["refiner_unet"]["projection_class_embeddings_input_dim"] == 256 * 5 + te2["projection_dim"]


def test_tiny_hub_layout(tiny: tuple[Path, Path]) -> None:
    base_dir, refiner_dir = tiny
    assert base_dir.name == "base" and refiner_dir.name == "refiner"
    weights = {
        "unet": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "text_encoder": "model.safetensors",
        "text_encoder_2": "model.safetensors",
    }
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")
    for pipe_dir, comps in (
        (base_dir, weights),
        (refiner_dir, {k: v for k, v in weights.items() if k != "text_encoder"}),
    ):
        assert (pipe_dir / "model_index.json").is_file()
        assert (pipe_dir / "scheduler" / "scheduler_config.json").is_file()
        for comp, fname in comps.items():
            assert (pipe_dir / comp / "config.json").is_file()
            assert (pipe_dir / comp / fname).is_file()
        assert not list(pipe_dir.rglob("*.bin"))
        # weight files readable like the JSON next to them (writers create them 0600)
        json_mode = (pipe_dir / "model_index.json").stat().st_mode & 0o777
        assert {p.stat().st_mode & 0o777 for p in pipe_dir.rglob("*.safetensors")} == {json_mode}
    for name in ("tokenizer", "tokenizer_2"):
        for f in tok_files:
            assert (base_dir / name / f).is_file()
    for f in tok_files:
        assert (refiner_dir / "tokenizer_2" / f).is_file()
    assert not (refiner_dir / "text_encoder").exists() and not (refiner_dir / "tokenizer").exists()
    assert not list(base_dir.parent.glob(".build-*"))  # scratch folder cleaned up

    base_index = json.loads((base_dir / "model_index.json").read_text())
    ref_index = json.loads((refiner_dir / "model_index.json").read_text())
    assert base_index["_class_name"] == "StableDiffusionXLPipeline"
    assert base_index["force_zeros_for_empty_prompt"] is True
    assert base_index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert ref_index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert ref_index["text_encoder"] == [None, None] and ref_index["tokenizer"] == [None, None]
    assert ref_index["requires_aesthetics_score"] is True
    assert ref_index["force_zeros_for_empty_prompt"] is False

    # text_encoder_2 and the VAE are the same weights in both folders, as on the hub
    for comp, fname in (("text_encoder_2", "model.safetensors"), ("vae", "diffusion_pytorch_model.safetensors")):
        assert (base_dir / comp / fname).read_bytes() == (refiner_dir / comp / fname).read_bytes()

    unet = json.loads((base_dir / "unet" / "config.json").read_text())
    ref_unet = json.loads((refiner_dir / "unet" / "config.json").read_text())
    te = json.loads((base_dir / "text_encoder" / "config.json").read_text())
    te2 = json.loads((base_dir / "text_encoder_2" / "config.json").read_text())
    vae = json.loads((base_dir / "vae" / "config.json").read_text())
    t = unet["addition_time_embed_dim"]
    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == t * 6 + te2["projection_dim"]
    assert ref_unet["cross_attention_dim"] == te2["hidden_size"]
    assert (
        ref_unet["projection_class_embeddings_input_dim"]
        == ref_unet["addition_time_embed_dim"] * 5 + te2["projection_dim"]
    )
    assert len(vae["block_out_channels"]) == 4  # latent scale 8
    sched = json.loads((base_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["timestep_spacing"] == "leading" and sched["steps_offset"] == 1


def test_tiny_size(tiny: tuple[Path, Path]) -> None:
    def size(d: Path) -> int:
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())

    base_dir, refiner_dir = tiny
    assert 8e6 < size(base_dir) < 20e6
    assert 6e6 < size(refiner_dir) < 15e6


def test_loaded_pipelines(pipes: Pipes) -> None:
    base, refiner = pipes
    assert base.vae_scale_factor == 8
    assert base.tokenizer.model_max_length == 77 and base.tokenizer_2.model_max_length == 77
    assert base.tokenizer.pad_token == "<|endoftext|>" and base.tokenizer_2.pad_token == "!"
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    assert base.text_encoder.config.vocab_size == len(base.tokenizer)
    assert len(base.tokenizer("a cat", padding="max_length").input_ids) == 77


def _ensemble(pipes: Pipes, seed: int, size: int = 64) -> Image.Image:
    base, refiner = pipes
    prompt = "a photo of an astronaut riding a horse"
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = base(
        prompt=prompt,
        height=size,
        width=size,
        num_inference_steps=2,
        denoising_end=0.8,
        output_type="latent",
        generator=gen,
    ).images
    assert latents.shape == (1, 4, size // 8, size // 8)
    image = refiner(prompt=prompt, image=latents, num_inference_steps=2, denoising_start=0.8, generator=gen).images[0]
    assert isinstance(image, Image.Image)
    return image


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models are overhead-bound; one thread keeps them fast when other jobs share the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_ensemble_run_and_same_seed_same_pixels(pipes: Pipes) -> None:
    first = _ensemble(pipes, seed=1234)
    assert first.size == (64, 64) and first.mode == "RGB"
    second = _ensemble(pipes, seed=1234)
    assert np.array_equal(np.asarray(first), np.asarray(second))
    other = _ensemble(pipes, seed=4321)
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_build_is_deterministic(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    first_root = tiny[0].parent
    again = models.build_tiny(tmp_path / "again", seed=0)
    assert _digests(first_root) == _digests(again[0].parent)
    assert len(_digests(first_root)) == 8  # base and refiner: 7 weight files; the preview decoder (taesd): 1
    other = models.build_tiny(tmp_path / "other", seed=1)
    changed = {k for k, v in _digests(other[0].parent).items() if _digests(first_root)[k] != v}
    assert changed == set(_digests(first_root))  # a different seed changes every weight file


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_tokenizer_json_counts_match(tiny: tuple[Path, Path], name: str) -> None:
    folder = tiny[0] / name
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert fast.padding is None and fast.truncation is None
    clip = CLIPTokenizer.from_pretrained(folder)
    for prompt in PROMPTS:
        ids = clip(prompt).input_ids
        assert fast.encode(prompt).ids == ids
        assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    # a real word splits into several tokens; <|endoftext|> has the highest id (CLIP pools at argmax)
    assert len(clip("astronaut").input_ids) - 2 >= 2 or len(clip("thunderstorm").input_ids) - 2 >= 2
    assert clip.eos_token_id == len(clip) - 1


def test_tokenizer_files_are_clip_layout(tmp_path: Path) -> None:
    vocab_file, merges_file = models.write_bpe_files(tmp_path)
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = merges_file.read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert len([t for t in vocab if t.endswith("</w>")]) >= 256
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    for line in merges[1:]:
        a, b = line.split()
        assert a in vocab and b in vocab and a + b in vocab


def test_build_pipelines_in_half_precision() -> None:
    before = torch.get_default_dtype()
    built: Pipes = models.build_pipelines(models.TINY_CONFIGS, "cpu", torch.bfloat16)
    base, refiner = built
    assert torch.get_default_dtype() == before
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    for module in (base.unet, refiner.unet, base.vae, base.text_encoder, base.text_encoder_2):
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}
        assert all(torch.isfinite(p).all() for p in module.parameters())


def test_build_full_wiring_on_meta() -> None:
    """The full-size builder's device/dtype path, without memory: meta device, fp16."""
    built: Pipes = models.build_full("meta", torch.float16)
    base, refiner = built
    assert torch.get_default_dtype() == torch.float32
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score is True
    modules = {
        "unet": base.unet,
        "refiner_unet": refiner.unet,
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "text_encoder_2": base.text_encoder_2,
    }
    for name, module in modules.items():
        params = list(module.parameters())
        assert sum(p.numel() for p in params) == models.PUBLISHED_PARAMETER_COUNTS[name]
        assert {(p.device.type, p.dtype) for p in params} == {("meta", torch.float16)}
    # the small local tokenizer's ids fit the full 49408-row embeddings
    assert len(base.tokenizer) <= base.text_encoder.config.vocab_size == 49408


def test_cli_build_tiny_skips_existing(tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root = tiny[0].parent
    before = _digests(root)
    mtime = (tiny[0] / "model_index.json").stat().st_mtime_ns
    assert models.main(["build-tiny", str(root), "--seed", "7"]) == 0
    assert capsys.readouterr().out.split() == [str(tiny[0]), str(tiny[1])]
    assert (tiny[0] / "model_index.json").stat().st_mtime_ns == mtime and _digests(root) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_full_on_gpu() -> None:
    built: Pipes = models.build_full("cuda", torch.float16)
    base, refiner = built
    counts = {
        "unet": base.unet,
        "refiner_unet": refiner.unet,
        "vae": base.vae,
        "text_encoder": base.text_encoder,
        "text_encoder_2": base.text_encoder_2,
    }
    for name, module in counts.items():
        assert sum(p.numel() for p in module.parameters()) == models.PUBLISHED_PARAMETER_COUNTS[name]
        assert {p.device.type for p in module.parameters()} == {"cuda"}
        assert {p.dtype for p in module.parameters()} == {torch.float16}
    gen = torch.Generator("cuda").manual_seed(0)
    latents = base(
        "a cat", height=512, width=512, num_inference_steps=4, denoising_end=0.8, output_type="latent", generator=gen
    ).images
    image = refiner(
        "a cat", image=latents, num_inference_steps=4, denoising_start=0.8, generator=gen, output_type="np"
    ).images
    assert np.isfinite(latents.float().cpu().numpy()).all() and np.isfinite(image).all()
