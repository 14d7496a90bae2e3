"""Property-based fuzzing of the live API from the committed spec (schemathesis 4, every check it has).

Schemathesis derives requests from openapi/openapi.json (examples, boundary values, random valid and invalid
data, and chains that follow the spec's links: create -> get/cancel/delete/events) and checks each answer: no
5xx, a declared status code, a declared content type, declared headers, a body matching its schema, invalid
input refused, valid input accepted, auth enforced, a deleted generation gone, a created one readable.

The service is real (uvicorn + one worker + Redis) with limits that keep every job tiny (128 px, 2 steps, one
image) and long-polls short, and a per-key cap on unfinished generations so the queue (and so any event
stream) stays short. Webhook host names are never resolved (tests/fuzz_app.py).
"""

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.access import Key, keys_env
from tests.procs import PY, ROOT, Proc, Service, free_port, wait_for

# fixed, so a failure reproduces; FUZZ_SEED / FUZZ_EXAMPLES explore further by hand
SEED = int(os.environ.get("FUZZ_SEED", "20240601"))
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))  # per operation and phase: about a minute on two cores

# Per-operation exceptions to `positive_data_acceptance` (schema-valid requests must not get 4xx). Each is a
# refusal the static schema cannot express, so the spec documents it in words instead:
CONFIG = """
[phases.stateful]
max-steps = 20

[[operations]]
# webhook URL policy (no name resolves here) and long_prompt=reject's token count are decided by the server
include-operation-id = "create_generation"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "422", "429"]

[[operations]]
# `cursor` is an opaque token only this API mints; any other string is refused by name
include-operation-id = "list_generations"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "422", "429"]

[[operations]]
# `Last-Event-ID` must be an id of the generation's own event stream
include-operation-id = "stream_generation_events"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "422", "429"]

[[operations]]
# a schema-valid file is any bytes: only decoding tells an image (422 otherwise); an upload id names an image by
# this key (404 otherwise)
include-operation-id = "create_image_upload"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422", "429"]

[[operations]]
include-operation-id = "get_image_upload"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "429"]

[[operations]]
include-operation-id = "delete_image_upload"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "404", "409", "429"]

[[operations]]
# OpenAI's shape: 400 for an invalid field (`size` strings, image bytes), 424 when the wait runs out
include-operation-id = "create_openai_image"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "424", "429"]

[[operations]]
include-operation-id = "create_openai_image_edit"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "424", "429"]

[[operations]]
# `from` and `to` must lie within the retention window ending today (UTC), which moves: no static bound says so
include-operation-id = "get_usage"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "422", "429"]

[[operations]]
# the signature is the capability: a made-up one is refused (403), as is an expired one
include-operation-id = "get_signed_image"
checks.positive_data_acceptance.expected-statuses = ["2xx", "403", "404"]
"""

LIMITS = {
    "SDXL_MAX_STEPS": "2",
    "SDXL_MAX_WIDTH": "128",
    "SDXL_MAX_HEIGHT": "128",
    "SDXL_MAX_IMAGES_PER_PROMPT": "1",
    "SDXL_MAX_WAIT_SECONDS": "2",  # Prefer: wait=N long-polls answer within 2 s
    "SDXL_DEFAULT_MAX_QUEUED": "8",  # unfinished generations per key: beyond, 429 (keeps event streams short)
}


@pytest.fixture(scope="module")
def key() -> Key:
    return Key("fuzz")


@pytest.fixture(scope="module")
def fuzz_service(shared_stack: Service, key: Key) -> Iterator[Service]:
    """tests/fuzz_app.py's API with LIMITS and the fuzz key, on the shared stack's Redis and worker (the limits
    are the API's: it refuses anything bigger, so the worker only ever gets tiny jobs)."""
    svc = shared_stack.view(**LIMITS, SDXL_API_KEYS=keys_env(key))
    try:
        port = free_port()
        api = Proc(
            [
                PY,
                "-m",
                "uvicorn",
                "tests.fuzz_app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "5",
            ],
            svc.env(),
            svc.data_dir / f"fuzz-api-{port}.log",
        )
        svc.apis.append(api)
        svc.port = port
        import httpx

        wait_for(lambda: httpx.get(f"{svc.url}/healthz", timeout=1).status_code == 200, 30, "fuzz API")
        yield svc
    finally:
        svc.stop()


def test_schemathesis_finds_nothing(fuzz_service: Service, key: Key, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [
        str(Path(PY).parent / "schemathesis"),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        str(ROOT / "openapi" / "openapi.json"),
        "--url",
        fuzz_service.url,
        "--header",
        f"Authorization: Bearer {key.secret}",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--max-failures",
        "20",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_TELEMETRY": "false",
        "COLUMNS": "160",
        "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
        "PYTHONPATH": str(ROOT),
    }
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    out = res.stdout + res.stderr
    print(out[-4000:])  # the run's summary (pytest -s or -rA shows it)
    api_log = fuzz_service.apis[0].output()
    assert "Traceback" not in api_log, api_log[-5000:]  # an unexpected error the checks did not see
    assert res.returncode == 0, out[-15000:]
