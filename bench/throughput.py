"""Throughput under concurrency: 8 clients against 1 API + 1 worker, the overhead benchmark's workload.

Each client loops: POST /v1/generations with `Prefer: wait=60`, then GET the image, until `--total`
generations are done. Figures: images/s over the in-process sequential rate (the same Engine.run, one call
after another, in a fresh process: the best one worker could do), and the share of the wall time, from the
first start to the last finish, that the worker was inside the pipeline (sum of `timings.pipeline` over that
window; the heartbeat's `busy_seconds` is reported too). Goal: busy share >= 0.99.

    python bench/throughput.py                          # 8 clients, 48 generations, 256 px, 20 steps
    python bench/throughput.py --total 8 --size 128 --steps 4   # smoke
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from benchlib import bench_env, busy_share, emit, goal, inprocess, pcts, records, stack, start_line, workload  # noqa: E402


async def run_clients(url: str, body: dict[str, Any], clients: int, total: int) -> tuple[float, list[float], list[str]]:
    remaining = [total]
    latencies: list[float] = []
    ids: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            t0 = time.perf_counter()
            resp = await http.post("/v1/generations", json=body, headers={"Prefer": "wait=60"})
            if resp.status_code != 201:  # with 8 clients and ~1 s jobs, 60 s is never reached
                raise RuntimeError(f"expected 201, got {resp.status_code}: {resp.text[:300]}")
            res = resp.json()
            img = await http.get(res["images"][0]["url"])
            if img.status_code != 200 or not img.content:
                raise RuntimeError(f"image GET answered {img.status_code}")
            latencies.append(time.perf_counter() - t0)
            ids.append(res["id"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, latencies, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--total", type=int, default=48, help="generations in the timed run")
    ap.add_argument("--baseline-n", type=int, default=10, help="in-process sequential calls")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--refiner", default="ensemble", choices=["none", "ensemble", "img2img"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the worker and the baseline")
    ap.add_argument("--progress-interval", type=float, default=60.0, help="SDXL_PROGRESS_INTERVAL_SECONDS")
    args = ap.parse_args()
    start_line(
        "throughput",
        clients=args.clients,
        total=args.total,
        size=args.size,
        steps=args.steps,
        refiner=args.refiner,
        threads=args.threads,
        progress_interval_seconds=args.progress_interval,
    )
    body = workload(args.size, args.steps, args.refiner, seed=1234)
    env = bench_env(args.threads, args.progress_interval)
    with stack(apis=1, workers=1, env=env) as st:
        warm = httpx.post(f"{st.api_urls[0]}/v1/generations", json=body, headers={"Prefer": "wait=60"}, timeout=120)
        if warm.status_code != 201:
            raise RuntimeError(f"warm-up answered {warm.status_code}: {warm.text[:300]}")
        params = warm.json()["params"]
        # the baseline brackets the service run (half before, half after), pooled: load drift hits both alike
        base = inprocess(params, max(2, (args.baseline_n + 1) // 2), st.svc.env(), warmup=1)
        r = st.r
        wid = st.svc.workers[0].worker_id  # type: ignore[attr-defined]
        busy0 = float(r.hget(f"sdxl:worker:{wid}", "busy_seconds") or 0)
        wall, latencies, ids = asyncio.run(run_clients(st.api_urls[0], body, args.clients, args.total))
        time.sleep(3.5)  # one heartbeat (3 s) so the registry's busy_seconds includes the last job
        busy1 = float(r.hget(f"sdxl:worker:{wid}", "busy_seconds") or 0)
        recs = records(r)
        base += inprocess(params, max(2, args.baseline_n // 2), st.svc.env(), warmup=1)
        timed = [recs[i] for i in ids]

    seq_rate = 1 / statistics.median(base)
    rate = len(ids) / wall
    share = busy_share(timed)
    emit(
        {
            "figure": "inprocess_sequential",
            "seconds_per_image": pcts(base, nd=4),
            "images_per_second": round(seq_rate, 4),
        }
    )
    emit(
        {
            "figure": "service_throughput",
            "clients": args.clients,
            "generations": len(ids),
            "wall_s": round(wall, 3),
            "images_per_second": round(rate, 4),
        }
    )
    emit({"figure": "client_latency_s", **pcts(latencies, nd=3)})
    emit(
        {
            "figure": "pipeline_busy",
            **share,
            "heartbeat_busy_seconds": round(busy1 - busy0, 3),
            "heartbeat_busy_over_client_wall": round((busy1 - busy0) / wall, 4),
        }
    )
    emit(
        {
            "event": "summary",
            "bench": "throughput",
            "images_per_second": round(rate, 4),
            "over_inprocess_sequential": round(rate / seq_rate, 4),
            "pipeline_busy_share": goal(share["busy_share"], 0.99, higher_is_better=True),
            "worker_pipeline_over_inprocess_p50": round(
                statistics.median(x["timings"]["pipeline"] for x in timed) / statistics.median(base), 4
            ),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
