"""The whole service on a GPU: redis-server, the API, the dispatcher and one real worker process whose engine is
the full-size random-weight SDXL (official architecture, fp16, base + refiner, built on the GPU, `torch.compile`
in the default mode). Prints JSON lines as it goes (bench/gpu_service.sh keeps them):

- `cold_start`: from the worker process starting to its first image (a generation POSTed as the process starts,
  so it waits in the queue), with the worker's own load and warm-up (compile) seconds;
- `sequential`: one client, POST with `Prefer: wait`, then the image bytes; end to end over the worker's
  `timings.pipeline` (bench/gpu_scale.py's client);
- `concurrent`: 8 clients; images/s over the pipeline-bound rate (1 / the median pipeline time) and the busy share;
- `memory`: resident and peak VRAM of the worker (torch's allocator, from its registry entry) and what nvidia-smi
  shows for its process;
- the same worker again with `SDXL_BATCH_MAX=4` (a second cold start, on warm compile caches), 8 clients:
  images/s over the batch-1 run's, and its peak VRAM;
- `summary`: the figures against their goals.

    python bench/gpu_service.py              # CUDA: full-size SDXL, 1024 px, 30 steps
    python bench/gpu_service.py --dry-run    # CPU: the tiny model, 128 px, 10 steps, compile backend `eager`
    python bench/gpu_service.py worker       # (internal) `python -m worker`, building the full-size model when
                                             # SDXL_BENCH_FULL_MODEL=1
"""

import argparse
import asyncio
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import redis  # noqa: E402
from benchlib import bench_env, busy_share, emit, goal, pcts, raised_limits, records, start_line, tiny_model  # noqa: E402
from gpu_scale import concurrent, one  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.procs import PY, Proc, RedisServer, Service, free_port  # noqa: E402

TERMINAL = {"succeeded", "failed", "canceled"}


def worker_main() -> int:
    """The real worker process; with SDXL_BENCH_FULL_MODEL=1 its Engine builds the full-size random SDXL on the
    worker's device instead of loading SDXL_BASE_MODEL (nothing is downloaded or read from disk)."""
    from worker import pipeline

    if os.environ.get("SDXL_BENCH_FULL_MODEL") == "1":
        real = pipeline.Engine

        class FullSizeEngine(real):  # type: ignore[misc,valid-type]
            def __init__(self, settings: Any, pipelines: Any = None) -> None:
                from tools.models import build_full

                if pipelines is None:
                    pipelines = build_full(settings.resolved_device, pipeline.DTYPES[settings.resolved_dtype])
                super().__init__(settings, pipelines)

        pipeline.Engine = FullSizeEngine  # type: ignore[misc]
    from worker.__main__ import main

    return main()


