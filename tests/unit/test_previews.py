"""Live previews: the TAESD-XL decode and the encoder (worker/previews.py), the engine's preview hook on the tiny
model (base, ensemble and img2img refiners, batches), the request field's resolution and the webhook filter."""

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from common.contract.events import STREAM_ONLY, EventType, enqueue_webhook
from common.contract.params import GenerationParams
from tools.models import build_tiny_taesd
from worker.pipeline import Engine, ImageSpec, Progress
from worker.previews import HUB_TAESD_XL, Previewer, event_data, latent_size, preview_size, preview_source
from worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def taesd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


@pytest.fixture(scope="module")
def previewer(taesd: Path) -> Previewer:
    p = Previewer.load(WorkerSettings(preview_vae=str(taesd)), torch.device("cpu"), torch.float32)
    assert p is not None
    return p


@pytest.mark.parametrize(("size", "max_side", "expected"), [
    ((1024, 1024), 256, (256, 256)),
    ((1216, 832), 256, (256, 176)),
    ((832, 1216), 256, (176, 256)),
    ((64, 64), 256, (64, 64)),  # never larger than the image
    ((1024, 1024), 1024, (1024, 1024)),
    ((2048, 64), 256, (256, 8)),  # at least one latent cell
])
def test_preview_size(size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    assert preview_size(*size, max_side) == expected
    assert latent_size(size[0] // 8, size[1] // 8, max_side) == (expected[0] // 8, expected[1] // 8)


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_render_gives_decodable_small_images(taesd: Path, fmt: str) -> None:
    p = Previewer.load(WorkerSettings(preview_vae=str(taesd), preview_format=fmt, preview_max_size=64),
                       torch.device("cpu"), torch.float32)
    assert p is not None
    latents = torch.randn(3, 4, 32, 24, generator=torch.Generator().manual_seed(0))  # a 192x256 batch of 3
    out = p.render(latents)
    assert len(out) == 3
    for pv in out:
        img = Image.open(io.BytesIO(pv.data))
        assert img.format == fmt.upper() and img.size == (48, 64) == (pv.width, pv.height)
        assert pv.content_type == f"image/{fmt}" and pv.ext == fmt
    assert out[0].data != out[1].data  # each image of the batch decoded from its own latents


def test_render_follows_the_latents(previewer: Previewer) -> None:
    """The decode reads the pipeline's latents as they are (TAESD-XL's scaling factor is 1)."""
    a = previewer.decode(torch.zeros(1, 4, 8, 8))[0]
    b = previewer.decode(torch.full((1, 4, 8, 8), 2.0))[0]
    assert a.size == b.size == (64, 64) and a.tobytes() != b.tobytes()


def test_event_data_inline_or_url(previewer: Previewer) -> None:
    pv = previewer.render(torch.zeros(1, 4, 8, 8))[0]
    inline = event_data("gen_x", 1, 5, 30, "base", pv, None)
    assert base64.b64decode(inline["b64"]) == pv.data and inline["url"] is None
    assert inline | {"b64": None} == {"generation_id": "gen_x", "index": 1, "step": 5, "total_steps": 30,
                                      "stage": "base", "width": 64, "height": 64, "content_type": "image/webp",
                                      "bytes": len(pv.data), "b64": None, "url": None}
    stored = event_data("gen_x", 1, 5, 30, "base", pv, "/v1/generations/gen_x/previews/1-5.webp")
    assert stored["b64"] is None and stored["url"].endswith("1-5.webp")


def test_preview_source(tmp_path: Path, taesd: Path) -> None:
    assert preview_source(WorkerSettings(preview_vae="none")) is None
    assert preview_source(WorkerSettings(preview_vae="")) is None
    assert preview_source(WorkerSettings(preview_vae="org/taesd")) == "org/taesd"
    assert preview_source(WorkerSettings(preview_vae="auto", base_model="stabilityai/sdxl")) == HUB_TAESD_XL
    (tmp_path / "base").mkdir()
    assert preview_source(WorkerSettings(base_model=str(tmp_path / "base"))) == HUB_TAESD_XL
    build_tiny_taesd(tmp_path / "taesd")
    assert preview_source(WorkerSettings(base_model=str(tmp_path / "base"))) == str(tmp_path / "taesd")


def test_auto_without_a_decoder_turns_previews_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("worker.previews.HUB_TAESD_XL", str(tmp_path / "no-such-taesd"))
    assert Previewer.load(WorkerSettings(base_model=str(tmp_path)), torch.device("cpu"), torch.float32) is None
    with pytest.raises(RuntimeError, match="SDXL_PREVIEW_VAE"):  # named explicitly: it must load
        Previewer.load(WorkerSettings(preview_vae=str(tmp_path / "nothing")), torch.device("cpu"), torch.float32)


# --- the engine's hook -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine(WorkerSettings(base_model=str(tiny_model / "base"), refiner_model=str(tiny_model / "refiner"),
                                 watermark=False))


