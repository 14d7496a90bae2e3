"""`make run`: Redis (REDIS_URL or a private redis-server on a free port), one worker, the API; Ctrl-C or
SIGTERM stops everything this script started, in reverse order."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    env = dict(os.environ)
    redis_url = env.get("REDIS_URL") or env.get("SDXL_REDIS_URL")
    if not redis_url:
        port = free_port()
        data = tempfile.mkdtemp(prefix="sdxl-redis-")
        procs.append(("redis", subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--dir", data,
             "--save", ""], stdout=subprocess.DEVNULL)))
        redis_url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                redis.Redis.from_url(redis_url, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        print(f"started redis-server at {redis_url} (data in {data})", flush=True)
    env["SDXL_REDIS_URL"] = redis_url
    port = env.get("PORT", "8000")
    env.setdefault("SDXL_PUBLIC_BASE_URL", f"http://127.0.0.1:{port}")
    py = sys.executable
    procs.append(("worker", subprocess.Popen([py, "-m", "worker"], env=env, cwd=ROOT)))
    env.update(SDXL_HOST="127.0.0.1", SDXL_PORT=port)
    procs.append(("api", subprocess.Popen([py, "-m", "app"], env=env, cwd=ROOT)))
    print(f"SDXL service on http://127.0.0.1:{port}  (Ctrl-C stops everything)", flush=True)
    code = 0
    try:
        while not stopping:
            for name, p in procs:
                if p.poll() is not None:
                    print(f"{name} exited with {p.returncode}; stopping the rest", file=sys.stderr, flush=True)
                    code = p.returncode or 1
                    stopping = True
            time.sleep(0.2)
    finally:
        for _name, p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _name, p in reversed(procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    return code


if __name__ == "__main__":
    sys.exit(main())
