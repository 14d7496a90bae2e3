"""API keys end to end: 401s, per-key isolation (404 for other keys' generations), keys file + CLI, open mode,
and the refusal to serve without keys on a non-loopback address."""

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.auth import ConfigError, KeyRing
from app.main import create_app
from app.settings import Settings
from tests.access import BLOCKER, TINY, Key, cancel, get, keys_env, post, service_with, wait_status
from tests.procs import ROOT, Proc, Service, free_port, wait_for

ALICE = Key("alice")
BOB = Key("bob")


@pytest.fixture(scope="module")
def svc(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with service_with(tiny_model, tmp_path_factory.mktemp("auth"), 1, {"SDXL_API_KEYS": keys_env(ALICE, BOB)}) as s:
        yield s


def assert_401(r: httpx.Response, error: str | None) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    if error:
        assert f'error="{error}"' in challenge
    else:
        assert "error=" not in challenge
    assert r.json()["status"] == 401


def test_missing_key_is_401_with_bearer_challenge(svc: Service) -> None:
    assert_401(httpx.get(f"{svc.url}/v1/generations"), None)
    assert_401(httpx.post(f"{svc.url}/v1/generations", json={"prompt": "x", **TINY}), None)
    assert_401(httpx.get(f"{svc.url}/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA"), None)
    assert_401(httpx.post(f"{svc.url}/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA/cancel"), None)


def test_wrong_key_or_scheme_is_401(svc: Service) -> None:
    assert_401(httpx.get(f"{svc.url}/v1/generations", headers={"Authorization": "Bearer sdxl_wrong"}), "invalid_token")
    # the sha256 itself is not a key: only its preimage is
    stolen = {"Authorization": f"Bearer {ALICE.entry['sha256']}"}
    assert_401(httpx.get(f"{svc.url}/v1/generations", headers=stolen), "invalid_token")
    basic = {"Authorization": f"Basic {ALICE.secret}"}
    assert_401(httpx.get(f"{svc.url}/v1/generations", headers=basic), "invalid_request")


def test_health_and_playground_need_no_key(svc: Service) -> None:
    assert httpx.get(f"{svc.url}/healthz").status_code == 200
    assert httpx.get(f"{svc.url}/readyz").status_code == 200
    assert httpx.get(f"{svc.url}/").status_code != 401  # the playground page (if mounted) is public


def test_a_generation_is_invisible_to_other_keys(svc: Service) -> None:
    r = post(svc.url, {"prompt": "alice's lighthouse", **TINY}, ALICE, Prefer="wait=60")
    assert r.status_code == 201, r.text
    gen = r.json()
    gid = gen["id"]
    assert gen["status"] == "succeeded"
    path = f"/v1/generations/{gid}"
    assert get(svc.url, path, ALICE).status_code == 200
    assert get(svc.url, f"{path}/images/0", ALICE).status_code == 200

    missing = get(svc.url, "/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA", BOB)
    for r in (get(svc.url, path, BOB), get(svc.url, f"{path}/images/0", BOB), cancel(svc.url, gid, BOB)):
        assert r.status_code == 404, r.text
        # the same answer as for an id that never existed: nothing tells bob that alice's exists
        assert r.json()["type"] == missing.json()["type"]
    assert gid in [g["id"] for g in get(svc.url, "/v1/generations", ALICE).json()["data"]]
    assert gid not in [g["id"] for g in get(svc.url, "/v1/generations", BOB).json()["data"]]


def test_another_key_cannot_cancel_running_work(svc: Service) -> None:
    gid = post(svc.url, BLOCKER, ALICE).json()["id"]
    wait_status(svc.url, gid, ALICE, {"running"})
    assert cancel(svc.url, gid, BOB).status_code == 404
    assert get(svc.url, f"/v1/generations/{gid}", ALICE).json()["status"] == "running"
    assert cancel(svc.url, gid, ALICE).status_code == 202
    assert wait_status(svc.url, gid, ALICE, {"canceled", "succeeded", "failed"})["status"] == "canceled"


def test_keys_created_by_the_cli_work_from_a_keys_file(svc: Service, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    out = subprocess.run(
        [sys.executable, "-m", "cli.apikeys", "create", "carol", "--burst", "7", "--file", str(keys_file), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    created = json.loads(out.stdout)
    assert created["entry"]["name"] == "carol" and created["entry"]["burst"] == 7
    assert created["key"] not in keys_file.read_text()  # only the hash is stored
    hashed = subprocess.run(
        [sys.executable, "-m", "cli.apikeys", "hash", created["key"]], cwd=ROOT, capture_output=True, text=True,
        check=True)
    assert hashed.stdout.strip() == created["entry"]["sha256"]

    url = svc.start_api(SDXL_API_KEYS="", SDXL_API_KEYS_FILE=str(keys_file))
    carol = {"Authorization": f"Bearer {created['key']}"}
    r = httpx.get(f"{url}/v1/generations", headers=carol)
    assert r.status_code == 200 and r.headers["ratelimit-limit"] == "7"
    assert_401(httpx.get(f"{url}/v1/generations", headers=ALICE.headers), "invalid_token")  # not in the file


def test_open_mode_on_loopback_needs_no_key_and_sees_no_keyed_work(svc: Service) -> None:
    alice_gen = post(svc.url, {"prompt": "alice again", **TINY}, ALICE).json()["id"]
    url = svc.start_api(SDXL_API_KEYS="")
    r = httpx.post(f"{url}/v1/generations", json={"prompt": "open", **TINY}, timeout=30)
    assert r.status_code == 202, r.text
    listed = [g["id"] for g in httpx.get(f"{url}/v1/generations").json()["data"]]
    assert r.json()["id"] in listed and alice_gen not in listed
    assert httpx.get(f"{url}/v1/generations/{alice_gen}").status_code == 404


def test_open_mode_is_refused_on_a_non_loopback_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for host in ("0.0.0.0", "10.0.0.5", "api.internal", "::"):
        with pytest.raises(ConfigError, match="SDXL_ALLOW_OPEN"):
            create_app(Settings(host=host, api_keys=None))
    create_app(Settings(host="0.0.0.0", api_keys=None, allow_open=True))  # on purpose
    for name in ("SDXL_ALLOW_OPEN", "SDXL_ALLOW_OPEN_NON_LOOPBACK"):  # the second is docker-compose's name
        with monkeypatch.context() as m:
            m.setenv(name, "true")
            create_app(Settings(host="0.0.0.0", api_keys=None))
    create_app(Settings(host="0.0.0.0", api_keys=keys_env(ALICE)))  # keys required: fine
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        create_app(Settings(host=host, api_keys=None))


def test_open_non_loopback_api_process_exits_with_the_reason(tmp_path: Path, tiny_model: Path) -> None:
    from tests.procs import base_env

    port = free_port()
    env = base_env("redis://127.0.0.1:1/0", tiny_model, tmp_path, SDXL_HOST="0.0.0.0", SDXL_PORT=str(port))
    api = Proc([sys.executable, "-m", "app"], env, tmp_path / "api.log")
    try:
        wait_for(lambda: api.proc.poll() is not None, 30, "the API to refuse to start")
        assert api.proc.returncode != 0
        assert "refusing to start" in api.output() and "SDXL_HOST='0.0.0.0'" in api.output()
    finally:
        api.stop()


def test_broken_key_config_is_refused_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SDXL_API_KEYS is not valid JSON"):
        KeyRing.from_settings(Settings(api_keys="alice:secret"))
    with pytest.raises(ConfigError, match=r"SDXL_API_KEYS\[0\]\.sha256"):
        KeyRing.from_settings(Settings(api_keys=json.dumps([{"name": "a", "sha256": "abc"}])))
    dup = json.dumps([ALICE.entry, {**BOB.entry, "name": "alice"}])
    with pytest.raises(ConfigError, match="configured twice"):
        KeyRing.from_settings(Settings(api_keys=dup))
    with pytest.raises(ConfigError, match="cannot be read"):
        KeyRing.from_settings(Settings(api_keys_file=tmp_path / "absent.json"))
    ring = KeyRing.from_settings(Settings(api_keys=keys_env(ALICE, BOB), default_burst=5))
    found = ring.lookup(BOB.secret)
    assert found is not None and found.owner == "key:bob" and found.limits.burst == 5
    assert ring.lookup(BOB.secret + "x") is None
