"""The worker commands the Kubernetes manifests run (deploy/kubernetes/base/worker.yaml, weights-job.yaml), as
the kubelet runs them: real processes against a real Redis and a real hub cache folder.

- `python -m worker.health` (readiness) and `python -m worker.health --live` (liveness and startup);
- `python -m worker.weights download` (the weights Job) and `wait` (each worker's init container).
"""

import json
import socket
import subprocess
import time
from pathlib import Path

import redis

from common.contract import keys
from tests.procs import PY, ROOT, RedisServer, base_env, free_port


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_liveness_is_a_fresh_heartbeat_in_any_state_and_survives_redis_outages(
        redis_server: RedisServer, redis_client: redis.Redis, tiny_model: Path, tmp_path: Path) -> None:
    env = base_env(redis_server.url, tiny_model, tmp_path)
    wid = f"{socket.gethostname()}-k8s000"

    def register(state: str, age: float) -> None:
        redis_client.hset(keys.worker(wid), mapping={"id": wid, "state": state, "heartbeat": str(time.time() - age)})
        redis_client.zadd(keys.WORKERS, {wid: time.time() - age})

    assert run(["worker.health", "--live"], env).returncode == 1  # nothing registered for this pod
    # states a worker passes through by itself: alive (no restart), though only ready/busy are ready
    for state in ("loading", "warming", "waiting_for_storage", "ready", "busy", "stopping"):
        register(state, 0)
        live = run(["worker.health", "--live"], env)
        assert live.returncode == 0, (state, live.stdout, live.stderr)
        assert json.loads(live.stdout)["state"] == state
        assert run(["worker.health"], env).returncode == (0 if state in ("ready", "busy") else 1), state
    register("busy", 60)  # a heartbeat older than SDXL_LEASE_SECONDS (5 here): hung or dead
    stale = run(["worker.health", "--live"], env)
    assert stale.returncode == 1 and "heartbeat" in json.loads(stale.stdout)["reason"]
    # Redis away: not the worker's failure for liveness (it rides the outage out), but it is not ready
    away = base_env(f"redis://127.0.0.1:{free_port()}/0", tiny_model, tmp_path)
    live = run(["worker.health", "--live"], away)
    assert live.returncode == 0 and "redis unreachable" in json.loads(live.stdout)["reason"]
    assert run(["worker.health"], away).returncode == 1


def test_weights_job_marks_the_cache_and_workers_wait_for_their_own_settings(
        redis_server: RedisServer, tiny_model: Path, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    env = base_env(redis_server.url, tiny_model, tmp_path, HF_HOME=str(hf_home))
    before = run(["worker.weights", "wait", "--timeout", "0"], env)
    assert before.returncode == 1, before.stderr  # the init container keeps the worker waiting
    done = run(["worker.weights", "download"], env)
    assert done.returncode == 0, done.stderr
    marker = Path(run(["worker.weights", "marker"], env).stdout.strip())
    assert marker.parent == hf_home / "sdxl-weights" and marker.is_file()
    recorded = json.loads(marker.read_text())
    assert recorded["base_model"] == str(tiny_model / "base")
    assert recorded["refiner_model"] == str(tiny_model / "refiner")
    assert run(["worker.weights", "wait", "--timeout", "0"], env).returncode == 0
    # workers configured for other weights do not start on this cache: their marker is another one
    other = {**env, "SDXL_VARIANT": "fp16"}
    assert run(["worker.weights", "wait", "--timeout", "0"], other).returncode == 1
