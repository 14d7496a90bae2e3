"""The storage check at start and on /readyz, against real stores: moto's S3 server on loopback and a directory.

- A missing bucket: the API starts but /readyz answers 503 naming the bucket and NoSuchBucket; the worker loads
  its models, then waits as `waiting_for_storage` and takes no job; both log why. Creating the bucket makes
  both ready without a restart, and the job that waited succeeds.
- A bucket deleted under a ready worker: the job fails `storage_unavailable` at once (no retries), its message
  naming NoSuchBucket and the bucket.
- Bad credentials: moto's server accepts any credentials unless authentication is switched on, so these
  tests run a second moto server, in a process of its own, with it on (`/moto-api/reset-auth`): an unknown
  access key is InvalidAccessKeyId, a wrong secret SignatureDoesNotMatch, a user without a policy AccessDenied.
- A local directory that cannot be used (a file in its place): 503 until it is fixed.
"""

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import redis
from botocore.config import Config

from common.contract import keys
from common.storage import StoragePermanentError
from common.storage_s3 import S3Store
from tests.e2e.test_storage_s3 import AWS_ENV, SMALL, Moto, s3
from tests.procs import PY, ROOT, Proc, RedisServer, Service, free_port, wait_for

MISSING = "sdxl-check-missing"  # created and deleted by the tests; moto's state is shared in this process
RECHECK = 20  # seconds to wait for a re-check (the API's cache and the worker's interval are 5 s)


@pytest.fixture(scope="module")
def moto(aws_env: None) -> Iterator[Moto]:
    server = Moto()
    server.start()
    yield server
    server.stop()


def delete_bucket(server: Moto, bucket: str) -> None:
    client = s3(server)
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


def readyz(api: str) -> httpx.Response:
    return httpx.get(f"{api}/readyz", timeout=10)


