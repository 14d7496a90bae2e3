"""LoRA adapter cost on the worker's own engine (worker/adapters.py), as JSON lines:

- time to first image with a cold adapter (read, converted, put on the device, fused) versus a cached one (fused
  only) versus one already applied, each against the same request without adapters; each variant split into
  phases (adapters: the runner's apply, synchronised; base: prompts and denoising; decode: VAE and PIL) with the
  median step, the Python garbage collections that ran inside it (count, full ones, seconds) and, on CUDA, the
  device allocations (cudaMalloc) it made: where a cached adapter's extra time goes. Measured twice: with the
  collector as Python leaves it, then after `freeze_heap` (what the worker does once warm);
- a CPU-tier hit (an adapter evicted from the device, back with one copy and no file read) versus a file load;
- fusing an adapter the worker's way (one float32 scratch buffer) against the plain way (full-size float32
  temporaries per layer), same layers, same process;
- the swap between two cached adapters (restore the pristine weights, fuse the other) as a ratio to one denoising
  step of the same run;
- recompilations across 10 swaps with torch.compile on (dynamo's unique graphs; goal 0);
- the `lcm` preset's latency, base only, split into phases, with the VAE decoding in float32 (SDXL's VAE in float16
  asks for it: `force_upcast`) and in bfloat16 (SDXL_VAE_DECODE_DTYPE); with `--full` at 1024 px, eager and
  compiled (goal on an H100/H200: at most 0.25 s);
- preview overhead (bench/previews.py `measure`, at the default cadence).

CPU: the tiny model and the tiny test adapters (tools/models.py build-tiny-adapters). `--full` on CUDA: the
full-size random SDXL in fp16 at 1024 px with random LoRAs of the real layer shapes (`build-tiny-adapters --full`).
The compile figure uses `--backend` (default `eager` on the CPU: dynamo's graph capture and guards, which decide
recompilation, without inductor's codegen, too slow here; `inductor` on CUDA).

    python bench/adapters.py                     # CPU, tiny model, 256 px, 20 steps
    python bench/adapters.py --full              # CUDA, full-size random SDXL, 1024 px, 30 steps
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from common.adapters import registry_for  # noqa: E402
from common.contract.params import GenerationParams, LoraRef, RefinerParams  # noqa: E402
from worker.pipeline import Engine, ImageSpec, Progress, freeze_heap  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Phases:
    """One request's seconds by phase, and what ran inside it besides the model."""

    total: float = 0.0
    adapters: float = 0.0  # the runner's apply (load, CPU-tier copy, swap), synchronised
    base: float = 0.0  # prompts and denoising, to the decoding hook
    decode: float = 0.0  # VAE decode and PIL
    steps: list[float] = field(default_factory=list)
    gc_runs: int = 0
    gc_full: int = 0  # generation-2 collections: every tracked object of the process traversed
    gc_seconds: float = 0.0
    cuda_mallocs: int = 0  # device allocations the caching allocator had to make (0 once warm)


