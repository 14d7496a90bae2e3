"""The no-queue reference for bench/overhead.py: the worker's own Engine called straight from a FastAPI route.

What a hand-rolled wrapper does ("naive FastAPI" in ../shared/REFERENCE.md): validate the body, run the
pipeline on one long-lived model thread, encode the PNG as the worker does, answer the bytes. No queue, no
record, no events, no second request for the image. Its overhead (end-to-end minus the pipeline call, which the
`X-Pipeline-Seconds` header reports) is measured in the same run as the service's, on the same cores, so the
service's overhead can be read against what the cheapest possible wrapper costs on the same machine.

    uvicorn bench.naive:create_naive_app --factory     # BENCH_NAIVE_PARAMS: the resolved params (JSON)
"""

import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import baseline_engine  # noqa: E402

from app.schemas import GenerationCreate  # noqa: E402


def create_naive_app() -> FastAPI:
    from worker.encode import encode
    from worker.settings import WorkerSettings

    params_json = json.loads(os.environ["BENCH_NAIVE_PARAMS"])
    level = WorkerSettings().png_compress_level
    # one long-lived thread owns the model: torch's CPU thread pools are per thread (REFERENCE.md), and one
    # pipeline object must not run twice at once
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
    engine, params, specs = model_thread.submit(
        baseline_engine, {"params": params_json, "warmup": 2, "batch": 1}).result()

    def generate() -> tuple[bytes, str, float]:
        t0 = time.perf_counter()
        images, _times = engine.run(params, specs, lambda _p: None)
        seconds = time.perf_counter() - t0
        data, ctype = encode(images[0], params.output_format, params.output_quality,
                             {"seed": specs[0].seed, "index": 0}, level)
        return data, ctype, seconds

    app = FastAPI()

    @app.post("/generate")
    async def create(body: GenerationCreate) -> Response:
        data, ctype, seconds = await asyncio.get_running_loop().run_in_executor(model_thread, generate)
        return Response(data, media_type=ctype, headers={"X-Pipeline-Seconds": f"{seconds:.6f}"})

    return app


def call(client: Any, body: dict[str, Any]) -> tuple[float, float]:
    """One request: (end-to-end seconds, the pipeline seconds the server reported)."""
    t0 = time.perf_counter()
    resp = client.post("/generate", json=body)
    seconds = time.perf_counter() - t0
    if resp.status_code != 200 or not resp.content:
        raise RuntimeError(f"naive wrapper answered {resp.status_code}: {resp.text[:300]}")
    return seconds, float(resp.headers["X-Pipeline-Seconds"])
