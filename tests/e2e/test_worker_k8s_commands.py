"""The worker commands the Kubernetes manifests run (deploy/kubernetes/base/worker.yaml, weights-job.yaml), as
the kubelet runs them: real processes against a real Redis and a real hub cache folder.

- `python -m worker.health` (readiness) and `python -m worker.health --live` (liveness and startup);
- `python -m worker.weights download` (the weights Job) and `wait` (each worker's init container);
- `python -m worker.drain` (the preStop hook), inside the PID namespace of a busy worker that runs as PID 1.
"""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from common.contract import keys
from tests.procs import PY, ROOT, Proc, RedisServer, Service, base_env, free_port, wait_for


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


# --- the preStop drain, with the worker as PID 1 of its own PID namespace, as in its container -------------------

LONG = {"width": 512, "height": 512, "num_inference_steps": 100, "refiner": {"mode": "none"}}


def prestop_command() -> list[str]:
    worker = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "base" / "worker.yaml").read_text())
    [spec] = [d["spec"]["template"]["spec"] for d in worker if d and d["kind"] == "Deployment"]
    return spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]  # type: ignore[no-any-return]


def pid_namespaces_work() -> bool:
    if not (shutil.which("unshare") and shutil.which("nsenter")):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "test $$ -eq 1"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


def child_pid(pid: int) -> int:
    """unshare --fork runs the command as its child: PID 1 inside, this pid outside."""
    def child() -> int | None:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(text[0]) if text else None

    return wait_for(child, 30, "the worker under unshare")  # type: ignore[no-any-return]


@pytest.mark.parametrize("grace, outcome", [("600", "succeeded"), ("1", "queued")], ids=["finishes", "requeues"])
def test_prestop_drain_lets_the_running_job_finish_or_puts_it_back(
        grace: str, outcome: str, redis_server: RedisServer, tiny_model: Path, tmp_path: Path) -> None:
    """The manifest's preStop command, run in the worker's PID namespace while it is busy, returns once the
    worker has drained: the job finished within SDXL_SHUTDOWN_GRACE_SECONDS, or went back in line past it."""
    if not pid_namespaces_work():
        pytest.skip("unshare/nsenter cannot make PID namespaces here (needs root or user namespaces)")
    svc = Service(redis_server.url, tiny_model, tmp_path)
    base = svc.start_api()
    wid = f"k8s-drain-{free_port()}"
    # the container's PATH: `python` is the image's (here the venv's) interpreter
    env = svc.env(SDXL_WORKER_ID=wid, SDXL_SHUTDOWN_GRACE_SECONDS=grace,
                  PATH=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")
    worker = Proc(["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", PY, "-m", "worker"], env,
                  tmp_path / "worker.log")
    worker.worker_id = wid  # type: ignore[attr-defined]
    svc.workers.append(worker)
    try:
        svc.wait_worker_ready(wid)
        r = httpx.post(f"{base}/v1/generations", json={"prompt": "drain me", **LONG}, timeout=30)
        gen_id = r.json()["id"]
        wait_for(lambda: httpx.get(f"{base}/v1/generations/{gen_id}", timeout=10).json()["status"] == "running",
                 120, f"{gen_id} running", interval=0.05)
        inside = ["nsenter", "-t", str(child_pid(worker.proc.pid)), "--pid", "--mount"]
        hook = subprocess.run([*inside, *prestop_command()], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert hook.returncode == 0, hook.stdout + hook.stderr
        assert "drained" in hook.stderr + hook.stdout
        assert worker.proc.wait(60) == 0
        log = worker.output()
        assert "shutdown requested: finishing the current job" in log  # the signal found it busy
        status = httpx.get(f"{base}/v1/generations/{gen_id}", timeout=10).json()["status"]
        assert status == outcome, log[-3000:]
        assert not redis.Redis.from_url(redis_server.url).exists(keys.worker(wid))
    finally:
        svc.stop()
