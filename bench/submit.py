"""Submit throughput: POST /v1/generations requests/s on one API process, over a bare FastAPI endpoint.

The bare app (below) has one route that validates the same `app.schemas.GenerationCreate` body and does
nothing else; both are served by `python -m uvicorn ... --no-access-log` on loopback, one process each, and
hit by the same client: a minimal asyncio HTTP/1.1 keep-alive load generator (`--connections` connections,
`--duration` seconds each, fixed body). It is far cheaper per request than httpx, so on a small machine the
client is less likely to be what limits the bare endpoint. No worker runs: generations just queue, with the
queue-depth and per-key limits raised (docs/access.md). Goal: service / bare >= 0.5.

A third target calibrates the goal: the bare app plus one Redis round trip per request (an INCR on the same
private redis-server, through the same redis-py asyncio client and hiredis). Any submit that stores anything
durably pays at least that; `one_round_trip_over_bare` says how much of the goal's budget it alone takes here.

    python bench/submit.py                        # 16 connections, 10 s per target
    python bench/submit.py --duration 2           # smoke
"""

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastapi import FastAPI, Response  # noqa: E402

from app.schemas import GenerationCreate  # noqa: E402


def create_bare_app() -> FastAPI:
    """The floor: FastAPI + pydantic validation of the real request model, nothing else. With
    BENCH_BARE_REDIS_URL set, also one Redis round trip per request (the floor of a durable submit)."""
    import redis.asyncio as aredis

    app = FastAPI()
    url = os.environ.get("BENCH_BARE_REDIS_URL")
    r = aredis.Redis.from_url(url) if url else None

    @app.post("/v1/generations", status_code=202)
    async def create(body: GenerationCreate) -> Response:
        if r is not None:
            await r.incr("bench:bare:submits")
        return Response(b"{}", status_code=202, media_type="application/json")

    return app


