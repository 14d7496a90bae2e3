"""API keys: 401s, per-key isolation (404 for other keys' generations), keys file + CLI, open mode, and the
refusal to build an app without keys on a non-loopback address. In-process apps (tests/api/conftest.py); what
needs a worker or the API process itself is in tests/test_auth.py."""

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from app.auth import ConfigError, KeyRing
from app.main import create_app
from app.settings import Settings
from tests.client import TINY, Key, cancel, create, get, keys_env
from tests.procs import ROOT

ALICE = Key("alice")
BOB = Key("bob")


@pytest.fixture
def api(make_api: Callable[..., httpx.Client]) -> httpx.Client:
    return make_api(api_keys=keys_env(ALICE, BOB))


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


def test_missing_key_is_401_with_bearer_challenge(api: httpx.Client) -> None:
    assert_401(api.get("/v1/generations"), None)
    assert_401(api.post("/v1/generations", json={"prompt": "x", **TINY}), None)
    assert_401(api.get("/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA"), None)
    assert_401(api.post("/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA/cancel"), None)


def test_wrong_key_or_scheme_is_401(api: httpx.Client) -> None:
    assert_401(api.get("/v1/generations", headers={"Authorization": "Bearer sdxl_wrong"}), "invalid_token")
    # the sha256 itself is not a key: only its preimage is
    stolen = {"Authorization": f"Bearer {ALICE.entry['sha256']}"}
    assert_401(api.get("/v1/generations", headers=stolen), "invalid_token")
    basic = {"Authorization": f"Basic {ALICE.secret}"}
    assert_401(api.get("/v1/generations", headers=basic), "invalid_request")


def test_health_and_playground_need_no_key(api: httpx.Client) -> None:
    assert api.get("/healthz").status_code == 200
    assert api.get("/readyz").status_code == 200
    assert api.get("/").status_code != 401  # the playground page (if mounted) is public


def test_a_generation_is_invisible_to_other_keys(api: httpx.Client, succeed: Callable[[str], None]) -> None:
    r = create(api, {"prompt": "alice's lighthouse", **TINY}, ALICE)
    assert r.status_code == 202, r.text
    gid = r.json()["id"]
    succeed(gid)  # no worker here: the record and image it would leave
    path = f"/v1/generations/{gid}"
    gen = get(api, path, ALICE)
    assert gen.status_code == 200 and gen.json()["status"] == "succeeded"
    assert get(api, f"{path}/images/0", ALICE).status_code == 200

    missing = get(api, "/v1/generations/gen_AAAAAAAAAAAAAAAAAAAAAA", BOB)
    for r in (get(api, path, BOB), get(api, f"{path}/images/0", BOB), cancel(api, gid, BOB)):
        assert r.status_code == 404, r.text
        # the same answer as for an id that never existed: nothing tells bob that alice's exists
        assert r.json()["type"] == missing.json()["type"]
    assert gid in [g["id"] for g in get(api, "/v1/generations", ALICE).json()["data"]]
    assert gid not in [g["id"] for g in get(api, "/v1/generations", BOB).json()["data"]]


def test_keys_created_by_the_cli_work_from_a_keys_file(make_api: Callable[..., httpx.Client], tmp_path: Path) -> None:
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

    from_file = make_api(api_keys="", api_keys_file=keys_file)
    carol = {"Authorization": f"Bearer {created['key']}"}
    r = from_file.get("/v1/generations", headers=carol)
    assert r.status_code == 200 and r.headers["ratelimit-limit"] == "7"
    assert_401(from_file.get("/v1/generations", headers=ALICE.headers), "invalid_token")  # not in the file


def test_open_mode_on_loopback_needs_no_key_and_sees_no_keyed_work(
        api: httpx.Client, make_api: Callable[..., httpx.Client]) -> None:
    alice_gen = create(api, {"prompt": "alice again", **TINY}, ALICE).json()["id"]
    open_api = make_api(api_keys="")  # another replica on the same Redis, without keys
    r = open_api.post("/v1/generations", json={"prompt": "open", **TINY}, timeout=30)
    assert r.status_code == 202, r.text
    listed = [g["id"] for g in open_api.get("/v1/generations").json()["data"]]
    assert r.json()["id"] in listed and alice_gen not in listed
    assert open_api.get(f"/v1/generations/{alice_gen}").status_code == 404


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
