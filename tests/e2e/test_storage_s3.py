"""S3 storage against moto's standalone S3 server: a real HTTP endpoint on loopback (not mock_aws).

Two moto servers run in this process and share its state: `internal` is where the API and the worker reach
the store (minio:9000 in compose) and `public` is the endpoint clients reach (localhost:9000), used only in
presigned URLs. Stopping `internal` and starting it again on the same port is a storage outage and recovery.
moto does not check presigned signatures or expiry; SigV4 and the endpoint in the URL are checked here.
"""

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import httpx
import pytest
import redis
from botocore.config import Config
from moto.server import ThreadedMotoServer

from app.settings import Settings
from common.contract import keys
from common.storage import ObjectNotFound, StorageUnavailable, build_store
from common.storage_s3 import S3Store
from tests.procs import PY, ROOT, RedisServer, Service, free_port, wait_for

BUCKET = "sdxl-test-images"
SMALL = {"width": 128, "height": 128, "num_inference_steps": 4}
PUBLIC_BASE = "https://sdxl.example.test"  # only written into URLs, never contacted
RETRY_BUDGET = 10  # the worker's SDXL_STORAGE_RETRY_SECONDS in the end-to-end tests
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # never consult the machine's AWS files or the instance metadata address
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Moto:
    """moto's S3 server on a fixed loopback port that can be stopped and started again on that port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_for(lambda: httpx.get(self.url, timeout=1).status_code < 500, 10, "moto server")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def moto(aws_env: None) -> Iterator[tuple[Moto, Moto]]:
    internal, public = Moto(), Moto()
    internal.start()
    public.start()
    s3(internal).create_bucket(Bucket=BUCKET)
    yield internal, public
    internal.stop()
    public.stop()


def s3(server: Moto) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.url,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )


def keys_under(server: Moto, prefix: str) -> list[str]:
    res = s3(server).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for o in res.get("Contents", [])]


def make_store(internal: Moto, public: Moto | None = None, **kw: Any) -> S3Store:
    return S3Store(
        BUCKET,
        endpoint_url=internal.url,
        public_endpoint_url=public.url if public else None,
        addressing_style="path",
        **kw,
    )


# --- S3Store on its own ---------------------------------------------------------------------------------


def test_round_trip_metadata_presign_and_delete_prefix(moto: tuple[Moto, Moto]) -> None:
    internal, public = moto
    store = make_store(internal, public, presign_expiry_seconds=600)
    data = b"\x89PNG not really" * 50
    digest = hashlib.sha256(data).hexdigest()
    store.put("unit/gen_a/0.png", data, "image/png", {"sha256": digest, "generation-id": "gen_a"})
    store.put("unit/gen_a/1.webp", b"second", "image/webp", {"sha256": "x", "generation-id": "gen_a"})
    store.put("unit/gen_ab/0.png", b"sibling", "image/png", {})  # shares the text prefix `unit/gen_a`

    head = s3(internal).head_object(Bucket=BUCKET, Key="unit/gen_a/0.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"sha256": digest, "generation-id": "gen_a", "size": str(len(data))}
    obj = store.get("unit/gen_a/0.png")
    assert obj.data == data and obj.content_type == "image/png"

    url = store.presigned_url("unit/gen_a/0.png")
    assert url is not None
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == public.url  # signed for the endpoint clients reach
    assert parts.path == f"/{BUCKET}/unit/gen_a/0.png"  # path-style addressing
    q = parse_qs(parts.query)
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and q["X-Amz-Expires"] == ["600"]
    assert "/us-east-1/s3/aws4_request" in q["X-Amz-Credential"][0]
    fetched = httpx.get(url, timeout=10)
    assert fetched.status_code == 200 and fetched.content == data
    assert fetched.headers["content-type"] == "image/png"

    assert store.delete_prefix("unit/gen_a/") == 2
    assert keys_under(internal, "unit/gen_a/") == []
    assert keys_under(internal, "unit/gen_ab/") == ["unit/gen_ab/0.png"]  # the sibling is untouched
    with pytest.raises(ObjectNotFound):
        store.get("unit/gen_a/0.png")
    assert store.delete_prefix("unit/gen_a/") == 0
    with pytest.raises(ValueError):
        store.delete_prefix("")  # never the whole bucket


def test_without_public_endpoint_presigns_for_the_store_endpoint(moto: tuple[Moto, Moto]) -> None:
    internal, _ = moto
    url = make_store(internal).presigned_url("unit/x.png")
    assert url is not None and url.startswith(f"{internal.url}/{BUCKET}/unit/x.png?")


def test_unreachable_endpoint_is_storage_unavailable(aws_env: None) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = S3Store(BUCKET, endpoint_url=dead, addressing_style="path", max_attempts=1)
    with pytest.raises(StorageUnavailable):
        store.put("k/0.png", b"x", "image/png", {})
    with pytest.raises(StorageUnavailable):
        store.get("k/0.png")
    with pytest.raises(StorageUnavailable):
        store.delete_prefix("k/")


class _ErrorHandler(BaseHTTPRequestHandler):
    status = 503
    code = "SlowDown"
    # HTTP/1.1 answers botocore's `Expect: 100-continue` at once (under 1.0 it waits a second per PUT)
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = f"<Error><Code>{self.code}</Code><Message>test</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "code"), [(500, "InternalError"), (503, "SlowDown"), (404, "NoSuchBucket")])
def test_server_errors_are_storage_unavailable(aws_env: None, status: int, code: str) -> None:
    handler = type("H", (_ErrorHandler,), {"status": status, "code": code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()  # shutdown() within 50 ms
    try:
        store = S3Store(
            BUCKET, endpoint_url=f"http://127.0.0.1:{server.server_port}", addressing_style="path", max_attempts=1
        )
        with pytest.raises(StorageUnavailable, match=code):
            store.put("k/0.png", b"x", "image/png", {})
        with pytest.raises(StorageUnavailable, match=code):
            store.get("k/0.png")  # a missing bucket is a broken deployment, not a missing image
    finally:
        server.shutdown()
        server.server_close()


def test_build_store_from_settings(moto: tuple[Moto, Moto]) -> None:
    internal, public = moto
    settings = Settings.model_validate(
        {
            "storage_backend": "s3",
            "s3_bucket": BUCKET,
            "s3_endpoint_url": internal.url,
            "s3_public_endpoint_url": public.url,
            "s3_addressing_style": "path",
            "presign_expiry_seconds": 60,
        }
    )
    store = build_store(settings)
    assert isinstance(store, S3Store) and store.region == "us-east-1"  # from AWS_DEFAULT_REGION
    store.put("unit/settings/0.png", b"abc", "image/png", {})
    assert store.get("unit/settings/0.png").data == b"abc"
    assert "X-Amz-Expires=60" in (store.presigned_url("unit/settings/0.png") or "")
    with pytest.raises(ValueError, match="SDXL_S3_BUCKET"):
        build_store(Settings.model_validate({"storage_backend": "s3"}))


def test_documented_lifecycle_rule_is_accepted(moto: tuple[Moto, Moto]) -> None:
    internal, _ = moto
    text = (ROOT / "docs" / "storage.md").read_text()
    block = text.split("```json\n", 1)[1].split("```", 1)[0]
    rule = json.loads(block)
    client = s3(internal)
    client.put_bucket_lifecycle_configuration(Bucket=BUCKET, LifecycleConfiguration=rule)
    (stored,) = client.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert stored["Filter"]["Prefix"] == Settings.model_validate({}).storage_prefix
    # TTL + 1 day, in whole days
    assert stored["Expiration"]["Days"] == -(-Settings.model_validate({}).generation_ttl_seconds // 86400) + 1


# --- end to end: real API and worker processes on S3 ----------------------------------------------------


class S3Service:
    def __init__(
        self,
        svc: Service,
        internal: Moto,
        public: Moto,
        r: redis.Redis,
        api: str,
        presigned_api: str,
        short_ttl_api: str,
    ) -> None:
        self.svc = svc
        self.internal = internal
        self.public = public
        self.r = r
        self.api = api
        self.presigned_api = presigned_api
        self.short_ttl_api = short_ttl_api


@pytest.fixture(scope="module")
def s3svc(moto: tuple[Moto, Moto], tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    internal, public = moto
    server = RedisServer()
    server.start()
    env = {
        **AWS_ENV,
        "SDXL_STORAGE_BACKEND": "s3",
        "SDXL_S3_BUCKET": BUCKET,
        "SDXL_S3_ENDPOINT_URL": internal.url,
        "SDXL_S3_PUBLIC_ENDPOINT_URL": public.url,
        "SDXL_S3_ADDRESSING_STYLE": "path",
        "SDXL_PUBLIC_BASE_URL": PUBLIC_BASE,
        "SDXL_STORAGE_RETRY_SECONDS": str(RETRY_BUDGET),
    }
    svc = Service(server.url, tiny_model, tmp_path_factory.mktemp("s3svc"), env)
    r = server.client()
    try:
        w = svc.start_worker(wait_ready=False)  # loads its models while the APIs start
        api = svc.start_api()
        presigned_api = svc.start_api(SDXL_IMAGE_URL_MODE="presigned")
        short_ttl_api = svc.start_api(SDXL_GENERATION_TTL_SECONDS="3")
        svc.wait_worker_ready(w.worker_id)  # type: ignore[attr-defined]
        yield S3Service(svc, internal, public, r, api, presigned_api, short_ttl_api)
    finally:
        svc.stop()
        r.close()
        server.stop()


def create(api: str, body: dict[str, Any], wait: int | None = 30) -> dict[str, Any]:
    headers = {"Prefer": f"wait={wait}"} if wait else {}
    res = httpx.post(f"{api}/v1/generations", json=body, headers=headers, timeout=wait + 10 if wait else 10)
    assert res.status_code in (201, 202), res.text
    return dict(res.json())


def wait_final(r: redis.Redis, gen_id: str, timeout: float = 90) -> str:
    """Reads the record's status straight from Redis (a short-TTL API may already answer 404)."""

    def final() -> str | None:
        raw = r.hget(keys.generation(gen_id), "status")
        status = raw.decode() if isinstance(raw, bytes) else str(raw or "")
        return status if status in ("succeeded", "failed", "canceled") else None

    return str(wait_for(final, timeout, f"{gen_id} final"))


