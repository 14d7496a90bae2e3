"""The images and the compose stack, built and run for real: `make test-containers` (scripts/containers/test.sh)
builds the images, then runs this module, marked `containers` so that `make test` and `make chaos` leave it out.

The stack is docker-compose.yml plus deploy/ci/docker-compose.ci.yml, which swaps only what a machine without a
registry or a GPU cannot have (Debian-built Redis and haproxy gateway, moto as S3, one CPU worker with the tiny
model). Its containers talk over the compose network this module creates and removes; the test reaches the
gateway and the S3 stand-in on loopback ports only.
"""

import base64
import hashlib
import io
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests import client
from tests.client import Key, keys_env
from tests.procs import ROOT, free_port, wait_for

pytestmark = pytest.mark.containers

DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")  # Debian's client (the engine's API version)
COMPOSE_FILES = ("docker-compose.yml", "deploy/ci/docker-compose.ci.yml")
SERVICES = ("gateway", "api", "worker-cpu", "webhook-dispatcher", "cleanup")  # redis and minio(-init) as deps
SMALL = {"width": 128, "height": 128, "num_inference_steps": 4, "refiner": {"mode": "none"}}
# long enough on the CPU for the worker to be killed inside the pipeline, short enough to run again
LONG = {"width": 512, "height": 512, "num_inference_steps": 60, "refiner": {"mode": "none"}}
START_TIMEOUT = 300  # compose up on a 2-core machine: health checks in turn, the worker loading its model


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    url: str  # the gateway, the only way in
    key: Key

    def compose(self, *args: str, timeout: float = START_TIMEOUT) -> str:
        files = [a for f in COMPOSE_FILES for a in ("-f", str(ROOT / f))]
        proc = subprocess.run(["docker-compose", "-p", self.project, *files, *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"docker-compose {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        return proc.stdout

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).split()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=client.TIMEOUT)


def docker(*args: str) -> str:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr[-2000:]}"
    return proc.stdout.strip()


