"""Live preview cost: time per preview (TAESD-XL decode + WebP encode + base64, what the worker does before the
Redis write) and a whole run with previews on versus off at the default cadence (every 5 steps), as JSON lines.

Goal: previews on cost at most 5 % of the run's time on a GPU at 1024 px (0 when off: no hook is passed). On the
CPU the tiny model's steps are so cheap that its ratio is an upper bound; the full-size-shaped decode (a random
TAESD-XL of the real size on 128x128 latents, the latents of a 1024 px image) gives the CPU figure that scales.
`overhead_share` is the previews' own measured seconds over the run without them (steady, from one timed run);
`ratio` compares the two runs' medians (noisier).

    python bench/previews.py                  # CPU: tiny model at 256 px, 30 steps, + the full-size-shaped decode
    python bench/previews.py --full           # CUDA: full-size random SDXL, 1024 px, 30 steps (fp16)

bench/adapters.py imports `measure`.
"""

import argparse
import base64
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.contract.params import DEFAULT_PREVIEW_EVERY, GenerationParams, RefinerParams  # noqa: E402
from worker.pipeline import Engine, ImageSpec, Progress  # noqa: E402
from worker.previews import Previewer, encode, event_data  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_preview(previewer: Previewer, latents: torch.Tensor, reps: int = 10) -> dict[str, float]:
    """Median ms of decode, encode and both (one warm-up first), for a batch of latents."""
    device = latents.device
    previewer.render(latents)
    decode_ms, total_ms = [], []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        images = previewer.decode(latents)
        t1 = time.perf_counter()
        for img in images:
            base64.b64encode(encode(img, previewer.fmt, previewer.quality))
        total_ms.append((time.perf_counter() - t0) * 1000)
        decode_ms.append((t1 - t0) * 1000)
    total = statistics.median(total_ms)
    decode = statistics.median(decode_ms)
    return {"ms_per_preview": round(total, 3), "decode_ms": round(decode, 3), "encode_ms": round(total - decode, 3)}


def measure(engine: Engine | None = None, previewer: Previewer | None = None, width: int = 256, height: int = 256,
            steps: int = 30, every: int = DEFAULT_PREVIEW_EVERY, runs: int = 3, label: str = "tiny",
            full_size_decode: bool = True) -> list[dict[str, Any]]:
    """The figures as rows. Without `engine`/`previewer`: the tiny model and its TAESD stand-in on the CPU."""
    rows: list[dict[str, Any]] = []
    if engine is None:
        tiny = ROOT / ".models" / "tiny"
        engine = Engine(WorkerSettings(base_model=str(tiny / "base"), refiner_model=None, watermark=False,
                                       device="cpu"))
    if previewer is None:
        previewer = Previewer.load(WorkerSettings(base_model=engine.settings.base_model, preview_vae="auto"),
                                   engine.device, engine.dtype)
        if previewer is None:
            raise RuntimeError("no preview decoder: build one with `python -m tools.models build-tiny-taesd DIR`")
    params = GenerationParams(prompt="a lighthouse at dusk", width=width, height=height, num_inference_steps=steps,
                              guidance_scale=5.0, seed=0, refiner=RefinerParams(), preview_every=every)
    specs = [ImageSpec(params.prompt, None, None, None, 0)]
    latents = torch.randn(1, 4, height // 8, width // 8, device=engine.device, dtype=engine.dtype)
    rows.append({"figure": "preview", "model": label, "device": str(engine.device), "image": [width, height],
                 **time_preview(previewer, latents)})

    spent: list[float] = []

    def preview(progress: Progress, lat: torch.Tensor) -> None:
        t0 = time.perf_counter()
        for pv in previewer.render(lat):  # what the worker does, but the Redis write
            json.dumps(event_data("gen", 0, progress.step, progress.total_steps, progress.stage, pv, None))
        spent.append(time.perf_counter() - t0)

    def timed(with_previews: bool) -> float:
        _sync(engine.device)
        t0 = time.perf_counter()
        engine.run(params, specs, lambda _p: None, preview=preview if with_previews else None)
        _sync(engine.device)
        return time.perf_counter() - t0

    timed(False)
    timed(True)  # warm-ups
    off, on, shares = [], [], []
    for _ in range(runs):
        off.append(timed(False))
        spent.clear()
        on.append(timed(True))
        shares.append(sum(spent) / off[-1])
    off_s, on_s = statistics.median(off), statistics.median(on)
    share = statistics.median(shares)
    rows.append({"figure": "run", "model": label, "device": str(engine.device), "image": [width, height],
                 "steps": steps, "every": every, "previews_per_run": steps // every, "runs": runs,
                 "off_s": round(off_s, 4), "on_s": round(on_s, 4), "ratio": round(on_s / off_s, 4),
                 "overhead_share": round(share, 4),
                 "goal": {"value": round(share, 4), "goal": 0.05, "op": "<=", "met": share <= 0.05,
                          "applies": "GPU at 1024 px"}})

    if full_size_decode:
        rows += full_size_preview(engine.device, engine.dtype)
    return rows


def full_size_preview(device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """A random TAESD-XL of the real size (AutoencoderTiny's defaults are taesdxl's) on a 1024 px image's latents:
    our path (latents shrunk to the 256 px preview first) and, for comparison, a full 1024 px decode."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny().to(device=device, dtype=dtype).eval()
    latents = torch.randn(1, 4, 128, 128, device=device, dtype=dtype)
    rows = []
    for max_side, name in ((256, "shrunk latents (ours)"), (1024, "full decode, for comparison")):
        previewer = Previewer(vae, max_side=max_side)
        rows.append({"figure": "preview", "model": "taesdxl-size random", "device": str(device),
                     "image": [1024, 1024], "latents": [128, 128], "preview_px": max_side, "path": name,
                     **time_preview(previewer, latents, reps=5)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size random SDXL on CUDA at 1024 px (fp16)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    emit({"event": "start", "bench": "previews", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None})
    if args.full:
        from diffusers import AutoencoderTiny

        from tools.models import build_full

        settings = WorkerSettings(device="cuda", dtype="float16", refiner_model=None, watermark=False)
        base, _refiner = build_full("cuda", torch.float16)
        engine = Engine(settings, pipelines=(base, None))
        torch.manual_seed(0)
        previewer = Previewer(AutoencoderTiny().to(device="cuda", dtype=torch.float16).eval())
        rows = measure(engine, previewer, width=1024, height=1024, steps=args.steps, runs=args.runs,
                       label="full-size random")
    else:
        rows = measure(steps=args.steps, runs=args.runs)
    for row in rows:
        emit(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
