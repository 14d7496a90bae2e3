"""Worker throughput with micro-batching over without: the same burst of compatible requests (same size, steps,
scheduler; different seeds) against 1 API + 1 worker, once with the default worker (SDXL_BATCH_MAX=1) and
once with SDXL_BATCH_MAX=4 SDXL_BATCH_WAIT_MS=50, each on a fresh Redis and fresh processes. The requests are
split over `--rounds` alternating rounds (unbatched, batched, batched, unbatched, ...) and pooled, so a change
in machine load during the run hits both configurations alike.

All requests are queued at once (no Prefer: wait), then long-polled to the end. Throughput is images over the
worker's window, first start to last finish, taken from the records; the client's window (first submit to
last answer) is reported too. The mean batch size comes from `timings.batch_images`.

    python bench/batching.py                           # 32 requests, 256 px, 20 steps, base+refiner
    python bench/batching.py --requests 8 --size 128 --steps 4   # smoke
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
from benchlib import bench_env, emit, raised_limits, records, stack, start_line, workload  # noqa: E402


async def burst(url: str, bodies: list[dict[str, Any]]) -> tuple[float, list[str]]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(http.post("/v1/generations", json=b) for b in bodies))
        bad = [a for a in answers if a.status_code != 202]
        if bad:
            raise RuntimeError(f"submit answered {bad[0].status_code}: {bad[0].text[:300]}")
        ids = [a.json()["id"] for a in answers]

        async def until_final(gen_id: str) -> None:
            while True:
                res = await http.get(f"/v1/generations/{gen_id}", headers={"Prefer": "wait=60"})
                if res.json()["status"] in ("succeeded", "failed", "canceled"):
                    return

        await asyncio.gather(*(until_final(i) for i in ids))
        return time.perf_counter() - t0, ids


def one_run(
    label: str, args: argparse.Namespace, worker_env: dict[str, str], requests: int, seed0: int
) -> dict[str, Any]:
    env = bench_env(args.threads, args.progress_interval, **raised_limits())
    with stack(apis=1, workers=1, env=env, worker_env=worker_env) as st:
        url = st.api_urls[0]
        warm = httpx.post(
            f"{url}/v1/generations",
            json=workload(args.size, args.steps, args.refiner, seed=0),
            headers={"Prefer": "wait=60"},
            timeout=120,
        )
        if warm.status_code != 201:
            raise RuntimeError(f"warm-up answered {warm.status_code}: {warm.text[:300]}")
        bodies = [workload(args.size, args.steps, args.refiner, seed=seed0 + i) for i in range(requests)]
        client_wall, ids = asyncio.run(burst(url, bodies))
        stored = records(st.r)
        recs = [stored[i] for i in ids if i in stored]
    ok = [x for x in recs if x.get("status") == "succeeded"]
    if len(ok) != len(ids):
        raise RuntimeError(f"{label}: {len(ids) - len(ok)} of {len(ids)} generations did not succeed")
    start = min(float(x["started_at"]) for x in ok)
    end = max(float(x["finished_at"]) for x in ok)
    batch_sizes = [int(x["timings"].get("batch_images", 1)) for x in ok]
    row = {
        "figure": f"{label}_throughput",
        "worker_env": worker_env,
        "requests": len(ids),
        "images": len(ok),
        "worker_window_s": round(end - start, 3),
        "images_per_second": round(len(ok) / (end - start), 4),
        "client_wall_s": round(client_wall, 3),
        "client_images_per_second": round(len(ok) / client_wall, 4),
        "mean_batch_images": round(statistics.mean(batch_sizes), 3),
        "pipeline_s_p50": round(statistics.median(x["timings"]["pipeline"] for x in ok), 4),
    }
    emit(row)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--refiner", default="ensemble", choices=["none", "ensemble", "img2img"])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per configuration (A B B A)")
    ap.add_argument("--batch-max", type=int, default=4)
    ap.add_argument("--batch-wait-ms", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the worker")
    ap.add_argument("--progress-interval", type=float, default=60.0, help="SDXL_PROGRESS_INTERVAL_SECONDS")
    args = ap.parse_args()
    start_line(
        "batching",
        requests=args.requests,
        size=args.size,
        steps=args.steps,
        refiner=args.refiner,
        threads=args.threads,
        batch_max=args.batch_max,
        batch_wait_ms=args.batch_wait_ms,
        rounds=args.rounds,
    )
    configs = {
        "unbatched": {},
        "batched": {"SDXL_BATCH_MAX": str(args.batch_max), "SDXL_BATCH_WAIT_MS": str(args.batch_wait_ms)},
    }
    # A B B A ... order, requests split over the rounds, pooled: a drift in machine load hits both alike
    order = [
        name
        for r in range(args.rounds)
        for name in (("unbatched", "batched") if r % 2 == 0 else ("batched", "unbatched"))
    ]
    per_round = max(1, args.requests // args.rounds)
    rows: dict[str, list[dict[str, Any]]] = {"unbatched": [], "batched": []}
    for i, name in enumerate(order):
        rows[name].append(one_run(name, args, configs[name], per_round, seed0=1000 + i * per_round))

    def pooled(name: str, window: str) -> float:
        return sum(r["images"] for r in rows[name]) / sum(r[window] for r in rows[name])

    emit(
        {
            "event": "summary",
            "bench": "batching",
            "rounds": args.rounds,
            "batched_over_unbatched_images_per_second": round(
                pooled("batched", "worker_window_s") / pooled("unbatched", "worker_window_s"), 4
            ),
            "per_round": [
                round(b["images_per_second"] / u["images_per_second"], 4)
                for u, b in zip(rows["unbatched"], rows["batched"], strict=True)
            ],
            "client_window_ratio": round(pooled("batched", "client_wall_s") / pooled("unbatched", "client_wall_s"), 4),
            "mean_batch_images": round(statistics.mean(r["mean_batch_images"] for r in rows["batched"]), 3),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
