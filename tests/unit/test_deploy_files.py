"""Invariants of the deployment files (Dockerfile, docker-compose.yml, .dockerignore, deploy/), offline.

The linters lint them; each `check_*` returns what breaks one property the stack relies on, and MUTATIONS
feeds every check a copy of the files with a realistic bug in it, so that no check passes vacuously."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.procs import ROOT

DOCKERFILE, COMPOSE, ENV_EXAMPLE, PYPROJECT = "Dockerfile", "docker-compose.yml", "deploy/env.example", "pyproject.toml"
CI_COMPOSE = "deploy/ci/docker-compose.ci.yml"
TARGETS = ("api", "worker", "dashboard")
BASE_IMAGE = "debian:bookworm-slim"  # official, and rebuilt faithfully by debootstrap where no registry answers
MINIO_INIT = "deploy/minio/init.sh"
SECRETS = ("SDXL_API_KEYS", "SDXL_WEBHOOK_SECRETS", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "S3_APP_ACCESS_KEY_ID", "S3_APP_SECRET_ACCESS_KEY")
APP, WORKER = ["python", "-m", "app"], ["python", "-m", "worker"]
# Compose service -> the image target and process it must run (docs/deploy.md's topology).
PROCESSES = {"api": ("api", APP), "webhook-dispatcher": ("api", ["python", "-m", "dispatcher"]),
             "cleanup": ("api", ["python", "-m", "cleanup"])}
TORCH_STACK = ("torch", "diffusers", "transformers", "accelerate")
Stages = dict[str, tuple[str, list[tuple[str, str]]]]


class Deploy:
    """The deployment files' text, parsed on demand, so that an edited copy is checked the same way."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.texts = texts

    @cached_property
    def stages(self) -> Stages:
        """Stage name -> (FROM image, [(INSTRUCTION, value)]); dockerfile-parse joins lines, drops comments."""
        stages: Stages = {}
        for item in DockerfileParser(fileobj=io.BytesIO(self.texts[DOCKERFILE].encode()), env_replace=False).structure:
            if item["instruction"] == "FROM":
                base, *alias = re.split(r"\s+as\s+", item["value"].strip(), flags=re.I)
                stages[alias[0] if alias else base] = (base, current := [])
            elif item["instruction"] != "COMMENT":
                current.append((item["instruction"], item["value"]))
        return stages

    def compose(self, path: str) -> dict[str, dict[str, Any]]:
        # What compose sees with an empty .env: defaults, and a stand-in for each required `${X:?}`.
        text = re.sub(r"\$\{(\w+)(?::?([-?])([^}]*))?\}",
                      lambda m: m[3] if m[2] == "-" else "x" * 8 if m[2] else "", self.texts[path])
        return yaml.safe_load(text)["services"]

    @cached_property
    def services(self) -> dict[str, dict[str, Any]]:
        return self.compose(COMPOSE)

    def lineage(self, target: str) -> tuple[str, list[tuple[str, str]]]:
        """A target's external base image and its instructions, those of the stages it is FROM first."""
        base, own = self.stages.get(target, ("", []))
        if base not in self.stages:
            return base, own
        root, inherited = self.lineage(base)
        return root, inherited + own

    def last(self, target: str, keyword: str) -> str:
        return ([v for k, v in self.lineage(target)[1] if k == keyword] or [""])[-1]

    def target(self, service: str) -> str:
        return self.services.get(service, {}).get("build", {}).get("target", "")


def published(svc: dict[str, Any]) -> list[list[str]]:
    """[host ip or "", host port, container port] of each short-syntax `ports:` entry."""
    return [(["", ""] + str(p).split("/")[0].split(":"))[-3:] for p in svc.get("ports", [])]


