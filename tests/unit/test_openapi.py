"""The published contract: openapi/openapi.json is what the app serves, it lints clean, and it keeps its rules.

No service is started: the document is built in-process from create_app() (which connects to nothing).
"""

import copy
import difflib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT

SPEC_PATH = ROOT / "openapi" / "openapi.json"
NODE_DIR = ROOT / "tools" / "node"
REDOCLY = NODE_DIR / "node_modules" / ".bin" / "redocly"
PROBLEM_JSON = "application/problem+json"
METHODS = ("get", "put", "post", "delete", "patch")


def _export_module() -> Any:
    spec = importlib.util.spec_from_file_location("export_openapi", ROOT / "scripts" / "export_openapi.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated() -> str:
    return str(_export_module().render())


@pytest.fixture(scope="module")
def doc(generated: str) -> dict[str, Any]:
    return dict(json.loads(generated))


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, m, op) for path, item in doc["paths"].items() for m, op in item.items() if m in METHODS]


def resolve(doc: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in obj:
        node: Any = doc
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def test_committed_spec_matches_the_app(generated: str) -> None:
    committed = SPEC_PATH.read_text() if SPEC_PATH.exists() else ""
    if committed != generated:
        diff = list(difflib.unified_diff(committed.splitlines(), generated.splitlines(), "committed", "app", n=1))
        shown = "\n".join(diff[:40]) + (f"\n... {len(diff) - 40} more diff lines" if len(diff) > 40 else "")
        pytest.fail(f"openapi/openapi.json differs from what the app generates: run `make openapi`\n{shown}")


def test_export_is_deterministic_and_env_independent(generated: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # settings that change the running service must not change the published contract (nor stop the export)
    monkeypatch.setenv("SDXL_API_KEYS", '[{"name": "a", "sha256": "' + "0" * 64 + '"}]')
    monkeypatch.setenv("SDXL_HOST", "0.0.0.0")
    monkeypatch.setenv("SDXL_MAX_WIDTH", "128")
    assert _export_module().render() == generated
    assert generated.endswith("}\n") and json.dumps(json.loads(generated), indent=2, sort_keys=True) + "\n" == generated


def test_operation_ids_are_stable_snake_case(doc: dict[str, Any]) -> None:
    ids = [op.get("operationId") for _p, _m, op in operations(doc)]
    assert all(i and re.fullmatch(r"[a-z][a-z0-9_]*", i) for i in ids), ids
    assert len(ids) == len(set(ids))
    expected = {
        "create_generation",
        "get_generation",
        "cancel_generation",
        "get_generation_image",
        "healthz",
        "readyz",
        "list_generations",
        "delete_generation",
        "stream_generation_events",
    }
    assert expected <= set(ids)


OPENAI_PREFIX = "/v1/images/"


def test_every_error_is_problem_json(doc: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "ValidationError" not in doc["components"]["schemas"]
    for path, method, op in operations(doc):
        errors = {c: resolve(doc, r) for c, r in op["responses"].items() if c.isdigit() and int(c) >= 400}
        assert "500" in errors, (method, path)
        if path.startswith(OPENAI_PREFIX):  # the one exception: OpenAI's error body and its 400 for bad input
            assert "400" in errors and "422" not in errors, (method, path)
            for code, resp in errors.items():
                media = resp["content"]["application/json"]
                assert media["schema"] == {"$ref": "#/components/schemas/OpenAIError"}, (method, path, code)
                # `param` is null where no field is at fault, and FastAPI leaves null out of examples
                assert {"message", "type", "code"} <= set(media["example"]["error"]), (method, path, code)
                assert "X-Request-ID" in resp["headers"], (method, path, code)
            continue
        if op.get("parameters") or op.get("requestBody"):
            assert "422" in errors, (method, path)
        for code, resp in errors.items():
            assert list(resp["content"]) == [PROBLEM_JSON], (method, path, code)
            media = resp["content"][PROBLEM_JSON]
            assert media["schema"] == {"$ref": "#/components/schemas/ProblemDetails"}, (method, path, code)
            assert media["example"]["status"] == int(code)
            assert media["example"]["type"].startswith("urn:sdxl:problem:")
            assert "X-Request-ID" in resp["headers"], (method, path, code)
            if code in ("429", "503"):
                assert "Retry-After" in resp["headers"], (method, path, code)


def test_security_follows_the_routes(doc: dict[str, Any]) -> None:
    scheme = doc["components"]["securitySchemes"]["apiKey"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
    assert "security" not in doc  # each operation states its own: FastAPI derives it from the HTTPBearer dependency
    for path, method, op in operations(doc):
        # probes, and signed image URLs (the signature is the capability: OpenAI clients fetch them keyless)
        public = path in ("/healthz", "/readyz", "/v1/signed-images/{gen_id}/{index}")
        assert op["security"] == ([] if public else [{"apiKey": []}]), (method, path)
        if not public:
            assert {"401", "429", "503"} <= set(op["responses"]), (method, path)
            assert "WWW-Authenticate" in resolve(doc, op["responses"]["401"])["headers"]
        if method == "post":
            assert {"413", "415"} <= set(op["responses"]), (method, path)


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in a.keys() | b.keys() for d in _differences(a.get(k), b.get(k), f"{where}/{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


def test_the_document_is_declared_not_patched() -> None:
    """What app/openapi.py adds to FastAPI's own document stays limited to what FastAPI cannot declare."""
    from fastapi import FastAPI

    from app.main import create_app
    from app.openapi import REQUEST_SCHEMAS
    from app.settings import Settings

    app = create_app(Settings.model_construct())
    declared = copy.deepcopy(FastAPI.openapi(app))
    added = _differences(declared, app.openapi())
    # the request schemas of the routes that read JSON or multipart themselves (app/image_inputs.py)
    requests = "|".join(sorted(REQUEST_SCHEMAS))
    allowed = re.compile(rf"^/components/schemas/(ProblemDetails|FieldError|{requests})$"
                         r"|^/paths/.+/parameters/\d+/(name|example)$")
    assert added and all(allowed.match(d) for d in added), [d for d in added if not allowed.match(d)]


def test_headers_are_documented(doc: dict[str, Any]) -> None:
    create = doc["paths"]["/v1/generations"]["post"]
    header_params = {p["name"] for p in create["parameters"] if p["in"] == "header"}
    assert {"Prefer", "Idempotency-Key"} <= header_params
    events = doc["paths"]["/v1/generations/{gen_id}/events"]["get"]
    assert "Last-Event-ID" in {p["name"] for p in events["parameters"] if p["in"] == "header"}
    for code in ("200", "201", "202"):
        headers = create["responses"][code]["headers"]
        assert {"Location", "X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(headers)
    for _p, _m, op in operations(doc):
        for resp in op["responses"].values():
            assert "X-Request-ID" in resolve(doc, resp).get("headers", {})


def test_schemas_describe_themselves(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for name in ("GenerationCreate", "Generation", "ProblemDetails", "Image", "Progress"):
        assert schemas[name].get("description"), name
    assert schemas["GenerationCreate"]["examples"]
    for _p, _m, op in operations(doc):
        assert op.get("summary"), op["operationId"]


def _redocly() -> Path:
    if not REDOCLY.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot install Redocly CLI (tools/node) to lint the spec")
        subprocess.run([str(ROOT / "scripts" / "ensure_node_tools.sh")], check=True, timeout=300)
    return REDOCLY


def test_redocly_lint_is_clean() -> None:
    """Redocly CLI's recommended-strict rules (redocly.yaml): no errors, no warnings."""
    redocly = _redocly()
    env = {**os.environ, "REDOCLY_TELEMETRY": "off", "NO_COLOR": "1", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"}
    res = subprocess.run(
        [
            "npx",
            "--prefix",
            str(NODE_DIR),
            "--no-install",
            "redocly",
            "lint",
            "openapi/openapi.json",
            "--config",
            "redocly.yaml",
            "--format",
            "stylish",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert redocly.exists()
    assert res.returncode == 0, f"redocly lint failed:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