def test_generate_stores_in_s3_and_api_mode_streams_the_image(s3svc: S3Service) -> None:
    gen = create(s3svc.api, {"prompt": "a lighthouse", "seed": 3, "num_images_per_prompt": 2, **SMALL})
    assert gen["status"] == "succeeded", gen
    for img in gen["images"]:
        i = img["index"]
        assert img["url"] == f"{PUBLIC_BASE}/v1/generations/{gen['id']}/images/{i}"  # the API's own URL
        key = f"generations/{gen['id']}/{i}.png"
        head = s3(s3svc.internal).head_object(Bucket=BUCKET, Key=key)
        assert head["ContentType"] == "image/png"
        assert head["Metadata"] == {"sha256": img["sha256"], "size": str(img["bytes"]), "generation-id": gen["id"]}
        res = httpx.get(f"{s3svc.api}/v1/generations/{gen['id']}/images/{i}", timeout=10)
        assert res.status_code == 200 and res.headers["content-type"] == "image/png"
        assert hashlib.sha256(res.content).hexdigest() == img["sha256"]


def test_presigned_mode_urls_and_307_redirect(s3svc: S3Service) -> None:
    gen = create(s3svc.api, {"prompt": "a red bicycle", **SMALL})
    assert gen["status"] == "succeeded", gen
    res = httpx.get(f"{s3svc.presigned_api}/v1/generations/{gen['id']}", timeout=10).json()
    url = res["images"][0]["url"]
    assert url.startswith(f"{s3svc.public.url}/{BUCKET}/generations/{gen['id']}/0.png?")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=3600" in url
    redirect = httpx.get(f"{s3svc.presigned_api}/v1/generations/{gen['id']}/images/0", timeout=10)
    assert redirect.status_code == 307
    location = redirect.headers["location"]
    assert location.startswith(f"{s3svc.public.url}/{BUCKET}/generations/{gen['id']}/0.png?")
    fetched = httpx.get(location, timeout=10)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert hashlib.sha256(fetched.content).hexdigest() == gen["images"][0]["sha256"]