def check_secrets(d: Deploy) -> list[str]:
    # `${X:?}` makes compose refuse to start without X; a default, here or in env.example, ships a known secret.
    refs = re.findall(r"\$\{(\w+)(:?[-?+]?)", d.texts[COMPOSE])
    example = dict(ln.partition("=")[::2] for ln in d.texts[ENV_EXAMPLE].splitlines() if "=" in ln and ln[0] != "#")
    problems = [f"{n}: not ${{{n}:?...}} everywhere" for n in SECRETS if {o for r, o in refs if r == n} != {":?"}]
    problems += [f"env.example gives {n} a value" for n in SECRETS if example.get(n, "")]
    return problems + [f"{n} is not documented in env.example" for n, _ in refs if n not in example]


def check_exposure(d: Deploy) -> list[str]:
    # Clients enter through the gateway only; MinIO's S3 port too, because presigned URLs point straight at it.
    s = d.services
    problems = [f"{n} publishes ports" for n, svc in s.items() if svc.get("ports") and n not in {"gateway", "minio"}]
    problems += [] if "80" in {c for *_, c in published(s["gateway"])} else ["gateway :80 is not published"]
    problems += [f"gateway :{c} must be bound to 127.0.0.1" for ip, _, c in published(s["gateway"])
                 if c != "80" and ip != "127.0.0.1"]
    problems += [] if [c for *_, c in published(s["minio"])] == ["9000"] else ["MinIO publishes more than S3 :9000"]
    host_port = s["api"]["environment"]["SDXL_S3_PUBLIC_ENDPOINT_URL"].rstrip("/").rsplit(":", 1)[-1]
    problems += [] if [host_port] == [h for _, h, _ in published(s["minio"])] else ["presigned URLs miss MinIO"]
    rule = " ".join(label for label in s["api"].get("labels", []) if ".routers.sdxl-api.rule=" in label)
    return problems + ([] if "!PathPrefix(`/metrics`)" in rule else ["the gateway routes /metrics to clients"])


def check_gpus(d: Deploy) -> list[str]:
    # SDXL fills one GPU: two workers on it run out of memory, and `count: all` hands one worker every GPU.
    workers = {n: svc for n, svc in d.services.items() if d.target(n) == "worker"}
    problems, ids = ([] if len(workers) >= 2 else ["fewer than two GPU workers"]), []
    for name, svc in workers.items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        own = [i for dev in devices for i in dev.get("device_ids", [])]
        if len(devices) != 1 or len(own) != 1 or "count" in devices[0] or "gpu" not in devices[0]["capabilities"]:
            problems.append(f"{name} must reserve exactly one GPU by id: {devices}")
        ids += own
        # The worker finishes its job within 60 s of SIGTERM; Docker SIGKILLs it when the grace period ends.
        grace = re.fullmatch(r"(\d+)(s|m)", str(svc.get("stop_grace_period", "10s")))
        if not grace or int(grace[1]) * (60 if grace[2] == "m" else 1) <= 60:
            problems.append(f"{name}: stop_grace_period must be over 60 s")
    return problems + ([f"workers share a GPU: {ids}"] if len(ids) != len(set(ids)) else [])


def check_non_root(d: Deploy) -> list[str]:
    # A USER set in a parent stage is inherited, so `last` follows FROM <stage>.
    users = {t: d.last(t, "USER").split(":")[0] for t in TARGETS}
    return [f"target {t} runs as root" for t, user in users.items() if user in {"", "root", "0"}]


def check_processes(d: Deploy) -> list[str]:
    # Each image and service starts the process docs/deploy.md names; the wrong module is a silent no-op service.
    cmds = {t: json.loads(d.last(t, "CMD") or "[]") for t in ("api", "worker", "dashboard")}
    problems = [f"target {t} runs {cmds[t]}" for t, argv in (("api", APP), ("worker", WORKER)) if cmds[t] != argv]
    problems += [] if cmds["dashboard"][:1] == ["rq-dashboard"] else [f"dashboard runs {cmds['dashboard']}"]
    problems += [f"{n} must run {argv} on the {t} image" for n, (t, argv) in PROCESSES.items()
                 if d.target(n) != t or d.services[n].get("command") != argv]
    # The api image's HEALTHCHECK probes :8000, which only `python -m app` serves: others would never be healthy.
    return problems + [f"{n} inherits the api image's HTTP healthcheck" for n, svc in d.services.items()
                       if d.target(n) == "api" and svc.get("command") != APP
                       and svc.get("healthcheck", {}).get("disable") is not True]