def engine_answers() -> bool:
    try:
        return subprocess.run([DOCKER, "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no client installed, or an engine that hangs
        return False


def running(container: str) -> bool:
    return docker("inspect", "-f", "{{.State.Running}}", container) == "true"


def ready_workers(stack: Stack) -> list[dict[str, Any]]:
    with stack.client() as c:
        r = c.get("/readyz")
    return [w for w in r.json()["workers"] if w["ready"]] if r.status_code == 200 else []


@pytest.fixture(scope="module")
def stack(tiny_model: Path) -> Iterator[Stack]:
    if not engine_answers():
        # a plain `pytest` on a machine without Docker; `make test-containers` starts an engine and requires it
        if os.environ.get("SDXL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"no Docker engine answers `{DOCKER} info`")
        pytest.skip("no Docker engine: `make test-containers` starts one (root, Debian)")
    http_port, s3_port = free_port(), free_port()
    key = Key("ci")
    env = {
        **os.environ,
        "SDXL_IMAGE_TAG": os.environ.get("SDXL_IMAGE_TAG", "local"),
        # published on loopback only: `${SDXL_HTTP_PORT}:80` becomes 127.0.0.1:<port>:80
        "SDXL_HTTP_PORT": f"127.0.0.1:{http_port}",
        "SDXL_S3_PORT": f"127.0.0.1:{s3_port}",
        "SDXL_S3_PUBLIC_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "SDXL_PUBLIC_BASE_URL": f"http://127.0.0.1:{http_port}",
        "SDXL_API_KEYS": keys_env(key),
        "SDXL_WEBHOOK_SECRETS": "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        "MINIO_ROOT_USER": "ci-root", "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(16),
        "S3_APP_ACCESS_KEY_ID": "ci-app", "S3_APP_SECRET_ACCESS_KEY": secrets.token_urlsafe(16),
        "SDXL_BASE_MODEL": "/tiny/base", "SDXL_REFINER_MODEL": "/tiny/refiner",
        "SDXL_CI_MODEL_DIR": str(tiny_model.resolve()),  # a real folder: Docker mounts what a symlink names
        "HF_HUB_OFFLINE": "1",
        # removing a container copies nothing but deletes its whole tree on the vfs driver: over compose's 60 s
        # for the worker's 2 GB
        "COMPOSE_HTTP_TIMEOUT": "600",
    }
    s = Stack(f"sdxl-ci-{uuid.uuid4().hex[:8]}", env, f"http://127.0.0.1:{http_port}", key)
    try:
        s.compose("up", "-d", "--no-build", *SERVICES)
        # ready: a replica answers through the gateway and the worker has loaded the model
        wait_for(lambda: ready_workers(s), START_TIMEOUT, "a ready worker behind the gateway", interval=1)
        yield s
    finally:
        try:
            print(s.compose("logs", "--no-color", "--tail", "60"))  # shown with a failure (pytest -rA: always)
        finally:
            s.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=900)


def fetch_image(stack: Stack, done: dict[str, Any]) -> bytes:
    """The image through the gateway: a redirect to a presigned URL of the S3 stand-in, followed."""
    with stack.client() as c:
        r = c.get(f"/v1/generations/{done['id']}/images/0", headers=stack.key.headers, follow_redirects=True)
    assert r.status_code == 200, r.text
    image = done["images"][0]
    assert str(r.url).startswith(stack.env["SDXL_S3_PUBLIC_ENDPOINT_URL"]), r.url
    assert len(r.content) == image["bytes"] and hashlib.sha256(r.content).hexdigest() == image["sha256"]
    return r.content


def test_readyz_through_the_gateway_with_two_api_replicas(stack: Stack) -> None:
    apis = stack.containers("api")
    assert len(apis) == 2 and all(running(c) for c in apis), apis
    with stack.client() as c:
        ready = c.get("/readyz")
        metrics = c.get("/metrics")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["redis"] == "ok" and body["storage"] == "ok", body
    assert body["workers_ready"] == 1 and body["workers"][0]["has_refiner"], body
    # the gateway keeps /metrics (for Prometheus on the internal network) from clients, as the Traefik rule does
    assert metrics.status_code == 404


def test_a_generation_through_the_gateway(stack: Stack) -> None:
    with stack.client() as c:
        r = client.create(c, {"prompt": "a lighthouse at dusk", "seed": 7, **SMALL}, stack.key)
        assert r.status_code == 202, r.text
        done = client.wait_final(c, r.json()["id"], stack.key, timeout=120)
    assert done["status"] == "succeeded", done
    png = Image.open(io.BytesIO(fetch_image(stack, done)))
    assert png.format == "PNG" and png.size == (128, 128)


def test_a_killed_worker_container_s_job_completes_on_the_restarted_one(stack: Stack) -> None:
    (worker,) = stack.containers("worker-cpu")
    with stack.client() as c:
        r = client.create(c, {"prompt": "a harbour in fog", "seed": 3, **LONG}, stack.key)
        assert r.status_code == 202, r.text
        gen_id = r.json()["id"]
        # inside the pipeline: a step done, so the worker holds the job when it dies
        wait_for(lambda: client.get(c, f"/v1/generations/{gen_id}", stack.key).json()["progress"]["step"] >= 1,
                 120, "the long job's first step", interval=0.2)
        docker("kill", worker)
        assert not running(worker)
        before = client.get(c, f"/v1/generations/{gen_id}", stack.key).json()
        assert before["status"] == "running" and before["attempt"] == 1, before
        # `docker kill` is a manual stop, which no restart policy undoes: the test starts it again, as an
        # orchestrator would start a replacement
        docker("start", worker)
        done = client.wait_final(c, gen_id, stack.key, timeout=300)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    png = Image.open(io.BytesIO(fetch_image(stack, done)))
    assert png.size == (512, 512)