@contextmanager
def gc_watch(phases: Phases) -> Iterator[None]:
    """Count the garbage collections (and their seconds) that run inside the block."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            phases.gc_seconds += time.perf_counter() - started.pop()
            phases.gc_runs += 1
            phases.gc_full += info.get("generation") == 2

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


def device_mallocs() -> int:
    return int(torch.cuda.memory_stats().get("num_device_alloc", 0)) if torch.cuda.is_available() else 0


def summary(runs: list[Phases]) -> dict[str, Any]:
    """Medians of each phase over runs; the collections summed."""
    return {"total_s": round(statistics.median(r.total for r in runs), 4),
            "adapters_s": round(statistics.median(r.adapters for r in runs), 4),
            "base_s": round(statistics.median(r.base for r in runs), 4),
            "decode_s": round(statistics.median(r.decode for r in runs), 4),
            "step_ms": round(statistics.median(s for r in runs for s in r.steps) * 1000, 3)
            if any(r.steps for r in runs) else None,
            "gc_full": sum(r.gc_full for r in runs), "gc_runs": sum(r.gc_runs for r in runs),
            "gc_s": round(sum(r.gc_seconds for r in runs), 4),
            "cuda_mallocs": sum(r.cuda_mallocs for r in runs)}


class Bench:
    def __init__(self, engine: Engine, adapters_dir: Path, size: int, steps: int) -> None:
        self.engine = engine
        self.registry = registry_for(str(adapters_dir))
        self.size, self.steps = size, steps
        self.step_times: list[float] = []

    def ref(self, name: str, scale: float = 1.0) -> LoraRef:
        return LoraRef(name=name, sha256=self.registry.adapters()[name].sha256, scale=scale)

    def run(self, loras: tuple[LoraRef, ...] = (), steps: int | None = None) -> float:
        """Seconds to the decoded image (the adapters applied first, as the runner does)."""
        return self.phases(loras, steps).total

    def phases(self, loras: tuple[LoraRef, ...] = (), steps: int | None = None, scheduler: str = "euler",
               guidance: float = 5.0, preset: str | None = None, step_sync: bool = True) -> Phases:
        """One request as the worker runs it (worker/execute.py: apply the adapters, then the pipeline), by
        phase, synchronised at each boundary. `step_sync`: also at every step, for step times (on a GPU that
        exposes the launch overhead the asynchronous queue hides otherwise: latency figures leave it off)."""
        params = GenerationParams(prompt="a lighthouse at dusk", width=self.size, height=self.size,
                                  num_inference_steps=steps or self.steps, guidance_scale=guidance, seed=0,
                                  refiner=RefinerParams(), loras=loras, scheduler=scheduler, preset=preset)
        marks: list[float] = []
        decoding: list[float] = []

        def hook(p: Progress) -> None:
            if step_sync or p.stage == "decoding":
                sync(self.engine)
                (decoding if p.stage == "decoding" else marks).append(time.perf_counter())

        out = Phases()
        mallocs = device_mallocs()
        with gc_watch(out):
            sync(self.engine)
            t0 = time.perf_counter()
            self.engine.adapters.apply(loras)
            sync(self.engine)
            t1 = time.perf_counter()
            self.engine.run(params, [ImageSpec(params.prompt, None, None, None, 0)], hook)
            sync(self.engine)
            t2 = time.perf_counter()
        out.cuda_mallocs = device_mallocs() - mallocs
        out.total, out.adapters = t2 - t0, t1 - t0
        out.base = (decoding[0] if decoding else t2) - t1
        out.decode = t2 - decoding[0] if decoding else 0.0
        out.steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
        self.step_times += out.steps
        return out

    def forget(self) -> None:
        """Nothing cached or applied: the next adapter is cold."""
        self.engine.adapters.apply(())
        self.engine.adapters.loaded.clear()
        self.engine.adapters.cpu.clear()

    def time_to_first_image(self, runs: int) -> dict[str, Any]:
        a, b = self.ref("tiny-style"), self.ref("tiny-kohya")
        self.run()
        self.run((a,))  # warm-ups (lazy init)
        got: dict[str, list[Phases]] = {"none": [], "cold": [], "cached": [], "applied": []}
        for _ in range(runs):
            got["none"].append(self.phases())
            self.forget()
            got["cold"].append(self.phases((a,)))  # read, convert, to the device, fuse
            self.run((b,))
            got["cached"].append(self.phases((a,)))  # in the LRU: fuse only
            got["applied"].append(self.phases((a,)))  # already fused: nothing
        med = {k: summary(v) for k, v in got.items()}
        none = med["none"]
        return {"figure": "time_to_first_image", "runs": runs, "gc_frozen": gc.get_freeze_count() > 0,
                **{f"{k}_s": v["total_s"] for k, v in med.items()},
                **{f"{k}_over_none": round(v["total_s"] / none["total_s"], 3) for k, v in med.items() if k != "none"},
                # where the cached request's extra time goes, phase by phase (positive: slower than none)
                "cached_minus_none": {k: round(med["cached"][k] - none[k], 4)
                                      for k in ("total_s", "adapters_s", "base_s", "decode_s")},
                "phases": med}

    def cpu_tier(self, runs: int) -> dict[str, Any]:
        """An adapter back from the CPU tier (one copy per pair) versus read from its file, via the cache alone."""
        cache = self.engine.adapters
        a = self.ref("tiny-style")
        from_file, from_cpu = [], []
        for _ in range(runs):
            self.forget()
            t0 = time.perf_counter()
            cache.apply((a,))
            sync(self.engine)
            from_file.append(time.perf_counter() - t0)
            cache.apply(())
            key = (a.name, a.sha256)
            cache.cpu[key] = cache.loaded.pop(key).to(torch.device("cpu"))  # as an eviction from the device does
            t0 = time.perf_counter()
            cache.apply((a,))
            sync(self.engine)
            from_cpu.append(time.perf_counter() - t0)
            cache.apply(())
        f, c = statistics.median(from_file), statistics.median(from_cpu)
        return {"figure": "cpu_tier", "runs": runs, "file_load_and_fuse_s": round(f, 4),
                "cpu_tier_and_fuse_s": round(c, 4), "cpu_over_file": round(c / f, 3)}

    def fuse_cost(self, reps: int) -> dict[str, Any]:
        """Fusing one adapter into every layer it touches from the pristine weights: the worker's way (one float32
        scratch buffer, one addmm_ per layer) against the plain one (a float32 copy of the weight, B @ A and its
        scaled copy, all full size, per layer), on the same layers in one process. The weights end pristine."""
        from worker.adapters import Scratch, fuse

        cache = self.engine.adapters
        a = self.ref("tiny-style", 0.8)
        cache.apply((a,))
        cache.apply(())  # cached, pristine copies taken, weights pristine
        layers = cache.loaded[(a.name, a.sha256)].layers
        pristine = [cache._pristine_weight(layer.module) for layer in layers]

        def scratch_way() -> None:
            scratch = Scratch(max(layer.module.weight.numel() for layer in layers))
            for layer, w0 in zip(layers, pristine, strict=True):
                fuse(layer.module, w0, [(layer, a.scale)], scratch)

        def plain_way() -> None:
            for layer, w0 in zip(layers, pristine, strict=True):
                w = w0.to(torch.float32, copy=True)
                delta = (layer.up.flatten(1).float() @ layer.down.flatten(1).float()).reshape(w0.shape)
                w.add_(delta * layer.scaling, alpha=a.scale)
                layer.module.weight.copy_(w)

        times: dict[str, list[float]] = {"scratch": [], "plain": []}
        with torch.no_grad():
            for _ in range(reps):
                for name, way in (("scratch", scratch_way), ("plain", plain_way)):
                    sync(self.engine)
                    t0 = time.perf_counter()
                    way()
                    sync(self.engine)
                    times[name].append(time.perf_counter() - t0)
            scratch_way()
            by_scratch = [layer.module.weight.detach().float().clone() for layer in layers]
            plain_way()
            worst = max((layer.module.weight.detach().float() - w).abs().max().item()
                        for layer, w in zip(layers, by_scratch, strict=True))
            for layer, w0 in zip(layers, pristine, strict=True):
                layer.module.weight.copy_(w0)
        s, p = statistics.median(times["scratch"]), statistics.median(times["plain"])
        return {"figure": "fuse", "reps": reps, "layers": len(layers), "scratch_ms": round(s * 1000, 3),
                "plain_ms": round(p * 1000, 3), "scratch_over_plain": round(s / p, 3),
                "max_weight_difference": worst}

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


def preset_latency(engine: Engine, adapters_dir: Path, size: int, runs: int, label: str) -> list[dict[str, Any]]:
    """The `lcm` preset as the API resolves it: its adapter fused, LCMScheduler, 4 steps, guidance 1 (no CFG),
    base only; seconds to the decoded image (median of `runs` after one warm-up), by phase, once with the
    engine's own decode VAE and, on a GPU where that is not bfloat16, once decoding in bfloat16
    (SDXL_VAE_DECODE_DTYPE). No synchronisation per step: the total is what a request waits."""
    bench = Bench(engine, adapters_dir, size, 4)
    lcm = (bench.ref("tiny-lcm"),)
    own = engine.decode_vae
    rows = []
    decoders = [(str(own.dtype).removeprefix("torch."), own)]
    if engine.device.type == "cuda" and own.dtype != torch.bfloat16 and torch.cuda.is_bf16_supported():
        decoders.append(("bfloat16", engine.decode_vae_for(torch.bfloat16)))
    try:
        for name, vae in decoders:
            engine.decode_vae = vae
            got = [bench.phases(lcm, 4, scheduler="lcm", guidance=1.0, preset="lcm", step_sync=False)
                   for _ in range(runs + 1)]
            phases = summary(got[1:])
            t = phases["total_s"]
            rows.append({"figure": "preset_latency", "engine": label, "preset": "lcm", "steps": 4, "guidance": 1.0,
                         "image": [size, size], "runs": runs, "vae_decode_dtype": name,
                         "vae_force_upcast": bool(engine.base.vae.config.force_upcast), "seconds": t,
                         "phases": phases, "goal": {"value": t, "goal": 0.25, "op": "<=", "met": t <= 0.25,
                                                    "applies": "H100/H200, 1024 px, base only"}})
    finally:
        engine.decode_vae = own
    return rows


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
        for row in preset_latency(engine, adapters_dir, size, 3, f"compiled ({settings.compile_backend})"):
            emit({"model": "full-size random", "device": str(engine.device), **row})
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
    parser.add_argument("--runs", type=int, default=5)
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
          "fusing": "LoRA fused into the weights in place from a pristine copy, one float32 scratch buffer per swap "
          "(worker/adapters.py)", "gc": "figures before and after freeze_heap (worker/pipeline.py)"})
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
    model = "full-size random" if args.full else "tiny"
    emit({"model": model, "device": str(engine.device), **bench.time_to_first_image(args.runs)})
    freeze_heap()  # as the worker does once warm (worker/__main__.py): then the same figure again
    emit({"model": model, "device": str(engine.device), **bench.time_to_first_image(args.runs)})
    emit({"model": model, "device": str(engine.device), **bench.cpu_tier(args.runs)})
    emit({"model": model, "device": str(engine.device), **bench.fuse_cost(max(10, args.runs * 4))})
    emit({"model": model, "device": str(engine.device), **bench.swap_cost(max(10, args.runs * 4))})
    for row in preset_latency(engine, adapters_dir, size if args.full else 256, 3, "eager"):
        emit({"model": model, "device": str(engine.device), **row})
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
