"""Image inputs (image to image, inpainting): what they cost in resident memory and per request. Prints JSON lines,
each with the commit and its settings; every ratio is against a baseline measured in the same run.

1. `memory`: the Engine's img2img, inpaint and refiner-inpaint pipelines (`from_pipe`, worker/pipeline.py) over
   the base + refiner alone: the unique parameter and buffer storage of every resident module (deduplicated by
   storage address; 1.0 means not one weight is copied or cast) and the process RSS before and after building
   them. On the tiny model in float32 and in bfloat16 (a GPU deployment's half precision: the Engine must keep
   it), and on a full-size random-weight SDXL base + refiner (tools/models.py `build_full`, bf16 on the CPU,
   about 12 GB and a minute to build; `--no-full` skips it, and so does a tiny bf16 ratio above 1.01, which at
   full size would not fit in this machine's memory). Each is measured in a fresh child process.
   Built with SDXL_CHANNELS_LAST=false and no watermarker, so that nothing else the Engine does at start
   (channels-last copies of the conv weights, the watermarker's imports) lands between the two RSS readings.
   One more figure (tiny model): a dedicated inpainting UNet (`SDXL_INPAINT_MODEL`), which is one more UNet by
   design.
2. `submit`: the real API, Redis and worker processes (tests/procs.py) with a sleeping engine (this file's
   `sleep-worker`: bench/sleep_worker.py's engine, sleeping `--step-seconds` per step and answering a
   photo-like image), so the pipeline does not swamp the figure. Submit latency (POST without `Prefer: wait`)
   of a text-only request against the same request with a 1024x1024 PNG input as a multipart part, a `data:` URI,
   an upload id, and an upload id plus a mask (inpainting), rounds alternating the variants; the API's CPU per
   submit; and the worker's time outside the engine's own call (`timings.pipeline - timings.base`: the input's
   fetch, decode and resize are in it) over the text-only request's. Beside them, the same pieces timed
   directly in this process (decode and validate, store put and get, to_rgb, to_mask, a resize).
3. `one_call`: `Accept: image/png` + `Prefer: wait` (the image bytes in one answer) against `Prefer: wait` (JSON)
   then GET of the image, text only, same seed and size (1024 px, 20 steps of `--step-seconds`: a GPU-scale
   call), pairs alternating which goes first; ratio of the end-to-end medians and the median paired saving.

    python bench/images.py                          # 2-4 minutes on 2 cores (4 with the full-size build)
    python bench/images.py --no-full --n 3 --pairs 2   # smoke

Internal entry points: `python bench/images.py memory tiny|full DTYPE` (one model's memory figures, one JSON line) and
`python bench/images.py sleep-worker` (the worker process with the sleeping engine).
"""

import argparse
import base64
import ctypes
import gc
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from benchlib import (  # noqa: E402
    ROOT,
    bench_env,
    emit,
    goal,
    pcts,
    raised_limits,
    start_line,
    tiny_model,
)
from PIL import Image  # noqa: E402

from tests.procs import PY, Proc, RedisServer, Service, free_port  # noqa: E402

PROMPT = "a lighthouse at dusk, oil painting"
SIZE = 1024
SEED = 1234
STRENGTH = 0.5
FULL_BUILD_TIMEOUT_S = 300  # the child builds ~6.6 B parameters; past this the full-size figure is skipped
FULL_MIN_AVAILABLE_GIB = 16  # bf16 base + refiner peak at ~12 GB


def _commit() -> dict[str, Any]:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=ROOT, timeout=10).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    return {"commit": sha or None, "dirty": dirty}


COMMIT = _commit()


def out(row: dict[str, Any]) -> None:
    emit({"bench": "images", **COMMIT, **row})


