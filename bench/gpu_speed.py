"""Base + refiner speed options on and off, on one seed: seconds per image and divergence from fp16 eager.

Cases, in this order (the order of priority: a case that no longer fits the time budget is skipped and said so):

| case | settings over the compiled baseline |
|---|---|
| `eager` | no compile: the reference images and latents (fp16 eager on the GPU) |
| `compiled` | `SDXL_COMPILE_MODE=default`: the "off" side of every option below |
| `max_autotune` | `SDXL_COMPILE_MODE=max-autotune` (GEMMs autotuned, UNets run as CUDA graphs) |
| `fuse_qkv` | `SDXL_FUSE_QKV=true` |
| `compile_vae` | `SDXL_COMPILE_VAE=true` |
| `fp8` | `SDXL_FP8=true` (opt-in; torchao float8 dynamic activation + weight) |
| `all_exact` | max-autotune + fused QKV + compiled VAE, if time is left |

Each case: bench/pipeline.py's `time_case` (base + refiner ensemble, batch 1, seed 0, one warm-up and `--runs`
timed calls, peak VRAM), after one more untimed call (which compiles; CUDA graphs record on the next); then its
divergence from `eager` on the last timed call (bench/divergence.py: PSNR of the 8-bit images, max abs latent
difference). An option may become a default only where that divergence is negligible (PSNR >= 40 dB).
The model is built once (tools/models.py's full-size random SDXL, built on CUDA; the tiny one on the CPU) and
rebuilt only after a case that changes its weights in place (fused QKV, FP8).

    python bench/gpu_speed.py                        # CUDA: full-size, 1024 px, 30 steps, 3 runs, 480 s budget
    python bench/gpu_speed.py --dry-run              # CPU: tiny model, 64 px, 4 steps, compile backend `eager`
    python bench/gpu_speed.py --cases fuse_qkv,fp8   # eager + compiled + these (a rerun of what did not fit)
"""

import argparse
import gc
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# before torch is imported (inductor reads it once): max-autotune times GEMM candidates but leaves convolutions
# on cuDNN (unless --autotune-convs), which keeps its compile inside one device call
if "--autotune-convs" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS", "ATEN")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from benchlib import goal  # noqa: E402
from divergence import NEGLIGIBLE_PSNR_DB, Captured, captured, divergence, recording  # noqa: E402
from pipeline import emit, time_case  # noqa: E402  (bench/pipeline.py, the pipeline benchmark)

from worker.pipeline import Engine  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

OPTIONS: dict[str, dict[str, Any]] = {
    "max_autotune": {"compile_mode": "max-autotune"},
    "fuse_qkv": {"compile_mode": "default", "fuse_qkv": True},
    "compile_vae": {"compile_mode": "default", "compile_vae": True},
    "fp8": {"compile_mode": "default", "fp8": True},
    "all_exact": {"compile_mode": "max-autotune", "fuse_qkv": True, "compile_vae": True},
}
CASES: dict[str, dict[str, Any]] = {"eager": {"compile_mode": None}, "compiled": {"compile_mode": "default"},
                                    **OPTIONS}
IN_PLACE = ("fuse_qkv", "fp8")  # settings that change the shared modules: the next case gets a fresh model
GOAL_SECONDS = 0.9


