"""Webhook pieces on their own, against a real private Redis and real local HTTP(S) servers: the progress
throttle in emit(), retry arithmetic, the due-zset pump, settings, and pinned delivery over TLS (Host + SNI
sent for the name while the connection goes to the approved address, with no DNS lookup)."""

import base64
import datetime as dt
import ipaddress
import json
import os
import random
import socket
import ssl
import time
from collections.abc import Iterator
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError
from rq import Queue
from rq.serializers import JSONSerializer

from common.contract import keys
from common.contract.events import EventType, emit
from common.contract.records import encode
from dispatcher import delivery as webhooks
from tests.webhook_receiver import Receiver

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


class ListQueue:
    """Stands in for the rq queue in emit(): records what would be enqueued."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, dict[str, Any]]] = []

    def enqueue(self, func: str, payload: dict[str, Any], **_: Any) -> None:
        self.jobs.append((func, payload))


def make_record(r: redis.Redis, gen_id: str, events: list[str]) -> None:
    hook = {"url": "https://hooks.example.com/x", "events": events, "address": "93.184.215.14"}
    fields = {
        "id": gen_id,
        "owner": "open",
        "status": "running",
        "params": {},
        "images": [],
        "timings": {},
        "webhook": hook,
        "created_at": time.time(),
        "request_id": "req_1",
    }
    r.hset(keys.generation(gen_id), mapping=dict(encode(fields)))  # type: ignore[arg-type]


def url_of(gen_id: str, img: dict[str, Any]) -> str:
    return f"/v1/generations/{gen_id}/images/{img['index']}"


def test_progress_webhooks_are_throttled_across_calls_but_the_stream_keeps_every_event(
    redis_client: redis.Redis,
) -> None:
    make_record(redis_client, "gen_a", ["generation.progress", "generation.succeeded"])
    q = ListQueue()
    for _ in range(5):
        emit(redis_client, "gen_a", EventType.progress, url_of, 60, q, progress_interval=30)
    emit(redis_client, "gen_a", EventType.succeeded, url_of, 60, q, progress_interval=30)
    assert [p["type"] for _, p in q.jobs] == ["generation.progress", "generation.succeeded"]
    assert redis_client.xlen(keys.events("gen_a")) == 6
    func, payload = q.jobs[0]
    assert func == "dispatcher.delivery.deliver" and payload["address"] == "93.184.215.14" and payload["attempt"] == 1
    assert payload["request_id"] == "req_1" and payload["data"]["id"] == "gen_a"
    # the gate is a Redis key with a TTL, so it reopens after the interval, for any process
    make_record(redis_client, "gen_b", ["generation.progress"])
    emit(redis_client, "gen_b", EventType.progress, url_of, 60, q, progress_interval=0.2)
    emit(redis_client, "gen_b", EventType.progress, url_of, 60, q, progress_interval=0.2)
    time.sleep(0.3)
    emit(redis_client, "gen_b", EventType.progress, url_of, 60, q, progress_interval=0.2)
    assert sum(1 for _, p in q.jobs if p["generation_id"] == "gen_b") == 2


def test_unsubscribed_events_enqueue_nothing(redis_client: redis.Redis) -> None:
    make_record(redis_client, "gen_c", ["generation.succeeded"])
    q = ListQueue()
    emit(redis_client, "gen_c", EventType.started, url_of, 60, q)
    emit(redis_client, "gen_c", EventType.progress, url_of, 60, q)
    assert q.jobs == []


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    now = time.time()
    assert webhooks.retry_after_seconds("7", now) == 7
    when = format_datetime(dt.datetime.fromtimestamp(now + 120, dt.UTC), usegmt=True)
    assert 118 <= (webhooks.retry_after_seconds(when, now) or 0) <= 121
    assert webhooks.retry_after_seconds("soon", now) is None and webhooks.retry_after_seconds(None, now) is None


def test_next_delay_follows_the_schedule_with_jitter_and_honours_retry_after() -> None:
    rng = random.Random(1)
    schedule = [5.0, 300.0]
    for _ in range(50):
        assert 4.5 <= (webhooks.next_delay(schedule, 1, 0.1, None, 3600, rng) or 0) <= 5.5
    assert 270 <= (webhooks.next_delay(schedule, 2, 0.1, None, 3600, rng) or 0) <= 330
    assert webhooks.next_delay(schedule, 3, 0.1, None, 3600, rng) is None  # spent
    assert webhooks.next_delay(schedule, 1, 0.1, 60, 3600, rng) == 60  # the receiver asked for more
    assert webhooks.next_delay(schedule, 1, 0.1, 10**9, 3600, rng) == 3600  # ... up to the cap


def test_the_pump_moves_due_retries_once_and_a_lost_claim_comes_back(redis_client: redis.Redis) -> None:
    pump = webhooks.DuePump(redis_client, interval=1, lease_seconds=0.3)
    now = time.time()
    items = {json.dumps({"event_id": f"e{i}", "attempt": 2}): now - 1 for i in range(2)}
    items[json.dumps({"event_id": "later", "attempt": 2})] = now + 3600
    redis_client.zadd(keys.WEBHOOK_DUE, items)
    assert pump.pump_once(now) == 2
    assert pump.pump_once(now) == 0  # nothing is moved twice
    q = Queue(keys.WEBHOOK_QUEUE, connection=redis_client, serializer=JSONSerializer)
    assert sorted(j.args[0]["event_id"] for j in q.jobs) == ["e0", "e1"]
    left: Any = redis_client.zrange(keys.WEBHOOK_DUE, 0, -1)
    assert [m.decode() for m in left] == ['{"event_id": "later", "attempt": 2}']
    # a dispatcher that dies after claiming: the entry is leased, not lost
    redis_client.zadd(keys.WEBHOOK_DUE, {"crashed": now - 1})
    assert pump._claim(keys=[keys.WEBHOOK_DUE], args=[now, now + 0.3, 10]) == [b"crashed"]
    assert pump.pump_once(now + 0.1) == 0
    assert redis_client.zscore(keys.WEBHOOK_DUE, "crashed") == pytest.approx(now + 0.3)


def test_settings_refuse_bad_secrets_and_schedules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_WEBHOOK_SECRETS", f"{SECRET}, {SECRET}")
    monkeypatch.setenv("SDXL_WEBHOOK_RETRY_SCHEDULE", "0.5, 1,2")
    s = webhooks.DispatcherSettings()
    assert s.webhook_secrets == [SECRET, SECRET] and s.webhook_retry_schedule == [0.5, 1.0, 2.0]
    monkeypatch.setenv("SDXL_WEBHOOK_RETRY_SCHEDULE", "[1, 5]")
    assert webhooks.DispatcherSettings().webhook_retry_schedule == [1.0, 5.0]
    for name, bad in (
        ("SDXL_WEBHOOK_SECRETS", "hunter2"),
        ("SDXL_WEBHOOK_SECRETS", "whsec_"),
        ("SDXL_WEBHOOK_RETRY_SCHEDULE", "5,-1"),
        ("SDXL_WEBHOOK_TIMEOUT_SECONDS", "120"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(ValidationError):
                webhooks.DispatcherSettings()


# --- pinned delivery over TLS -----------------------------------------------------------------------
def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, Path, list[str | None]]]:
    cert, key = self_signed(tmp_path, "hooks.test")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    ctx.sni_callback = lambda sock, name, c: sni.append(name)  # type: ignore[assignment,misc,return-value]
    rcv = Receiver([SECRET], tls=ctx)
    rcv.start()
    yield rcv, cert, sni
    rcv.stop()


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def numeric_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host)  # raises for a name
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", numeric_only)


def deliverer(r: redis.Redis, allow: str, cert: Path | None = None) -> webhooks.Deliverer:
    s = webhooks.DispatcherSettings(
        webhook_secrets=[SECRET], webhook_allow_addresses=allow, webhook_retry_schedule=[60], webhook_timeout_seconds=5
    )
    client = None
    if cert is not None:
        client = httpx.Client(
            verify=ssl.create_default_context(cafile=str(cert)), follow_redirects=False, trust_env=False, timeout=5
        )
    return webhooks.Deliverer(r, s, client=client)


def payload(url: str, address: str, event_type: str = "generation.succeeded") -> dict[str, Any]:
    return {
        "generation_id": "gen_t",
        "event_id": "evt_gen_t_1-0",
        "type": event_type,
        "timestamp": time.time(),
        "data": {"id": "gen_t", "status": "succeeded"},
        "url": url,
        "address": address,
        "attempt": 1,
        "request_id": "req_9",
    }


def test_delivery_connects_to_the_pinned_address_with_the_names_host_and_sni(
    redis_client: redis.Redis, tls_receiver: tuple[Receiver, Path, list[str | None]], no_dns: None
) -> None:
    rcv, cert, sni = tls_receiver
    make_record(redis_client, "gen_t", ["generation.succeeded"])
    redis_client.expire(keys.generation("gen_t"), 600)
    d = deliverer(redis_client, f"127.0.0.1:{rcv.port}", cert)
    url = f"https://hooks.test:{rcv.port}/ok/tls?x=1#frag"  # the name resolves nowhere: only the pin connects
    entry = d.deliver(payload(url, "127.0.0.1"))
    assert entry["outcome"] == "delivered" and entry["status_code"] == 204, entry
    (got,) = rcv.to("/ok/tls?x=1")
    assert got.headers["host"] == f"hooks.test:{rcv.port}" and sni == ["hooks.test"]
    assert got.verified == [True] and got.headers["x-request-id"] == "req_9"
    assert got.json == {
        "type": "generation.succeeded",
        "timestamp": got.json["timestamp"],
        "data": {"id": "gen_t", "status": "succeeded"},
    }
    assert json.loads(redis_client.lindex(keys.webhook_log("gen_t"), -1) or b"{}")["outcome"] == "delivered"
    assert 0 < int(redis_client.ttl(keys.webhook_log("gen_t"))) <= 600  # the log lives as long as the generation
    # a deleted generation's events are still delivered, but leave no log that nobody could read
    redis_client.delete(keys.generation("gen_t"), keys.webhook_log("gen_t"))
    assert d.deliver(payload(url, "127.0.0.1"))["outcome"] == "delivered"
    assert len(rcv.to("/ok/tls?x=1")) == 2 and not redis_client.exists(keys.webhook_log("gen_t"))


def test_a_certificate_for_another_name_is_refused(
    redis_client: redis.Redis, tls_receiver: tuple[Receiver, Path, list[str | None]], no_dns: None
) -> None:
    rcv, cert, _ = tls_receiver
    d = deliverer(redis_client, f"127.0.0.1:{rcv.port}", cert)
    entry = d.deliver(payload(f"https://other.test:{rcv.port}/ok/x", "127.0.0.1"))
    assert entry["outcome"] == "retrying" and entry["status_code"] is None and "SSL" in entry["error"].upper()
    assert rcv.deliveries == []


def test_delivery_rechecks_the_pinned_address_against_the_current_policy(redis_client: redis.Redis) -> None:
    rcv = Receiver([SECRET])
    rcv.start()
    try:
        d = deliverer(redis_client, allow="")  # this dispatcher does not allow loopback
        entry = d.deliver(payload(f"https://127.0.0.1:{rcv.port}/ok/x", "127.0.0.1"))
        assert entry["outcome"] == "refused" and "loopback" in entry["error"]
        entry = d.deliver(payload(f"https://hooks.example.com:{rcv.port}/ok/x", ""))
        assert entry["outcome"] == "refused"
        assert rcv.deliveries == [] and redis_client.zcard(keys.WEBHOOK_DUE) == 0
    finally:
        rcv.stop()
