"""Static checks of the deployment files: Dockerfile, docker-compose.yml, deploy/.

Nothing here needs Docker, a GPU or the network. The checks run the same linters a
reviewer would (hadolint, check-jsonschema with the vendored compose-spec schema) and
then assert, in Python, the properties the stack depends on: only the gateway (and
MinIO's S3 port) published, Redis append-only, one GPU per worker with a long stop
grace period, two or more API replicas, non-root images with health checks, no torch
in the API image.

Each linter is also run once on a deliberately broken input, so a linter that silently
passes everything fails the suite instead of hiding problems.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / "env.example"
TRAEFIK = ROOT / "deploy" / "traefik" / "traefik.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
MINIO_INIT = ROOT / "deploy" / "minio" / "init.sh"

# The only services allowed to publish host ports, and which container ports they may
# publish. MinIO's S3 port is published because presigned URLs point straight at it.
PUBLISHERS = {"gateway": {80, 9090, 9181}, "minio": {9000}}
# Gateway ports other than the public web entry point must stay on loopback.
GATEWAY_PUBLIC_PORT = 80

WORKER_GRACE_MIN_S = 60.0
TORCH_VERSION = "2.13.0"


# --------------------------------------------------------------------------- tools


def tool(name: str) -> str:
    """Path of a CLI tool: the running venv's bin dir first, then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (not in {candidate.parent} nor on PATH)")
    return found


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    # Drop HADOLINT_* so a developer's environment cannot silence rules.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, check=False, **kwargs)


# ---------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments dropped."""
    out: list[Instruction] = []
    buf: str | None = None
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        stripped = line.strip()
        if stripped.startswith("#") or (buf is None and not stripped):
            continue  # comments (incl. inside a continuation) and blank lines
        if buf is None:
            buf, start = "", number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.strip().partition(" ")
        out.append(Instruction(start, keyword.upper(), " ".join(args.split())))
        buf = None
    assert buf is None, "Dockerfile ends inside a line continuation"
    return out


def parse_stages(text: str) -> dict[str, Stage]:
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for ins in parse_dockerfile(text):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else base
            current = Stage(name=name, base=base)
            stages[name] = current
        elif current is not None:
            current.instructions.append(ins)
    return stages