class StateWatch(threading.Thread):
    """Seconds from `t0` at which the worker's registry entry first showed each state (loading, warming, ready)."""

    def __init__(self, r: redis.Redis, wid: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.r, self.key, self.t0 = r, f"sdxl:worker:{wid}", t0
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            state = self.r.hget(self.key, "state")
            if state is not None:
                self.seen.setdefault(state.decode(), round(time.perf_counter() - self.t0, 2))


def start_worker(svc: Service, env: dict[str, str]) -> Proc:
    wid = f"gpu-{free_port()}"
    w = Proc([PY, str(Path(__file__).resolve()), "worker"], svc.env(SDXL_WORKER_ID=wid, **env),
             svc.data_dir / f"worker-{wid}.log")
    w.worker_id = wid  # type: ignore[attr-defined]
    svc.workers.append(w)
    return w


def log_seconds(w: Proc, message: str) -> float | None:
    """`seconds` of the worker's JSON log line `message` ("models loaded", "warm-up done")."""
    for line in w.output().splitlines():
        if f'"{message}"' in line:
            try:
                return float(json.loads(line)["seconds"])
            except (ValueError, KeyError):
                return None
    return None


async def first_image(url: str, body: dict[str, Any], w: Proc, timeout: float) -> dict[str, Any]:
    """POST now (the worker may still be loading), long-poll until it ends, then read the image."""
    deadline = time.perf_counter() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        resp = await http.post("/v1/generations", json=body)
        if resp.status_code not in (201, 202):
            raise RuntimeError(f"POST answered {resp.status_code}: {resp.text[:300]}")
        res = resp.json()
        while res["status"] not in TERMINAL:
            if w.proc.poll() is not None or time.perf_counter() > deadline:
                raise RuntimeError(f"worker exited or timed out before its first image:\n{w.output()[-4000:]}")
            res = (await http.get(f"/v1/generations/{res['id']}", headers={"Prefer": "wait=10"})).json()
        if res["status"] != "succeeded":
            raise RuntimeError(f"first generation {res['status']}: {json.dumps(res)[:1000]}")
        img = await http.get(res["images"][0]["url"])
        if img.status_code != 200 or not img.content:
            raise RuntimeError(f"image GET answered {img.status_code}")
        return res


def cold_start(svc: Service, url: str, body: dict[str, Any], env: dict[str, str], label: str,
               timeout: float) -> tuple[Proc, dict[str, Any]]:
    r = redis.Redis.from_url(svc.redis_url)
    t0 = time.perf_counter()
    w = start_worker(svc, env)
    watch = StateWatch(r, w.worker_id, t0)  # type: ignore[attr-defined]
    watch.start()
    res = asyncio.run(first_image(url, body, w, timeout))
    seconds = time.perf_counter() - t0
    watch.done.set()
    row = {"bench": "gpu_service", "figure": "cold_start", "worker": label,
           "seconds_to_first_image": round(seconds, 2), "states_at_s": watch.seen,
           "models_loaded_s": log_seconds(w, "models loaded"), "warmup_s": log_seconds(w, "warm-up done"),
           "first_pipeline_s": res["timings"]["pipeline"], "env": env}
    emit(row)
    return w, row


async def sequential(url: str, n: int, body: dict[str, Any]) -> list[tuple[float, float]]:
    """(end to end, timings.pipeline) per generation, one at a time, after one untimed."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await one(http, body)
        for _ in range(n):
            wall, res = await one(http, body)
            out.append((wall, float(res["timings"]["pipeline"])))
    return out


def concurrent_figure(svc: Service, url: str, clients: int, total: int, body: dict[str, Any],
                      label: str) -> dict[str, Any]:
    r = redis.Redis.from_url(svc.redis_url)
    before = set(records(r))
    wall = asyncio.run(concurrent(url, clients, total, body))
    recs = [rec for gid, rec in records(r).items() if gid not in before]
    pipe = statistics.median(float(rec["timings"]["pipeline"]) for rec in recs)
    batch = statistics.median(int(rec["timings"].get("batch_images", 1)) for rec in recs)
    per_image = pipe / batch
    row = {"bench": "gpu_service", "figure": "concurrent", "worker": label, "clients": clients, "n": len(recs),
           "images_per_s": round(len(recs) / wall, 4), "pipeline_p50_s": round(pipe, 4),
           "images_per_call_p50": batch, "over_pipeline_bound": round(len(recs) / wall * per_image, 4),
           **busy_share(recs)}
    emit(row)
    return row


def nvidia_smi_mib(pid: int) -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return int(parts[1])
    return None


def memory_figure(svc: Service, w: Proc, label: str, heartbeat: float) -> dict[str, Any]:
    """The worker's registry entry after its next heartbeat (which writes torch's allocated and peak bytes)."""
    r = redis.Redis.from_url(svc.redis_url)
    key = f"sdxl:worker:{w.worker_id}"  # type: ignore[attr-defined]
    time.sleep(heartbeat + 0.5)
    entry = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
    gib = 2**30
    row = {"bench": "gpu_service", "figure": "memory", "worker": label,
           "resident_gib": round(int(entry["allocated"]) / gib, 3) if "allocated" in entry else None,
           "peak_gib": round(int(entry["peak"]) / gib, 3) if "peak" in entry else None,
           "nvidia_smi_process_mib": nvidia_smi_mib(w.proc.pid)}
    emit(row)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, the tiny model, small sizes, compile backend eager")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--sequential", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=16, help="generations in the 8-client runs")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch-max", type=int, default=4, help="the second worker's SDXL_BATCH_MAX (0: skip it)")
    ap.add_argument("--batch-wait-ms", type=int, default=50)
    ap.add_argument("--cold-start-timeout", type=float, default=420)
    args = ap.parse_args()
    # bench/gpu_service.sh's deadline: stop the service's processes and still write the summary line
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    size = args.size or (1024 if gpu else 128)
    steps = args.steps or (30 if gpu else 10)
    start_line("gpu_service", dry_run=args.dry_run, gpu=torch.cuda.get_device_name(0) if gpu else None,
               model="full-size random SDXL" if gpu else "tiny random SDXL", size=size, steps=steps,
               torch_cuda=torch.version.cuda,
               **{k: v for k, v in vars(args).items() if k not in ("size", "steps", "dry_run")})
    body = {"prompt": "a lighthouse at dusk, oil painting", "width": size, "height": size,
            "num_inference_steps": steps, "seed": 0, "refiner": {"mode": "ensemble"}}
    heartbeat = 3.0
    worker_env = {
        "SDXL_BENCH_FULL_MODEL": "1" if gpu else "0",
        "SDXL_DEVICE": "cuda" if gpu else "cpu",
        "SDXL_DTYPE": "float16" if gpu else "float32",
        "SDXL_COMPILE_MODE": "default",
        # the dry run's CPU compile: dynamo's capture and guards without inductor's codegen (minutes on 2 cores)
        "SDXL_COMPILE_BACKEND": "inductor" if gpu else "eager",
        "SDXL_WARMUP_SIZES": f"{size}x{size}",  # the size measured: a cold start compiles that one
        "SDXL_WATERMARK": "false",
        "SDXL_PREVIEW_VAE": "none",  # no request here asks for live previews
        "OMP_NUM_THREADS": "4" if gpu else "1",
    }
    # the production progress interval (0.25 s): GPU-scale calls have few steps per second
    env = {**bench_env(1, progress_interval=0.25), **raised_limits(), "SDXL_HEARTBEAT_SECONDS": str(heartbeat),
           # the dispatcher refuses to start without a signing secret; no request here asks for a webhook
           "SDXL_WEBHOOK_SECRETS": "whsec_" + base64.b64encode(os.urandom(24)).decode()}
    server = RedisServer()
    server.start()
    summary: dict[str, Any] = {"event": "summary", "bench": "gpu_service", "dry_run": args.dry_run}
    with tempfile.TemporaryDirectory(prefix="sdxl-gpu-service-") as tmp:
        svc = Service(server.url, tiny_model(), Path(tmp), env)
        try:
            url = svc.start_api()
            svc.start_dispatcher()
            w1, cold = cold_start(svc, url, body, worker_env, "batch_max=1", args.cold_start_timeout)
            summary["cold_start_s"] = goal(cold["seconds_to_first_image"], 90, higher_is_better=False)
            pairs = asyncio.run(sequential(url, args.sequential, body))
            ratios = [wall / pipe for wall, pipe in pairs]
            seq = {"bench": "gpu_service", "figure": "sequential", "n": len(pairs),
                   "end_to_end_over_pipeline_median": round(statistics.median(ratios), 4), **pcts(ratios, nd=4),
                   "overhead_ms_p50": round(statistics.median((wall - pipe) * 1000 for wall, pipe in pairs), 2),
                   "pipeline_s_p50": round(statistics.median(pipe for _, pipe in pairs), 4)}
            emit(seq)
            summary["end_to_end_over_pipeline"] = goal(seq["end_to_end_over_pipeline_median"], 1.02, False)
            c1 = concurrent_figure(svc, url, args.clients, args.concurrent, body, "batch_max=1")
            summary["concurrent_over_pipeline_bound"] = goal(c1["over_pipeline_bound"], 0.97, True)
            summary["busy_share"] = goal(c1["busy_share"], 0.99, True)
            m1 = memory_figure(svc, w1, "batch_max=1", heartbeat)
            summary["memory_gib"] = {"resident": m1["resident_gib"], "peak_batch_1": m1["peak_gib"]}
            svc.stop([w1])
            svc.workers.remove(w1)
            if args.batch_max > 1:
                env4 = {**worker_env, "SDXL_BATCH_MAX": str(args.batch_max),
                        "SDXL_BATCH_WAIT_MS": str(args.batch_wait_ms)}
                w4, cold4 = cold_start(svc, url, body, env4, f"batch_max={args.batch_max}", args.cold_start_timeout)
                summary["cold_start_warm_caches_s"] = cold4["seconds_to_first_image"]
                c4 = concurrent_figure(svc, url, args.clients, args.concurrent, body, f"batch_max={args.batch_max}")
                summary["batch_over_batch_1_images_per_s"] = goal(
                    round(c4["images_per_s"] / c1["images_per_s"], 3), 1.4, True)
                m4 = memory_figure(svc, w4, f"batch_max={args.batch_max}", heartbeat)
                summary["memory_gib"][f"peak_batch_{args.batch_max}"] = m4["peak_gib"]
        except BaseException:  # a failure, or the deadline's SIGTERM: the processes' logs say how far they got
            for p in svc.workers + svc.apis + svc.dispatchers:
                print(f"--- {p.log.name}\n{p.output()[-6000:]}", file=sys.stderr)
            raise
        finally:
            emit(summary)
            svc.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main())
    sys.exit(main())
