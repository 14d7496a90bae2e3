"""Failure across hosts: the service's own hosts in network namespaces on this machine (tests/netns.py), partitioned
while every process stays alive.

    lab (the test; the switches)   10.213.1.1 on the back network, 10.213.2.1 on the front one
    redis host                     10.213.1.10: redis-server :6379 and the S3 stand-in (moto) :9000
    api host                       10.213.1.20 (back: Redis, S3) and 10.213.2.20 (front: clients) :8000
    worker hosts w1, w2            10.213.1.31, 10.213.1.32: `python -m worker` on the tiny model, S3 storage

Drills:
- a worker host loses its cable in the middle of a job: the other worker's reaper finds the lease lapsed and the
  generation runs again there; when the cable is back, the isolated worker finds its attempt's token stale and
  drops its copy. The generation succeeds once (one terminal event), and the bucket (versioned, so that every
  write stays visible) holds exactly one write of each of the winning attempt's images;
- the API host loses Redis (the cable pulled, or a firewall silently dropping packets): requests answer 503 with
  `Retry-After` in bounded time, and the API serves again by itself once Redis is back.

They print their detection and recovery times as JSON lines (BENCHMARKS.md); the only time bounds are the
generous ones against hanging (every wait and every HTTP client has one).
"""

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import redis
from botocore.config import Config

from common.contract import keys
from tests.e2e.test_storage_s3 import AWS_ENV
from tests.netns import Lab, unavailable
from tests.procs import PY, Proc, base_env, wait_for

pytestmark = pytest.mark.slow

BACK, FRONT = 1, 2  # the networks' third octets
REDIS_HOST = "10.213.1.10"
API_BACK, API_FRONT = "10.213.1.20", "10.213.2.20"
WORKERS = {"w1": 31, "w2": 32}
REDIS_URL = f"redis://{REDIS_HOST}:6379/0"
S3_URL = f"http://{REDIS_HOST}:9000"
API_URL = f"http://{API_FRONT}:8000"
BUCKET = "sdxl-partitions"
LONG = {"width": 256, "height": 256, "num_inference_steps": 100}  # seconds on 2 cores: cut mid-run
SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
HANG = 60.0  # the bound against hanging, for one HTTP request and for each wait below
TERMINAL_EVENTS = {"generation.succeeded", "generation.failed", "generation.canceled"}


def report(drill: str, **figures: Any) -> None:
    """One JSON line of measured seconds (BENCHMARKS.md "Partitions"); `-s` shows it, the log keeps it anyway."""
    print(json.dumps({"drill": drill, **{k: round(v, 2) if isinstance(v, float) else v
                                         for k, v in figures.items()}}), flush=True)


class Cluster:
    """The hosts of one drill, run from inside the lab namespace (`lab.inside()`)."""

    def __init__(self, lab: Lab, model_dir: Path, data_dir: Path, s3: bool) -> None:
        self.lab = lab
        self.model_dir = model_dir
        self.data_dir = data_dir
        self.storage = ({"SDXL_STORAGE_BACKEND": "s3", "SDXL_S3_BUCKET": BUCKET, "SDXL_S3_ENDPOINT_URL": S3_URL,
                         "SDXL_S3_ADDRESSING_STYLE": "path", "SDXL_STORAGE_RETRY_SECONDS": "10", **AWS_ENV}
                        if s3 else {})
        self.workers: dict[str, Proc] = {}
        self.api: Proc | None = None
        self.r = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
        self.http = httpx.Client(base_url=API_URL, timeout=HANG)

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(REDIS_URL, self.model_dir, self.data_dir, **{**self.storage, **extra})

    def start_redis(self) -> None:
        self.lab.start("redis", ["redis-server", "--bind", REDIS_HOST, "--port", "6379", "--protected-mode", "no",
                                 "--save", "", "--appendonly", "no", "--logfile", ""],
                       self.env(), self.data_dir / "redis.log")
        wait_for(lambda: self.r.ping(), 20, "redis-server on the redis host")
        if self.storage:
            self.lab.start("redis", [PY, "-m", "moto.server", "-H", REDIS_HOST, "-p", "9000"], self.env(),
                           self.data_dir / "moto.log")
            wait_for(lambda: httpx.get(S3_URL, timeout=2).status_code < 500, 30, "moto on the redis host")
            s3 = self.s3()
            s3.create_bucket(Bucket=BUCKET)
            # every put stays as a version: a second write of a key (a duplicate result) cannot hide
            s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=S3_URL, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                          connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}))

    def start_api(self, **extra: str) -> None:
        self.api = self.lab.start("api", [PY, "-m", "app"], self.env(
            SDXL_HOST=API_FRONT, SDXL_PORT="8000", SDXL_ALLOW_OPEN="true", SDXL_GRACEFUL_SHUTDOWN_SECONDS="5",
            **extra), self.data_dir / "api.log")
        wait_for(lambda: self.http.get("/healthz", timeout=2).status_code == 200, 60, "the API host")

    def start_worker(self, host: str) -> Proc:
        w = self.lab.start(host, [PY, "-m", "worker"], self.env(SDXL_WORKER_ID=host),
                           self.data_dir / f"worker-{host}.log")
        self.workers[host] = w
        return w

    def wait_ready(self, host: str) -> None:
        w = self.workers[host]

        def ready() -> bool:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {host} exited:\n{w.output()[-3000:]}")
            return self.r.hget(keys.worker(host), "state") == b"ready"

        wait_for(ready, 120, f"worker {host} ready", interval=0.2)

    def submit(self, body: dict[str, Any]) -> str:
        resp = self.http.post("/v1/generations", json={"prompt": "partition", "seed": 7, **body})
        assert resp.status_code == 202, resp.text
        return str(resp.json()["id"])

    def record(self, gen_id: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.r.hgetall(keys.generation(gen_id)).items()}

    def wait_record(self, gen_id: str, what: str, check: Any, interval: float = 0.02) -> dict[str, str]:
        return wait_for(lambda: (lambda rec: rec if check(rec) else None)(self.record(gen_id)), HANG * 2,
                        f"{gen_id} {what}", interval=interval)  # type: ignore[no-any-return]

    def events(self, gen_id: str) -> list[str]:
        return [f[b"type"].decode() for _, f in self.r.xrange(keys.events(gen_id))]

    def close(self) -> None:
        self.http.close()
        self.r.close()


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    made = Lab()
    try:
        made.network(BACK)
        made.network(FRONT)
        yield made
    finally:
        made.close()  # processes first, then the namespaces with their cables, bridges and rules