def test_outage_mid_job_is_retried_and_the_job_succeeds(s3svc: S3Service) -> None:
    worker = s3svc.svc.workers[0]
    s3svc.internal.stop()
    try:
        gen = create(s3svc.api, {"prompt": "through the outage", **SMALL}, wait=None)
        # the worker has rendered the image and is backing off between failed uploads
        wait_for(
            lambda: f"storage put failed for generations/{gen['id']}/0.png" in worker.output(),
            60,
            "a failed upload in the worker log",
            interval=0.1,
        )
        assert s3svc.r.hget(keys.generation(gen["id"]), "status") == b"running"
    finally:
        s3svc.internal.start()  # same port, same state
    assert wait_final(s3svc.r, gen["id"]) == "succeeded"
    done = httpx.get(f"{s3svc.api}/v1/generations/{gen['id']}", timeout=10).json()
    res = httpx.get(f"{s3svc.api}/v1/generations/{gen['id']}/images/0", timeout=10)
    assert res.status_code == 200 and hashlib.sha256(res.content).hexdigest() == done["images"][0]["sha256"]


@pytest.mark.slow  # an outage that outlasts the worker's whole retry budget (RETRY_BUDGET seconds)
def test_storage_down_beyond_the_budget_fails_storage_unavailable(s3svc: S3Service) -> None:
    s3svc.internal.stop()
    try:
        gen = create(s3svc.api, {"prompt": "lost to the outage", **SMALL}, wait=None)
        assert wait_final(s3svc.r, gen["id"], timeout=RETRY_BUDGET + 60) == "failed"
    finally:
        s3svc.internal.start()
    done = httpx.get(f"{s3svc.api}/v1/generations/{gen['id']}", timeout=10).json()
    assert done["status"] == "failed" and done["images"] == []
    assert done["error"]["type"] == "storage_unavailable"
    assert httpx.get(f"{s3svc.api}/v1/generations/{gen['id']}/images/0", timeout=10).status_code == 404
    # the worker is fine afterwards
    assert create(s3svc.api, {"prompt": "after the outage", **SMALL})["status"] == "succeeded"