def check_healthchecks(d: Deploy) -> list[str]:
    # Each image probes its own process: the API's liveness URL, the worker's heartbeat, the dashboard's socket.
    probes = {"api": "127.0.0.1:8000/healthz", "worker": '"-m", "worker.health"', "dashboard": "('127.0.0.1', 9181)"}
    problems = [f"target {t} has no HEALTHCHECK probing {p}" for t, p in probes.items()
                if p not in d.last(t, "HEALTHCHECK").partition(" CMD ")[2]]

    def healthy(name: str) -> bool:
        own = d.services.get(name, {}).get("healthcheck")
        return not own.get("disable") if own else bool(d.last(d.target(name), "HEALTHCHECK"))

    # `condition: service_healthy` on a service without a healthcheck blocks `compose up` forever.
    return problems + [f"{n} waits for {dep} to be healthy; it has no healthcheck" for n, svc in d.services.items()
                       for dep, spec in (svc.get("depends_on") or {}).items()
                       if spec["condition"] == "service_healthy" and not healthy(dep)]


def check_api_image(d: Deploy) -> list[str]:
    # The api image (which also runs dispatcher and cleanup; dashboard is FROM it) carries no torch and no CUDA.
    problems = [f"api image: {k} {v}" for k, v in d.lineage("dashboard")[1] if k in {"RUN", "ENV", "ARG", "COPY", "ADD"}
                 and re.search(r"torch|cuda|nvidia|diffusers|\[[^]]*worker", v, re.I)]
    problems += [] if any("[api]" in v for k, v in d.lineage("api")[1] if k == "RUN") else ["no `api` extra"]
    project = tomllib.loads(d.texts[PYPROJECT])["project"]
    api_side = project["dependencies"] + project["optional-dependencies"]["api"]
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in api_side}
    return problems + [f"pyproject: the api side requires {n}" for n in sorted(names & set(TORCH_STACK))]


def check_base_images(d: Deploy) -> list[str]:
    # Without a registry (CI) the base is rebuilt with debootstrap, and a `# syntax=` frontend cannot be pulled.
    problems = [f"target {t} is FROM {d.lineage(t)[0]}" for t in TARGETS if d.lineage(t)[0] != BASE_IMAGE]
    return problems + (["the Dockerfile names a frontend image (# syntax=)"]
                       if re.search(r"(?m)^#\s*syntax\s*=", d.texts[DOCKERFILE]) else [])


def check_worker_torch(d: Deploy) -> list[str]:
    instructions = d.lineage("worker")[1]
    args = dict(v.partition("=")[::2] for k, v in instructions if k == "ARG")
    # Users get the CUDA build, the same index wherever the files name one (CI passes the CPU one as an argument).
    compose_arg = d.services["worker-gpu0"]["build"]["args"]["TORCH_INDEX_URL"]
    example = re.search(r"(?m)^TORCH_INDEX_URL=(\S+)", d.texts[ENV_EXAMPLE])
    indexes = {args.get("TORCH_INDEX_URL", ""), compose_arg, example[1] if example else ""}
    problems = [] if len(indexes) == 1 and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", *indexes) else [
        f"the default torch index is not one CUDA index: {sorted(indexes)}"]
    if f"torch=={args.get('TORCH_VERSION')}" not in tomllib.loads(d.texts[PYPROJECT])["project"][
            "optional-dependencies"]["worker"]:
        problems.append(f"TORCH_VERSION={args.get('TORCH_VERSION')} is not the worker extra's torch pin")
    runs = [v for k, v in instructions if k == "RUN"]
    # Naming torch beside the extra keeps pip from swapping the index's build for PyPI's wheel.
    ok = any('--index-url "${TORCH_INDEX_URL}"' in r for r in runs) and any(
        "[worker]" in r and '"torch==${TORCH_VERSION}"' in r for r in runs)
    problems += [] if ok else ["torch must come from TORCH_INDEX_URL and stay pinned beside the extra"]
    # What nvidia/cuda images set for the NVIDIA container toolkit: without them it gives the container no GPU.
    env = " ".join(v for k, v in instructions if k == "ENV")
    return problems + [f"worker image lacks {v}" for v in ("NVIDIA_VISIBLE_DEVICES=all",
                                                          "NVIDIA_DRIVER_CAPABILITIES=compute,utility")
                       if not re.search(rf"(^|\s){v}(\s|$)", env)]