class Models:
    """The pipelines, built once and rebuilt only after a case that changed them in place."""

    def __init__(self, full: bool, device: str, dtype: str, tiny_dir: str) -> None:
        self.full, self.device, self.dtype, self.tiny_dir = full, device, dtype, tiny_dir
        self.pipes: tuple[Any, Any] | None = None
        self.unets: list[Any] = []
        self.dirty = False

    def settings(self, **overrides: Any) -> WorkerSettings:
        return WorkerSettings(device=self.device, dtype=self.dtype, watermark=False,
                              base_model=f"{self.tiny_dir}/base", refiner_model=f"{self.tiny_dir}/refiner",
                              **overrides)

    def engine(self, **overrides: Any) -> Engine:
        if self.pipes is None or self.dirty:
            self.pipes = None
            release()
            if self.full:
                from tools.models import build_full

                self.pipes = build_full(self.device, getattr(torch, self.dtype))
            else:
                loaded = Engine(self.settings())  # the tiny model from disk, as the worker loads it
                self.pipes = (loaded.base, loaded.refiner)
            self.unets = [p.unet for p in self.pipes]
            self.dirty = False
        for pipe, unet in zip(self.pipes, self.unets, strict=True):
            pipe.unet = unet  # the uncompiled module: each case compiles its own
        self.dirty = any(overrides.get(k) for k in IN_PLACE)
        return Engine(self.settings(**overrides), pipelines=self.pipes)


