"""SDXL model builders: tiny random-weight pipelines for tests, full-size ones for GPU benchmarks.

Everything here is built from the real architecture classes with locally generated tokenizers, so nothing
is downloaded (run with HF_HUB_OFFLINE=1). Folders are written with ``save_pretrained`` and therefore have
exactly the hub layout of stabilityai/stable-diffusion-xl-{base,refiner}-1.0.

CLI::

    python -m tools.models build-tiny DIR [--seed N] [--force]
    python -m tools.models build-full DIR [--device cuda] [--dtype float16]
    python -m tools.models build-tiny-adapters DIR [--full]
    python -m tools.models count
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

__all__ = [
    "FULL_CONFIGS",
    "PUBLISHED_PARAMETER_COUNTS",
    "TINY_CONFIGS",
    "build_full",
    "build_pipelines",
    "build_tiny",
    "build_tiny_adapters",
    "count_full_parameters",
    "make_tokenizer",
    "write_bpe_files",
]

Config = dict[str, Any]

# --------------------------------------------------------------------------------------------------------
# SDXL 1.0 official architecture configs (diffusers/transformers config.json of the hub repos, minus the
# bookkeeping keys). Parameter counts instantiated from them must match PUBLISHED_PARAMETER_COUNTS.
# --------------------------------------------------------------------------------------------------------

_UNET_COMMON: Config = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "upcast_attention": None,
    "use_linear_projection": True,
}

BASE_UNET_CONFIG: Config = {
    **_UNET_COMMON,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    # text_encoder hidden (768) + text_encoder_2 hidden (1280)
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    # 6 time ids * 256 + text_encoder_2 pooled projection (1280)
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
}

REFINER_UNET_CONFIG: Config = {
    **_UNET_COMMON,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    # the refiner only sees text_encoder_2
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    # 5 time ids (aesthetic score replaces target size) * 256 + 1280
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
}

VAE_CONFIG: Config = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

_CLIP_COMMON: Config = {
    "attention_dropout": 0.0,
    # eos_token_id 2 is the "legacy" value of the real configs: CLIP then pools at argmax(input_ids), which
    # is the first <|endoftext|> because our generated vocab (like the real one) gives it the highest id.
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
    "dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
}

TEXT_ENCODER_CONFIG: Config = {
    **_CLIP_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}

TEXT_ENCODER_2_CONFIG: Config = {
    **_CLIP_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}

# Only the keys EulerDiscreteScheduler accepts (the hub file also carries DDIM leftovers like clip_sample).
SCHEDULER_CONFIG: Config = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

FULL_CONFIGS: dict[str, Config] = {
    "unet": BASE_UNET_CONFIG,
    "refiner_unet": REFINER_UNET_CONFIG,
    "vae": VAE_CONFIG,
    "text_encoder": TEXT_ENCODER_CONFIG,
    "text_encoder_2": TEXT_ENCODER_2_CONFIG,
    "scheduler": SCHEDULER_CONFIG,
}

PUBLISHED_PARAMETER_COUNTS: dict[str, int] = {
    "unet": 2_567_463_684,
    "refiner_unet": 2_259_526_660,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}

# --------------------------------------------------------------------------------------------------------
# Tiny configs: same classes, block types and conditioning wiring as SDXL 1.0, shrunk until a 256 px,
# 10-step base+refiner run takes about 0.3 s on 2 CPU cores. At these widths CPU time is dominated by
# per-op overhead and full-resolution VAE convs, so depth (layers_per_block 1) and the VAE's top-level
# widths are cut, while the cheap-to-run low-resolution UNet level and the text encoders carry most of
# the weights (~14 MB base, ~10 MB refiner). The VAE keeps 4 blocks so the latent scale stays 8
# (256 px -> 32 px latents).
# --------------------------------------------------------------------------------------------------------

_TINY_TIME_DIM = 8
_TINY_TE1_HIDDEN = 32
_TINY_TE2_HIDDEN = 64
_TINY_TE2_PROJ = 32

_TINY_CLIP_COMMON: Config = {
    **_CLIP_COMMON,
    "num_hidden_layers": 4,  # >= 2 because SDXL reads hidden_states[-2]
    "vocab_size": 0,  # replaced by the generated vocab size
}

_TINY_UNET_COMMON: Config = {
    **_UNET_COMMON,
    "addition_time_embed_dim": _TINY_TIME_DIM,
    "addition_embed_type_num_heads": 2,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 32,
}

TINY_CONFIGS: dict[str, Config] = {
    "unet": {
        **_TINY_UNET_COMMON,
        "attention_head_dim": [1, 1, 2],
        "block_out_channels": [16, 32, 96],
        "cross_attention_dim": _TINY_TE1_HIDDEN + _TINY_TE2_HIDDEN,
        "down_block_types": BASE_UNET_CONFIG["down_block_types"],
        "up_block_types": BASE_UNET_CONFIG["up_block_types"],
        "projection_class_embeddings_input_dim": _TINY_TIME_DIM * 6 + _TINY_TE2_PROJ,
        "transformer_layers_per_block": [1, 1, 2],
    },
    "refiner_unet": {
        **_TINY_UNET_COMMON,
        "attention_head_dim": [1, 1, 2, 2],
        "block_out_channels": [16, 32, 64, 96],
        "cross_attention_dim": _TINY_TE2_HIDDEN,
        "down_block_types": REFINER_UNET_CONFIG["down_block_types"],
        "up_block_types": REFINER_UNET_CONFIG["up_block_types"],
        "projection_class_embeddings_input_dim": _TINY_TIME_DIM * 5 + _TINY_TE2_PROJ,
        "transformer_layers_per_block": 1,
    },
    "vae": {
        **VAE_CONFIG,
        "block_out_channels": [8, 8, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 256,
    },
    "text_encoder": {
        **_TINY_CLIP_COMMON,
        "hidden_act": "quick_gelu",
        "hidden_size": _TINY_TE1_HIDDEN,
        "intermediate_size": 4 * _TINY_TE1_HIDDEN,
        "num_attention_heads": 4,
        "projection_dim": _TINY_TE1_HIDDEN,
    },
    "text_encoder_2": {
        **_TINY_CLIP_COMMON,
        "hidden_act": "gelu",
        "hidden_size": _TINY_TE2_HIDDEN,
        "intermediate_size": 4 * _TINY_TE2_HIDDEN,
        "num_attention_heads": 4,
        "projection_dim": _TINY_TE2_PROJ,
    },
    "scheduler": SCHEDULER_CONFIG,
}

# --------------------------------------------------------------------------------------------------------
# Local CLIP-style byte-level BPE tokenizer
# --------------------------------------------------------------------------------------------------------

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
_NUM_MERGES = 120  # few enough that most words still split into several tokens

# Merges are learned from this word list so that common English (and prompt) words split into a few
# tokens instead of one token per letter, like real CLIP does on rarer words.
_MERGE_CORPUS = """
a photo of an astronaut riding a horse on the moon in the style of a detailed oil painting portrait
the quick brown fox jumps over the lazy dog and then runs into the forest near the river at night
beautiful landscape with mountains lake trees clouds sunset sunrise golden hour cinematic lighting
high quality highly detailed sharp focus studio photograph professional color colorful vibrant
city street building house room window door light shadow water fire ice snow rain sky sea ocean
cat dog bird fish flower garden castle dragon robot car train ship boat plane space planet star
woman man girl boy child people person face eyes hair hands smile standing sitting walking running
red green blue yellow orange purple black white gray pink dark bright soft warm cold blurry ugly
digital art illustration concept anime drawing sketch render realistic photorealistic fantasy
this that these those there here where when what which with without from into onto about under
is are was were be been being have has had do does did will would could should can may might
one two three four five six seven eight nine ten first second third last next little small large
big old new young good best better great long short tall wide deep open close morning evening
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode char table (same order as the real CLIP vocab)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training, ties broken lexicographically so the output is deterministic."""
    byte_map = _bytes_to_unicode()
    freqs: Counter[tuple[str, ...]] = Counter()
    for word in words:
        chars = [byte_map[b] for b in word.lower().encode("utf-8")]
        freqs[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in freqs.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in freqs.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        freqs = merged
    return merges


def write_bpe_files(out_dir: Path, num_merges: int = _NUM_MERGES) -> tuple[Path, Path]:
    """Write a small CLIP-style vocab.json + merges.txt; returns their paths.

    Layout follows the real CLIP vocab: 256 byte chars, their ``</w>`` variants, merged tokens, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last, so ``<|endoftext|>`` has the highest id and "!" is id 0.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = _learn_merges(_MERGE_CORPUS, num_merges)
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            tokens.append(a + b)
            seen.add(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_path, merges_path


def make_tokenizer(vocab_file: Path, merges_file: Path, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """CLIPTokenizer from local files. model_max_length must be set: transformers 5 otherwise pads to a
    huge length. SDXL's tokenizer pads with <|endoftext|>, tokenizer_2 with "!"."""
    return CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MODEL_MAX_LENGTH,
    )


def _make_tokenizers(work_dir: Path) -> tuple[CLIPTokenizer, CLIPTokenizer, Path, Path]:
    vocab_file, merges_file = write_bpe_files(work_dir)
    tok = make_tokenizer(vocab_file, merges_file, EOS_TOKEN)
    tok_2 = make_tokenizer(vocab_file, merges_file, "!")
    return tok, tok_2, vocab_file, merges_file


# --------------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _clip_config(cfg: Config) -> CLIPTextConfig:
    return CLIPTextConfig(**copy.deepcopy(cfg))


def _make_components(configs: dict[str, Config], seed: int, vocab_size: int) -> dict[str, Any]:
    """Instantiate every module under the caller's device/dtype context, reseeding torch before each one so
    a component's weights depend only on (seed, component) and not on construction order. A text encoder
    config with vocab_size 0 gets `vocab_size` (the generated tokenizer's)."""
    te_cfg = dict(configs["text_encoder"])
    te2_cfg = dict(configs["text_encoder_2"])
    for cfg in (te_cfg, te2_cfg):
        if cfg["vocab_size"] <= 0:
            cfg["vocab_size"] = vocab_size
    builders: dict[str, Any] = {
        "unet": lambda: UNet2DConditionModel(**copy.deepcopy(configs["unet"])),
        "refiner_unet": lambda: UNet2DConditionModel(**copy.deepcopy(configs["refiner_unet"])),
        "vae": lambda: AutoencoderKL(**copy.deepcopy(configs["vae"])),
        "text_encoder": lambda: CLIPTextModel(_clip_config(te_cfg)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(_clip_config(te2_cfg)),
    }
    out: dict[str, Any] = {}
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed * 1000 + i)
        out[name] = build().eval().requires_grad_(False)
    return out


def _assemble(
    parts: dict[str, Any], tok: CLIPTokenizer, tok_2: CLIPTokenizer
) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    # Separate scheduler objects: a scheduler carries per-run state (step index).
    base = StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=tok,
        tokenizer_2=tok_2,
        unet=parts["unet"],
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=parts["vae"],
        text_encoder=None,
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=tok_2,
        unet=parts["refiner_unet"],
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return base, refiner


def _fix_saved_tokenizers(pipe_dir: Path, vocab_file: Path, merges_file: Path) -> None:
    """transformers 5 saves only tokenizer.json + tokenizer_config.json, and tokenizer.json inherits any
    padding/truncation state left on the backend by an earlier call. Strip that state (so a bare
    `tokenizers.Tokenizer.from_file` counts real tokens) and add vocab.json/merges.txt like the hub has."""
    for name in ("tokenizer", "tokenizer_2"):
        tdir = pipe_dir / name
        tjson = tdir / "tokenizer.json"
        if not tjson.exists():
            continue
        data = json.loads(tjson.read_text(encoding="utf-8"))
        if data.get("padding") is not None or data.get("truncation") is not None:
            data["padding"] = None
            data["truncation"] = None
            tjson.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
        (tdir / "vocab.json").write_bytes(vocab_file.read_bytes())
        (tdir / "merges.txt").write_bytes(merges_file.read_bytes())


def _save(
    base: StableDiffusionXLPipeline,
    refiner: StableDiffusionXLImg2ImgPipeline,
    out_dir: Path,
    vocab_file: Path,
    merges_file: Path,
) -> tuple[Path, Path]:
    """Save both pipelines to out_dir/base and out_dir/refiner.

    Written into a scratch folder beside them and renamed into place, so a reader that checks for
    model_index.json (or a concurrent builder) never sees a half-written model.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {"base": out_dir / "base", "refiner": out_dir / "refiner"}
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=out_dir))
    try:
        for name, pipe in (("base", base), ("refiner", refiner)):
            # mypy cannot see DiffusionPipeline.save_pretrained through diffusers' untyped mixins.
            pipe.save_pretrained(scratch / name, safe_serialization=True)  # type: ignore[attr-defined,union-attr]
            _fix_saved_tokenizers(scratch / name, vocab_file, merges_file)
            _fix_weight_modes(scratch / name)
        for name, dest in final.items():
            if dest.exists():
                old = scratch / f"old-{name}"
                dest.rename(old)
            (scratch / name).rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final["base"], final["refiner"]


def _fix_weight_modes(pipe_dir: Path) -> None:
    """The safetensors writers create weight files 0600 (temp file + rename); give them the same mode as
    the JSON files next to them (umask-derived) so another user, e.g. a container's, can read them."""
    mode = (pipe_dir / "model_index.json").stat().st_mode & 0o777
    for path in pipe_dir.rglob("*.safetensors"):
        path.chmod(mode)


def build_pipelines(
    configs: dict[str, Config],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    out_dir: Path | None = None,
) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    """Base + refiner pipelines from a config set (TINY_CONFIGS or FULL_CONFIGS), created directly on
    `device` in `dtype` (default dtype set temporarily and restored), sharing text_encoder_2 and vae.
    Saved in hub layout to out_dir/base and out_dir/refiner when `out_dir` is given."""
    with tempfile.TemporaryDirectory(prefix="sdxl-bpe-") as tmp:
        tok, tok_2, vocab_file, merges_file = _make_tokenizers(Path(tmp))
        with torch.device(device), _default_dtype(dtype):
            parts = _make_components(configs, seed, vocab_size=len(tok))
        base, refiner = _assemble(parts, tok, tok_2)
        if out_dir is not None:
            _save(base, refiner, Path(out_dir), vocab_file, merges_file)
    return base, refiner


def build_tiny(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Build a tiny random-weight SDXL base + refiner (fp32) and save them to out_dir/base and
    out_dir/refiner; returns those two paths.

    Same architecture classes and conditioning wiring as SDXL 1.0 (two CLIP encoders for the base, only
    text_encoder_2 plus aesthetic score for the refiner; text_encoder_2 and VAE are shared and identical in
    both folders, as on the hub). Deterministic: the same seed gives byte-identical safetensors.
    """
    build_pipelines(TINY_CONFIGS, "cpu", torch.float32, seed=seed, out_dir=Path(out_dir))
    build_tiny_taesd(Path(out_dir) / "taesd", seed=seed)  # the previews' decoder, found beside `base`
    return Path(out_dir) / "base", Path(out_dir) / "refiner"


def build_tiny_inpaint_unet(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random SDXL inpainting UNet (the base's architecture with 9 input channels: latents, mask and
    masked-image latents, as diffusers/stable-diffusion-xl-1.0-inpainting-0.1) saved to out_dir/unet, the layout
    SDXL_INPAINT_MODEL reads."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**copy.deepcopy(TINY_CONFIGS["unet"]), "in_channels": 9})
    unet.save_pretrained(Path(out_dir) / "unet")  # type: ignore[attr-defined]  # ModelMixin, untyped
    return Path(out_dir)


# TAESD-XL's layout (madebyollin/taesdxl) at a fraction of its width: live previews in tests
TINY_TAESD_CONFIG: Config = {"encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8),
                             "num_encoder_blocks": (1, 1, 1, 1), "num_decoder_blocks": (1, 1, 1, 1)}


def build_tiny_taesd(out_dir: Path, seed: int = 0, config: Config | None = None) -> Path:
    """A random-weight TAESD-XL (diffusers' `AutoencoderTiny`) saved to out_dir in the hub layout
    (config.json + safetensors), the folder SDXL_PREVIEW_VAE reads; `auto` finds `<dir>/taesd` beside
    `<dir>/base`. `config`: overrides of AutoencoderTiny's defaults (its defaults are TAESD-XL's real size)."""
    torch.manual_seed(seed)
    vae = AutoencoderTiny(**(TINY_TAESD_CONFIG if config is None else config))
    vae.save_pretrained(Path(out_dir))  # type: ignore[attr-defined]  # ModelMixin, untyped
    mode = (Path(out_dir) / "config.json").stat().st_mode & 0o777  # as _fix_weight_modes: readable by others
    for path in Path(out_dir).glob("*.safetensors"):
        path.chmod(mode)
    return Path(out_dir)


def build_full(
    device: str,
    dtype: torch.dtype,
    out_dir: Path | None = None,
    seed: int = 0,
) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    """Full-size SDXL 1.0 base + refiner with random weights, created directly on `device` in `dtype`.

    Meant for GPU benchmarks: the compute does not depend on weight values. Modules are constructed
    under ``torch.device(device)`` with the default dtype temporarily set to `dtype` (restored afterwards),
    so no fp32 or CPU copy is ever made (about 11.5 GB in fp16). Weights come from the modules' own
    default initialisers (PyTorch's uniform +-1/sqrt(fan_in) for diffusers layers, normal(0, 0.02) for
    CLIP), which keep activations O(1), so outputs are finite and NaN-free but not meaningful images.
    text_encoder_2 and vae are the same objects in both pipelines. The tokenizers are the small local
    ones (their ids fit the 49408-row embeddings). The VAE keeps the official ``force_upcast=True``, so in
    fp16 the pipeline decodes in fp32 as with the real SDXL VAE. If `out_dir` is given both pipelines are
    also saved (hub layout) to out_dir/base and out_dir/refiner.
    """
    return build_pipelines(FULL_CONFIGS, device, dtype, seed=seed, out_dir=out_dir)


def count_full_parameters() -> dict[str, int]:
    """Parameter count of each SDXL 1.0 component, instantiated on the meta device (no memory used)."""
    with torch.device("meta"):
        parts = _make_components(FULL_CONFIGS, seed=0, vocab_size=0)
    return {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}


# --------------------------------------------------------------------------------------------------------
# Tiny random LoRA adapters and presets (docs/adapters.md): a registry folder for SDXL_ADAPTERS_DIR
# --------------------------------------------------------------------------------------------------------

_UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_TE_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# name -> (format, components, rank, seed); random weights large enough to change the image visibly
TINY_ADAPTERS: dict[str, tuple[str, tuple[str, ...], int, int]] = {
    "tiny-style": ("peft", ("unet", "text_encoder"), 4, 1),
    "tiny-kohya": ("kohya", ("unet",), 4, 2),
    "tiny-lcm": ("peft", ("unet",), 8, 3),  # stands in for latent-consistency/lcm-lora-sdxl
    "tiny-lightning": ("kohya", ("unet",), 8, 4),  # stands in for ByteDance/SDXL-Lightning's 4-step LoRA
}
TINY_ADAPTER_MANIFEST: dict[str, Any] = {
    "adapters": {
        "tiny-style": {"file": "tiny-style.safetensors", "refiner_file": "tiny-style-refiner.safetensors",
                       "base": "sdxl", "scale_min": -1.0, "scale_max": 1.5,
                       "description": "random test LoRA, PEFT/diffusers format: UNet, text encoder and refiner"},
        "tiny-kohya": {"file": "tiny-kohya.safetensors",
                       "description": "random test LoRA, kohya format (base model from its metadata)"},
        "tiny-lcm": {"file": "tiny-lcm.safetensors", "base": "sdxl",
                     "description": "random stand-in for latent-consistency/lcm-lora-sdxl"},
        "tiny-lightning": {"file": "tiny-lightning.safetensors",
                           "description": "random stand-in for ByteDance/SDXL-Lightning (4-step LoRA)"},
    },
    "presets": {
        "lcm": {"adapter": "tiny-lcm", "scheduler": "lcm", "steps": 4, "steps_min": 2, "steps_max": 8,
                "guidance_scale": 1.0, "description": "LCM-LoRA: 4 steps with LCMScheduler, no guidance"},
        "lightning": {"adapter": "tiny-lightning", "scheduler": "euler", "scheduler_config":
                      {"timestep_spacing": "trailing"}, "steps": 4, "steps_min": 1, "steps_max": 8,
                      "guidance_scale": 0.0, "description": "SDXL-Lightning: 4 Euler steps, trailing timesteps"},
    },
}


def _lora_pairs(model: Any, targets: tuple[str, ...], rank: int, gen: torch.Generator
                ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, down (r, in), up (out, r)) for every nn.Linear whose name ends in one of `targets`."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(targets):
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features ** 0.5
            up = torch.randn(module.out_features, rank, generator=gen) * (0.6 / rank ** 0.5)
            yield name, down, up


def tiny_lora_state_dict(fmt: str, components: dict[str, Any], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA for `components` ({"unet": model, "text_encoder": model, ...}) in `fmt`: "peft" (diffusers'
    own keys: `unet.<module>.lora_A.weight`) or "kohya" (`lora_unet_<module_with_underscores>.lora_down.weight`,
    `.lora_up.weight`, `.alpha`)."""
    gen = torch.Generator().manual_seed(seed)
    kohya_prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for comp, model in components.items():
        targets = _UNET_LORA_TARGETS if comp == "unet" else _TE_LORA_TARGETS
        for name, down, up in _lora_pairs(model, targets, rank, gen):
            if fmt == "peft":
                out[f"{comp}.{name}.lora_A.weight"] = down.contiguous()
                out[f"{comp}.{name}.lora_B.weight"] = up.contiguous()
            else:
                key = kohya_prefix[comp] + name.replace(".", "_")
                out[f"{key}.lora_down.weight"] = down.contiguous()
                out[f"{key}.lora_up.weight"] = up.contiguous()
                out[f"{key}.alpha"] = torch.tensor(float(rank))  # alpha = rank: scaling 1, as PEFT's files
    return out


def build_tiny_adapters(out_dir: Path, configs: dict[str, Config] | None = None, rank: int | None = None) -> Path:
    """Random LoRA adapters for the tiny model (or `configs`' model, e.g. FULL_CONFIGS) in PEFT/diffusers and
    kohya formats, a refiner LoRA for one of them, and `adapters.json` with two presets (docs/adapters.md).
    `rank`: every adapter's rank instead of the small defaults (real SDXL LoRAs have 32-128)."""
    from safetensors.torch import save_file

    configs = configs or TINY_CONFIGS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # shapes only: the weights come from the generator below
        parts = _make_components(configs, seed=0, vocab_size=1000)
    kohya_meta = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora",
                  "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    for name, (fmt, comps, default_rank, seed) in TINY_ADAPTERS.items():
        sd = tiny_lora_state_dict(fmt, {c: parts[c] for c in comps}, rank or default_rank, seed)
        save_file(sd, str(out_dir / f"{name}.safetensors"), metadata=kohya_meta if fmt == "kohya" else None)
    refiner = tiny_lora_state_dict("peft", {"unet": parts["refiner_unet"]}, rank or 4, 5)
    save_file(refiner, str(out_dir / "tiny-style-refiner.safetensors"))
    (out_dir / "adapters.json").write_text(json.dumps(TINY_ADAPTER_MANIFEST, indent=2) + "\n")
    mode = out_dir.stat().st_mode & 0o666 | 0o444
    for path in out_dir.iterdir():
        path.chmod(mode)
    return out_dir


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, _DTYPE_ALIASES.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise argparse.ArgumentTypeError(f"not a floating torch dtype: {name}")
    return dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_tiny = sub.add_parser("build-tiny", help="build tiny random SDXL base + refiner into DIR")
    p_tiny.add_argument("dir", type=Path)
    p_tiny.add_argument("--seed", type=int, default=0)
    p_tiny.add_argument("--force", action="store_true", help="rebuild even if DIR already holds both")

    p_full = sub.add_parser("build-full", help="build full-size random SDXL base + refiner into DIR")
    p_full.add_argument("dir", type=Path)
    p_full.add_argument("--device", default="cuda")
    p_full.add_argument("--dtype", type=_parse_dtype, default=torch.float16)
    p_full.add_argument("--seed", type=int, default=0)

    p_inpaint = sub.add_parser("build-tiny-inpaint", help="build a tiny random SDXL inpainting UNet into DIR/unet")
    p_inpaint.add_argument("dir", type=Path)
    p_inpaint.add_argument("--seed", type=int, default=0)

    p_taesd = sub.add_parser("build-tiny-taesd", help="build a tiny random TAESD-XL (previews) into DIR")
    p_taesd.add_argument("dir", type=Path)
    p_taesd.add_argument("--seed", type=int, default=0)

    p_adapters = sub.add_parser("build-tiny-adapters", help="build random LoRA adapters, a manifest and presets "
                                "for the tiny model into DIR (an SDXL_ADAPTERS_DIR)")
    p_adapters.add_argument("dir", type=Path)
    p_adapters.add_argument("--full", action="store_true", help="for the full-size random model instead")
    p_adapters.add_argument("--rank", type=int, help="every adapter's rank (default: 4 or 8)")

    sub.add_parser("count", help="print SDXL 1.0 parameter counts (meta device) as JSON")

    args = parser.parse_args(argv)
    if args.command == "build-tiny":
        base_dir, refiner_dir = args.dir / "base", args.dir / "refiner"
        built = (base_dir / "model_index.json").exists() and (refiner_dir / "model_index.json").exists()
        if args.force or not built:
            base_dir, refiner_dir = build_tiny(args.dir, seed=args.seed)
        print(base_dir)
        print(refiner_dir)
    elif args.command == "build-full":
        build_full(args.device, args.dtype, out_dir=args.dir, seed=args.seed)
        print(args.dir / "base")
        print(args.dir / "refiner")
    elif args.command == "build-tiny-inpaint":
        print(build_tiny_inpaint_unet(args.dir, seed=args.seed))
    elif args.command == "build-tiny-adapters":
        print(build_tiny_adapters(args.dir, FULL_CONFIGS if args.full else None, args.rank))
    elif args.command == "build-tiny-taesd":
        print(build_tiny_taesd(args.dir, seed=args.seed))
    else:
        print(json.dumps(count_full_parameters(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