def check_ca_secret(d: Deploy) -> list[str]:
    # Every download during the build may need the host's CA bundle (CI), given as a secret that user builds omit.
    runs = [v for t in TARGETS for k, v in d.lineage(t)[1] if k == "RUN" and "pip install" in v]
    mount = "--mount=type=secret,id=ca,required=false"
    return sorted({f"RUN without the optional CA secret: {r[:80]}" for r in runs
                   if mount not in r or "if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi" not in r})


def check_ci_override(d: Deploy) -> list[str]:
    # The CI stack is docker-compose.yml with only registry-only images, the GPUs and Prometheus swapped: a
    # service it adds or a setting it changes would make the run test something users do not deploy.
    ci, main = d.compose(CI_COMPOSE), d.services
    swaps = {"gateway": {"image", "volumes", "healthcheck"}, "redis": {"image"}, "api": {"volumes"},
             "minio": {"image", "command", "healthcheck"}, "minio-init": {"image", "entrypoint"}}
    problems = [f"CI override adds service {n}" for n in ci if n not in main and n != "worker-cpu"]
    problems += [f"CI override changes {n}: {sorted(set(svc) - swaps.get(n, set()))}" for n, svc in ci.items()
                 if n in main and set(svc) - swaps.get(n, set())]
    gpu_only = {"SDXL_DEVICE", "SDXL_DTYPE", "SDXL_VARIANT", "HF_HUB_OFFLINE", "HF_TOKEN"}
    worker, cpu = main["worker-gpu0"], ci.get("worker-cpu", {})
    cpu_env = cpu.get("environment", {})
    problems += [f"worker-cpu {k}={cpu_env.get(k)!r}, GPU workers {v!r}"
                 for k, v in worker["environment"].items() if k not in gpu_only and cpu_env.get(k) != v]
    problems += [f"worker-cpu {k} differs" for k in ("image", "command", "init", "restart", "stop_signal",
                                                    "stop_grace_period", "depends_on") if cpu.get(k) != worker.get(k)]
    device = cpu_env.get("SDXL_DEVICE")
    return problems + ([] if device == "cpu" else [f"worker-cpu runs on {device}"])


def check_redis(d: Deploy) -> list[str]:
    # Queued jobs live only in Redis: without the append-only file on a volume a restart loses them.
    redis = d.services["redis"]
    cmd = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    problems = [] if re.search(r"--appendonly yes\b", cmd) else [f"redis runs {cmd}"]
    return problems + ([] if any(str(v).endswith(":/data") for v in redis.get("volumes", [])) else ["no /data"])


def check_dockerignore(d: Deploy) -> list[str]:
    # The build bind-mounts the context: whatever it does not ignore can end up in a layer.
    entries = {line.strip() for line in d.texts[".dockerignore"].splitlines()}
    return sorted({".git", ".venv", ".env", ".env.*", "models", "**/*.safetensors", "**/*.ckpt"} - entries)


