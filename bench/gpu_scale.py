"""The service around a pipeline call of GPU scale (1 s), on this CPU machine: the real API, Redis and worker
process, with bench/sleep_worker.py's engine. Prints JSON lines:

- `sequential`: one client, POST with `Prefer: wait`, then the image bytes; end to end over the worker's
  pipeline time (`timings.pipeline`) per generation, median and p95;
- `concurrent`: 8 clients; images/s over the pipeline-bound rate (1 / the median pipeline time) and the busy
  share (pipeline time over the wall time from the first start to the last finish).

    python bench/gpu_scale.py                   # 1 s calls, 10 sequential, 40 concurrent
    python bench/gpu_scale.py --seconds 0.2 --sequential 3 --concurrent 8   # smoke
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from benchlib import bench_env, busy_share, emit, pcts, raised_limits, records, start_line, tiny_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.procs import PY, Proc, RedisServer, Service, free_port  # noqa: E402

BODY = {"prompt": "gpu scale", "width": 64, "height": 64, "num_inference_steps": 20, "refiner": {"mode": "none"}}


def start_sleep_worker(svc: Service, seconds: float) -> None:
    wid = f"sleep-{free_port()}"
    w = Proc([PY, str(Path(__file__).with_name("sleep_worker.py"))],
             svc.env(SDXL_WORKER_ID=wid, SDXL_SLEEP_SECONDS=str(seconds), SDXL_WARMUP="false"),
             svc.data_dir / f"worker-{wid}.log")
    w.worker_id = wid  # type: ignore[attr-defined]
    svc.workers.append(w)
    svc.wait_worker_ready(wid)


async def one(http: httpx.AsyncClient, body: dict[str, Any] = BODY) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    resp = await http.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
    if resp.status_code != 201:
        raise RuntimeError(f"expected 201, got {resp.status_code}: {resp.text[:300]}")
    res = resp.json()
    img = await http.get(res["images"][0]["url"])
    if img.status_code != 200 or not img.content:
        raise RuntimeError(f"image GET answered {img.status_code}")
    return time.perf_counter() - t0, res


async def sequential(url: str, n: int, body: dict[str, Any] = BODY) -> list[float]:
    ratios = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await one(http, body)  # warm the connection and the worker
        for _ in range(n):
            wall, res = await one(http, body)
            ratios.append(wall / res["timings"]["pipeline"])
    return ratios


async def concurrent(url: str, clients: int, total: int, body: dict[str, Any] = BODY) -> float:
    remaining = [total]

    async def client(http: httpx.AsyncClient) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            await one(http, body)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.0, help="the pipeline call's duration")
    ap.add_argument("--sequential", type=int, default=10)
    ap.add_argument("--concurrent", type=int, default=40)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    start_line("gpu_scale", **vars(args))
    server = RedisServer()
    server.start()
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        svc = Service(server.url, tiny_model(), Path(tmp), {**bench_env(1), **raised_limits()})
        try:
            url = svc.start_api()
            start_sleep_worker(svc, args.seconds)
            ratios = asyncio.run(sequential(url, args.sequential))
            emit({"bench": "gpu_scale", "figure": "end_to_end_over_pipeline", "n": len(ratios),
                  "median": round(statistics.median(ratios), 4), **pcts(ratios)})
            r = server.client()
            before = set(records(r))
            wall = asyncio.run(concurrent(url, args.clients, args.concurrent))
            recs = [rec for gid, rec in records(r).items() if gid not in before]
            pipe = statistics.median(float(rec["timings"]["pipeline"]) for rec in recs)
            emit({"bench": "gpu_scale", "figure": "concurrent", "clients": args.clients, "n": len(recs),
                  "images_per_s": round(len(recs) / wall, 4),
                  "over_pipeline_bound": round(len(recs) / wall * pipe, 4),
                  **busy_share(recs)})
        finally:
            svc.stop()
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
