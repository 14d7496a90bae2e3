"""Shared benchmark helpers: a private Redis + real API/worker processes, percentiles, machine facts, and an
in-process baseline (the worker's own Engine.run in a fresh process) to compute ratios against.

Every benchmark prints JSON lines: one object per figure and a final {"event": "summary", ...}. Ratios are
always against a baseline measured in the same run, on the same machine, with the same thread count.

    python bench/benchlib.py inprocess < params.json     # (internal) the baseline child process
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from tests.procs import PY, RedisServer, Service  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def pcts(
    values: Sequence[float], qs: Sequence[int] = (50, 95, 99), scale: float = 1.0, nd: int = 3
) -> dict[str, float]:
    return {f"p{q}": round(percentile(values, q) * scale, nd) for q in qs}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """CPU model, cores, load and the versions that matter, for the start line of every benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rs = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=5).stdout
        redis_server = next((p.split("=", 1)[1] for p in rs.split() if p.startswith("v=")), rs.strip())
    except (OSError, subprocess.TimeoutExpired):
        redis_server = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "python": platform.python_version(),
            **{
                d: _version(d)
                for d in ("torch", "diffusers", "fastapi", "uvicorn", "starlette", "pydantic", "rq", "redis",
                          "hiredis", "httpx", "zlib-ng")
            },
            "redis-server": redis_server,
        },
    }


def start_line(bench: str, **extra: Any) -> None:
    emit({"event": "start", "bench": bench, **machine(), **extra})


def tiny_model() -> Path:
    target = Path(os.environ.get("SDXL_TEST_MODEL_DIR", ROOT / ".models" / "tiny"))
    if not (target / "base" / "model_index.json").exists() or not (target / "refiner" / "model_index.json").exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from tools.models import build_tiny

        build_tiny(target)
    return target


def bench_env(threads: int, progress_interval: float = 60.0, **extra: str) -> dict[str, str]:
    """Environment for every benchmark process (API, worker and the in-process baseline alike).

    - threads: torch's intra-op pool (OMP/MKL). The worker and the baseline get the same number, and it is
      below the core count by default so the API, Redis and the client are not fighting the model for cores.
    - SDXL_PROGRESS_INTERVAL_SECONDS: progress is still written at every stage change (base, refiner, decoding,
      encoding, uploading); a long interval only drops the periodic mid-stage writes, which at tiny-model step
      times (a few ms) would otherwise be ~4 writes/s per job of pure Redis traffic inside the timed pipeline.
    - heartbeat/lease: the production defaults (3 s / 12 s), not the tests' 1 s / 5 s.
    """
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "SDXL_PROGRESS_INTERVAL_SECONDS": str(progress_interval),
        "SDXL_HEARTBEAT_SECONDS": "3",
        "SDXL_LEASE_SECONDS": "12",
    }
    env.update(extra)
    return env


def raised_limits(**extra: str) -> dict[str, str]:
    """Per-key and global limits far above anything a benchmark sends (docs/access.md)."""
    return {
        "SDXL_DEFAULT_RATE_PER_MINUTE": "100000000",
        "SDXL_DEFAULT_BURST": "10000000",
        "SDXL_DEFAULT_MAX_QUEUED": "10000000",
        "SDXL_MAX_QUEUE_DEPTH": "10000000",
        **extra,
    }


@dataclass
class Stack:
    svc: Service
    redis_server: RedisServer
    api_urls: list[str] = field(default_factory=list)
    data_dir: Path = Path(".")

    @property
    def r(self) -> redis.Redis:
        return self.redis_server.client()

    def logs_tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-n:]}" for p in self.svc.apis + self.svc.workers)


@contextmanager
def stack(
    apis: int = 1, workers: int = 1, env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None
) -> Iterator[Stack]:
    """A private redis-server on a free loopback port + `apis` uvicorn processes + `workers` workers."""
    model = tiny_model()
    server = RedisServer()
    server.start()
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        svc = Service(server.url, model, Path(tmp), env)
        st = Stack(svc, server, [], Path(tmp))
        try:
            for _ in range(apis):
                st.api_urls.append(svc.start_api())
            for _ in range(workers):
                svc.start_worker(True, **(worker_env or {}))
            yield st
        finally:
            svc.stop()
            server.stop()


def workload(
    size: int = 256, steps: int = 20, refiner: str = "ensemble", seed: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "prompt": PROMPT,
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": seed,
        "refiner": {"mode": refiner},
        **extra,
    }