def log_lines(proc: Proc, msg_part: str) -> list[dict[str, Any]]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{") and msg_part in line:
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def missing_bucket(moto: Moto, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """An API and a worker started while their bucket does not exist."""
    server = RedisServer()
    server.start()
    env = {
        **AWS_ENV,
        "SDXL_STORAGE_BACKEND": "s3",
        "SDXL_S3_BUCKET": MISSING,
        "SDXL_S3_ENDPOINT_URL": moto.url,
        "SDXL_S3_ADDRESSING_STYLE": "path",
        "SDXL_STORAGE_RETRY_SECONDS": "10",
    }
    svc = Service(server.url, tiny_model, tmp_path_factory.mktemp("check"), env)
    try:
        svc.start_worker(wait_ready=False)
        svc.start_api()
        yield svc
    finally:
        svc.stop()
        server.stop()


def test_a_missing_bucket_is_not_ready_until_it_is_created(missing_bucket: Service, moto: Moto) -> None:
    svc = missing_bucket
    api, worker = svc.apis[0], svc.workers[0]
    wid = worker.worker_id  # type: ignore[attr-defined]
    r = redis.Redis.from_url(svc.redis_url, decode_responses=True)

    # the API: up (healthz), not ready, and it says why
    down = readyz(svc.url)
    assert down.status_code == 503, down.text
    assert down.headers["content-type"] == "application/problem+json" and down.headers["retry-after"]
    body = down.json()
    assert body["type"].endswith("not-ready")
    assert f"`{MISSING}`" in body["detail"] and "NoSuchBucket" in body["detail"] and moto.url in body["detail"]
    assert httpx.get(f"{svc.url}/healthz", timeout=10).status_code == 200
    (started,) = log_lines(api, "storage check failed")
    assert started["level"] == "error" and started["error_code"] == "NoSuchBucket"
    assert MISSING in started["msg"] and "/readyz answers 503" in started["msg"]

    # the worker: says so at once, loads its models, then waits without taking a job
    wait_for(lambda: r.hget(keys.worker(wid), "state") == "waiting_for_storage", 120, "the worker waiting",
             interval=0.2)
    entry = r.hgetall(keys.worker(wid))
    assert "NoSuchBucket" in entry["storage"] and MISSING in entry["storage"]
    lines = log_lines(worker, "storage check failed")
    assert lines[0]["error_code"] == "NoSuchBucket" and MISSING in lines[0]["msg"]
    assert "loading the models meanwhile" in lines[0]["msg"]  # the first check, before the models load
    assert any("takes no job until it passes" in line["msg"] for line in lines)
    assert "worker ready" not in worker.output()
    probe = subprocess.run([PY, "-m", "worker.health"], env=svc.env(SDXL_WORKER_ID=wid), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    report = json.loads(probe.stdout)
    assert probe.returncode == 1 and "waiting_for_storage" in report["reason"] and "NoSuchBucket" in report["reason"]

    gen = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "kept for later", **SMALL}, timeout=10).json()
    assert gen["status"] == "queued"

    # fixed: both become ready again, without a restart
    s3(moto).create_bucket(Bucket=MISSING)
    try:
        wait_for(lambda: readyz(svc.url).status_code == 200, RECHECK, "readyz 200 once the bucket exists")
        svc.wait_worker_ready(wid, timeout=RECHECK)
        ready = readyz(svc.url).json()
        assert ready["status"] == "ready" and ready["storage"] == "ok" and ready["redis"] == "ok"
        assert [w["storage"] for w in ready["workers"]] == ["ok"]
        assert log_lines(api, "storage ok")[-1]["msg"].endswith("(recovered)")
        assert log_lines(worker, "storage ok")[-1]["msg"].startswith(f"storage ok: s3 bucket `{MISSING}`")
        wait_for(lambda: r.hget(keys.generation(gen["id"]), "status") == "succeeded", 60, "the waiting job")
        assert api.proc.poll() is None and worker.proc.poll() is None  # the same processes throughout
    finally:
        r.close()


def test_a_bucket_deleted_under_a_ready_worker_fails_the_job_at_once(missing_bucket: Service, moto: Moto) -> None:
    svc = missing_bucket
    worker = svc.workers[0]
    if MISSING not in [b["Name"] for b in s3(moto).list_buckets()["Buckets"]]:
        s3(moto).create_bucket(Bucket=MISSING)  # run on its own
    svc.wait_worker_ready(worker.worker_id, timeout=120)  # type: ignore[attr-defined]
    delete_bucket(moto, MISSING)
    try:
        res = httpx.post(f"{svc.url}/v1/generations", json={"prompt": "nowhere to go", **SMALL},
                         headers={"Prefer": "wait=30"}, timeout=40)
        gen = res.json()
        assert gen["status"] == "failed", gen
        assert gen["error"]["type"] == "storage_unavailable" and gen["images"] == []
        message = gen["error"]["message"]
        assert "NoSuchBucket" in message and f"`{MISSING}`" in message and moto.url in message
        assert f"storage put failed for generations/{gen['id']}" not in worker.output()  # not retried
        wait_for(lambda: readyz(svc.url).status_code == 503, RECHECK, "readyz 503 once the bucket is gone")
    finally:
        s3(moto).create_bucket(Bucket=MISSING)


# --- bad credentials: a moto server with authentication on -----------------------------------------------


class AuthMoto:
    """moto's server in a process of its own (authentication is process-wide), switched on after set-up."""

    bucket = "sdxl-check-auth"

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}  # off during set-up
        self.proc = Proc([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], {**env, **AWS_ENV}, log)
        wait_for(lambda: httpx.get(self.url, timeout=1).status_code < 500, 30, "moto server")
        root = {"endpoint_url": self.url, "region_name": "us-east-1"}
        boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **root).create_bucket(Bucket=self.bucket)
        iam = boto3.client("iam", **root)
        self.users: dict[str, dict[str, str]] = {}
        for name, policy in (("no-policy", None), ("allowed", {"Effect": "Allow", "Action": "s3:*",
                                                                "Resource": "*"})):
            iam.create_user(UserName=name)
            if policy is not None:
                iam.put_user_policy(UserName=name, PolicyName="s3",
                                    PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}))
            self.users[name] = iam.create_access_key(UserName=name)["AccessKey"]
        # from now on every request is authenticated and authorised as AWS would
        httpx.post(f"{self.url}/moto-api/reset-auth", content=b"0", timeout=10).raise_for_status()

    def creds(self, user: str) -> dict[str, str]:
        key = self.users[user]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture(scope="module")
def auth_moto(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthMoto]:
    server = AuthMoto(tmp_path_factory.mktemp("moto-auth") / "moto.log")
    yield server
    server.stop()


