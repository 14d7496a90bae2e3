"""A client generated from the committed openapi/openapi.json, used as a customer would, against a live service.

The client is generated at test time by openapi-python-client (the spec's users' tool of choice for Python) into
tests/.generated/client (gitignored) and imported from there. The client raises on any status the spec does not
declare, so every answer below is also a check that the contract lists it.
"""

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.access import BLOCKER, Key, keys_env
from tests.procs import PY, ROOT, Service

OUT = ROOT / "tests" / ".generated" / "client"
TINY = {"width": 128, "height": 128, "num_inference_steps": 4}


@pytest.fixture(scope="module")
def sdxl() -> SimpleNamespace:
    """The generated package's modules, freshly generated from the committed spec."""
    env = {**os.environ, "PATH": f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(
        [
            str(Path(PY).parent / "openapi-python-client"),
            "generate",
            "--path",
            "openapi/openapi.json",
            "--output-path",
            str(OUT),
            "--overwrite",
            "--config",
            "openapi/python-client.yaml",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Warning" not in res.stdout + res.stderr, res.stdout + res.stderr  # every operation fully generated
    sys.path.insert(0, str(OUT))
    for name in [m for m in sys.modules if m == "sdxl_client" or m.startswith("sdxl_client.")]:
        del sys.modules[name]  # a previous run's package must not shadow this one
    mod = {name: importlib.import_module(f"sdxl_client.{name}") for name in ("client", "models", "types")}
    api = {
        name: importlib.import_module(f"sdxl_client.api.{group}.{name}")
        for group, name in [
            ("generations", "create_generation"),
            ("generations", "get_generation"),
            ("generations", "get_generation_image"),
            ("generations", "cancel_generation"),
            ("generations", "list_generations"),
            ("generations", "delete_generation"),
            ("webhooks", "list_generation_webhook_attempts"),
            ("image_uploads", "create_image_upload"),
            ("image_uploads", "get_image_upload"),
            ("image_uploads", "list_image_uploads"),
            ("image_uploads", "delete_image_upload"),
            ("health", "healthz"),
            ("health", "readyz"),
        ]
    }
    return SimpleNamespace(**mod, **api)


@pytest.fixture(scope="module")
def key() -> Key:
    return Key("client")


@pytest.fixture(scope="module")
def svc(shared_stack: Service, key: Key) -> Iterator[Service]:
    """An API with this module's key, on the shared stack (one worker)."""
    s = shared_stack.view(SDXL_API_KEYS=keys_env(key))
    try:
        s.start_api()
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(sdxl: SimpleNamespace, svc: Service, key: Key) -> Any:
    # long enough for Prefer: wait=30 on a loaded machine
    return sdxl.client.AuthenticatedClient(
        base_url=svc.url, token=key.secret, raise_on_unexpected_status=True, timeout=httpx.Timeout(90.0)
    )


def body(sdxl: SimpleNamespace, **fields: Any) -> Any:
    return sdxl.models.GenerationCreate.from_dict({"prompt": "a lighthouse at dusk", **TINY, **fields})


def test_health_probes_need_no_key(sdxl: SimpleNamespace, svc: Service) -> None:
    anon = sdxl.client.Client(base_url=svc.url, raise_on_unexpected_status=True)
    assert sdxl.healthz.sync(client=anon).to_dict() == {"status": "ok"}
    ready = sdxl.readyz.sync(client=anon).to_dict()
    assert ready["status"] == "ready" and ready["workers_ready"] == 1


def test_create_wait_download(sdxl: SimpleNamespace, client: Any) -> None:
    res = sdxl.create_generation.sync_detailed(client=client, body=body(sdxl, seed=7), prefer="wait=30")
    assert res.status_code == 201, res.content
    gen = res.parsed
    assert isinstance(gen, sdxl.models.Generation)
    assert gen.status == sdxl.models.GenerationStatus.SUCCEEDED
    assert res.headers["location"].endswith(f"/v1/generations/{gen.id}")
    assert res.headers["preference-applied"] == "wait=30" and res.headers["x-request-id"]
    assert gen.params.seed == 7 and gen.progress.stage == "done"  # typed: no dict digging
    assert isinstance(gen.created_at, datetime) and gen.finished_at >= gen.created_at
    assert gen.timings.total >= gen.timings.pipeline > 0 and gen.timings.batch_images == 1

    img = gen.images[0]
    got = sdxl.get_generation_image.sync_detailed(gen.id, 0, client=client)
    assert got.status_code == 200 and isinstance(got.parsed, sdxl.types.File)
    data = got.parsed.payload.read()
    assert len(data) == img.bytes_ and hashlib.sha256(data).hexdigest() == img.sha256
    assert Image.open(io.BytesIO(data)).size == (128, 128)


def test_create_then_long_poll_with_get(sdxl: SimpleNamespace, client: Any) -> None:
    res = sdxl.create_generation.sync_detailed(client=client, body=body(sdxl))
    assert res.status_code == 202 and res.parsed.status.value in ("queued", "running")
    deadline = time.monotonic() + 120
    gen = res.parsed
    while gen.status.value not in ("succeeded", "failed", "canceled") and time.monotonic() < deadline:
        gen = sdxl.get_generation.sync(gen.id, client=client, prefer="wait=30")
    assert gen.status == sdxl.models.GenerationStatus.SUCCEEDED
    assert len(gen.images) == 1 and gen.images[0].width == 128


def test_cancel_a_long_generation_and_not_a_finished_one(sdxl: SimpleNamespace, client: Any) -> None:
    long = sdxl.create_generation.sync(client=client, body=sdxl.models.GenerationCreate.from_dict(BLOCKER))
    res = sdxl.cancel_generation.sync_detailed(long.id, client=client)
    assert res.status_code == 202, res.content
    gen = res.parsed
    deadline = time.monotonic() + 60
    while gen.status.value != "canceled" and time.monotonic() < deadline:
        gen = sdxl.get_generation.sync(long.id, client=client, prefer="wait=5")
    assert gen.status == sdxl.models.GenerationStatus.CANCELED and gen.images == []

    done = sdxl.create_generation.sync(client=client, body=body(sdxl), prefer="wait=30")
    assert done.status.value == "succeeded"
    refused = sdxl.cancel_generation.sync_detailed(done.id, client=client)
    assert refused.status_code == 409
    assert isinstance(refused.parsed, sdxl.models.ProblemDetails)
    assert refused.parsed.type_ == "urn:sdxl:problem:generation-final"


def test_list_newest_first_and_filter(sdxl: SimpleNamespace, client: Any) -> None:
    made = [sdxl.create_generation.sync(client=client, body=body(sdxl), prefer="wait=30") for _ in range(2)]
    page = sdxl.list_generations.sync(client=client, limit=2)
    assert isinstance(page, sdxl.models.GenerationList)
    assert [g.id for g in page.data] == [made[1].id, made[0].id]
    assert isinstance(page.next_cursor, str)  # earlier tests made more
    rest = sdxl.list_generations.sync(client=client, limit=100, cursor=page.next_cursor)
    assert {g.id for g in rest.data}.isdisjoint(g.id for g in page.data) and rest.next_cursor is None
    canceled = sdxl.list_generations.sync(client=client, status=sdxl.models.ListGenerationsStatusType0.CANCELED)
    assert canceled.data and all(g.status.value == "canceled" for g in canceled.data)


def test_delete_then_404(sdxl: SimpleNamespace, client: Any) -> None:
    gen = sdxl.create_generation.sync(client=client, body=body(sdxl), prefer="wait=30")
    attempts = sdxl.list_generation_webhook_attempts.sync(gen.id, client=client)
    assert attempts.data == []
    assert sdxl.delete_generation.sync_detailed(gen.id, client=client).status_code == 204
    gone = sdxl.get_generation.sync_detailed(gen.id, client=client)
    assert gone.status_code == 404 and gone.parsed.type_ == "urn:sdxl:problem:generation-not-found"


def test_errors_parse_as_problem_details(sdxl: SimpleNamespace, svc: Service, client: Any) -> None:
    bad = sdxl.create_generation.sync_detailed(client=client, body=body(sdxl, width=100))
    assert bad.status_code == 422
    problem = bad.parsed
    assert isinstance(problem, sdxl.models.ProblemDetails) and problem.type_ == "urn:sdxl:problem:validation-error"
    assert [(e.field, e.value) for e in problem.errors] == [("width", 100)]

    anon = sdxl.client.Client(base_url=svc.url, raise_on_unexpected_status=True)
    refused = sdxl.create_generation.sync_detailed(client=anon, body=body(sdxl))
    assert refused.status_code == 401 and refused.parsed.type_ == "urn:sdxl:problem:unauthorized"
    assert refused.headers["www-authenticate"].startswith("Bearer")


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def test_every_scheduler_answers_strict_json(sdxl: SimpleNamespace, client: Any) -> None:
    # found by tests/e2e/test_fuzz.py: DPM-Solver's config holds -inf, and the manifest carried it into the answer
    for scheduler in sdxl.models.GenerationCreateScheduler:
        res = sdxl.create_generation.sync_detailed(
            client=client, body=body(sdxl, scheduler=scheduler.value, num_inference_steps=2), prefer="wait=30"
        )
        assert res.status_code == 201, (scheduler, res.content[:300])
        gen = json.loads(res.content, parse_constant=_no_constants)
        assert gen["status"] == "succeeded" and gen["manifest"]["scheduler_config"], scheduler


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def test_upload_an_image_and_inpaint_it(sdxl: SimpleNamespace, client: Any) -> None:
    """The image flow as a customer writes it with the generated client: store the picture and its mask once,
    inpaint by upload id, then again in one multipart call; the outputs match, and the uploads can be deleted."""
    picture = _png(Image.new("RGB", (128, 96), (180, 40, 40)))
    mask_img = Image.new("L", (128, 96), 0)
    mask_img.paste(255, (32, 24, 96, 72))
    mask = _png(mask_img)
    File = sdxl.types.File
    uploads = []
    for data in (picture, mask):
        res = sdxl.create_image_upload.sync_detailed(client=client, body=sdxl.models.CreateImageUploadBody(
            file=File(payload=io.BytesIO(data), file_name="in.png", mime_type="image/png")))
        assert res.status_code == 201, res.content
        up = res.parsed
        assert isinstance(up, sdxl.models.ImageUpload) and up.sha256 == hashlib.sha256(data).hexdigest()
        assert (up.width, up.height) == (128, 96)
        uploads.append(up)
    listed = sdxl.list_image_uploads.sync(client=client)
    assert {u.id for u in uploads} <= {u.id for u in listed.data}

    fields = {"prompt": "a red barn", "num_inference_steps": 4, "seed": 5, "refiner": {"mode": "none"}}
    by_id = sdxl.create_generation.sync_detailed(
        client=client, body=sdxl.models.GenerationCreate.from_dict(
            {**fields, "image": uploads[0].id, "mask_image": uploads[1].id}), prefer="wait=30")
    assert by_id.status_code == 201, by_id.content
    gen = by_id.parsed
    assert gen.status == sdxl.models.GenerationStatus.SUCCEEDED
    assert (gen.images[0].width, gen.images[0].height) == (128, 96)
    multipart = sdxl.create_generation.sync_detailed(
        client=client, body=sdxl.models.CreateGenerationFilesBody(
            request=sdxl.models.GenerationCreate.from_dict(fields),
            image=File(payload=io.BytesIO(picture), file_name="in.png", mime_type="image/png"),
            mask_image=File(payload=io.BytesIO(mask), file_name="mask.png", mime_type="image/png")),
        prefer="wait=30")
    assert multipart.status_code == 201, multipart.content
    assert multipart.parsed.images[0].sha256 == gen.images[0].sha256  # same pixels in, same bytes out

    for up in uploads:
        assert sdxl.delete_image_upload.sync_detailed(up.id, client=client).status_code == 204
        gone = sdxl.get_image_upload.sync_detailed(up.id, client=client)
        assert gone.status_code == 404 and gone.parsed.type_ == "urn:sdxl:problem:upload-not-found"


def test_the_documented_wait_helper_works_as_written(sdxl: SimpleNamespace, client: Any) -> None:
    """docs/clients.md's helper, run as written (the first code block that defines it)."""
    doc = (ROOT / "docs" / "clients.md").read_text()
    code = next(block.split("\n", 1)[1] for block in doc.split("```")[1::2] if "def wait_for" in block)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/clients.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    gen, png = namespace["generate"](client, "a lighthouse at dusk", seed=3, **TINY)
    assert gen.status.value == "succeeded" and gen.params.seed == 3
    assert hashlib.sha256(png).hexdigest() == gen.images[0].sha256
    queued = sdxl.create_generation.sync(client=client, body=body(sdxl))
    assert namespace["wait_for"](client, queued).status.value == "succeeded"
