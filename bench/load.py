"""Load run (`make load`): many small generations from many clients against TWO API processes and TWO workers.

64 concurrent clients (round-robin over the two API URLs) submit 2,000 tiny generations (64 px, 2 steps,
base+refiner), each then long-polls its generation to a final status and downloads the image of every
succeeded one. The key's and the global limits are raised for the run. Loopback only, own Redis, bounded by a
global timeout.

Invariants (exit 1 if any fails): every submit accepted (202) and zero 5xx anywhere; no transport errors;
unique generation ids; every accepted generation ends final (and succeeded); the number of generation records
in Redis equals the number accepted, with the same ids; every succeeded generation's image downloads and its
sha256 matches the record; one image file per generation in storage; each generation's event stream holds
exactly one `started` per attempt, one terminal event and attempt == 1; the workers' jobs_done adds up to
the number succeeded (a job run twice would not).

    python bench/load.py                                  # 2,000 requests, 64 clients, 2 APIs, 2 workers
    python bench/load.py --requests 100 --clients 16      # smoke
"""

import argparse
import asyncio
import hashlib
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
from benchlib import Stack, bench_env, emit, pcts, raised_limits, records, stack, start_line, workload  # noqa: E402

FINAL = ("succeeded", "failed", "canceled")


class Tally:
    def __init__(self, requests: int) -> None:
        self.requests = requests
        self.submit_latency: list[float] = []
        self.e2e_latency: list[float] = []
        self.submit_codes: Counter[int] = Counter()
        self.other_codes: Counter[int] = Counter()
        self.transport_errors: list[str] = []
        self.accepted: list[str] = []
        self.final: dict[str, dict[str, Any]] = {}
        self.image_ok: set[str] = set()
        self.image_bad: list[str] = []
        self.first_submit = float("inf")
        self.last_final = 0.0


async def client(
    idx: int, http: httpx.AsyncClient, next_index: list[int], total: int, args: argparse.Namespace, tally: Tally
) -> None:
    while next_index[0] < total:
        i = next_index[0]
        next_index[0] += 1
        body = workload(args.size, args.steps, args.refiner, seed=i)
        try:
            t0 = time.perf_counter()
            tally.first_submit = min(tally.first_submit, t0)
            resp = await http.post("/v1/generations", json=body)
            tally.submit_latency.append(time.perf_counter() - t0)
            tally.submit_codes[resp.status_code] += 1
            if resp.status_code != 202:
                continue
            gen_id = resp.json()["id"]
            tally.accepted.append(gen_id)
            while True:
                res = await http.get(f"/v1/generations/{gen_id}", headers={"Prefer": "wait=30"})
                if res.status_code != 200:
                    tally.other_codes[res.status_code] += 1
                    await asyncio.sleep(0.1)
                    continue
                doc = res.json()
                if doc["status"] in FINAL:
                    break
            now = time.perf_counter()
            tally.e2e_latency.append(now - t0)
            tally.last_final = max(tally.last_final, now)
            tally.final[gen_id] = doc
            if doc["status"] == "succeeded":
                img = doc["images"][0]
                got = await http.get(img["url"])
                tally.other_codes[got.status_code] += 1
                if got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == img["sha256"]:
                    tally.image_ok.add(gen_id)
                else:
                    tally.image_bad.append(gen_id)
        except httpx.HTTPError as exc:
            tally.transport_errors.append(f"client {idx}: {type(exc).__name__}: {exc}")