def run(engine: Engine, previews: bool = True, n: int = 1, **kw: Any) -> tuple[list[bytes], list[tuple[Any, ...]]]:
    base: dict[str, Any] = dict(prompt="a lighthouse", width=64, height=64, num_inference_steps=10,
                                guidance_scale=5.0, seed=1, refiner={"mode": "none"}, preview_every=2)
    base.update(kw)
    p = GenerationParams(**base)
    seen: list[tuple[Any, ...]] = []

    def preview(pr: Progress, latents: torch.Tensor) -> None:
        seen.append((pr.step, pr.total_steps, pr.stage, tuple(latents.shape)))

    specs = [ImageSpec(p.prompt, None, None, None, p.image_seed(i)) for i in range(n)]
    imgs, _ = engine.run(p, specs, lambda _pr: None, preview=preview if previews else None)
    return [i.tobytes() for i in imgs], seen


def test_hook_every_n_steps_and_same_pixels(engine: Engine) -> None:
    with_previews, seen = run(engine)
    assert [s[0] for s in seen] == [2, 4, 6, 8, 10]
    assert all(s[1] == 10 and s[2] == "base" and s[3] == (1, 4, 8, 8) for s in seen)
    assert run(engine, previews=False)[0] == with_previews  # previews leave the images alone
    assert run(engine, preview_every=None)[1] == []  # off: no call


def test_hook_sees_the_whole_batch(engine: Engine) -> None:
    _, seen = run(engine, n=3, preview_every=5)
    assert [(s[0], s[3][0]) for s in seen] == [(5, 3), (10, 3)]


@pytest.mark.parametrize(("refiner", "stages"), [
    ({"mode": "ensemble", "denoising_start": 0.5}, {"base", "refiner"}),
    ({"mode": "img2img", "strength": 0.5}, {"base", "refiner"}),
])
def test_hook_follows_the_refiner(engine: Engine, refiner: dict[str, Any], stages: set[str]) -> None:
    _, seen = run(engine, refiner=refiner, preview_every=1)
    steps = [s[0] for s in seen]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[0] == 1
    assert {s[2] for s in seen} == stages
    assert steps[-1] == seen[-1][1]  # up to the last step of the refiner


# --- the contract ------------------------------------------------------------------------------------------


def test_previews_never_reach_a_webhook() -> None:
    class Queue:
        jobs: list[Any] = []

        def enqueue(self, *args: Any, **kw: Any) -> None:
            self.jobs.append(args)

    q = Queue()
    rec = {"id": "gen_x", "webhook": {"url": "https://example.com/h", "events": [t.value for t in EventType]}}
    assert EventType.preview in STREAM_ONLY and not EventType.preview.is_terminal
    enqueue_webhook(None, rec, EventType.preview, "1-0", {}, q, 0)  # type: ignore[arg-type]
    assert q.jobs == []
    enqueue_webhook(None, rec, EventType.succeeded, "1-1", {}, q, 0)  # type: ignore[arg-type]
    assert len(q.jobs) == 1


def test_webhook_subscriptions_refuse_previews() -> None:
    from pydantic import ValidationError

    from app.schemas import WebhookCreate

    with pytest.raises(ValidationError):
        WebhookCreate(url="https://example.com/h", events=["generation.preview"])  # type: ignore[list-item]


def test_resolve_previews() -> None:
    from app.enqueue import resolve
    from app.errors import Problem
    from app.schemas import GenerationCreate
    from app.settings import Settings

    settings = Settings(refiner_model=None)

    def params(**kw: Any) -> GenerationParams:
        return resolve(GenerationCreate(prompt="p", **kw), settings, refiner_available=False)

    assert params().preview_every is None
    assert params(previews=True).preview_every == 5
    assert params(previews=True, preview_every=3).preview_every == 3
    with pytest.raises(Problem, match="preview_every"):
        params(preview_every=3)
    a, b = params(seed=1), params(seed=1, previews=True)
    assert a.batch_key() != b.batch_key()  # a micro-batch shares one preview cadence


def test_a_large_preview_is_stored_under_the_generation_and_named_by_url(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from common.contract.params import JobPayload
    from common.storage import LocalStore
    from worker.attempt import Member
    from worker.execute import Executing
    from worker.previews import Preview

    params = GenerationParams(prompt="p", width=64, height=64, num_inference_steps=4, guidance_scale=5, seed=0)
    m = Member(JobPayload(generation_id="gen_x", token="t", params=params), "gen_x-1")
    pv = Preview(b"x" * 100, 8, 8, "image/webp", "webp")
    store = LocalStore(tmp_path)
    runner: Any = SimpleNamespace(store=store, settings=WorkerSettings(preview_inline_max_bytes=100,
                                                                       public_base_url="https://api.example"))
    assert Executing.store_preview(runner, m, 0, 5, pv) is None  # at the limit: inline
    assert list(tmp_path.rglob("*.webp")) == []
    runner.settings = WorkerSettings(preview_inline_max_bytes=99, public_base_url="https://api.example")
    url = Executing.store_preview(runner, m, 1, 5, pv)
    assert url == "https://api.example/v1/generations/gen_x/previews/1-5.webp"
    assert store.get("generations/gen_x/previews/1-5.webp").data == pv.data
    assert store.delete_prefix("generations/gen_x/") == 1  # deleted with the generation
