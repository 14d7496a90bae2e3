"""`make run` itself, as a newcomer runs it: the banner, a signed webhook to a loopback receiver (local mode, the
development secret), history that survives a restart, an expiry carried out by its cleanup, and Ctrl-C."""

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.procs import ROOT, free_port, wait_for
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.slow  # two starts of the whole product: with the fault drills in `make chaos`

TTL = 12  # seconds a generation lives here: long enough to see it again after a restart


class MakeRun:
    def __init__(self, data: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDXL_")}
        env.update(PORT=str(port), DATA_DIR=str(data), HF_HUB_OFFLINE="1", SDXL_GENERATION_TTL_SECONDS=str(TTL),
                   SDXL_CLEANUP_INTERVAL_SECONDS="1", SDXL_WEBHOOK_RETRY_SCHEDULE="1,1", PYTHONUNBUFFERED="1")
        env.pop("REDIS_URL", None)
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        # its own process group, as a terminal's foreground job: Ctrl-C is SIGINT to the whole group
        self.proc = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def banner(self, timeout: float = 300) -> str:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"make run exited:\n{self.log.read_text()[-3000:]}")
            return "SDXL service ready on" in self.log.read_text()

        wait_for(ready, timeout, "the make run banner", interval=0.5)
        return self.log.read_text()

    def ctrl_c(self) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(60)

    def kill(self) -> None:
        """A failed test's way out: the whole group, and the Redis `make run` keeps in its own session."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        text = self.log.read_text() if self.log.exists() else ""
        if "Redis       " in text:
            try:
                redis.Redis.from_url(text.split("Redis       ", 1)[1].split()[0], socket_timeout=2).shutdown(
                    nosave=True)
            except redis.RedisError:
                pass  # already stopped (a shutdown also drops the connection)


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"


def test_make_run_is_the_whole_product(data: Path, tmp_path: Path) -> None:
    port = free_port()
    run = MakeRun(data, port, tmp_path / "make-run-1.log")
    try:
        text = run.banner()
        for line in (f"SDXL service ready on {run.url}", f"{run.url}/docs", "Redis       redis://127.0.0.1:",
                     str(data), "local mode", "it draws noise", "whsec_"):
            assert line in text, (line, text[-2000:])
        secret = (data / "webhook-secret").read_text().strip()
        assert secret.startswith("whsec_") and secret in text  # printed once, on the start that made it

        receiver = Receiver([secret])
        receiver.start()
        try:
            body = {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 2,
                    "webhook": {"url": receiver.url("/ok/first")}}
            gen = httpx.post(f"{run.url}/v1/generations", json=body, headers={"Prefer": "wait=60"},
                             timeout=90).json()
            assert gen["status"] == "succeeded", gen
            wait_for(lambda: any(d.json["type"] == "generation.succeeded" for d in receiver.to("/ok/first")), 30,
                     "the signed webhook")
            delivery = next(d for d in receiver.to("/ok/first") if d.json["type"] == "generation.succeeded")
            assert delivery.verified == [True]  # signed with the development secret
            attempts = httpx.get(f"{run.url}/v1/generations/{gen['id']}/webhooks", timeout=10).json()["data"]
            assert any(a["outcome"] == "delivered" for a in attempts)
        finally:
            receiver.stop()
        run.ctrl_c()  # make reports the interrupt in its exit code; what matters is that everything stops
    finally:
        run.kill()
    # Ctrl-C stopped everything: the API's port is free again, and so is the Redis make run started
    redis_url = text.split("Redis       ", 1)[1].split()[0]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{run.url}/healthz", timeout=2)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()

    again = MakeRun(data, port, tmp_path / "make-run-2.log")
    try:
        text = again.banner()
        assert "whsec_" not in text.split("SDXL service ready on", 1)[1]  # the secret is printed once only
        images = list((data / "images").rglob(f"{gen['id']}/*"))
        assert images  # the image is still there
        kept = httpx.get(f"{again.url}/v1/generations/{gen['id']}", timeout=10)
        assert kept.status_code == 200 and kept.json()["status"] == "succeeded"  # history survived the restart
        # the cleanup `make run` started expires it on time: record and image go
        wait_for(lambda: httpx.get(f"{again.url}/v1/generations/{gen['id']}", timeout=5).status_code == 404,
                 TTL + 30, "the expiry")
        wait_for(lambda: not list((data / "images").rglob(f"{gen['id']}/*")), 30, "the image's deletion")
        again.ctrl_c()
    finally:
        again.kill()