async def drive(urls: list[str], args: argparse.Namespace, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    https = [httpx.AsyncClient(base_url=u, timeout=60, limits=limits) for u in urls]
    next_index = [0]
    try:
        await asyncio.gather(
            *(client(c, https[c % len(https)], next_index, args.requests, args, tally) for c in range(args.clients))
        )
    finally:
        for h in https:
            await h.aclose()


def check(st: Stack, tally: Tally) -> tuple[dict[str, bool], dict[str, Any]]:
    r = st.r
    stored = records(r)
    accepted = set(tally.accepted)
    statuses = Counter(doc["status"] for doc in tally.final.values())
    events_ok, attempts_ok = 0, 0
    pipe = r.pipeline(transaction=False)
    for gen_id in tally.accepted:
        pipe.xrange(f"sdxl:events:{gen_id}")
    for gen_id, entries in zip(tally.accepted, pipe.execute(), strict=True):
        types = Counter(fields[b"type"].decode() for _eid, fields in entries)
        attempt = int(stored.get(gen_id, {}).get("attempt") or 0)
        terminal = sum(types[f"generation.{s}"] for s in FINAL)
        events_ok += types["generation.started"] == attempt and terminal == 1
        attempts_ok += attempt == 1
    image_files = sum(  # skips the `.type` sidecars older stores kept beside each image
        1
        for p in (st.data_dir / "images").rglob("*")
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".type")
    )
    time.sleep(3.5)  # one heartbeat (3 s): the registry's jobs_done includes the last job
    jobs_done = 0
    for w in st.svc.workers:
        jobs_done += int(r.hget(f"sdxl:worker:{w.worker_id}", "jobs_done") or 0)  # type: ignore[attr-defined]
    five_xx = sum(n for c, n in (tally.submit_codes + tally.other_codes).items() if c >= 500)
    invariants = {
        "all_submits_accepted": sum(tally.submit_codes.values()) == len(tally.accepted) == tally.requests,
        "zero_5xx": five_xx == 0,
        "no_transport_errors": not tally.transport_errors,
        "unique_ids": len(accepted) == len(tally.accepted),
        "every_accepted_final": set(tally.final) == accepted,
        "every_accepted_succeeded": statuses["succeeded"] == len(accepted),
        "redis_records_equal_accepted": set(stored) == accepted and len(stored) == len(accepted),
        "every_succeeded_image_verified": len(tally.image_ok) == statuses["succeeded"] and not tally.image_bad,
        "one_image_file_per_generation": image_files == statuses["succeeded"],
        "events_one_start_one_terminal": events_ok == len(accepted),
        "single_attempt_each": attempts_ok == len(accepted),
        "worker_jobs_done_equal_succeeded": jobs_done == statuses["succeeded"],
    }
    detail = {
        "accepted": len(tally.accepted),
        "statuses": dict(statuses),
        "redis_records": len(stored),
        "image_files": image_files,
        "worker_jobs_done": jobs_done,
        "five_xx": five_xx,
        "submit_codes": dict(tally.submit_codes),
        "other_codes": dict(tally.other_codes),
        "transport_errors": tally.transport_errors[:5],
        "image_bad": tally.image_bad[:5],
    }
    return invariants, detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--apis", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="64..128 px")
    ap.add_argument("--steps", type=int, default=2, help="2..4")
    ap.add_argument("--refiner", default="ensemble", choices=["none", "ensemble", "img2img"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--timeout", type=float, default=1800, help="global limit in seconds for the whole run")
    args = ap.parse_args()
    started = time.monotonic()
    start_line(
        "load",
        requests=args.requests,
        clients=args.clients,
        apis=args.apis,
        workers=args.workers,
        size=args.size,
        steps=args.steps,
        refiner=args.refiner,
        timeout_s=args.timeout,
    )
    tally = Tally(args.requests)
    env = bench_env(args.threads, progress_interval=0.25, **raised_limits())
    timed_out = False
    with stack(apis=args.apis, workers=args.workers, env=env) as st:
        budget = args.timeout - (time.monotonic() - started)
        t0 = time.perf_counter()
        try:
            asyncio.run(asyncio.wait_for(drive(st.api_urls, args, tally), timeout=max(1.0, budget)))
        except TimeoutError:
            timed_out = True
        wall = time.perf_counter() - t0
        invariants, detail = check(st, tally)
        stored = records(st.r)
    invariants["finished_within_timeout"] = not timed_out
    done = [x for x in stored.values() if x.get("status") == "succeeded"]
    window = (max(float(x["finished_at"]) for x in done) - min(float(x["created_at"]) for x in done)) if done else 0
    client_window = tally.last_final - tally.first_submit if tally.final else 0
    emit(
        {"figure": "submit_latency_ms", **pcts(tally.submit_latency, scale=1000, nd=2), "n": len(tally.submit_latency)}
    )
    emit({"figure": "end_to_end_latency_s", **pcts(tally.e2e_latency, nd=3)})
    emit(
        {
            "figure": "throughput",
            "generations": len(tally.final),
            "client_window_s": round(client_window, 3),
            "generations_per_second": round(len(tally.final) / client_window, 3) if client_window else 0,
            "server_window_s": round(window, 3),
            "server_generations_per_second": round(len(done) / window, 3) if window else 0,
            "pipeline_s_p50": round(statistics.median(x["timings"]["pipeline"] for x in done), 4) if done else None,
            "wall_s": round(wall, 3),
        }
    )
    emit({"figure": "invariants", **invariants, **detail})
    ok = all(invariants.values())
    emit(
        {
            "event": "summary",
            "bench": "load",
            "ok": ok,
            "failed_invariants": [k for k, v in invariants.items() if not v],
            "submit_latency_ms": pcts(tally.submit_latency, scale=1000, nd=2),
            "generations_per_second": round(len(tally.final) / client_window, 3) if client_window else 0,
        }
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
