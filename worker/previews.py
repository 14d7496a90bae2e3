"""Live previews: the current latents, every N steps, through TAESD-XL (diffusers' `AutoencoderTiny`) to a small
WebP or JPEG, published as `generation.preview` events on the generation's stream (SSE only, never webhooks).

The latents are shrunk (area average) to the preview's size before decoding, so a 1024 px generation decodes
32x32 latents into 256 px instead of 128x128 into 1024 px and then resizing: a sixteenth of TAESD's work, which
keeps a preview at a small fraction of one denoising step (bench/previews.py measures it). The latents of a
denoising step are still noisy: early previews show the noise the step has not yet removed.
"""

import base64
import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from worker.settings import WorkerSettings

log = logging.getLogger("worker.previews")

HUB_TAESD_XL = "madebyollin/taesdxl"
CONTENT_TYPES = {"webp": "image/webp", "jpeg": "image/jpeg"}
LATENT_SCALE = 8  # SDXL's VAE (and TAESD-XL) maps one latent cell to 8x8 pixels


@dataclass
class Preview:
    """One encoded preview image."""

    data: bytes
    width: int
    height: int
    content_type: str
    ext: str


def preview_source(settings: WorkerSettings) -> str | None:
    """Where the preview decoder comes from: SDXL_PREVIEW_VAE, or for `auto` a `taesd` folder beside a local base
    model (what `make model` builds for the tiny one), else the hub's TAESD-XL. `none` (or empty): no previews."""
    name = (settings.preview_vae or "").strip()
    if name.lower() in ("", "none"):
        return None
    if name.lower() != "auto":
        return name
    base = Path(settings.base_model)
    beside = base.parent / "taesd"
    if base.is_dir() and (beside / "config.json").is_file():
        return str(beside)
    return HUB_TAESD_XL


def preview_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) of the preview of a `width` x `height` image: at most `max_side` on its longer side,
    multiples of 8 (latent cells), never larger than the image."""
    lw, lh = max(1, width // LATENT_SCALE), max(1, height // LATENT_SCALE)
    tw, th = latent_size(lw, lh, max_side)
    return tw * LATENT_SCALE, th * LATENT_SCALE


def latent_size(lw: int, lh: int, max_side: int) -> tuple[int, int]:
    """The latent grid a preview decodes: the latents' own, shrunk to fit `max_side` pixels."""
    limit = max(1, max_side // LATENT_SCALE)
    scale = min(1.0, limit / max(lw, lh))
    return max(1, math.floor(lw * scale + 0.5)), max(1, math.floor(lh * scale + 0.5))


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "webp":
        image.save(buf, format="WEBP", quality=quality, method=0)  # method 0: the fastest encoder
    else:
        image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Previewer:
    """A resident TAESD-XL decoder (a few MB) plus the preview encoder; used on the worker's main thread."""

    def __init__(self, vae: Any, max_side: int = 256, fmt: str = "webp", quality: int = 70) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"preview format must be one of {sorted(CONTENT_TYPES)} but is {fmt!r}")
        self.vae = vae
        self.max_side = max_side
        self.fmt = fmt
        self.quality = quality
        self.content_type = CONTENT_TYPES[fmt]

    @classmethod
    def load(cls, settings: WorkerSettings, device: torch.device, dtype: torch.dtype) -> "Previewer | None":
        """The previewer settings ask for, warmed up; None when previews are off (SDXL_PREVIEW_VAE=none). With
        `auto`, a decoder that cannot be loaded (no network for the hub one) turns previews off with a warning;
        a decoder named explicitly must load."""
        from diffusers import AutoencoderTiny

        source = preview_source(settings)
        if source is None:
            return None
        t0 = time.monotonic()
        try:
            vae = AutoencoderTiny.from_pretrained(source, torch_dtype=dtype).to(device).eval()
        except Exception as exc:
            if (settings.preview_vae or "").strip().lower() != "auto":
                raise RuntimeError(f"SDXL_PREVIEW_VAE={settings.preview_vae!r} could not be loaded: {exc}") from exc
            log.warning("no preview decoder (%s could not be loaded: %s): previews are off; set SDXL_PREVIEW_VAE "
                        "to a TAESD-XL directory or hub id, or to `none`", source, exc)
            return None
        previewer = cls(vae, settings.preview_max_size, settings.preview_format, settings.preview_quality)
        previewer.render(torch.zeros(1, 4, 8, 8, device=device, dtype=dtype))  # first-call costs paid here
        log.info("preview decoder loaded", extra={"source": source, "seconds": round(time.monotonic() - t0, 3)})
        return previewer

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Denoising-space SDXL latents (B, 4, h, w) -> one small RGB image each. TAESD-XL's scaling factor is 1:
        it reads the pipeline's latents as they are."""
        param = next(iter(self.vae.parameters()))
        x = latents.detach().to(device=param.device, dtype=param.dtype)
        lw, lh = latent_size(x.shape[-1], x.shape[-2], self.max_side)
        if (lw, lh) != (x.shape[-1], x.shape[-2]):
            x = torch.nn.functional.interpolate(x, size=(lh, lw), mode="area")
        out = self.vae.decode(x, return_dict=False)[0]  # [-1, 1]
        pixels = ((out.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
        arr = pixels.cpu().numpy()
        return [Image.fromarray(a) for a in arr]  # (h, w, 3) uint8: RGB

    def render(self, latents: torch.Tensor) -> list[Preview]:
        """Decode and encode every image of the batch, in batch order."""
        return [Preview(encode(img, self.fmt, self.quality), img.width, img.height, self.content_type, self.fmt)
                for img in self.decode(latents)]


def event_data(gen_id: str, index: int, step: int, total_steps: int, stage: str, preview: Preview,
               url: str | None) -> dict[str, Any]:
    """The `generation.preview` event's data: inline base64 (`b64`), or `url` where the image was stored."""
    return {
        "generation_id": gen_id,
        "index": index,
        "step": step,
        "total_steps": total_steps,
        "stage": stage,
        "width": preview.width,
        "height": preview.height,
        "content_type": preview.content_type,
        "bytes": len(preview.data),
        "b64": None if url else base64.b64encode(preview.data).decode("ascii"),
        "url": url,
    }


def preview_name(index: int, step: int, ext: str) -> str:
    return f"{index}-{step}.{ext}"