def steps_done(rec: dict[str, str]) -> int:
    return int(json.loads(rec.get("progress") or "{}").get("step", 0))


def test_a_worker_cut_off_mid_job_loses_it_once_and_drops_its_stale_copy(
        lab: Lab, tiny_model: Path, tmp_path: Path) -> None:
    lab.host("redis", {BACK: 10})
    lab.host("api", {BACK: 20, FRONT: 20})
    for host, octet in WORKERS.items():
        lab.host(host, {BACK: octet})
    with lab.inside():
        c = Cluster(lab, tiny_model, tmp_path, s3=True)
        try:
            c.start_redis()
            for host in WORKERS:
                c.start_worker(host)  # they load their models while the API starts
            c.start_api()
            for host in WORKERS:
                c.wait_ready(host)

            gen_id = c.submit(LONG)
            busy_host = c.wait_record(gen_id, "inside the pipeline on attempt 1",
                                      lambda rec: rec.get("status") == "running" and steps_done(rec) >= 1)["worker_id"]
            other_host = next(h for h in WORKERS if h != busy_host)
            busy, other = c.workers[busy_host], c.workers[other_host]

            cut_at = time.monotonic()
            lab.cut(busy_host, BACK)  # the cable goes; the process and its half-done pipeline stay
            c.wait_record(gen_id, "requeued", lambda rec: rec.get("attempt") == "2")
            requeued = time.monotonic() - cut_at
            c.wait_record(gen_id, f"running again on {other_host}",
                          lambda rec: rec.get("worker_id") == other_host and rec.get("status") != "queued")
            rerun = time.monotonic() - cut_at
            winner = c.wait_record(gen_id, "succeeded", lambda rec: rec.get("status") in ("succeeded", "failed"),
                                   interval=0.1)
            done = time.monotonic() - cut_at
            assert winner["status"] == "succeeded", winner
            assert busy.proc.poll() is None, "the isolated worker must still be alive"

            # only the healed worker may take the next job: it shows the worker is back in service
            assert other.stop() == 0
            probe = c.submit(SMALL)
            healed_at = time.monotonic()
            lab.heal(busy_host, BACK)
            seen: dict[str, float] = {}  # what happened, seconds after the heal

            def healed() -> bool:
                rec = c.record(probe)
                if "back_in_service" not in seen and rec.get("worker_id") == busy_host and rec["status"] != "queued":
                    seen["back_in_service"] = time.monotonic() - healed_at
                if "dropped" not in seen and "dropping this copy" in busy.output():
                    seen["dropped"] = time.monotonic() - healed_at
                return len(seen) == 2

            wait_for(healed, HANG, f"{busy_host} dropping its stale copy and taking the next job")
            assert c.wait_record(probe, "done", lambda rec: rec.get("status") in ("succeeded", "failed"),
                                 interval=0.1)["status"] == "succeeded"

            # exactly once: the winner's record untouched since it succeeded, one terminal event, one success
            # counted per generation (this one and the probe), one requeue
            assert c.record(gen_id) == winner
            assert winner["attempt"] == "2" and winner["worker_id"] == other_host
            events = c.events(gen_id)
            assert [e for e in events if e in TERMINAL_EVENTS] == ["generation.succeeded"], events
            assert events.count("generation.started") == 2, events
            assert int(c.r.hget(keys.METRICS, "gen|succeeded|") or 0) == 2
            assert int(c.r.hget(keys.METRICS, "requeue|lease_expired") or 0) == 1
            assert busy.proc.poll() is None and "Traceback" not in busy.output(), busy.output()[-3000:]
            # the isolated worker finished nothing of this generation: its only word on it is the drop
            said = [json.loads(line) for line in busy.output().splitlines()
                    if line.startswith("{") and gen_id in line]
            assert not [x for x in said if x["msg"].startswith("generation succeeded")], said

            # no duplicate object: every version under the generation's prefix is one of the winner's images,
            # written once, with the winner's bytes
            images = json.loads(winner["images"])
            listing = c.s3().list_object_versions(Bucket=BUCKET, Prefix=f"generations/{gen_id}/")
            versions = [(v["Key"], v["ETag"]) for v in listing.get("Versions", [])]
            assert sorted(k for k, _ in versions) == sorted(img["key"] for img in images), versions
            for img in images:
                head = c.s3().head_object(Bucket=BUCKET, Key=img["key"])
                assert head["Metadata"]["sha256"] == img["sha256"] and head["ContentLength"] == img["bytes"]
            report("worker_cut_mid_job", lease_seconds=float(c.env()["SDXL_LEASE_SECONDS"]),
                   heartbeat_seconds=float(c.env()["SDXL_HEARTBEAT_SECONDS"]),
                   detected_requeued_s=requeued, rerun_started_s=rerun, rerun_succeeded_s=done,
                   healed_stale_copy_dropped_s=seen["dropped"], healed_back_in_service_s=seen["back_in_service"])
        finally:
            c.close()


