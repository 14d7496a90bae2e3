"""Bounds read from the model's configs (app/model_limits.py), on folders in the hub layout."""

import json
from pathlib import Path

import pytest

from app.errors import Problem
from app.model_limits import LimitsCache, ModelLimits, read_limits
from common.contract.params import GenerationParams, RefinerMode, RefinerParams


def model(root: Path, layers: tuple[int, int] | None, timesteps: int | None) -> Path:
    for i, sub in enumerate(("text_encoder", "text_encoder_2")):
        if layers is not None:
            (root / sub).mkdir(parents=True)
            (root / sub / "config.json").write_text(json.dumps({"num_hidden_layers": layers[i]}))
    if timesteps is not None:
        (root / "scheduler").mkdir(parents=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": timesteps}))
    return root


def params(**kw: object) -> GenerationParams:
    base: dict[str, object] = {"prompt": "p", "seed": 1, "width": 64, "height": 64, "num_inference_steps": 4,
                               "guidance_scale": 5.0}
    return GenerationParams(**{**base, **kw})  # type: ignore[arg-type]


def test_sdxl_depths_allow_clip_skip_up_to_11(tmp_path: Path) -> None:
    limits, complete = read_limits(str(model(tmp_path / "b", (12, 32), 1000)), None)
    assert complete and limits == ModelLimits(max_clip_skip=11, max_steps=1000)
    limits.check(params(clip_skip=11))
    with pytest.raises(Problem) as err:
        limits.check(params(clip_skip=12))
    assert err.value.errors == [{"field": "clip_skip", "value": 12,
                                 "message": "must be at most 11 for this model (its shallower text encoder has "
                                            "12 layers)"}]


def test_steps_beyond_the_schedulers_training_timesteps_are_refused(tmp_path: Path) -> None:
    base = model(tmp_path / "b", (4, 4), 50)
    refiner = model(tmp_path / "r", None, 40)
    limits, complete = read_limits(str(base), str(refiner))
    assert complete and (limits.max_steps, limits.max_refiner_steps) == (50, 40)
    limits.check(params(num_inference_steps=50))
    with pytest.raises(Problem, match="num_inference_steps"):
        limits.check(params(num_inference_steps=51))
    img2img = RefinerParams(mode=RefinerMode.img2img, num_inference_steps=41)
    with pytest.raises(Problem, match="refiner.num_inference_steps"):
        limits.check(params(refiner=img2img))
    limits.check(params(refiner=RefinerParams(mode=RefinerMode.ensemble, num_inference_steps=41)))  # unused


def test_unknown_configs_leave_the_bound_to_the_worker_and_are_looked_for_again(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    import app.model_limits as ml

    cache = LimitsCache(str(tmp_path / "later"), None)
    assert cache.get() == ModelLimits()
    cache.get().check(params(clip_skip=10))  # nothing known: nothing refused here
    model(tmp_path / "later", (4, 4), 1000)  # the model arrives (a first download finished)
    assert cache.get() == ModelLimits()  # not looked for again at once
    monkeypatch.setattr(ml, "RETRY_SECONDS", 0.0)
    assert cache.get().max_clip_skip == 3