def ms(values: Sequence[float], nd: int = 2) -> dict[str, float]:
    return pcts(values, (50, 95), scale=1000, nd=nd)


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth field plus sensor-like noise (bench/encode.py's `photo_like`): closest to a real SDXL output."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((max(1, height // 32), max(1, width // 32), 3)) * 255).astype("uint8"))
    photo = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    return np.clip(photo + rng.normal(0, 2.5, photo.shape), 0, 255).astype("uint8")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # Pillow's defaults: what a client is likely to send
    return buf.getvalue()


def input_pngs() -> tuple[bytes, bytes]:
    """The 1024 px input image (photo-like) and an inpainting mask (the right half white: repaint)."""
    image = png(Image.fromarray(photo_like(SIZE, SIZE, seed=7)))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:, SIZE // 2:] = 255
    return image, png(Image.fromarray(mask, "L"))


# --- 1. resident memory ---------------------------------------------------------------------------------------


def _settle() -> None:
    """Collect, and hand freed heap back to the OS, so RSS reads what is held, not what malloc keeps cached."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> tuple[int, str]:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss), "psutil"
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024, "/proc/self/status VmRSS"
    raise RuntimeError("no way to read RSS here")


def storage_bytes(pipes: Sequence[Any]) -> dict[str, int]:
    """Unique parameter + buffer storage of every torch module the pipelines hold (each storage counted once,
    by address: modules shared between pipelines, or tensors shared between modules, count once)."""
    import torch

    modules: dict[int, Any] = {}
    for pipe in pipes:
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                modules[id(comp)] = comp
    return module_storage_bytes(list(modules.values()))


def module_storage_bytes(modules: Sequence[Any]) -> dict[str, int]:
    storages: dict[int, int] = {}
    for module in modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return {"bytes": sum(storages.values()), "storages": len(storages), "modules": len(modules)}


def param_dtypes(pipes: Sequence[Any]) -> list[str]:
    import torch

    found = {str(t.dtype).removeprefix("torch.") for pipe in pipes for comp in pipe.components.values()
             if isinstance(comp, torch.nn.Module) for t in comp.parameters()}
    return sorted(found)


def memory_child(model: str, dtype: str) -> dict[str, Any]:
    """One model's memory figures, in this (fresh) process: `model` tiny or full, `dtype` the Engine's."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from worker.pipeline import DTYPES, Engine
    from worker.settings import WorkerSettings

    t0 = time.monotonic()
    if model == "tiny":
        root = tiny_model()
        base = StableDiffusionXLPipeline.from_pretrained(root / "base", dtype=DTYPES[dtype], add_watermarker=False)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            root / "refiner", dtype=DTYPES[dtype], text_encoder_2=base.text_encoder_2, vae=base.vae,
            add_watermarker=False)
        names = {"base_model": str(root / "base"), "refiner_model": str(root / "refiner")}
    else:
        from tools.models import build_full

        base, refiner = build_full("cpu", DTYPES[dtype])
        names = {"base_model": "full-size random (tools.models.build_full)", "refiner_model": "full-size random"}
    load_s = time.monotonic() - t0
    settings = WorkerSettings.model_validate({**names, "dtype": dtype, "device": "cpu", "channels_last": False,
                                              "watermark": False, "compile_mode": None, "fuse_qkv": False,
                                              "inpaint_model": None})
    _settle()
    rss0, rss_source = rss_bytes()
    before = storage_bytes([base, refiner])
    dtypes_before = param_dtypes([base, refiner])
    t1 = time.monotonic()
    engine = Engine(settings, pipelines=(base, refiner))
    engine_s = time.monotonic() - t1
    _settle()
    rss1, _ = rss_bytes()
    text_only = storage_bytes(engine.pipes())
    everything = [*engine.pipes(), engine.img2img, engine.inpaint, engine.refiner_inpaint]
    with_images = storage_bytes(everything)
    row: dict[str, Any] = {
        "model": model, "dtype": dtype, "load_or_build_s": round(load_s, 1),
        "settings": {"channels_last": False, "watermark": False, "inpaint_model": None, "device": "cpu"},
        "param_dtypes_before": dtypes_before,
        "param_dtypes_after": param_dtypes(everything),
        "storage_bytes_base_refiner": before["bytes"],
        "storage_bytes_engine_text_pipelines": text_only["bytes"],
        "storage_bytes_engine_all_pipelines": with_images["bytes"],
        "storage_ratio": with_images["bytes"] / before["bytes"],
        "modules": {"base_refiner": before["modules"], "all_pipelines": with_images["modules"]},
        "storages": {"base_refiner": before["storages"], "all_pipelines": with_images["storages"]},
        "rss_source": rss_source,
        "rss_bytes_before": rss0,
        "rss_bytes_after": rss1,
        "rss_delta_mib": round((rss1 - rss0) / 2**20, 2),
        "rss_ratio": round(rss1 / rss0, 5),
        "engine_build_s": round(engine_s, 3),
    }
    if model == "tiny" and dtype == "float32":
        # a dedicated inpainting UNet (SDXL_INPAINT_MODEL): one more UNet, by design (any UNet folder will load)
        dedicated = Engine(settings.model_copy(update={"inpaint_model": str(tiny_model() / "base")}),
                           pipelines=(base, refiner))
        extra = storage_bytes([*dedicated.pipes(), dedicated.img2img, dedicated.inpaint, dedicated.refiner_inpaint])
        row["dedicated_inpaint_unet"] = {"storage_ratio": round(extra["bytes"] / before["bytes"], 5),
                                         "unet_bytes": module_storage_bytes([dedicated.inpaint.unet])["bytes"]}
    return row


