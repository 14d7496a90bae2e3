"""`python bench/sleep_worker.py`: the real worker process (`python -m worker`) with its engine replaced by one
whose pipeline call sleeps `SDXL_SLEEP_SECONDS` (default 1.0), the scale of a GPU call, reporting progress each
step as the real one does. Measures the service around the pipeline at GPU scale on a CPU-only machine.
A batch of n images sleeps the same time as one (a GPU batch is about as fast until the device is full).
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.contract.params import GenerationParams  # noqa: E402
from worker import pipeline  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402


class SleepEngine:
    load_count = 0
    load_seconds = 0.0

    def __init__(self, settings: WorkerSettings, pipelines: Any = None) -> None:
        self.seconds = float(os.environ.get("SDXL_SLEEP_SECONDS", "1.0"))
        self.refiner = None
        # the worker builds its preview decoder on the engine's device (worker/__main__.py)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        SleepEngine.load_count += 1

    def run(self, params: GenerationParams, specs: list[pipeline.ImageSpec], hook: pipeline.StepHook,
            inputs: pipeline.Inputs | None = None) -> tuple[list[Image.Image], pipeline.StageTimes]:
        steps = params.num_inference_steps
        progress = pipeline.Progress(total_steps=steps)
        t0 = time.monotonic()
        for i in range(steps):
            time.sleep(self.seconds / steps)
            progress.step = i + 1
            hook(progress)
        size = (params.width, params.height)
        images = [Image.new("RGB", size, (spec.seed % 256, 0, 0)) for spec in specs]
        return images, pipeline.StageTimes(base=time.monotonic() - t0)

    def scheduler_config(self, name: str) -> dict[str, Any]:
        return {"name": name}

    def model_info(self) -> dict[str, Any]:
        return {"base_model": "sleep", "refiner_model": None}

    def free_memory(self) -> None:
        pass

    def warmup(self) -> None:
        pass

    def memory(self) -> dict[str, int]:
        return {}


if __name__ == "__main__":
    pipeline.Engine = SleepEngine  # type: ignore[misc,assignment]
    from worker.__main__ import main

    sys.exit(main())