def records(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every generation record in the private Redis: id -> decoded hash."""
    from common.contract.records import decode

    out: dict[str, dict[str, Any]] = {}
    for key in r.scan_iter(match="sdxl:gen:*", count=1000):
        raw = r.hgetall(key)
        if raw:
            rec = decode(raw)
            out[rec.get("id") or key.decode().split(":", 2)[2]] = rec
    return out


def busy_share(recs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Share of the wall time, first start to last finish, that a worker spent inside the pipeline call.

    With one worker and no batching this is sum(timings.pipeline) / wall; batched records share one call,
    so each call is counted once (pipeline / batch_images per image).
    """
    done = [x for x in recs if x.get("status") == "succeeded" and x.get("timings")]
    if not done:
        return {"busy_share": float("nan")}
    start = min(float(x["started_at"]) for x in done)
    end = max(float(x["finished_at"]) for x in done)
    busy = sum(x["timings"]["pipeline"] / max(1, int(x["timings"].get("batch_images", 1))) for x in done)
    return {
        "busy_share": round(busy / (end - start), 4),
        "busy_seconds": round(busy, 4),
        "wall_first_start_to_last_finish_s": round(end - start, 4),
    }


def inprocess(params: dict[str, Any], n: int, env: dict[str, str], warmup: int = 2, batch: int = 1) -> list[float]:
    """Seconds per `Engine.run` call on `params` (the resolved params the service reported), measured in a
    fresh process with the worker's own environment: the same code path without the service around it."""
    child_env = {**env, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [PY, str(Path(__file__).resolve()), "inprocess"],
        input=json.dumps({"params": params, "n": n, "warmup": warmup, "batch": batch}),
        capture_output=True,
        text=True,
        env=child_env,
        cwd=ROOT,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"in-process baseline failed:\n{proc.stderr[-3000:]}")
    return [float(x) for x in json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]]


