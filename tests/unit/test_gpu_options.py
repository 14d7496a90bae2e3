"""The GPU speed options (SDXL_COMPILE_VAE, SDXL_FP8, the compile modes) and bench/divergence.py, on the tiny model.

On the CPU: the options' wiring and their refusals, and the divergence helper. What needs CUDA (float8 numerics) is
marked `gpu` and skipped without it; the speed of each option is bench/gpu_speed.py's, never a test's.
"""

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.contract.params import GenerationParams
from worker.pipeline import Engine, ImageSpec
from worker.settings import WorkerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from divergence import Captured, capture, divergence, psnr  # noqa: E402


def settings(tiny_model: Path, **kw: Any) -> WorkerSettings:
    return WorkerSettings(base_model=str(tiny_model / "base"), refiner_model=str(tiny_model / "refiner"),
                          watermark=False, **kw)


def request(size: int = 64, steps: int = 4) -> tuple[GenerationParams, list[ImageSpec]]:
    p = GenerationParams(prompt="a lighthouse", width=size, height=size, num_inference_steps=steps,
                         guidance_scale=5.0, seed=3, refiner={"mode": "ensemble"})
    return p, [ImageSpec(p.prompt, None, None, None, p.image_seed(0))]


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Captured:
    return capture(Engine(settings(tiny_model)), *request())


def test_compiled_vae_decode_gives_the_same_image(tiny_model: Path, reference: Captured) -> None:
    """The `eager` backend runs dynamo's capture of the decode without codegen: the same arithmetic, so any
    difference would be the wiring's (a wrong module, latents scaled twice)."""
    eng = Engine(settings(tiny_model, compile_vae=True, compile_backend="eager"))
    assert eng._vae_decode is not None
    calls = []
    compiled = eng._vae_decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return compiled(*args, **kwargs)

    eng._vae_decode = counting
    got = capture(eng, *request())
    assert calls, "Engine.decode did not use the compiled decode"
    d = divergence(reference, got)
    assert d == {"psnr_db": "inf", "max_abs_latent_diff": 0.0, "negligible": True}


def test_compile_vae_is_off_by_default(tiny_model: Path) -> None:
    assert Engine(settings(tiny_model))._vae_decode is None


@pytest.mark.parametrize("mode, vae_mode", [
    ("default", "default"),
    ("max-autotune", "max-autotune-no-cudagraphs"),
    ("reduce-overhead", "default"),
    (None, None),
])
def test_the_vae_decode_is_compiled_without_cuda_graphs(tiny_model: Path, monkeypatch: pytest.MonkeyPatch,
                                                        mode: str | None, vae_mode: str | None) -> None:
    """max-autotune and reduce-overhead record CUDA graphs for the UNets; the VAE's weights move (fp32 casts
    around each decode), so its decode takes the same mode without them."""
    seen: list[tuple[str, str | None]] = []

    def fake_compile(fn: Any, backend: str, mode: str | None, fullgraph: bool) -> Any:
        seen.append(("unet" if isinstance(fn, torch.nn.Module) else "vae_decode", mode))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    Engine(settings(tiny_model, compile_mode=mode, compile_vae=True))
    unets = [("unet", mode), ("unet", mode)] if mode else []  # base and refiner
    assert seen == [*unets, ("vae_decode", vae_mode)]


def test_compile_vae_warms_up_at_the_declared_sizes(tiny_model: Path) -> None:
    eng = Engine(settings(tiny_model, compile_vae=True, compile_backend="eager", warmup_sizes="64x64,96x80"))
    sizes = []
    decode = eng.decode

    def recording(latents: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(latents.shape[-2:]))
        return decode(latents)

    eng.decode = recording  # type: ignore[method-assign]
    eng.warmup()
    assert sizes == [(8, 8), (10, 12)]  # latents at 1/8 of 64x64 and 96x80 (h, w)


def test_fp8_without_torchao_is_a_clear_error_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError, installed or not
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(RuntimeError, match=r"SDXL_FP8=true needs torchao.*pip install torchao"):
        # a model path that does not exist: the error comes before any loading is tried
        Engine(WorkerSettings(base_model="/nonexistent/base", refiner_model=None, fp8=True))


def test_fp8_on_a_cpu_is_a_clear_error() -> None:
    pytest.importorskip("torchao.quantization")
    with pytest.raises(RuntimeError, match=r"compute capability 8\.9.*runs on cpu"):
        Engine(WorkerSettings(base_model="/nonexistent/base", refiner_model=None, fp8=True, device="cpu"))


def test_fp8_is_off_by_default() -> None:
    assert WorkerSettings().fp8 is False and WorkerSettings().compile_vae is False


def test_psnr() -> None:
    a = np.zeros((1, 4, 4, 3), np.uint8)
    assert math.isinf(psnr(a, a.copy()))
    b = a.copy()
    b[...] = 1  # MSE 1 -> 20 log10(255)
    assert psnr(a, b) == pytest.approx(48.1308, abs=1e-4)
    with pytest.raises(ValueError, match="shape"):
        psnr(a, a[:, :2])


def test_divergence_of_bf16_from_fp32_is_finite_and_nonzero(tiny_model: Path, reference: Captured) -> None:
    bf16 = capture(Engine(settings(tiny_model, dtype="bfloat16")), *request())
    d = divergence(reference, bf16)
    assert isinstance(d["psnr_db"], float) and 0 < d["psnr_db"] < math.inf
    assert d["max_abs_latent_diff"] > 0
    assert d["negligible"] == (d["psnr_db"] >= 40)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_quantizes_the_unets_and_stays_near_fp16(tiny_model: Path) -> None:
    pytest.importorskip("torchao.quantization")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    fp16 = Engine(settings(tiny_model, device="cuda", dtype="float16"))
    ref = capture(fp16, *request(size=128, steps=8))
    eng = Engine(settings(tiny_model, device="cuda", dtype="float16", fp8=True))
    for pipe in eng.pipes():
        kinds = {type(m.weight).__name__ for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear)}
        assert any("Float8" in k for k in kinds), kinds
    got = capture(eng, *request(size=128, steps=8))
    d = divergence(ref, got)
    assert np.isfinite(got.latents.numpy()).all()
    assert d["max_abs_latent_diff"] > 0  # the quantization changed the arithmetic
    assert isinstance(d["psnr_db"], float) and d["psnr_db"] > 10, d  # and did not turn the image into noise
