"""SDXL pipeline speed: seconds per image for the engine's own code path, JSON lines as it goes.

GPU (default when CUDA is present): the full-size random-weight SDXL (official architecture, fp16; compute does
not depend on weight values) at 1024x1024, 30 steps. CPU: the same cases on the tiny model at 256 px.
Cases: base only (eager, batch 1), base+refiner ensemble (eager, batch 1 and 4), base+refiner compiled
(default mode, batch 1); one warm-up and three timed runs each; peak VRAM above the resident weights.

    python bench/pipeline.py                     # auto: GPU full-size if CUDA, else CPU tiny
    python bench/pipeline.py --model tiny --size 256 --steps 30
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.contract.params import GenerationParams  # noqa: E402
from worker.pipeline import Engine, ImageSpec  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(engine: Engine, name: str, refiner: str, batch: int, size: int, steps: int, runs: int,
              device: str) -> dict[str, Any]:
    params = GenerationParams(prompt="a lighthouse at dusk, oil painting", width=size, height=size,
                              num_inference_steps=steps, guidance_scale=5.0, seed=0, refiner={"mode": refiner})
    specs = [ImageSpec(params.prompt, None, None, None, i) for i in range(batch)]
    engine.run(params, specs, lambda p: None)  # warm-up (and compilation for compiled cases)
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.run(params, specs, lambda p: None)
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = {"case": name, "refiner": refiner, "batch": batch, "size": size, "steps": steps,
           "seconds_per_call": round(med, 4), "seconds_per_image": round(med / batch, 4),
           "images_per_second": round(batch / med, 4), "runs": [round(t, 4) for t in times]}
    if device.startswith("cuda"):
        row["peak_vram_over_resident_gb"] = round((torch.cuda.max_memory_allocated() - resident) / 2**30, 3)
        row["resident_gb"] = round(resident / 2**30, 3)
    emit(row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["auto", "full", "tiny"], default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tiny-dir", default=os.environ.get("SDXL_TEST_MODEL_DIR", ".models/tiny"))
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    full = args.model == "full" or (args.model == "auto" and args.device.startswith("cuda"))
    size = args.size or (1024 if full else 256)
    dtype = "float16" if args.device.startswith("cuda") else "float32"
    emit({"event": "start", "model": "full-size random SDXL" if full else "tiny random SDXL", "device": args.device,
          "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
          "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
          "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})

    def make_engine(compile_mode: str | None) -> Engine:
        settings = WorkerSettings(device=args.device, dtype=dtype, compile_mode=compile_mode, watermark=False,
                                  base_model=f"{args.tiny_dir}/base", refiner_model=f"{args.tiny_dir}/refiner")
        if full:
            from tools.models import build_full

            return Engine(settings, pipelines=build_full(args.device, getattr(torch, dtype)))
        return Engine(settings)

    eager = make_engine(None)
    rows = [
        time_case(eager, "base", "none", 1, size, args.steps, args.runs, args.device),
        time_case(eager, "base+refiner", "ensemble", 1, size, args.steps, args.runs, args.device),
        time_case(eager, "base+refiner", "ensemble", 4, size, args.steps, args.runs, args.device),
    ]
    if not args.skip_compile:
        del eager
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        compiled = make_engine("default")
        rows.append(time_case(compiled, "base+refiner compiled", "ensemble", 1, size, args.steps, args.runs,
                              args.device))
    base, ens1, ens4 = rows[0], rows[1], rows[2]
    summary = {
        "event": "summary",
        "refiner_over_base": round(ens1["seconds_per_image"] / base["seconds_per_image"], 3),
        "batch4_over_batch1_images_per_second": round(ens4["images_per_second"] / ens1["images_per_second"], 3),
    }
    if len(rows) > 3:
        summary["compiled_speedup_over_eager"] = round(ens1["seconds_per_image"] / rows[3]["seconds_per_image"], 3)
        summary["compiled_seconds_per_image"] = rows[3]["seconds_per_image"]
    emit(summary)


if __name__ == "__main__":
    main()