def release() -> None:
    torch._dynamo.reset()  # compiled code and, with it, the CUDA graphs it recorded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny model, small sizes, compile backend eager")
    ap.add_argument("--cases", default=",".join(OPTIONS), help=f"options to run after eager and compiled: {OPTIONS}")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--budget-s", type=float, help="no case starts that would not end within this many seconds "
                    "(default 480 on CUDA, none on the CPU)")
    ap.add_argument("--autotune-convs", action="store_true", help="max-autotune also times Triton convolutions")
    ap.add_argument("--tiny-dir", default=os.environ.get("SDXL_TEST_MODEL_DIR", ".models/tiny"))
    args = ap.parse_args()
    # bench/gpu_speed.sh's deadline: the summary of what finished is still written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    gpu = torch.cuda.is_available() and not args.dry_run
    device, dtype = ("cuda", "float16") if gpu else ("cpu", "float32")
    size, steps = args.size or (1024 if gpu else 64), args.steps or (30 if gpu else 4)
    runs = args.runs or 3
    budget = args.budget_s or (480.0 if gpu else None)
    unknown = [c for c in args.cases.split(",") if c and c not in OPTIONS]
    if unknown:
        ap.error(f"unknown --cases {unknown}: choose from {list(OPTIONS)}")
    wanted = ["eager", "compiled", *[c for c in OPTIONS if c in args.cases.split(",")]]
    if not gpu:
        from benchlib import tiny_model

        args.tiny_dir = str(tiny_model())
        torch.set_num_threads(1)  # as the CPU benchmarks run (BENCHMARKS.md): 2 threads were erratic on 2 cores
    emit({"event": "start", "bench": "gpu_speed", "dry_run": args.dry_run, "device": device, "dtype": dtype,
          "gpu": torch.cuda.get_device_name(0) if gpu else None,
          "model": "full-size random SDXL" if gpu else "tiny random SDXL", "size": size, "steps": steps,
          "runs": runs, "budget_s": budget, "cases": wanted, "torch": torch.__version__,
          "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "compile_backend": "inductor" if gpu else "eager",
          "inductor_conv_backends": os.environ.get("TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS", "ATEN,TRITON")})
    models = Models(full=gpu, device=device, dtype=dtype, tiny_dir=args.tiny_dir)
    backend = {} if gpu else {"compile_backend": "eager"}  # the CPU dry run: dynamo without inductor's codegen
    rows: dict[str, dict[str, Any]] = {}
    reference: Captured | None = None
    compile_s: float | None = None  # the baseline's first call: what a default-mode compile costs here
    try:
        for name in wanted:
            elapsed = time.perf_counter() - t_start
            # a compile like the baseline's; max-autotune also compiles and times GEMM candidates, shape by shape
            guess = (compile_s or 120.0) * (2.5 if CASES[name]["compile_mode"] == "max-autotune" else 1) + 8 * runs
            if name not in ("eager", "compiled") and budget is not None and elapsed + guess > budget:
                emit({"case": name, "skipped": f"time budget: {elapsed:.0f} s used, about {guess:.0f} s more "
                      f"needed, {budget:.0f} s allowed (run it again with CASES={name})"})
                continue
            try:
                t0 = time.perf_counter()
                engine = models.engine(**CASES[name], **backend)
                setup_s = time.perf_counter() - t0
                first_s = first_call(engine, size, steps, device)
                with recording(engine) as last:
                    row = time_case(engine, name, "ensemble", 1, size, steps, runs, device)
                got = captured(engine, last)
            except Exception as exc:  # e.g. FP8 without torchao or float8 units, out of memory: say so, go on
                emit({"case": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                models.dirty = True
                release()
                continue
            if name == "compiled":
                compile_s = first_s
            if name == "eager":
                reference = got
            div = divergence(reference, got) if reference is not None else {}
            rows[name] = {**row, "first_call_s": round(first_s, 2), "setup_s": round(setup_s, 2), **div}
            emit({"case": name, "event": "divergence_vs_eager", "settings": CASES[name],
                  "first_call_s": round(first_s, 2), "setup_s": round(setup_s, 2), **div})
            del engine
            release()
    finally:
        emit(summarize(rows, wanted, args.dry_run, time.perf_counter() - t_start))
    return 0


def summarize(rows: dict[str, dict[str, Any]], wanted: list[str], dry_run: bool, elapsed: float) -> dict[str, Any]:
    """Each option against the compiled baseline (its off side), and the fastest case within the divergence."""
    summary: dict[str, Any] = {"event": "summary", "bench": "gpu_speed", "dry_run": dry_run,
                               "elapsed_s": round(elapsed, 1)}
    base = rows.get("compiled")
    if base:
        summary["compiled_over_eager"] = {
            "speedup": round(rows["eager"]["seconds_per_image"] / base["seconds_per_image"], 3) if "eager" in rows
            else None, "psnr_db": base.get("psnr_db"), "max_abs_latent_diff": base.get("max_abs_latent_diff")}
        for name, row in rows.items():
            if name in OPTIONS:
                summary[name] = {"on_seconds_per_image": row["seconds_per_image"],
                                 "off_seconds_per_image": base["seconds_per_image"],
                                 "speedup": round(base["seconds_per_image"] / row["seconds_per_image"], 3),
                                 "psnr_db": row.get("psnr_db"), "max_abs_latent_diff": row.get("max_abs_latent_diff"),
                                 "negligible_divergence": row.get("negligible")}
    exact = {n: r["seconds_per_image"] for n, r in rows.items() if r.get("negligible")}
    if exact:
        best = min(exact, key=exact.__getitem__)
        summary["best_within_divergence"] = {"case": best, "psnr_floor_db": NEGLIGIBLE_PSNR_DB,
                                             **goal(exact[best], GOAL_SECONDS, higher_is_better=False)}
    if rows:
        fastest = min(rows, key=lambda n: rows[n]["seconds_per_image"])
        summary["fastest"] = {"case": fastest, "seconds_per_image": rows[fastest]["seconds_per_image"]}
    summary["not_measured"] = [n for n in wanted if n not in rows]
    rest = [n for n in summary["not_measured"] if n in OPTIONS]
    if rest:  # the next device call's command
        summary["rerun"] = f"CASES={','.join(rest)} bash bench/gpu_speed.sh"
    return summary


def first_call(engine: Engine, size: int, steps: int, device: str) -> float:
    """Seconds of one call at the measured shape, before time_case's own warm-up: it compiles (and, with CUDA
    graphs, warms up; they record on the next call)."""
    from common.contract.params import GenerationParams
    from worker.pipeline import ImageSpec

    params = GenerationParams(prompt="warm-up", width=size, height=size, num_inference_steps=steps,
                              guidance_scale=5.0, seed=0, refiner={"mode": "ensemble"})
    t0 = time.perf_counter()
    engine.run(params, [ImageSpec("warm-up", None, None, None, 0)], lambda _p: None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