def test_delete_removes_record_and_objects_then_404(s3svc: S3Service) -> None:
    gen = create(s3svc.api, {"prompt": "to be deleted", "num_images_per_prompt": 2, **SMALL})
    prefix = f"generations/{gen['id']}/"
    assert len(keys_under(s3svc.internal, prefix)) == 2
    res = httpx.delete(f"{s3svc.api}/v1/generations/{gen['id']}", timeout=10)
    assert res.status_code == 204 and res.content == b""
    assert keys_under(s3svc.internal, prefix) == []
    assert not s3svc.r.exists(keys.generation(gen["id"]), keys.events(gen["id"]))
    assert s3svc.r.zscore(keys.EXPIRY, gen["id"]) is None
    for method, path in (("GET", ""), ("GET", "/images/0"), ("DELETE", "")):
        again = httpx.request(method, f"{s3svc.api}/v1/generations/{gen['id']}{path}", timeout=10)
        assert again.status_code == 404 and again.headers["content-type"] == "application/problem+json"


def test_cleanup_once_removes_an_expired_generation_and_its_objects(s3svc: S3Service) -> None:
    keep = create(s3svc.api, {"prompt": "long lived", **SMALL})
    gen = create(s3svc.short_ttl_api, {"prompt": "short lived", **SMALL}, wait=None)
    assert wait_final(s3svc.r, gen["id"]) == "succeeded"
    prefix = f"generations/{gen['id']}/"
    assert keys_under(s3svc.internal, prefix) == [f"{prefix}0.png"]
    wait_for(
        lambda: httpx.get(f"{s3svc.api}/v1/generations/{gen['id']}", timeout=10).status_code == 404,
        30,
        "the generation to expire",
        interval=0.2,
    )
    assert s3svc.r.exists(keys.generation(gen["id"]))  # expired for the API, kept for cleanup to attribute
    out = subprocess.run(
        [PY, "-m", "cleanup", "--once"],
        env=s3svc.svc.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    sweep = [json.loads(line) for line in out.stderr.splitlines() if '"cleanup sweep"' in line]
    assert sweep and sweep[0]["process"] == "cleanup" and sweep[0]["expired"] >= 1
    assert keys_under(s3svc.internal, prefix) == []
    assert not s3svc.r.exists(keys.generation(gen["id"]), keys.events(gen["id"]))
    assert s3svc.r.zscore(keys.EXPIRY, gen["id"]) is None
    assert s3svc.r.zscore(keys.owner_index("open"), gen["id"]) is None
    # one that has not expired is left alone
    assert keys_under(s3svc.internal, f"generations/{keep['id']}/") == [f"generations/{keep['id']}/0.png"]
    assert httpx.get(f"{s3svc.api}/v1/generations/{keep['id']}", timeout=10).status_code == 200


def test_cleanup_module_does_not_import_torch() -> None:
    code = "import sys, cleanup; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    assert subprocess.run([PY, "-c", code], cwd=ROOT, timeout=60).returncode == 0