def stage_chain(stages: Mapping[str, Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [stages[name]]
    while chain[-1].base in stages:
        chain.append(stages[chain[-1].base])
    return chain


def effective(stages: Mapping[str, Stage], name: str, keyword: str) -> Instruction | None:
    """The last `keyword` instruction in effect for a stage, inheritance included."""
    for stage in stage_chain(stages, name):
        found = [i for i in stage.instructions if i.keyword == keyword]
        if found:
            return found[-1]
    return None


def external_base(stages: Mapping[str, Stage], name: str) -> str:
    return stage_chain(stages, name)[-1].base


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def stages(dockerfile_text: str) -> dict[str, Stage]:
    return parse_stages(dockerfile_text)


def hadolint_findings(path: Path, tmp_path: Path, *extra: str) -> tuple[int, list[dict[str, Any]]]:
    # An explicit empty config, so a stray .hadolint.yaml cannot ignore rules, and the
    # strictest threshold, so even `style` findings count.
    config = tmp_path / "hadolint.yaml"
    config.write_text("ignored: []\n")
    proc = run(
        [
            tool("hadolint"),
            "--config",
            str(config),
            "--failure-threshold",
            "style",
            "--format",
            "json",
            "--no-color",
            *extra,
            str(path),
        ]
    )
    assert proc.stdout.strip(), f"hadolint printed nothing; stderr: {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout)


def test_hadolint_reports_no_findings(tmp_path: Path) -> None:
    rc, findings = hadolint_findings(DOCKERFILE, tmp_path)
    assert findings == [], json.dumps(findings, indent=2)
    assert rc == 0


def test_hadolint_ignores_are_each_justified_and_used(tmp_path: Path, dockerfile_text: str) -> None:
    """Every `# hadolint ignore=` has a reason above it and silences a real finding."""
    lines = dockerfile_text.splitlines()
    pragmas: dict[int, set[str]] = {}  # line of the instruction -> ignored codes
    for index, line in enumerate(lines):
        match = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)\s*$", line)
        if not match:
            continue
        above = lines[index - 1].strip() if index else ""
        assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (
            f"line {index + 1}: `# hadolint ignore` needs a comment line above it giving the reason"
        )
        following = next(
            n for n in range(index + 1, len(lines)) if lines[n].strip() and not lines[n].lstrip().startswith("#")
        )
        pragmas[following + 1] = set(match.group(1).split(","))

    _, unfiltered = hadolint_findings(DOCKERFILE, tmp_path, "--disable-ignore-pragma")
    silenced = {(f["line"], f["code"]) for f in unfiltered}
    declared = {(line, code) for line, codes in pragmas.items() for code in codes}
    assert silenced == declared, f"findings hidden by pragmas {sorted(silenced)} != pragmas declared {sorted(declared)}"


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN pip install requests\nRUN apt-get update && apt-get install -y curl\n")
    rc, findings = hadolint_findings(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3007", "DL3013", "DL3042", "DL3008", "DL3015"} <= codes, codes


def test_dockerfile_has_api_worker_and_dashboard_targets(stages: dict[str, Stage]) -> None:
    assert {"api", "worker", "dashboard"} <= stages.keys(), sorted(stages)
    assert stage_chain(stages, "dashboard")[-1] is stage_chain(stages, "api")[-1]


IMAGE_REF = re.compile(r"^(?P<repo>[a-z0-9./_-]+):(?P<tag>[A-Za-z0-9._-]+)(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")


def assert_pinned(image: str) -> re.Match[str]:
    match = IMAGE_REF.match(image)
    assert match, f"{image!r} is not pinned to an explicit tag"
    tag = match.group("tag")
    # A full release (3.11.14, v3.7.4, RELEASE.2025-09-07...), not a floating 3.11 / latest.
    assert re.search(r"\d+\.\d+\.\d+|\d{4}-\d{2}-\d{2}", tag), f"{image!r}: tag {tag!r} is not a specific release"
    return match


def test_dockerfile_base_images_are_pinned(stages: dict[str, Stage]) -> None:
    external = {s.base for s in stages.values() if s.base not in stages}
    assert external, "no external base image found"
    for image in external:
        assert_pinned(image)


def test_api_image_is_slim_python_without_torch_or_cuda(stages: dict[str, Stage]) -> None:
    base = external_base(stages, "api")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", base), base
    for target in ("api", "dashboard"):
        for stage in stage_chain(stages, target):
            for ins in stage.instructions:
                if ins.keyword in {"RUN", "ENV", "ARG", "COPY", "ADD"}:
                    assert not re.search(r"torch|cuda|nvidia|diffusers", ins.args, re.I), (
                        f"stage {stage.name}, line {ins.line}: {ins.keyword} {ins.args}"
                    )
                # Weights are never baked into, nor mounted by, the API image.
                assert "/models" not in ins.args and "HF_HOME" not in ins.args, (
                    f"stage {stage.name}, line {ins.line}: {ins.keyword} {ins.args}"
                )
    installs = [i.args for i in stage_chain(stages, "api")[0].instructions if "pip install" in i.args]
    assert any("[api]" in a for a in installs), installs
    assert not any("[worker]" in a for a in installs), installs


def test_worker_image_has_cuda_torch_from_pytorch_index(stages: dict[str, Stage]) -> None:
    base = assert_pinned(external_base(stages, "worker"))
    assert base.group("repo") == "nvidia/cuda", base.group(0)
    cuda = re.match(r"(\d+)\.(\d+)", base.group("tag"))
    assert cuda, base.group("tag")

    worker = stages["worker"]
    args = {
        name: value
        for ins in worker.instructions
        if ins.keyword == "ARG"
        for name, _, value in [ins.args.partition("=")]
    }
    assert args.get("TORCH_VERSION") == TORCH_VERSION, args
    index = args.get("TORCH_INDEX_URL", "")
    wheel = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", index)
    assert wheel, f"TORCH_INDEX_URL must be a build ARG naming a PyTorch CUDA index: {index!r}"
    # The CUDA base image and the wheel's CUDA must agree (cu126 <-> 12.6).
    assert wheel.group(1) == cuda.group(1) + cuda.group(2), (index, base.group(0))

    runs = [i.args for i in worker.instructions if i.keyword == "RUN"]
    torch_runs = [r for r in runs if '--index-url "${TORCH_INDEX_URL}"' in r]
    assert torch_runs and all('"torch==${TORCH_VERSION}"' in r for r in torch_runs), runs
    assert any("[worker]" in r and '"torch==${TORCH_VERSION}"' in r for r in runs), runs
    assert any(re.search(r"\bpython3\.11\b", r) for r in runs), "worker must run CPython 3.11"

    env = " ".join(i.args for i in worker.instructions if i.keyword == "ENV")
    assert re.search(r"\bHF_HOME=/models\b", env), env
    volumes = [i.args for i in worker.instructions if i.keyword == "VOLUME"]
    assert any("/models" in v for v in volumes), volumes


def test_every_pip_install_skips_the_cache(dockerfile_text: str) -> None:
    for ins in parse_dockerfile(dockerfile_text):
        if ins.keyword == "RUN" and "pip install" in ins.args:
            for part in ins.args.split("&&"):
                if "pip install" in part:
                    assert "--no-cache-dir" in part, f"line {ins.line}: {part.strip()}"


@pytest.mark.parametrize("target", ["api", "worker", "dashboard"])
def test_targets_run_as_non_root(stages: dict[str, Stage], target: str) -> None:
    user = effective(stages, target, "USER")
    assert user is not None, f"target {target} never sets USER"
    name = user.args.split(":")[0]
    assert name not in {"root", "0"}, f"target {target} runs as {user.args}"


@pytest.mark.parametrize(
    ("target", "probe"),
    [("api", "/healthz"), ("worker", "worker.health"), ("dashboard", "9181")],
)
def test_targets_have_their_own_healthcheck(stages: dict[str, Stage], target: str, probe: str) -> None:
    check = effective(stages, target, "HEALTHCHECK")
    assert check is not None and "CMD" in check.args, f"target {target} has no HEALTHCHECK"
    assert probe in check.args, f"target {target}: HEALTHCHECK does not probe {probe}: {check.args}"
    healthcheck_argv(check)  # exec form, valid JSON


def healthcheck_argv(check: Instruction) -> list[str]:
    _, _, exec_form = check.args.partition(" CMD ")
    argv = json.loads(exec_form)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), check.args
    return argv


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False), (None, False)])
def test_api_healthcheck_command_tracks_healthz(stages: dict[str, Stage], status: int | None, healthy: bool) -> None:
    """Run the api image's HEALTHCHECK against a stand-in server on a free port."""
    check = effective(stages, "api", "HEALTHCHECK")
    assert check is not None
    argv = healthcheck_argv(check)
    assert argv[:2] == ["python", "-c"] and "127.0.0.1:8000" in argv[2], argv
    handler = type("Handler", (_Handler,), {"status": status or 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens on the port
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = argv[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False)
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (proc.returncode == 0) is healthy, proc.stderr


def test_targets_start_the_documented_processes(stages: dict[str, Stage]) -> None:
    def cmd(target: str) -> list[str]:
        ins = effective(stages, target, "CMD")
        assert ins is not None, target
        return json.loads(ins.args)

    assert cmd("api") == ["python", "-m", "app"]
    assert cmd("worker") == ["python", "-m", "worker"]
    assert cmd("dashboard")[0] == "rq-dashboard"


def test_dockerignore_keeps_secrets_weights_and_vcs_out() -> None:
    entries = {
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    required = {".git", ".venv", ".env", "models", "**/*.safetensors", "tests"}
    assert required <= entries, sorted(required - entries)


# ------------------------------------------------------------------ docker-compose


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class MissingVariable(KeyError):
    pass


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-file variable interpolation (${VAR}, :-, -, :?, ?, :+, +, $$)."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        braced = _BRACED.match(match.group("braced"))
        assert braced, f"unsupported interpolation {match.group(0)!r}"
        name, op, arg = braced.group("name", "op", "arg")
        value = env.get(name)
        unset_or_empty = not value
        if op is None:
            return value or ""
        if op in {":-", "-"}:
            missing = unset_or_empty if op == ":-" else value is None
            return arg if missing else str(value)
        if op in {":?", "?"}:
            missing = unset_or_empty if op == ":?" else value is None
            if missing:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        present = not unset_or_empty if op == ":+" else value is not None
        return arg if present else ""

    return _VAR.sub(replace, text)


def read_env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def required_variables(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))


@pytest.fixture(scope="module")
def compose_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def deploy_env(compose_text: str) -> dict[str, str]:
    """deploy/env.example with stand-in values for the secrets it leaves blank."""
    env = read_env_file(ENV_EXAMPLE)
    for name in required_variables(compose_text):
        if not env.get(name):
            env[name] = f"test-{name.lower()}-0123456789"
    return env


@pytest.fixture(scope="module")
def compose(compose_text: str, deploy_env: dict[str, str]) -> dict[str, Any]:
    data = yaml.safe_load(interpolate(compose_text, deploy_env))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_file_matches_the_compose_spec_schema() -> None:
    proc = check_jsonschema(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_matches_the_schema_after_interpolation(
    tmp_path: Path, compose_text: str, deploy_env: dict[str, str]
) -> None:
    rendered = tmp_path / "docker-compose.rendered.yml"
    rendered.write_text(interpolate(compose_text, deploy_env))
    proc = check_jsonschema(rendered)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_jsonschema_rejects_an_invalid_compose_file(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.bad.yml"
    bad.write_text("services:\n  api:\n    image: x\n    stop_grace_period: 5\n    replicas: 2\n")
    proc = check_jsonschema(bad)
    assert proc.returncode != 0, proc.stdout


def test_secrets_have_no_defaults_and_are_listed_in_env_example(compose_text: str, deploy_env: dict[str, str]) -> None:
    required = required_variables(compose_text)
    secrets = {
        "SDXL_API_KEYS",
        "SDXL_WEBHOOK_SECRETS",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "S3_APP_ACCESS_KEY_ID",
        "S3_APP_SECRET_ACCESS_KEY",
    }
    assert secrets <= required, sorted(secrets - required)
    documented = read_env_file(ENV_EXAMPLE)
    referenced = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text))
    assert referenced <= documented.keys(), sorted(referenced - documented.keys())
    for name in sorted(secrets):
        env = {k: v for k, v in deploy_env.items() if k != name}
        with pytest.raises(MissingVariable):
            interpolate(compose_text, env)


def parse_port(spec: Any) -> tuple[str | None, int]:
    """(host ip, container port) of a short- or long-syntax port mapping."""
    if isinstance(spec, dict):
        return spec.get("host_ip"), int(spec["target"])
    parts = str(spec).split(":")
    container = int(parts[-1].split("/")[0])
    host_ip = parts[0] if len(parts) == 3 else None
    return host_ip, container


def test_only_the_gateway_and_minio_s3_publish_ports(services: dict[str, dict[str, Any]]) -> None:
    publishing = {name for name, svc in services.items() if svc.get("ports")}
    assert publishing == set(PUBLISHERS), sorted(publishing)
    for name, allowed in PUBLISHERS.items():
        mapped = [parse_port(p) for p in services[name]["ports"]]
        assert {port for _, port in mapped} <= allowed, (name, mapped)
    gateway = [parse_port(p) for p in services["gateway"]["ports"]]
    assert any(port == GATEWAY_PUBLIC_PORT for _, port in gateway), gateway
    for host_ip, port in gateway:
        if port != GATEWAY_PUBLIC_PORT:
            assert host_ip == "127.0.0.1", f"gateway port {port} must be bound to 127.0.0.1"


def test_images_are_pinned_or_built_from_this_dockerfile(
    services: dict[str, dict[str, Any]], stages: dict[str, Stage]
) -> None:
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"]
            assert build.get("context", ".") == ".", name
            assert build.get("target") in stages, f"{name}: unknown target {build.get('target')}"
        else:
            assert_pinned(svc["image"])


def test_redis_persists_with_append_only_file(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    command = redis["command"]
    command = command if isinstance(command, list) else command.split()
    assert command[0] == "redis-server"
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes", command
    assert any(str(v).split(":")[1] == "/data" for v in redis["volumes"]), redis["volumes"]
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")


def seconds(duration: str) -> float:
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = DURATION.findall(str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(float(n) * scale[u] for n, u in parts)


def worker_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if svc.get("build", {}).get("target") == "worker"}


def test_one_gpu_per_worker_with_a_long_stop_grace_period(
    services: dict[str, dict[str, Any]],
) -> None:
    workers = worker_services(services)
    assert len(workers) >= 2, sorted(workers)
    seen: list[str] = []
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, (name, devices)
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], (name, device)
        assert len(device["device_ids"]) == 1 and "count" not in device, (name, device)
        seen.extend(device["device_ids"])
        assert seconds(svc["stop_grace_period"]) > WORKER_GRACE_MIN_S, (name, svc["stop_grace_period"])
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name
        env = svc["environment"]
        assert env["SDXL_DEVICE"] == "cuda" and env["SDXL_DTYPE"] == "float16", name
        assert env["HF_HOME"] == "/models" and str(env["HF_HUB_OFFLINE"]) == "0", name
        assert any(str(v).endswith(":/models") for v in svc["volumes"]), (name, svc["volumes"])
    assert len(seen) == len(set(seen)), f"two workers share a GPU: {seen}"


def test_workers_share_one_anchor(compose_text: str) -> None:
    anchors = re.findall(r"^(x-[\w-]+):\s*&(\w+)", compose_text, re.M)
    assert ("x-worker", "worker") in anchors, anchors
    assert len(re.findall(r"<<:\s*\*worker\b", compose_text)) >= 2


def test_api_runs_two_or_more_replicas_behind_the_gateway(
    services: dict[str, dict[str, Any]],
) -> None:
    api = services["api"]
    assert int(api["deploy"]["replicas"]) >= 2
    assert "container_name" not in api  # would make replicas impossible
    assert api["build"]["target"] == "api"
    labels = set(api["labels"])
    service = "traefik.http.services.sdxl-api.loadbalancer"
    assert "traefik.enable=true" in labels
    assert f"{service}.healthcheck.path=/readyz" in labels, labels
    assert f"{service}.server.port=8000" in labels, labels
    rule = next(label for label in labels if label.startswith("traefik.http.routers.sdxl-api.rule="))
    assert "!PathPrefix(`/metrics`)" in rule, "the gateway must not expose /metrics"
    assert api["environment"]["SDXL_API_KEYS"], "the API must run with keys"
    for volume in api.get("volumes", []):
        assert str(volume).endswith(":ro"), f"the API may only read the model cache: {volume}"
    for key in ("SDXL_BASE_MODEL", "SDXL_REFINER_MODEL"):
        workers = {svc["environment"][key] for svc in worker_services(services).values()}
        assert workers == {api["environment"][key]}, f"{key}: the API and the workers disagree"
    assert str(api["environment"]["SDXL_ALLOW_OPEN_NON_LOOPBACK"]).lower() == "false"


def test_gateway_is_traefik_v3_with_docker_provider(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    match = assert_pinned(gateway["image"])
    assert match.group("repo") == "traefik" and match.group("tag").startswith("v3."), gateway["image"]
    # Docker Engine 29 refuses API 1.24, the fallback of Traefik before 3.6.1.
    major, minor = (int(x) for x in match.group("tag")[1:].split(".")[:2])
    assert (major, minor) >= (3, 6), gateway["image"]
    mounts = [str(v) for v in gateway["volumes"]]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in mounts, mounts
    assert "./deploy/traefik/traefik.yml:/etc/traefik/traefik.yml:ro" in mounts, mounts

    static = yaml.safe_load(TRAEFIK.read_text())
    docker = static["providers"]["docker"]
    assert docker["exposedByDefault"] is False
    constraint = re.fullmatch(r"Label\(`([^`]+)`, `([^`]+)`\)", docker["constraints"])
    assert constraint, docker["constraints"]
    stack_label = f"{constraint.group(1)}={constraint.group(2)}"
    for name, svc in services.items():
        labels = set(svc.get("labels", []))
        if "traefik.enable=true" in labels:
            assert stack_label in labels, f"{name}: Traefik ignores it without {stack_label}"
            for label in labels:
                ep = re.match(r"traefik\.http\.routers\.[\w-]+\.entrypoints=(.+)", label)
                if ep:
                    assert set(ep.group(1).split(",")) <= static["entryPoints"].keys(), label

    entry_ports = {name: int(ep["address"].rsplit(":", 1)[1]) for name, ep in static["entryPoints"].items()}
    published = {port for _, port in (parse_port(p) for p in gateway["ports"])}
    internal = entry_ports[static["ping"]["entryPoint"]]
    assert internal not in published, "ping/metrics entry point must not be published"
    assert published <= set(entry_ports.values()), (published, entry_ports)
    assert "healthcheck" in gateway["healthcheck"]["test"]


def test_services_reusing_the_api_image_do_not_inherit_its_http_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, svc in services.items():
        if svc.get("build", {}).get("target") != "api":
            continue
        command = svc.get("command", [])
        if command == ["python", "-m", "app"]:
            continue
        assert svc.get("healthcheck", {}).get("disable") is True, (
            f"{name} runs {command} on the api image, whose HEALTHCHECK probes :8000"
        )


def test_background_processes_run_the_documented_modules(
    services: dict[str, dict[str, Any]],
) -> None:
    assert services["webhook-dispatcher"]["command"] == ["python", "-m", "dispatcher"]
    assert services["cleanup"]["command"] == ["python", "-m", "cleanup"]
    assert services["webhook-dispatcher"]["build"]["target"] == "api"
    assert services["cleanup"]["build"]["target"] == "api"
    assert services["webhook-dispatcher"]["environment"]["SDXL_WEBHOOK_SECRETS"]


def test_dependencies_wait_for_health_and_bucket(services: dict[str, dict[str, Any]], stages: dict[str, Stage]) -> None:
    app = ["api", "webhook-dispatcher", "cleanup", *worker_services(services)]
    for name in app:
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["minio-init"]["condition"] == "service_completed_successfully", name
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                target = services[dep]
                own = target.get("healthcheck")
                built = target.get("build", {}).get("target")
                has_check = (own and not own.get("disable")) or (
                    not own and built and effective(stages, built, "HEALTHCHECK")
                )
                assert has_check, f"{name} waits for {dep} to be healthy, but it has no healthcheck"


def test_minio_init_creates_the_bucket(services: dict[str, dict[str, Any]]) -> None:
    init = services["minio-init"]
    assert init["restart"] == "no"
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "./deploy/minio/init.sh:/deploy/minio/init.sh:ro" in init["volumes"]
    assert init["entrypoint"] == ["/bin/sh", "/deploy/minio/init.sh"]
    assert assert_pinned(init["image"]).group("repo").endswith("minio/mc")
    env = services["api"]["environment"]
    assert init["environment"]["SDXL_S3_BUCKET"] == env["SDXL_S3_BUCKET"]
    assert init["environment"]["S3_APP_ACCESS_KEY_ID"] == env["AWS_ACCESS_KEY_ID"]
    assert init["environment"]["S3_APP_SECRET_ACCESS_KEY"] == env["AWS_SECRET_ACCESS_KEY"]
    assert env["SDXL_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["SDXL_S3_ADDRESSING_STYLE"] == "path"
    public_port = int(env["SDXL_S3_PUBLIC_ENDPOINT_URL"].rsplit(":", 1)[1].rstrip("/"))
    host_ports = [int(str(p).split(":")[-2]) for p in services["minio"]["ports"]]
    assert public_port in host_ports, "presigned URLs must point at MinIO's published port"


def test_profiles_hold_only_the_optional_services(services: dict[str, dict[str, Any]]) -> None:
    profiles = {name: svc.get("profiles") for name, svc in services.items() if svc.get("profiles")}
    assert profiles == {"prometheus": ["monitoring"], "rq-dashboard": ["dashboard"]}, profiles


def test_prometheus_scrapes_every_process(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_sd = jobs["api"]["dns_sd_configs"][0]
    assert api_sd["names"] == ["api"] and api_sd["type"] == "A" and api_sd["port"] == 8000
    targets = {t for sc in jobs["worker"]["static_configs"] for t in sc["targets"]}
    expected = {f"{name}:{svc['environment']['SDXL_METRICS_PORT']}" for name, svc in worker_services(services).items()}
    assert targets == expected, (targets, expected)
    static = yaml.safe_load(TRAEFIK.read_text())
    metrics_ep = static["metrics"]["prometheus"]["entryPoint"]
    port = static["entryPoints"][metrics_ep]["address"].rsplit(":", 1)[1]
    assert {t for sc in jobs["gateway"]["static_configs"] for t in sc["targets"]} == {f"gateway:{port}"}
    prometheus = services["prometheus"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


# -------------------------------------------------------------------- minio init


FAKE_MC = r"""#!/bin/sh
# Stand-in for the MinIO client: logs its arguments, keeps the policy file.
echo "$*" >> "$FAKE_MC_LOG"
case "$1 $2 $3" in
    "admin policy create") cp "$6" "$FAKE_MC_DIR/policy.json" ;;
    "admin user info") printf 'AccessKey: %s\nStatus: enabled\nPolicyName: %s\n' "$5" "$FAKE_ATTACHED" ;;
esac
exit 0
"""


def run_init(
    tmp_path: Path, attached: str, **overrides: str | None
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    mc = bin_dir / "mc"
    mc.write_text(FAKE_MC)
    mc.chmod(mc.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "mc.log"
    log.write_text("")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_MC_LOG": str(log),
        "FAKE_MC_DIR": str(tmp_path),
        "FAKE_ATTACHED": attached,
        "MINIO_ROOT_USER": "root-user",
        "MINIO_ROOT_PASSWORD": "root-password",
        "SDXL_S3_BUCKET": "sdxl-images",
        "S3_APP_ACCESS_KEY_ID": "sdxl-app",
        "S3_APP_SECRET_ACCESS_KEY": "app-secret-123",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    sh = shutil.which("sh")
    assert sh, "no POSIX sh"
    proc = subprocess.run([sh, str(MINIO_INIT)], capture_output=True, text=True, env=env, timeout=30, check=False)
    return proc, log.read_text().splitlines()


def test_minio_init_creates_bucket_policy_and_user(tmp_path: Path) -> None:
    proc, calls = run_init(tmp_path, attached="")
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "alias set sdxl http://minio:9000 root-user root-password"
    assert "mb --ignore-existing sdxl/sdxl-images" in calls
    assert "admin user add sdxl sdxl-app app-secret-123" in calls
    assert "admin policy attach sdxl sdxl-sdxl-images-rw --user sdxl-app" in calls
    policy = json.loads((tmp_path / "policy.json").read_text())
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::sdxl-images", "arn:aws:s3:::sdxl-images/*"}


def test_minio_init_is_idempotent(tmp_path: Path) -> None:
    proc, calls = run_init(tmp_path, attached="sdxl-sdxl-images-rw")
    assert proc.returncode == 0, proc.stderr
    assert not any(c.startswith("admin policy attach") for c in calls), calls
    assert "mb --ignore-existing sdxl/sdxl-images" in calls


@pytest.mark.parametrize("missing", ["MINIO_ROOT_PASSWORD", "SDXL_S3_BUCKET", "S3_APP_SECRET_ACCESS_KEY"])
def test_minio_init_refuses_missing_settings(tmp_path: Path, missing: str) -> None:
    proc, calls = run_init(tmp_path, attached="", **{missing: None})
    assert proc.returncode != 0
    assert missing in proc.stderr
    assert calls == []


def test_minio_init_passes_shellcheck() -> None:
    proc = run([tool("shellcheck"), "--shell=sh", str(MINIO_INIT)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------ contract with the source tree


def _source_tree_present() -> bool:
    return (ROOT / "app").is_dir() and (ROOT / "worker").is_dir()


needs_source = pytest.mark.skipif(
    not _source_tree_present(), reason="app/ and worker/ packages are not in this tree yet"
)

MODULES_RUN_BY_COMPOSE = {
    "app.main": "the API (uvicorn app.main:create_app)",
    "worker": "the GPU worker (python -m worker)",
    "worker.health": "the worker HEALTHCHECK (python -m worker.health)",
    "dispatcher": "webhook-dispatcher (python -m dispatcher)",
    "cleanup": "cleanup (python -m cleanup)",
}
# Run on the api image, which has no torch: they must import without it.
MODULES_ON_THE_API_IMAGE = ["app.main", "worker.health", "dispatcher", "cleanup"]


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base / "__main__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def require_module(module: str) -> None:
    if module_file(module) is None:
        # Visible in the `-ra` summary: the images start this module, someone must write it.
        pytest.skip(f"{module} is not written yet; {MODULES_RUN_BY_COMPOSE[module]} needs it")


@needs_source
@pytest.mark.parametrize("module", sorted(MODULES_RUN_BY_COMPOSE))
def test_modules_started_by_the_images_exist(module: str) -> None:
    require_module(module)
    assert module_file(module) is not None


@needs_source
@pytest.mark.parametrize("module", MODULES_ON_THE_API_IMAGE)
def test_processes_on_the_api_image_import_without_torch(module: str) -> None:
    """What runs on the api image must not import torch (or diffusers & co.)."""
    require_module(module)
    code = (
        "import importlib, sys\n"
        "for banned in ('torch', 'diffusers', 'transformers', 'accelerate'):\n"
        "    sys.modules[banned] = None  # importing them now raises ImportError\n"
        f"importlib.import_module({module!r})\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="pyproject.toml is not in this tree yet")
def test_pyproject_api_extra_keeps_torch_out() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    assert {"api", "worker"} <= extras.keys(), sorted(extras)

    def names(requirements: list[str]) -> Iterator[str]:
        for req in requirements:
            yield re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower()

    api_side = set(names(project.get("dependencies", []))) | set(names(extras["api"]))
    assert not api_side & {"torch", "diffusers", "accelerate", "nvidia-cudnn-cu12"}, api_side