# (check, file, text, replacement): a realistic deployment bug per row, which its check must report.
MUTATIONS: list[tuple[Callable[[Deploy], list[str]], str, str, str]] = [
    (check_secrets, COMPOSE, "${SDXL_API_KEYS:?", "${SDXL_API_KEYS:-"),
    (check_secrets, ENV_EXAMPLE, "\nMINIO_ROOT_PASSWORD=\n", "\nMINIO_ROOT_PASSWORD=minioadmin\n"),
    (check_exposure, COMPOSE, '    expose:\n      - "8000"', '    ports:\n      - "8000:8000"'),
    (check_exposure, COMPOSE, '- "${SDXL_S3_PORT:-9000}:9000"', '- "${SDXL_S3_PORT:-9000}:9000"\n      - "9001:9001"'),
    (check_exposure, COMPOSE, " && !PathPrefix(`/metrics`)", ""),
    (check_gpus, COMPOSE, 'device_ids: ["1"]', 'device_ids: ["0"]'),
    (check_gpus, COMPOSE, "stop_grace_period: 120s", "stop_grace_period: 10s"),
    (check_non_root, DOCKERFILE, "USER 10001:10001\nEXPOSE 9181", "EXPOSE 9181"),
    (check_processes, DOCKERFILE, 'CMD ["python", "-m", "app"]', 'CMD ["uvicorn", "app.main:app"]'),
    (check_processes, COMPOSE, "healthcheck:\n      disable: true", "healthcheck:\n      disable: false"),
    (check_healthchecks, COMPOSE, 'test: ["CMD", "mc", "ready", "local"]', "disable: true"),
    (check_api_image, DOCKERFILE, '"/src[api]"', '"/src[api,worker]"'),
    (check_api_image, PYPROJECT, 'api = ["', 'api = ["torch==2.13.0", "'),
    (check_base_images, DOCKERFILE, "FROM debian:bookworm-slim AS base", "FROM python:3.11-slim-bookworm AS base"),
    (check_base_images, DOCKERFILE, "# Images for the SDXL", "# syntax=docker/dockerfile:1\n# Images for the SDXL"),
    (check_worker_torch, DOCKERFILE, "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
     "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130"),
    (check_worker_torch, DOCKERFILE, "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126",
     "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"),
    (check_worker_torch, DOCKERFILE, "ARG TORCH_VERSION=", "ARG TORCH_VERSION=9"),
    (check_worker_torch, DOCKERFILE, "NVIDIA_DRIVER_CAPABILITIES=compute,utility",
     "NVIDIA_DRIVER_CAPABILITIES=utility"),
    (check_ca_secret, DOCKERFILE, "--mount=type=secret,id=ca,required=false \\\n    if", "if"),
    (check_ca_secret, DOCKERFILE, "id=ca,required=false", "id=ca"),
    (check_ci_override, CI_COMPOSE, "SDXL_S3_ADDRESSING_STYLE: path", "SDXL_S3_ADDRESSING_STYLE: virtual"),
    (check_ci_override, CI_COMPOSE, "  api:\n    volumes:", "  api:\n    ports: [\"8000:8000\"]\n    volumes:"),
    (check_ci_override, CI_COMPOSE, "  worker-cpu:", "  worker-extra:"),
    (check_redis, COMPOSE, '"--appendonly", "yes"', '"--appendonly", "no"'),
    (check_dockerignore, ".dockerignore", "\n.env\n", "\n"),
]
CHECKS = list(dict.fromkeys(m[0] for m in MUTATIONS))  # so every check has at least one mutation


@pytest.fixture(scope="module")
def real() -> Deploy:
    files = (DOCKERFILE, COMPOSE, ENV_EXAMPLE, PYPROJECT, ".dockerignore", CI_COMPOSE)
    return Deploy({f: (ROOT / f).read_text() for f in files})


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_invariant_holds(real: Deploy, check: Callable[[Deploy], list[str]]) -> None:
    assert check(real) == []


@pytest.mark.parametrize(("check", "path", "old", "new"), MUTATIONS,
                         ids=[f"{m[0].__name__}-{i}" for i, m in enumerate(MUTATIONS)])
def test_check_catches_a_broken_copy(real: Deploy, check: Callable[..., list[str]], path: str, old: str,
                                     new: str) -> None:
    assert old in real.texts[path], f"{path} no longer contains {old!r}: update the mutation"
    assert check(Deploy({**real.texts, path: real.texts[path].replace(old, new, 1)})), f"missed {old!r} -> {new!r}"


