"""Parameter bounds that come from the loaded model's configs, not from a fixed range: read by the API from
the same folders (or hub cache) as its tokenizers, so a value the model cannot take is a 422 at submit,
not a `pipeline_error` after the queue.

- `clip_skip`: diffusers takes `hidden_states[-(clip_skip + 2)]` from each base text encoder, so it must be
  at most the shallower encoder's depth minus one (11 for SDXL's 12-layer CLIP ViT-L; 3 for the tiny model).
- `num_inference_steps` (base and refiner): a scheduler cannot take more steps than its training timesteps.
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import field_error
from app.tokens import locate
from common.contract.params import GenerationParams, RefinerMode

log = logging.getLogger("app.model_limits")

RETRY_SECONDS = 30.0  # a model not yet on this machine (a first download in progress) is looked for again


@dataclass(frozen=True)
class ModelLimits:
    max_clip_skip: int | None = None  # None: unknown here (configs not on this machine); the worker decides
    max_steps: int | None = None
    max_refiner_steps: int | None = None

    def check(self, params: GenerationParams) -> None:
        if params.clip_skip is not None and self.max_clip_skip is not None and params.clip_skip > self.max_clip_skip:
            raise field_error("clip_skip", f"must be at most {self.max_clip_skip} for this model (its shallower "
                                           f"text encoder has {self.max_clip_skip + 1} layers)", params.clip_skip)
        if self.max_steps is not None and params.num_inference_steps > self.max_steps:
            raise field_error("num_inference_steps", f"must be at most {self.max_steps} for this model's scheduler "
                                                     "(its training timesteps)", params.num_inference_steps)
        steps = params.refiner.num_inference_steps
        if (params.refiner.mode == RefinerMode.img2img and steps is not None and self.max_refiner_steps is not None
                and steps > self.max_refiner_steps):
            raise field_error("refiner.num_inference_steps", f"must be at most {self.max_refiner_steps} for the "
                                                             "refiner's scheduler (its training timesteps)", steps)


def _config(model: str | None, sub: str, name: str, revision: str | None) -> dict[str, Any] | None:
    folder = locate(model, sub, revision) if model else None
    path = folder / name if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(Path(path).read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError) as exc:
        log.warning("could not read %s: %s", path, exc)
        return None


def read_limits(base: str, refiner: str | None, revision: str | None = None) -> tuple[ModelLimits, bool]:
    """(limits, complete): every bound the configs here give; complete once all of them were found."""
    configs = (_config(base, "text_encoder", "config.json", revision),
               _config(base, "text_encoder_2", "config.json", revision))
    depths = [d for c in configs if c and isinstance(d := c.get("num_hidden_layers"), int)]
    sched = _config(base, "scheduler", "scheduler_config.json", revision)
    rsched = _config(refiner, "scheduler", "scheduler_config.json", None) if refiner else None
    limits = ModelLimits(
        max_clip_skip=min(depths) - 1 if len(depths) == 2 else None,
        max_steps=sched.get("num_train_timesteps") if sched else None,
        max_refiner_steps=rsched.get("num_train_timesteps") if rsched else None,
    )
    complete = limits.max_clip_skip is not None and limits.max_steps is not None and (
        refiner is None or limits.max_refiner_steps is not None)
    return limits, complete


class LimitsCache:
    """The limits of one deployment's models: kept once complete, looked for again while any is missing."""

    def __init__(self, base: str, refiner: str | None, revision: str | None = None) -> None:
        self.args = (base, refiner, revision)
        self._limits = ModelLimits()
        self._complete = False
        self._read_at = float("-inf")

    def get(self) -> ModelLimits:
        if not self._complete and time.monotonic() - self._read_at >= RETRY_SECONDS:
            self._read_at = time.monotonic()
            self._limits, self._complete = read_limits(*self.args)
            if not self._complete:
                log.warning("model configs for %s not all found locally: some bounds are left to the worker",
                            self.args[0])
        return self._limits
