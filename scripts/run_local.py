"""`make run`: the whole product on one machine. Redis (REDIS_URL, or a private redis-server whose data lives in
DATA_DIR/redis, so history survives restarts), one worker, the API, the webhook dispatcher and cleanup. Ctrl-C or
SIGTERM stops everything this script started, in reverse order.

Local mode: webhooks may go to plain http and loopback receivers (a development machine's own), for this
script's processes only, and the dispatcher signs with a development `whsec_` secret made on first start and
kept in DATA_DIR/webhook-secret. Settings given in the environment win over all of these.
"""

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
LOCAL_WEBHOOK_ADDRESSES = "127.0.0.1,::1"
VERIFY_HINT = """  verify a delivery (Python):
    from standardwebhooks import Webhook
    Webhook(SECRET).verify(body, {"webhook-id": ..., "webhook-timestamp": ..., "webhook-signature": ...})"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(text, flush=True)


def dev_secret(data: Path) -> tuple[str, bool]:
    """The development webhook secret (made on first start); (secret, made now)."""
    path = data / "webhook-secret"
    if path.exists():
        return path.read_text().strip(), False
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret, True


def start_redis(data: Path) -> tuple[str, subprocess.Popen[bytes]]:
    folder = data / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--appendonly", "yes",
         "--save", "60 1"], stdout=subprocess.DEVNULL,
        # out of the terminal's process group: Ctrl-C reaches the services, which still need Redis to stop
        # cleanly (a worker deregisters, the API finishes its requests); this script stops it last
        start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    return url, proc


def images_at(env: dict[str, str]) -> str:
    if env.get("SDXL_STORAGE_BACKEND") == "s3":
        return f"s3 bucket {env.get('SDXL_S3_BUCKET', '?')} at {env.get('SDXL_S3_ENDPOINT_URL') or 'AWS'}"
    return env["SDXL_STORAGE_DIR"]


def is_tiny(env: dict[str, str]) -> bool:
    model_dir = env.get("MODEL_DIR", ".models/tiny")
    return os.path.normpath(env.get("SDXL_BASE_MODEL", "")) == os.path.normpath(f"{model_dir}/base")


def wait_ready(url: str, procs: list[tuple[str, subprocess.Popen[bytes]]], timeout: float = 600) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for _n, p in procs):
            return False
        try:
            res = httpx.get(f"{url}/readyz", timeout=2)
            if res.status_code == 200 and res.json().get("workers_ready", 0) >= 1:  # the worker has warmed up
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    return False


def main() -> int:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    env = dict(os.environ)
    data = Path(env.get("DATA_DIR", ".data")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    env.setdefault("SDXL_STORAGE_DIR", str(data / "images"))
    redis_url = env.get("REDIS_URL") or env.get("SDXL_REDIS_URL")
    if not redis_url:
        redis_url, redis_proc = start_redis(data)
        procs.append(("redis", redis_proc))
    env["SDXL_REDIS_URL"] = redis_url
    port = env.get("PORT", "8000")
    url = f"http://127.0.0.1:{port}"
    env.setdefault("SDXL_PUBLIC_BASE_URL", url)

    # local mode: the API (submit-time check) and the dispatcher (delivery-time recheck) read the same policy
    local_hooks = "SDXL_WEBHOOK_ALLOW_HTTP" not in env and "SDXL_WEBHOOK_ALLOW_ADDRESSES" not in env
    if local_hooks:
        env["SDXL_WEBHOOK_ALLOW_HTTP"] = "true"
        env["SDXL_WEBHOOK_ALLOW_ADDRESSES"] = LOCAL_WEBHOOK_ADDRESSES
    made = False
    if not env.get("SDXL_WEBHOOK_SECRETS"):
        secret, made = dev_secret(data)
        env["SDXL_WEBHOOK_SECRETS"] = secret

    if is_tiny(env):  # the tiny test adapters and presets `make model` built beside the tiny model
        env.setdefault("SDXL_ADAPTERS_DIR", str(Path(env.get("MODEL_DIR", ".models/tiny"), "adapters").resolve()))
    py = sys.executable
    procs.append(("worker", subprocess.Popen([py, "-m", "worker"], env=env, cwd=ROOT)))
    procs.append(("api", subprocess.Popen([py, "-m", "app"], env={**env, "SDXL_HOST": "127.0.0.1",
                                                                   "SDXL_PORT": port}, cwd=ROOT)))
    procs.append(("dispatcher", subprocess.Popen([py, "-m", "dispatcher"], env=env, cwd=ROOT)))
    procs.append(("cleanup", subprocess.Popen([py, "-m", "cleanup"], env=env, cwd=ROOT)))
    code = 0
    if wait_ready(url, procs):
        lines = [
            "",
            f"SDXL service ready on {url}",
            f"  playground  {url}/",
            f"  API docs    {url}/docs",
            f"  Redis       {redis_url}",
            f"  data        {data} (images in {images_at(env)})",
            "  running     API, one worker, webhook dispatcher, cleanup; Ctrl-C stops everything",
        ]
        if local_hooks:
            lines.append(f"  webhooks    local mode: plain http and loopback receivers ({LOCAL_WEBHOOK_ADDRESSES}) "
                         "are allowed (SDXL_WEBHOOK_ALLOW_HTTP, SDXL_WEBHOOK_ALLOW_ADDRESSES)")
        if made:
            lines += [f"  webhook secret (made now, kept in {data / 'webhook-secret'}):",
                      f"    {env['SDXL_WEBHOOK_SECRETS']}", VERIFY_HINT]
        elif "SDXL_WEBHOOK_SECRETS" not in os.environ:
            lines.append(f"  webhook secret in {data / 'webhook-secret'}")
        if is_tiny(env):
            lines.append("  model       the project's tiny random-weight test model: it draws noise. "
                         "Set SDXL_BASE_MODEL for real weights (README: Real weights)")
        say("\n".join(lines) + "\n")
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