class ResidentInProcess:
    """The same baseline as `inprocess`, in a child that stays up: `call(n)` times n more `Engine.run` calls.

    A benchmark alternates these with the service's own generations, so a change in machine load (this box is
    shared) hits both sides of a ratio alike instead of whichever half ran during it."""

    MARK = "@@bench "  # our lines on the child's stdout, whatever a library prints there

    def __init__(self, params: dict[str, Any], env: dict[str, str], warmup: int = 2, batch: int = 1) -> None:
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [PY, str(Path(__file__).resolve()), "inprocess-serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        )
        self._send({"params": params, "warmup": warmup, "batch": batch})
        self._answer()  # loaded and warm

    def _send(self, msg: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def _answer(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(self.MARK):
                return json.loads(line[len(self.MARK):])
        self.log.seek(0)
        raise RuntimeError(f"in-process baseline died:\n{self.log.read().decode(errors='replace')[-3000:]}")

    def call(self, n: int = 1) -> list[float]:
        self._send(n)
        answer = self._answer()
        self.last_stages: list[dict[str, float]] = answer["stages"]  # engine stage times of those calls
        return [float(x) for x in answer["seconds"]]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(30)
        self.log.close()

    def __enter__(self) -> "ResidentInProcess":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


def baseline_engine(req: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """The worker's Engine, loaded and warmed as the worker does before taking jobs, with the request's specs."""
    from common.contract.params import GenerationParams
    from worker.pipeline import Engine, ImageSpec
    from worker.settings import WorkerSettings

    params = GenerationParams.model_validate(req["params"])
    engine = Engine(WorkerSettings())
    engine.warmup()
    specs = [
        ImageSpec(
            params.prompt, params.prompt_2, params.negative_prompt, params.negative_prompt_2, params.image_seed(i)
        )
        for i in range(req["batch"])
    ]
    for _ in range(req["warmup"]):
        engine.run(params, specs, lambda _p: None)
    return engine, params, specs


def _timed_calls(engine: Any, params: Any, specs: list[Any], n: int,
                 stages: list[dict[str, float]] | None = None) -> list[float]:
    """n calls' seconds; `stages` also gets each call's engine stage times (base, refiner, decoding)."""
    seconds = []
    for _ in range(n):
        t0 = time.perf_counter()
        _images, times = engine.run(params, specs, lambda _p: None)
        seconds.append(time.perf_counter() - t0)
        if stages is not None:
            stages.append({"base": times.base, "refiner": times.refiner, "decoding": times.decoding})
    return seconds


def _inprocess_child() -> None:
    req = json.loads(sys.stdin.read())
    engine, params, specs = baseline_engine(req)
    print(json.dumps({"seconds": _timed_calls(engine, params, specs, req["n"])}), flush=True)


def _inprocess_serve() -> None:
    """ResidentInProcess's child: a config line, then one line per `call(n)` with n."""
    engine, params, specs = baseline_engine(json.loads(sys.stdin.readline()))
    print(ResidentInProcess.MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        stages: list[dict[str, float]] = []
        seconds = _timed_calls(engine, params, specs, int(line), stages)
        print(ResidentInProcess.MARK + json.dumps({"seconds": seconds, "stages": stages}), flush=True)


def proc_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process so far (load-independent, unlike wall time)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_model_core(model_pids: Sequence[int], other_pids: Sequence[int]) -> dict[str, list[int]] | None:
    """The processes that run the model (the worker, the in-process baseline) on one core, everything else
    (API, Redis, this client) on the others, every thread of each. The two sides of a ratio then run on the
    same core: on this shared VM one core was up to 10 % slower than the other for minutes at a time, which
    a ratio would otherwise read as the service's cost. None (nothing pinned) with fewer than two cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    model, rest = {cores[-1]}, set(cores[:-1])
    for pids, mask in ((model_pids, model), (other_pids, rest)):
        for pid in pids:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    os.sched_setaffinity(int(tid), mask)
                except ProcessLookupError:  # a thread that just ended
                    pass
    return {"model_cores": sorted(model), "other_cores": sorted(rest)}


class RedisCounter:
    """Commands and CPU the private redis-server spent while counting (resume/pause around each timed request):
    round trips per request cost the same on a loaded or an idle machine, so they explain
    overhead that wall time only blurs."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.before: dict[str, int] = {}
        self.cpu0 = 0.0
        self.calls: dict[str, int] = {}
        self.cpu = 0.0

    def _snapshot(self) -> tuple[dict[str, int], float]:
        stats = self.r.info("commandstats")
        cpu = self.r.info("cpu")
        calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def resume(self) -> None:
        self.before, self.cpu0 = self._snapshot()

    def pause(self) -> None:
        after, cpu1 = self._snapshot()
        for k, v in after.items():
            self.calls[k] = self.calls.get(k, 0) + v - self.before.get(k, 0)
        self.cpu += cpu1 - self.cpu0

    def totals(self, per: int) -> dict[str, Any]:
        diff = {k: v for k, v in self.calls.items() if v > 0}
        diff.pop("info", None)  # our own snapshots
        total = sum(diff.values())
        top = sorted(diff.items(), key=lambda kv: -kv[1])[:12]
        return {
            "redis_commands_per_generation": round(total / per, 2),
            "redis_cpu_ms_per_generation": round(self.cpu * 1000 / per, 3),
            "by_command_per_generation": {k: round(v / per, 2) for k, v in top},
        }


def round_trip_cost(url: str, n: int = 2000) -> dict[str, float]:
    """CPU (client process) and wall time of one Redis PING with the sync and the asyncio redis-py clients:
    the unit that a request's round-trip count multiplies."""
    import asyncio

    import redis.asyncio as aredis

    r = redis.Redis.from_url(url)
    r.ping()
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        r.ping()
    sync_cpu, sync_wall = (time.process_time() - c0) / n, (time.perf_counter() - t0) / n
    r.close()

    async def pings() -> tuple[float, float]:
        ar = aredis.Redis.from_url(url)
        await ar.ping()
        c1, t1 = time.process_time(), time.perf_counter()
        for _ in range(n):
            await ar.ping()
        out = (time.process_time() - c1) / n, (time.perf_counter() - t1) / n
        await ar.aclose()
        return out

    async_cpu, async_wall = asyncio.run(pings())
    return {
        "sync_cpu_ms": round(sync_cpu * 1000, 4),
        "sync_wall_ms": round(sync_wall * 1000, 4),
        "async_cpu_ms": round(async_cpu * 1000, 4),
        "async_wall_ms": round(async_wall * 1000, 4),
    }


def goal(value: float, target: float, higher_is_better: bool) -> dict[str, Any]:
    return {
        "value": value,
        "goal": target,
        "op": ">=" if higher_is_better else "<=",
        "met": bool(value >= target if higher_is_better else value <= target),
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["inprocess"]:
        _inprocess_child()
    elif sys.argv[1:] == ["inprocess-serve"]:
        _inprocess_serve()
    else:
        sys.exit(__doc__)
