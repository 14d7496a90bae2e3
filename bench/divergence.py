"""How far a pipeline option moves the output from a reference run on the same seed.

`capture(engine, params, specs)` runs `Engine.run` once and keeps what it decoded: the final latents (the input
of the last `Engine.decode` call) and the 8-bit images the caller gets (`recording` does the same around any
calls, such as a timed benchmark's). `divergence(ref, other)` then gives

- `psnr_db`: the PSNR of the decoded 8-bit images (peak 255, over every pixel of every image; `inf` when they are
  identical), and
- `max_abs_latent_diff`: the largest absolute difference between the final latents (float32).

`bench/gpu_speed.py` compares each speed option with fp16 eager this way; an option may become a default only
where the divergence is negligible (PSNR >= `NEGLIGIBLE_PSNR_DB`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

NEGLIGIBLE_PSNR_DB = 40.0


@dataclass
class Captured:
    latents: torch.Tensor  # float32, on the CPU: what the last decode call was given
    images: np.ndarray  # uint8, (n, h, w, 3): what the caller gets


@contextmanager
def recording(engine: Any) -> Iterator[dict[str, torch.Tensor]]:
    """While open, keeps the last `engine.decode` call's latents and decoded pixels, on the device (no copy or sync
    inside a timed call); `captured` turns them into a `Captured` afterwards."""
    last: dict[str, torch.Tensor] = {}
    decode = engine.decode

    def record(latents: torch.Tensor) -> torch.Tensor:
        out = decode(latents)
        last["latents"], last["decoded"] = latents.detach().clone(), out.detach()
        return out  # type: ignore[no-any-return]

    engine.decode = record
    try:
        yield last
    finally:
        del engine.decode  # the instance attribute: back to the class's method


def captured(engine: Any, last: dict[str, torch.Tensor]) -> Captured:
    images = engine.to_pil(last["decoded"])  # what the caller gets (the watermark, where on, included)
    return Captured(latents=last["latents"].float().cpu(),
                    images=np.stack([np.asarray(im.convert("RGB")) for im in images]))


def capture(engine: Any, params: Any, specs: list[Any]) -> Captured:
    """One `engine.run(params, specs, ...)`, keeping what its (last) decode call was given and gave."""
    with recording(engine) as last:
        engine.run(params, specs, lambda _p: None)
    return captured(engine, last)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} and {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def divergence(ref: Captured, other: Captured) -> dict[str, Any]:
    if ref.latents.shape != other.latents.shape:
        raise ValueError(f"latents differ in shape: {tuple(ref.latents.shape)} and {tuple(other.latents.shape)}")
    value = psnr(ref.images, other.images)
    return {
        # JSON has no infinity: identical images are written as the string "inf"
        "psnr_db": "inf" if math.isinf(value) else round(value, 2),
        "max_abs_latent_diff": float((ref.latents - other.latents).abs().max()),
        "negligible": value >= NEGLIGIBLE_PSNR_DB,
    }