@pytest.mark.parametrize("module", ["app.main", "app.__main__", "worker.health", "dispatcher.__main__",
                                    "cleanup.__main__", "worker.__main__"])
def test_started_modules_exist_and_api_image_ones_need_no_torch(module: str) -> None:
    # The api image has no torch: an import of it there is a crash loop. worker.__main__ need only exist.
    load = "importlib.util.find_spec" if module == "worker.__main__" else "importlib.import_module"
    code = f"import importlib.util, sys\nsys.modules.update(dict.fromkeys({TORCH_STACK}))\nassert {load}({module!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


FAKE_MC = """#!/bin/sh
echo "$*" >> mc.log
[ "$1 $2 $3" = "admin policy create" ] && cp "$6" policy.json
[ "$1 $2 $3" = "admin user info" ] && echo "PolicyName: $ATTACHED"
exit 0
"""


@pytest.mark.parametrize("attached", ["", "sdxl-imgs-rw"], ids=["first-up", "rerun"])
def test_minio_init_creates_a_bucket_scoped_user_idempotently(tmp_path: Path, attached: str) -> None:
    (tmp_path / "mc").write_text(FAKE_MC)  # a stand-in for the MinIO client that logs its arguments
    (tmp_path / "mc").chmod(0o755)
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "ATTACHED": attached, "MINIO_ROOT_USER": "root",
           "MINIO_ROOT_PASSWORD": "root-pw", "SDXL_S3_BUCKET": "imgs", "S3_APP_ACCESS_KEY_ID": "app",
           "S3_APP_SECRET_ACCESS_KEY": "app-secret"}
    proc = subprocess.run(["sh", str(ROOT / MINIO_INIT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=30)
    calls = (tmp_path / "mc.log").read_text().splitlines()
    assert proc.returncode == 0, proc.stderr
    assert {"mb --ignore-existing sdxl/imgs", "admin user add sdxl app app-secret"} <= set(calls), calls
    # `mc admin policy attach` fails on an attached policy: attaching on a rerun would block the whole stack.
    assert ("admin policy attach sdxl sdxl-imgs-rw --user app" in calls) is not bool(attached), calls
    # The app's user reaches its own bucket only, never MinIO's other buckets.
    policy = json.loads((tmp_path / "policy.json").read_text())
    assert {r for st in policy["Statement"] for r in st["Resource"]} == {"arn:aws:s3:::imgs", "arn:aws:s3:::imgs/*"}


def lint(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    venv = Path(sys.executable).with_name(name)  # the running venv's copy first, then PATH
    exe = str(venv) if venv.is_file() else shutil.which(name) or pytest.fail(f"{name} missing: install the dev extra")
    (tmp_path / "hadolint.yaml").write_text("ignored: []\n")  # so a stray .hadolint.yaml cannot ignore rules
    flags = {"hadolint": ["--config", str(tmp_path / "hadolint.yaml"), "--failure-threshold", "style", "--no-color"],
             "check-jsonschema": ["--builtin-schema", "vendor.compose-spec"], "shellcheck": ["--shell=sh"]}[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}  # nor a developer's overrides
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("name", "path", "bad"), [
    ("hadolint", DOCKERFILE, "FROM python:latest\nRUN pip install requests\n"),
    ("check-jsonschema", COMPOSE, "services:\n  api:\n    image: x\n    replicas: 2\n"),
    ("check-jsonschema", CI_COMPOSE, "services:\n  api:\n    volumes: /x\n"),
    ("shellcheck", MINIO_INIT, "#!/bin/sh\nrm $1\n"),
], ids=["hadolint", "check-jsonschema", "check-jsonschema-ci", "shellcheck"])
def test_linter_passes_the_file_and_rejects_a_bad_one(tmp_path: Path, name: str, path: str, bad: str) -> None:
    proc = lint(tmp_path, name, str(ROOT / path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "bad").write_text(bad)  # a linter that passed everything would make the line above vacuous
    assert lint(tmp_path, name, str(tmp_path / "bad")).returncode != 0