async def _one_connection(port: int, request: bytes, stop_at: float, lat: list[float], codes: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            code = int(lines[0].split(b" ", 2)[1])
            length = 0
            for line in lines[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1
    finally:
        writer.close()


async def hammer(port: int, body: bytes, connections: int, duration: float) -> dict[str, Any]:
    request = (
        b"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    lat: list[float] = []
    codes: dict[int, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*(_one_connection(port, request, t0 + duration, lat, codes) for _ in range(connections)))
    wall = time.perf_counter() - t0
    return {"requests": len(lat), "wall_s": wall, "latencies": lat, "codes": codes}


def measure(
    name: str, port: int, pid: int, body: bytes, connections: int, duration: float, warmup: float
) -> dict[str, Any]:
    from benchlib import emit, pcts, proc_cpu_seconds

    asyncio.run(hammer(port, body, connections, warmup))
    cpu0 = proc_cpu_seconds(pid)
    res = asyncio.run(hammer(port, body, connections, duration))
    cpu = proc_cpu_seconds(pid) - cpu0
    row = {
        "figure": f"{name}_submit",
        "requests": res["requests"],
        "wall_s": round(res["wall_s"], 3),
        "requests_per_second": round(res["requests"] / res["wall_s"], 1),
        "latency_ms": pcts(res["latencies"], scale=1000, nd=2),
        "status_codes": res["codes"],
        "server_cpu_ms_per_request": round(cpu * 1000 / max(1, res["requests"]), 3),
        "server_cpu_share": round(cpu / res["wall_s"], 3),
    }
    emit(row)
    return row


def main() -> int:
    from benchlib import Stack, bench_env, emit, goal, raised_limits, round_trip_cost, stack, start_line, workload

    from tests.procs import PY, Proc, free_port, wait_for

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per target")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of untimed load per target first")
    args = ap.parse_args()
    start_line("submit", connections=args.connections, duration_s=args.duration)
    body = json.dumps(workload(256, 20, "ensemble", seed=1234)).encode()
    import httpx

    with stack(apis=1, workers=0, env=bench_env(1, 60.0, **raised_limits())) as st:
        st_: Stack = st
        port = int(st_.api_urls[0].rsplit(":", 1)[1])
        check = httpx.post(
            f"{st_.api_urls[0]}/v1/generations", content=body, headers={"Content-Type": "application/json"}
        )
        if check.status_code != 202:
            raise RuntimeError(f"service answered {check.status_code}: {check.text[:300]}")
        root = Path(__file__).resolve().parent.parent

        def start_bare(name: str, **env: str) -> tuple[Proc, int]:
            bare_port = free_port()
            proc = Proc(
                [PY, "-m", "uvicorn", "bench.submit:create_bare_app", "--factory", "--host", "127.0.0.1",
                 "--port", str(bare_port), "--no-access-log", "--timeout-graceful-shutdown", "5"],
                {**os.environ, "PYTHONPATH": str(root), **env},
                st_.data_dir / f"{name}.log",
            )
            wait_for(
                lambda: httpx.post(f"http://127.0.0.1:{bare_port}/v1/generations", content=body,
                                   headers={"Content-Type": "application/json"}).status_code == 202,
                30,
                name,
            )
            return proc, bare_port

        bare, bare_port = start_bare("bare")
        floor, floor_port = start_bare("bare_one_round_trip", BENCH_BARE_REDIS_URL=st_.redis_server.url)
        try:
            # alternate so a change in machine load hits all alike
            half = args.duration / 2
            bare1 = measure("bare", bare_port, bare.proc.pid, body, args.connections, half, args.warmup)
            svc1 = measure("service", port, st_.svc.apis[0].proc.pid, body, args.connections, half, args.warmup)
            floor1 = measure("bare_one_round_trip", floor_port, floor.proc.pid, body, args.connections, half,
                             args.warmup)
            floor2 = measure("bare_one_round_trip", floor_port, floor.proc.pid, body, args.connections, half, 0)
            svc2 = measure("service", port, st_.svc.apis[0].proc.pid, body, args.connections, half, 0)
            bare2 = measure("bare", bare_port, bare.proc.pid, body, args.connections, half, 0)
        finally:
            bare.stop()
            floor.stop()
        queued = sum(1 for _ in st_.r.scan_iter(match="sdxl:gen:*", count=1000))
        emit({"figure": "redis_ping_cost", **round_trip_cost(st_.redis_server.url)})
    bare_rps = (bare1["requests"] + bare2["requests"]) / (bare1["wall_s"] + bare2["wall_s"])
    svc_rps = (svc1["requests"] + svc2["requests"]) / (svc1["wall_s"] + svc2["wall_s"])
    floor_rps = (floor1["requests"] + floor2["requests"]) / (floor1["wall_s"] + floor2["wall_s"])
    bad = {c: n for row in (svc1, svc2) for c, n in row["status_codes"].items() if c != 202}
    emit(
        {
            "event": "summary",
            "bench": "submit",
            "connections": args.connections,
            "service_requests_per_second": round(svc_rps, 1),
            "bare_requests_per_second": round(bare_rps, 1),
            "bare_one_round_trip_requests_per_second": round(floor_rps, 1),
            "service_over_bare": goal(round(svc_rps / bare_rps, 4), 0.5, higher_is_better=True),
            "one_round_trip_over_bare": round(floor_rps / bare_rps, 4),
            "service_over_one_round_trip": round(svc_rps / floor_rps, 4),
            "service_cpu_ms_per_request": round(
                (svc1["server_cpu_ms_per_request"] + svc2["server_cpu_ms_per_request"]) / 2, 3
            ),
            "bare_cpu_ms_per_request": round(
                (bare1["server_cpu_ms_per_request"] + bare2["server_cpu_ms_per_request"]) / 2, 3
            ),
            "bare_one_round_trip_cpu_ms_per_request": round(
                (floor1["server_cpu_ms_per_request"] + floor2["server_cpu_ms_per_request"]) / 2, 3
            ),
            "non_202_answers": bad,
            "generation_records_in_redis": queued,
        }
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