def auth_store(server: AuthMoto, monkeypatch: pytest.MonkeyPatch, **creds: str) -> S3Store:
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    return S3Store(server.bucket, endpoint_url=server.url, addressing_style="path")


@pytest.mark.parametrize(
    ("who", "code"),
    [("unknown-key", "InvalidAccessKeyId"), ("wrong-secret", "SignatureDoesNotMatch"), ("no-policy", "AccessDenied")],
)
def test_bad_credentials_are_named(auth_moto: AuthMoto, monkeypatch: pytest.MonkeyPatch, who: str,
                                   code: str) -> None:
    creds = {
        "unknown-key": {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "AWS_SECRET_ACCESS_KEY": "whatever"},
        "wrong-secret": {**auth_moto.creds("allowed"), "AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        "no-policy": auth_moto.creds("no-policy"),
    }[who]
    store = auth_store(auth_moto, monkeypatch, **creds)
    with pytest.raises(StoragePermanentError) as raised:
        store.check()
    assert raised.value.code == code
    assert f"{code} (HTTP 403)" in str(raised.value) and f"`{auth_moto.bucket}`" in str(raised.value)
    with pytest.raises(StoragePermanentError, match=code):  # and a job's upload is not retried either
        store.put("generations/g/0.png", b"img", "image/png", {})


def test_good_credentials_pass(auth_moto: AuthMoto, monkeypatch: pytest.MonkeyPatch) -> None:
    store = auth_store(auth_moto, monkeypatch, **auth_moto.creds("allowed"))
    store.check()  # raises when the store is not usable
    store.put("generations/g/0.png", b"img", "image/png", {})


def test_the_api_with_an_unknown_key_is_not_ready(auth_moto: AuthMoto, tiny_model: Path, tmp_path: Path) -> None:
    server = RedisServer()
    server.start()
    env = {**AWS_ENV, "AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "SDXL_STORAGE_BACKEND": "s3",
           "SDXL_S3_BUCKET": auth_moto.bucket, "SDXL_S3_ENDPOINT_URL": auth_moto.url,
           "SDXL_S3_ADDRESSING_STYLE": "path"}
    svc = Service(server.url, tiny_model, tmp_path, env)
    try:
        api = svc.start_api()
        down = readyz(api)
        assert down.status_code == 503
        detail = down.json()["detail"]
        assert "InvalidAccessKeyId" in detail and f"`{auth_moto.bucket}`" in detail and "AWS_ACCESS_KEY_ID" in detail
        assert "AKIAUNKNOWNKEY000000" not in detail  # /readyz is public: the key id stays in the logs' config
        assert log_lines(svc.apis[0], "storage check failed")[0]["error_code"] == "InvalidAccessKeyId"
    finally:
        svc.stop()
        server.stop()


# --- the local directory -----------------------------------------------------------------------------------


def test_an_unusable_local_directory_is_not_ready_until_fixed(tiny_model: Path, tmp_path: Path) -> None:
    server = RedisServer()
    server.start()
    images = tmp_path / "images"
    images.write_text("a file where the image directory should be")
    svc = Service(server.url, tiny_model, tmp_path, {"SDXL_STORAGE_DIR": str(images)})
    try:
        api = svc.start_api()
        down = readyz(api)
        assert down.status_code == 503
        assert str(images) in down.json()["detail"] and "EEXIST" in down.json()["detail"]
        images.unlink()
        wait_for(lambda: readyz(api).status_code == 200, RECHECK, "readyz 200 once the directory can be made")
        assert readyz(api).json()["storage"] == "ok" and images.is_dir()
    finally:
        svc.stop()
        server.stop()


@pytest.mark.slow  # a worker start (imports and all) only to fail: seconds
def test_a_worker_without_a_bucket_name_exits_2(tiny_model: Path, tmp_path: Path) -> None:
    server = RedisServer()
    server.start()
    svc = Service(server.url, tiny_model, tmp_path, {**AWS_ENV, "SDXL_STORAGE_BACKEND": "s3"})
    try:
        w = svc.start_worker(wait_ready=False)
        assert w.proc.wait(120) == 2
        (line,) = log_lines(w, "could not build the object store")
        assert "SDXL_S3_BUCKET must be set" in line["msg"] and line["level"] == "error"
        assert not server.client().exists(keys.worker(w.worker_id))  # type: ignore[attr-defined]
    finally:
        svc.stop()
        server.stop()