def run_memory(model: str, dtype: str, timeout: float) -> dict[str, Any] | None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([PY, str(Path(__file__).resolve()), "memory", model, dtype], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        out({"figure": "memory", "model": model, "dtype": dtype, "skipped": f"the child ran past {timeout:.0f} s"})
        return None
    if proc.returncode != 0:
        out({"figure": "memory", "model": model, "dtype": dtype,
             "skipped": f"the child exited {proc.returncode}: {proc.stderr[-1500:]}"})
        return None
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    out({"figure": "memory", **row, "child_wall_s": round(time.monotonic() - t0, 1)})
    return dict(row)


def mem_available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


# --- the sleeping worker --------------------------------------------------------------------------------------


def sleep_worker() -> int:
    """`python -m worker` with an engine that sleeps SDXL_SLEEP_STEP_SECONDS per step and answers a photo-like
    image (so the encoded output has an SDXL output's size, ~1.6 MB at 1024 px, not a flat colour's)."""
    import sleep_worker as sw

    from worker import pipeline

    step_seconds = float(os.environ.get("SDXL_SLEEP_STEP_SECONDS", "0.05"))
    frames: dict[tuple[int, int], Image.Image] = {}

    class PhotoSleepEngine(sw.SleepEngine):
        def run(self, params: Any, specs: list[Any], hook: Any, inputs: Any = None) -> tuple[list[Any], Any]:
            progress = pipeline.Progress(total_steps=params.num_inference_steps)
            t0 = time.monotonic()
            for i in range(params.num_inference_steps):
                time.sleep(step_seconds)
                progress.step = i + 1
                hook(progress)
            size = (params.width, params.height)
            if size not in frames:
                frames[size] = Image.fromarray(photo_like(*size))
            return [frames[size].copy() for _ in specs], pipeline.StageTimes(base=time.monotonic() - t0)

    pipeline.Engine = PhotoSleepEngine  # type: ignore[misc,assignment]
    from worker.__main__ import main

    return int(main() or 0)


def start_sleep_worker(svc: Service, step_seconds: float) -> int:
    wid = f"images-{free_port()}"
    w = Proc([PY, str(Path(__file__).resolve()), "sleep-worker"],
             svc.env(SDXL_WORKER_ID=wid, SDXL_SLEEP_STEP_SECONDS=str(step_seconds), SDXL_WARMUP="false",
                     PYTHONPATH=str(ROOT)),
             svc.data_dir / f"worker-{wid}.log")
    w.worker_id = wid  # type: ignore[attr-defined]
    svc.workers.append(w)
    svc.wait_worker_ready(wid)
    return w.proc.pid


# --- 2. what an input image adds to a request -----------------------------------------------------------------


def body(steps: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "width": SIZE, "height": SIZE, "num_inference_steps": steps, "seed": SEED,
            "refiner": {"mode": "none"}, **extra}


Submit = Callable[[httpx.Client], httpx.Response]


def variants(client: httpx.Client, image: bytes, mask: bytes, steps: int) -> dict[str, Submit]:
    """Each way to send the same 1024 px generation: text only, and with the image in each form it may take."""
    def upload(data: bytes) -> str:
        resp = client.post("/v1/image-uploads", files={"file": ("in.png", data, "image/png")})
        resp.raise_for_status()
        return str(resp.json()["id"])

    image_id, mask_id = upload(image), upload(mask)
    data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
    img_body = body(steps, strength=STRENGTH)
    return {
        "text_only": lambda c: c.post("/v1/generations", json=body(steps)),
        "multipart": lambda c: c.post("/v1/generations", data={"request": json.dumps(img_body)},
                                      files={"image": ("in.png", image, "image/png")}),
        "data_uri": lambda c: c.post("/v1/generations", json={**img_body, "image": data_uri}),
        "upload_id": lambda c: c.post("/v1/generations", json={**img_body, "image": image_id}),
        "inpaint_upload_ids": lambda c: c.post("/v1/generations",
                                               json={**img_body, "image": image_id, "mask_image": mask_id}),
    }


def wait_final(client: httpx.Client, gen_id: str) -> dict[str, Any]:
    for _ in range(10):
        res = client.get(f"/v1/generations/{gen_id}", headers={"Prefer": "wait=30"}).json()
        if res["status"] in ("succeeded", "failed", "canceled"):
            if res["status"] != "succeeded":
                raise RuntimeError(f"generation {gen_id} {res['status']}: {res.get('error')}")
            return dict(res)
    raise RuntimeError(f"generation {gen_id} did not finish")


def submit_bench(client: httpx.Client, api_pid: int, image: bytes, mask: bytes, n: int, warmup: int,
                 steps: int) -> dict[str, Any]:
    subs = variants(client, image, mask, steps)
    names = list(subs)
    latency: dict[str, list[float]] = {k: [] for k in names}
    api_cpu: dict[str, list[float]] = {k: [] for k in names}
    outside: dict[str, list[float]] = {k: [] for k in names}  # worker: timings.pipeline - timings.base
    for round_ in range(warmup + n):
        order = names[round_ % len(names):] + names[:round_ % len(names)]  # no variant always first
        for name in order:
            cpu0 = cpu_seconds(api_pid)
            t0 = time.perf_counter()
            resp = subs[name](client)
            seconds = time.perf_counter() - t0
            cpu = cpu_seconds(api_pid) - cpu0
            if resp.status_code != 202:
                raise RuntimeError(f"{name}: expected 202, got {resp.status_code}: {resp.text[:500]}")
            res = wait_final(client, resp.json()["id"])  # the stack idle again before the next submit
            if round_ >= warmup:
                latency[name].append(seconds)
                api_cpu[name].append(cpu)
                outside[name].append(res["timings"]["pipeline"] - res["timings"]["base"])
    uploads, upload_cpu = [], []
    for i in range(warmup + n):  # the upload path's one-off cost: POST /v1/image-uploads of the same image
        cpu0 = cpu_seconds(api_pid)
        t0 = time.perf_counter()
        resp = client.post("/v1/image-uploads", files={"file": ("in.png", image, "image/png")})
        seconds = time.perf_counter() - t0
        cpu = cpu_seconds(api_pid) - cpu0
        resp.raise_for_status()
        if i >= warmup:
            uploads.append(seconds)
            upload_cpu.append(cpu)
    text_p50 = statistics.median(latency["text_only"])
    out({"figure": "image_upload", "n": n, "size": SIZE, "input_png_bytes": len(image), "latency_ms": ms(uploads),
         "over_text_only_submit_p50": round(statistics.median(uploads) / text_p50, 3),
         "api_cpu_ms_p50": round(statistics.median(upload_cpu) * 1000, 2)})
    text_cpu = statistics.median(api_cpu["text_only"])
    text_outside = statistics.median(outside["text_only"])
    for name in names:
        out({"figure": "submit", "variant": name, "n": n, "size": SIZE, "input_png_bytes": len(image),
             "mask_png_bytes": len(mask) if name.startswith("inpaint") else None,
             "latency_ms": ms(latency[name]),
             "over_text_only_p50": round(statistics.median(latency[name]) / text_p50, 3),
             "extra_ms_p50": round((statistics.median(latency[name]) - text_p50) * 1000, 2),
             "api_cpu_ms_p50": round(statistics.median(api_cpu[name]) * 1000, 2),
             "api_cpu_over_text_only_p50": round(statistics.median(api_cpu[name]) / text_cpu, 3),
             "worker_outside_engine_ms": ms(outside[name]),
             "worker_extra_ms_p50": round((statistics.median(outside[name]) - text_outside) * 1000, 2)})
    return {name: {"submit_over_text_only_p50": round(statistics.median(latency[name]) / text_p50, 3),
                   "submit_extra_ms_p50": round((statistics.median(latency[name]) - text_p50) * 1000, 2),
                   "worker_extra_ms_p50": round((statistics.median(outside[name]) - text_outside) * 1000, 2)}
            for name in names}


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, from the scheduler's nanosecond counters (/proc/PID/stat counts
    clock ticks, 10 ms: coarser than one submit's work)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            pass
    return total / 1e9


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    fn()  # first call: lazy imports, page cache
    seconds = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


def pieces(image: bytes, mask: bytes, n: int) -> None:
    """The API's and the worker's work on one input, timed directly in this process (one thread)."""
    from app.uploads import decode_data_uri
    from common import images
    from common.storage import LocalStore

    max_px = 16 * 1024 * 1024
    data_uri = "data:image/png;base64," + base64.b64encode(image).decode()
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-store-") as tmp:
        store = LocalStore(Path(tmp))
        store.put("uploads/x/image.png", image, "image/png", {})
        rgb = images.to_rgb(image, max_px)
        figures = {
            # API, at submit
            "api_data_uri_decode": timed(lambda: decode_data_uri(data_uri, "image"), n),
            "api_inspect_decode_validate_sha256": timed(lambda: images.inspect(image, max_px), n),
            "api_mask_check": timed(lambda: images.to_mask(mask, max_px), n),
            "api_store_put_local": timed(lambda: store.put("uploads/y/image.png", image, "image/png", {}), n),
            # worker, before the pipeline call
            "worker_store_get_local": timed(lambda: store.get("uploads/x/image.png"), n),
            "worker_to_rgb": timed(lambda: images.to_rgb(image, max_px), n),
            "worker_to_mask": timed(lambda: images.to_mask(mask, max_px), n),
            # only when the output size differs from the input's (here 1024x1024 -> 1152x896)
            "worker_resize_lanczos_to_1152x896": timed(lambda: rgb.resize((1152, 896), Image.Resampling.LANCZOS), n),
        }
    for name, values in figures.items():
        out({"figure": "piece", "piece": name, "n": n, "size": SIZE, "input_png_bytes": len(image),
             "ms": ms(values, 3)})


# --- 3. one call against two requests -------------------------------------------------------------------------


def one_call(client: httpx.Client, req: dict[str, Any]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    resp = client.post("/v1/generations", json=req, headers={"Accept": "image/png", "Prefer": "wait=60"})
    seconds = time.perf_counter() - t0
    if resp.status_code != 201 or resp.headers.get("content-type") != "image/png" or not resp.content:
        raise RuntimeError(f"one call: expected 201 image/png, got {resp.status_code} "
                           f"{resp.headers.get('content-type')}: {resp.text[:300]}")
    return seconds, len(resp.content), resp.headers["X-Generation-Id"]


def two_requests(client: httpx.Client, req: dict[str, Any]) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    resp = client.post("/v1/generations", json=req, headers={"Prefer": "wait=60"})
    if resp.status_code != 201:
        raise RuntimeError(f"two requests: expected 201, got {resp.status_code}: {resp.text[:300]}")
    img = client.get(resp.json()["images"][0]["url"])
    seconds = time.perf_counter() - t0
    if img.status_code != 200 or not img.content:
        raise RuntimeError(f"image GET answered {img.status_code}")
    return seconds, len(img.content), str(resp.json()["id"])


def one_call_bench(client: httpx.Client, pairs: int, steps: int, step_seconds: float) -> dict[str, Any]:
    """End to end of each way, and the same minus the worker's `timings.pipeline` (read afterwards, untimed):
    the service's part, without the sleeping engine's jitter."""
    req = body(steps)
    ways = {"one_call": one_call, "two_requests": two_requests}
    for fn in ways.values():
        fn(client, req)  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    overhead: dict[str, list[float]] = {k: [] for k in ways}
    sizes: dict[str, int] = {}
    for i in range(pairs):
        order = list(ways) if i % 2 == 0 else list(ways)[::-1]
        for name in order:
            s, size, gen_id = ways[name](client, req)
            pipeline_s = client.get(f"/v1/generations/{gen_id}").json()["timings"]["pipeline"]
            seconds[name].append(s)
            overhead[name].append(s - pipeline_s)
            sizes[name] = size
    saved = [b - a for a, b in zip(seconds["one_call"], seconds["two_requests"], strict=True)]
    saved_overhead = [b - a for a, b in zip(overhead["one_call"], overhead["two_requests"], strict=True)]
    ratio = statistics.median(seconds["one_call"]) / statistics.median(seconds["two_requests"])
    row = {"figure": "one_call", "pairs": pairs, "size": SIZE, "steps": steps, "step_seconds": step_seconds,
           "png_bytes": sizes, "one_call_s": pcts(seconds["one_call"], (50, 95), nd=4),
           "two_requests_s": pcts(seconds["two_requests"], (50, 95), nd=4),
           "one_over_two_p50": round(ratio, 4),
           "saved_ms_paired_p50": round(statistics.median(saved) * 1000, 2),
           "outside_pipeline_ms": {k: ms(v) for k, v in overhead.items()},
           "outside_pipeline_one_over_two_p50": round(
               statistics.median(overhead["one_call"]) / statistics.median(overhead["two_requests"]), 3),
           "outside_pipeline_saved_ms_paired_p50": round(statistics.median(saved_overhead) * 1000, 2)}
    out(row)
    return {k: row[k] for k in ("one_over_two_p50", "saved_ms_paired_p50", "outside_pipeline_one_over_two_p50",
                                "outside_pipeline_saved_ms_paired_p50")}


# --- main -----------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="timed submits per variant")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--pairs", type=int, default=15, help="one call / two requests pairs")
    ap.add_argument("--pieces", type=int, default=15, help="timed calls of each directly timed piece")
    ap.add_argument("--step-seconds", type=float, default=0.05, help="the sleeping engine's time per step")
    ap.add_argument("--submit-steps", type=int, default=2, help="steps of the submit benchmark's generations")
    ap.add_argument("--one-call-steps", type=int, default=20, help="steps of the one-call benchmark's generations")
    ap.add_argument("--no-full", action="store_true", help="skip the full-size SDXL memory figure")
    args = ap.parse_args()
    start_line("images", **COMMIT, **vars(args), size=SIZE, seed=SEED, strength=STRENGTH)

    mem: dict[str, Any] = {}
    for model, dtype in (("tiny", "float32"), ("tiny", "bfloat16"), ("full", "bfloat16")):
        label = f"{model}_{dtype}"
        skip = None
        if model == "full":
            tiny_half = mem.get("tiny_bfloat16")
            if args.no_full:
                skip = "--no-full"
            elif tiny_half is None or tiny_half["storage_ratio"] > 1.01:
                # the tiny model in the same dtype already grew: the full-size one would grow alike, past this
                # machine's memory (bf16 base + refiner alone are ~12 GB)
                skip = (f"the tiny {dtype} Engine's storage ratio is "
                        f"{tiny_half['storage_ratio'] if tiny_half else 'unknown'}: at full size that would not fit")
            elif mem_available_gib() < FULL_MIN_AVAILABLE_GIB:
                skip = f"{mem_available_gib():.1f} GiB available, {FULL_MIN_AVAILABLE_GIB} needed"
        if skip:
            out({"figure": "memory", "model": model, "dtype": dtype, "skipped": skip})
            continue
        row = run_memory(model, dtype, 120 if model == "tiny" else FULL_BUILD_TIMEOUT_S)
        if row is not None:
            mem[label] = {"storage_ratio": row["storage_ratio"], "rss_ratio": row["rss_ratio"],
                          "rss_delta_mib": row["rss_delta_mib"], "param_dtypes_after": row["param_dtypes_after"]}

    image, mask = input_pngs()
    pieces(image, mask, args.pieces)

    server = RedisServer()
    server.start()
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        env = {**bench_env(1), **raised_limits(SDXL_MAX_UPLOADS_PER_KEY="1000000",
                                               SDXL_MAX_UPLOAD_BYTES_PER_KEY=str(2**40))}
        svc = Service(server.url, tiny_model(), Path(tmp), env)
        try:
            url = svc.start_api()
            start_sleep_worker(svc, args.step_seconds)
            with httpx.Client(base_url=url, timeout=120) as client:
                submit = submit_bench(client, svc.apis[0].proc.pid, image, mask, args.n, args.warmup,
                                      args.submit_steps)
                one = one_call_bench(client, args.pairs, args.one_call_steps, args.step_seconds)
        finally:
            svc.stop()
            server.stop()

    goals = {m: {"storage_ratio": goal(round(v["storage_ratio"], 5), 1.01, higher_is_better=False),
                 "rss_ratio": goal(v["rss_ratio"], 1.01, higher_is_better=False),
                 "param_dtypes_after": v["param_dtypes_after"]} for m, v in mem.items()}
    out({"event": "summary", "memory_all_pipelines_over_base_refiner": goals, "submit": submit,
         "one_call": one})
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["memory"]:
        print(json.dumps(memory_child(sys.argv[2], sys.argv[3])), flush=True)
    elif sys.argv[1:2] == ["sleep-worker"]:
        sys.exit(sleep_worker())
    else:
        sys.exit(main())