@pytest.mark.parametrize("fault", ["cable", "drop"])
def test_an_api_cut_off_redis_answers_503_at_once_and_recovers_by_itself(
        lab: Lab, tiny_model: Path, tmp_path: Path, fault: str) -> None:
    """No worker: what is submitted stays queued, which is all the API needs to show."""
    if fault == "drop" and shutil.which("iptables") is None:
        pytest.skip("iptables is not installed: the packet-dropping variant needs it")
    lab.host("redis", {BACK: 10})
    lab.host("api", {BACK: 20, FRONT: 20})
    with lab.inside():
        c = Cluster(lab, tiny_model, tmp_path, s3=False)
        try:
            c.start_redis()
            c.start_api()
            gen_id = c.submit(SMALL)
            assert c.http.get(f"/v1/generations/{gen_id}").status_code == 200

            if fault == "cable":
                lab.cut("api", BACK)
            else:
                lab.blackhole("api", REDIS_HOST)
            cut_at = time.monotonic()
            figures: dict[str, Any] = {}
            for round_ in range(3):  # the first requests meet pooled connections, the later ones fresh ones
                for name, send in (("post", lambda: c.http.post("/v1/generations", json={"prompt": "x", **SMALL})),
                                   ("get", lambda: c.http.get(f"/v1/generations/{gen_id}"))):
                    t0 = time.monotonic()
                    resp = send()  # the client's timeout (HANG) is the bound against hanging
                    figures.setdefault(f"{name}_503_s", []).append(round(time.monotonic() - t0, 2))
                    assert resp.status_code == 503, (name, round_, resp.status_code, resp.text)
                    assert resp.headers["content-type"] == "application/problem+json"
                    assert int(resp.headers["retry-after"]) >= 1
                    assert resp.json()["type"].endswith("store-unavailable"), resp.text
            first_503 = figures["post_503_s"][0]
            assert c.http.get("/healthz").status_code == 200  # alive, just not ready: no restart wanted
            ready = c.http.get("/readyz")
            assert ready.status_code == 503 and ready.headers["retry-after"], ready.text

            if fault == "cable":
                lab.heal("api", BACK)
            else:
                lab.unblackhole("api", REDIS_HOST)
            healed_at = time.monotonic()

            def serves() -> str | None:
                resp = c.http.post("/v1/generations", json={"prompt": "after", **SMALL})
                return resp.json()["id"] if resp.status_code == 202 else None

            after = wait_for(serves, HANG, "the API to accept a generation again", interval=0.1)
            recovered = time.monotonic() - healed_at
            assert c.http.get(f"/v1/generations/{after}").json()["status"] == "queued"
            assert c.http.get(f"/v1/generations/{gen_id}").status_code == 200
            assert c.api is not None and c.api.proc.poll() is None  # the same process throughout
            report(f"api_cut_off_redis_{fault}", outage_s=healed_at - cut_at, first_post_503_s=first_503,
                   **figures, recovered_2xx_s=recovered)
        finally:
            c.close()
