"""Real processes for end-to-end tests: a private redis-server, uvicorn API processes, SDXL workers.

Every test Redis is our own on a free loopback port; the machine's Redis is never touched. A `Service` is an API
plus workers on one Redis; `Service.view` gives other API processes (their own settings) on the same Redis,
workers and storage, which is how the end-to-end modules share one stack (tests/e2e/conftest.py).
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
from rq.registry import StartedJobRegistry

from common.contract import keys

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing is not up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


class RedisServer:
    def __init__(self, appendonly: bool = False) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sdxl-redis-")
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
             "--dir", self.dir, "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: redis.Redis(port=self.port, socket_timeout=1).ping(), 10, "redis-server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def kill(self) -> None:
        """kill -9: no shutdown save; with append-only on (fsync per write) nothing written is lost."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)


def base_env(redis_url: str, model_dir: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        SDXL_REDIS_URL=redis_url,
        SDXL_BASE_MODEL=str(model_dir / "base"),
        SDXL_REFINER_MODEL=str(model_dir / "refiner"),
        SDXL_STORAGE_DIR=str(data_dir / "images"),
        SDXL_HEARTBEAT_SECONDS="1",
        SDXL_LEASE_SECONDS="5",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Proc:
    started: "list[Proc]" = []  # every process the tests started: the session's end stops what is left running

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.args = args
        self._fh = open(log, "ab")
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._fh, stderr=subprocess.STDOUT)
        self._terminated = False
        Proc.started.append(self)

    @classmethod
    def stop_leftovers(cls) -> list[str]:
        """Stop every process a test started and never stopped; what they were (a fixture that leaks them)."""
        left = [p for p in cls.started if p.proc.poll() is None]
        for p in left:
            p.stop(timeout=10)
        cls.started = []
        return [f"{' '.join(p.args[-2:])} (log {p.log})" for p in left]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM once, without waiting: `stop` then waits (and sends no second SIGTERM)."""
        if self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = 20) -> int | None:
        if self.proc.poll() is None:
            if not self._terminated:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._fh.close()
        return self.proc.returncode

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")


class Service:
    """An API process plus workers, all real processes, on one private Redis."""

    def __init__(self, redis_url: str, model_dir: Path, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.redis_url = redis_url
        self.model_dir = model_dir
        self.data_dir = data_dir
        self.extra = env or {}
        self.apis: list[Proc] = []
        self.workers: list[Proc] = []
        self.dispatchers: list[Proc] = []
        self.others: list[Proc] = []
        self.port = 0
        self.owns_workers = True  # False on a view: its workers are another Service's
        self.redis_server: RedisServer | None = None  # set where the Redis is this service's own

    def view(self, **env: str) -> "Service":
        """API processes of their own (started with `start_api`, settings `env` on top of this service's) on this
        service's Redis, workers and storage. `stop` stops only the view's own processes."""
        v = Service(self.redis_url, self.model_dir, self.data_dir, {**self.extra, **env})
        v.workers = self.workers  # the same list: `v.workers[0]` is this service's first worker
        v.owns_workers = False
        v.redis_server = self.redis_server
        return v

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(self.redis_url, self.model_dir, self.data_dir, **{**self.extra, **extra})

    def start_api(self, **extra: str) -> str:
        port = free_port()
        api = Proc([PY, "-m", "app"], self.env(**{"SDXL_HOST": "127.0.0.1", "SDXL_PORT": str(port),
                                                  "SDXL_GRACEFUL_SHUTDOWN_SECONDS": "5", **extra}),
                   self.data_dir / f"api-{port}.log")
        self.apis.append(api)
        if not self.port:
            self.port = port
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200, 30, "API")
        return f"http://127.0.0.1:{port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_worker(self, wait_ready: bool = True, **extra: str) -> Proc:
        assert self.owns_workers, "a view starts no workers: its workers are its base service's"
        wid = f"w{len(self.workers)}-{free_port()}"
        w = Proc([PY, "-m", "worker"], self.env(SDXL_WORKER_ID=wid, **extra), self.data_dir / f"worker-{wid}.log")
        w.worker_id = wid  # type: ignore[attr-defined]
        self.workers.append(w)
        if wait_ready:
            self.wait_worker_ready(wid)
        return w

    def wait_worker_ready(self, wid: str, timeout: float = 90) -> None:
        r = redis.Redis.from_url(self.redis_url)

        def ready() -> bool:
            for w in self.workers:
                if getattr(w, "worker_id", None) == wid and w.proc.poll() is not None:
                    raise RuntimeError(f"worker {wid} exited:\n{w.output()[-3000:]}")
            return r.hget(f"sdxl:worker:{wid}", "state") == b"ready"

        wait_for(ready, timeout, f"worker {wid} ready", interval=0.2)

    def start_dispatcher(self, **extra: str) -> Proc:
        """`python -m dispatcher` (webhooks); ready once rq lists it as a worker of sdxl-webhooks."""
        from rq import Queue, Worker

        d = Proc([PY, "-m", "dispatcher"], self.env(**extra),
                 self.data_dir / f"dispatcher-{len(self.dispatchers)}.log")
        self.dispatchers.append(d)
        queue = Queue("sdxl-webhooks", connection=redis.Redis.from_url(self.redis_url))

        def ready() -> bool:
            if d.proc.poll() is not None:
                raise RuntimeError(f"dispatcher exited:\n{d.output()[-3000:]}")
            return Worker.count(queue=queue) >= len(self.dispatchers)

        wait_for(ready, 30, "dispatcher ready", interval=0.1)
        return d

    def start_cleanup(self, **extra: str) -> Proc:
        """`python -m cleanup` (expiry, reaping, deadlines), sweeping every SDXL_CLEANUP_INTERVAL_SECONDS."""
        c = Proc([PY, "-m", "cleanup"], self.env(**extra), self.data_dir / f"cleanup-{len(self.others)}.log")
        self.others.append(c)
        wait_for(lambda: "cleanup started" in c.output() or c.proc.poll() is not None, 30, "cleanup started")
        assert c.proc.poll() is None, c.output()
        return c

    def wait_idle(self, timeout: float = 180) -> None:
        """Until nothing is queued or running on this Redis (no fair-share line, nothing in rq's queue, its
        intermediate list or its started registry, no running generation): work one test left in flight on a
        shared stack cannot reach into the next one."""
        r = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        started = StartedJobRegistry(keys.GENERATION_QUEUE, connection=r).key

        def idle() -> bool:
            return (not r.exists(keys.RQ_QUEUE_KEY, keys.RQ_INTERMEDIATE_KEY, started)
                    and not r.scard(keys.RUNNING)
                    and next(r.scan_iter(match=keys.pending("*"), count=1000), None) is None)

        try:
            wait_for(idle, timeout, "the stack to be idle (nothing queued or running)", interval=0.05)
        finally:
            r.close()

    def stop(self, procs: list[Proc] | None = None) -> None:
        """Stops `procs` (default: all of this service's own processes) side by side: SIGTERM to all, then wait."""
        if procs is None:
            procs = self.others + self.dispatchers + (self.workers if self.owns_workers else []) + self.apis
        for p in procs:
            p.terminate()
        for p in procs:
            p.stop()


@contextmanager
def running_service(redis_url: str, model_dir: Path, data_dir: Path, workers: int = 1,
                    env: dict[str, str] | None = None) -> Iterator[Service]:
    svc = Service(redis_url, model_dir, data_dir, env)
    try:
        # the workers load their models while the API starts: both are mostly imports, on different cores
        started = [svc.start_worker(wait_ready=False) for _ in range(workers)]
        svc.start_api()
        for w in started:
            svc.wait_worker_ready(w.worker_id)  # type: ignore[attr-defined]
        yield svc
    finally:
        svc.stop()
