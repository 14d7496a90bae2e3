"""LoRA adapter cost on the worker's own engine (worker/adapters.py), as JSON lines:

- time to first image with a cold adapter (read, converted, put on the device, fused) versus a cached one (fused
  only) versus one already applied, each against the same request without adapters;
- the swap between two cached adapters (restore the pristine weights, fuse the other) as a ratio to one denoising
  step of the same run;
- recompilations across 10 swaps with torch.compile on (dynamo's unique graphs; goal 0);
- with `--full`, the `lcm` preset's latency at 1024 px, base only, eager and compiled (goal on an H100/H200:
  at most 0.25 s);
- preview overhead (bench/previews.py `measure`, at the default cadence).

CPU: the tiny model and the tiny test adapters (tools/models.py build-tiny-adapters). `--full` on CUDA: the
full-size random SDXL in fp16 at 1024 px with random LoRAs of the real layer shapes (`build-tiny-adapters --full`).
The compile figure uses `--backend` (default `eager` on the CPU: dynamo's graph capture and guards, which decide
recompilation, without inductor's codegen, too slow here; `inductor` on CUDA).

    python bench/adapters.py                     # CPU, tiny model, 256 px, 20 steps
    python bench/adapters.py --full              # CUDA, full-size random SDXL, 1024 px, 30 steps
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.adapters import registry_for  # noqa: E402
from common.contract.params import GenerationParams, LoraRef, RefinerParams  # noqa: E402
from worker.pipeline import Engine, ImageSpec, Progress  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, engine: Engine, adapters_dir: Path, size: int, steps: int) -> None:
        self.engine = engine
        self.registry = registry_for(str(adapters_dir))
        self.size, self.steps = size, steps
        self.step_times: list[float] = []

    def ref(self, name: str, scale: float = 1.0) -> LoraRef:
        return LoraRef(name=name, sha256=self.registry.adapters()[name].sha256, scale=scale)

    def run(self, loras: tuple[LoraRef, ...] = (), steps: int | None = None) -> float:
        """Seconds to the decoded image (the pipeline call, adapters applied inside it)."""
        params = GenerationParams(prompt="a lighthouse at dusk", width=self.size, height=self.size,
                                  num_inference_steps=steps or self.steps, guidance_scale=5.0, seed=0,
                                  refiner=RefinerParams(), loras=loras)
        marks: list[float] = []

        def hook(p: Progress) -> None:
            if p.stage == "base":
                sync(self.engine)
                marks.append(time.perf_counter())

        sync(self.engine)
        t0 = time.perf_counter()
        self.engine.run(params, [ImageSpec(params.prompt, None, None, None, 0)], hook)
        sync(self.engine)
        self.step_times += [b - a for a, b in zip(marks, marks[1:], strict=False)]
        return time.perf_counter() - t0

    def forget(self) -> None:
        """Nothing cached or applied: the next adapter is cold."""
        self.engine.adapters.apply(())
        self.engine.adapters.loaded.clear()

    def time_to_first_image(self, runs: int) -> dict[str, Any]:
        a, b = self.ref("tiny-style"), self.ref("tiny-kohya")
        self.run()
        self.run((a,))  # warm-ups (lazy init)
        plain, cold, cached, applied = [], [], [], []
        for _ in range(runs):
            plain.append(self.run())
            self.forget()
            cold.append(self.run((a,)))  # read, convert, to the device, fuse
            self.run((b,))
            cached.append(self.run((a,)))  # in the LRU: fuse only
            applied.append(self.run((a,)))  # already fused: nothing
        med = {k: statistics.median(v) for k, v in (("none", plain), ("cold", cold), ("cached", cached),
                                                    ("applied", applied))}
        return {"figure": "time_to_first_image", "runs": runs, **{f"{k}_s": round(v, 4) for k, v in med.items()},
                "cold_over_none": round(med["cold"] / med["none"], 3),
                "cached_over_none": round(med["cached"] / med["none"], 3),
                "applied_over_none": round(med["applied"] / med["none"], 3)}

    def swap_cost(self, reps: int) -> dict[str, Any]:
        a, b = self.ref("tiny-style"), self.ref("tiny-kohya")
        self.engine.adapters.apply((a,))
        self.engine.adapters.apply((b,))  # both cached
        swaps = []
        for i in range(reps):
            sync(self.engine)
            t0 = time.perf_counter()
            self.engine.adapters.apply((a,) if i % 2 == 0 else (b,))
            sync(self.engine)
            swaps.append(time.perf_counter() - t0)
        self.step_times.clear()
        self.run((a,))
        self.run((a,))
        step = statistics.median(self.step_times)
        swap = statistics.median(swaps)
        layers = len(self.engine.adapters.loaded[(a.name, a.sha256)].layers)
        return {"figure": "swap", "reps": reps, "swap_ms": round(swap * 1000, 3), "step_ms": round(step * 1000, 3),
                "swap_over_step": round(swap / step, 4), "layers_a": layers,
                "goal": {"value": round(swap / step, 4), "goal": 1.0, "op": "<=", "met": swap <= step,
                         "applies": "H100/H200, full size"}}


def preset_latency(engine: Engine, adapters_dir: Path, size: int, runs: int, label: str) -> dict[str, Any]:
    """The `lcm` preset as the API resolves it: its adapter fused, LCMScheduler, 4 steps, guidance 1 (no CFG),
    base only; seconds to the decoded image (median of `runs` after one warm-up)."""
    bench = Bench(engine, adapters_dir, size, 4)
    lcm = (bench.ref("tiny-lcm"),)
    params = GenerationParams(prompt="a lighthouse at dusk", width=size, height=size, num_inference_steps=4,
                              guidance_scale=1.0, seed=0, scheduler="lcm", preset="lcm", loras=lcm,
                              refiner=RefinerParams())
    spec = [ImageSpec(params.prompt, None, None, None, 0)]
    times = []
    for _ in range(runs + 1):
        sync(engine)
        t0 = time.perf_counter()
        engine.run(params, spec, lambda _p: None)
        sync(engine)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times[1:])
    return {"figure": "preset_latency", "engine": label, "preset": "lcm", "steps": 4, "guidance": 1.0,
            "image": [size, size], "runs": runs, "seconds": round(t, 4),
            "goal": {"value": round(t, 4), "goal": 0.25, "op": "<=", "met": t <= 0.25,
                     "applies": "H100/H200, 1024 px, base only"}}


def recompiles(make_engine: Callable[[WorkerSettings], Engine], settings: WorkerSettings, adapters_dir: Path,
               size: int, swaps: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    engine = make_engine(settings)
    engine.warmup()
    bench = Bench(engine, adapters_dir, size, 3)
    bench.run()  # the compiled graphs at this size, before counting
    before = int(counters["stats"]["unique_graphs"])
    sets: list[tuple[LoraRef, ...]] = [(bench.ref("tiny-style", 0.7),), (bench.ref("tiny-kohya"),), (),
                                       (bench.ref("tiny-kohya", 0.5), bench.ref("tiny-style")),
                                       (bench.ref("tiny-lcm"),)]
    t0 = time.perf_counter()
    for i in range(swaps):
        bench.run(sets[i % len(sets)])
    seconds = time.perf_counter() - t0
    graphs = int(counters["stats"]["unique_graphs"]) - before
    if engine.device.type == "cuda":  # the compiled preset: its own scheduler and step count, compiled before
        emit({"model": "full-size random", "device": str(engine.device),
              **preset_latency(engine, adapters_dir, size, 3, f"compiled ({settings.compile_backend})")})
    torch._dynamo.reset()
    return {"figure": "recompiles", "swaps": swaps, "backend": settings.compile_backend,
            "mode": settings.compile_mode, "new_graphs": graphs, "seconds": round(seconds, 3),
            "swaps_counted": engine.adapters.counts["swap"],
            "goal": {"value": graphs, "goal": 0, "op": "==", "met": graphs == 0}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size random SDXL on CUDA at 1024 px (fp16)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--backend", default=None, help="torch.compile backend for the recompile count")
    parser.add_argument("--rank", type=int, default=None, help="the adapters' rank (default: 64 with --full, "
                        "the tiny adapters' own otherwise)")
    parser.add_argument("--skip-previews", action="store_true")
    args = parser.parse_args()
    args.rank = args.rank or (64 if args.full else None)
    size = args.size or (1024 if args.full else 256)
    steps = args.steps or (30 if args.full else 20)
    backend = args.backend or ("inductor" if args.full else "eager")
    emit({"event": "start", "bench": "adapters", "torch": torch.__version__, "threads": torch.get_num_threads(),
          "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "size": size, "steps": steps,
          "fusing": "LoRA fused into the weights in place from a pristine copy (worker/adapters.py)"})
    tmp = tempfile.TemporaryDirectory(prefix="sdxl-bench-adapters-")
    from tools.models import FULL_CONFIGS, build_tiny_adapters

    # full size: rank 64 on every attention projection of the UNet (and a text encoder), as real SDXL LoRAs
    adapters_dir = build_tiny_adapters(Path(tmp.name), FULL_CONFIGS if args.full else None, args.rank)
    tiny = ROOT / ".models" / "tiny"
    common: dict[str, Any] = {"adapters_dir": adapters_dir, "watermark": False, "refiner_model": None}
    if args.full:
        from tools.models import build_full

        base, _refiner = build_full("cuda", torch.float16)

        def make(s: WorkerSettings) -> Engine:
            return Engine(s, pipelines=(base, None))

        settings = WorkerSettings(device="cuda", dtype="float16", **common)
    else:
        def make(s: WorkerSettings) -> Engine:
            return Engine(s)

        settings = WorkerSettings(base_model=str(tiny / "base"), device="cpu", **common)
    engine = make(settings)
    bench = Bench(engine, adapters_dir, size, steps)
    emit({"model": "full-size random" if args.full else "tiny", "device": str(engine.device),
          **bench.time_to_first_image(args.runs)})
    emit({"model": "full-size random" if args.full else "tiny", "device": str(engine.device),
          **bench.swap_cost(max(10, args.runs * 4))})
    if args.full:
        emit({"model": "full-size random", "device": str(engine.device),
              **preset_latency(engine, adapters_dir, size, 3, "eager")})
    engine.adapters.apply(())  # pristine weights again: a compiled engine on the same modules starts from them
    del bench, engine
    compiled = settings.model_copy(update={"compile_mode": "default", "compile_backend": backend,
                                           "warmup_sizes": [(size if args.full else 64,) * 2]})
    emit({"model": "full-size random" if args.full else "tiny", "device": str(compiled.resolved_device),
          **recompiles(make, compiled, adapters_dir, size if args.full else 64, args.swaps)})

    # --- preview overhead (bench/previews.py, the live-previews benchmark) -------------------------------------
    if not args.skip_previews:
        try:
            from bench.previews import measure
        except ImportError as exc:
            emit({"figure": "preview", "skipped": f"bench/previews.py not importable: {exc}"})
        else:
            try:
                for row in measure(steps=steps, runs=args.runs) if not args.full else []:
                    emit({"section": "previews", **row})
            except RuntimeError as exc:  # no TAESD stand-in built
                emit({"figure": "preview", "skipped": str(exc)})
            if args.full:
                emit({"figure": "preview", "skipped": "run `python bench/previews.py --full` for the GPU figure"})
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
