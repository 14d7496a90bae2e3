"""A request's `loras` and `preset`, checked against the adapter registry (common/adapters.py) at submit."""

from dataclasses import dataclass
from typing import Any

from app.errors import Problem, field_error
from app.schemas import GenerationCreate
from app.settings import Settings
from common.adapter_urls import check_adapter_url
from common.adapters import DEFAULT_SCALE_RANGE, Preset, Registry, RegistryError, registry_for
from common.contract.params import LoraRef
from common.ssrf import split_list

DEPLOYMENT_BASE = "sdxl"  # the model family this service serves: adapters for any other are refused


def registry(settings: Settings) -> Registry:
    return registry_for(str(settings.adapters_dir) if settings.adapters_dir else None, DEPLOYMENT_BASE)


def unavailable(exc: RegistryError) -> Problem:
    return Problem(503, f"the adapter registry cannot be read: {exc}", kind="adapters-unavailable")


def listing(settings: Settings) -> list[dict[str, Any]]:
    try:
        return registry(settings).listing()
    except RegistryError as exc:
        raise unavailable(exc) from None


@dataclass(frozen=True)
class Chosen:
    """What the adapters part of a request resolves to."""

    loras: tuple[LoraRef, ...] = ()
    preset: Preset | None = None


def resolve_adapters(req: GenerationCreate, settings: Settings, by_url: dict[int, LoraRef] | None = None) -> Chosen:
    """422 for an unknown name, another base model's adapter, a scale out of range or too many adapters.

    `by_url`: the request's adapters by URL, fetched and stored (app/adapter_fetch.py), by index in `loras`;
    None: not fetched yet (the cheap checks before any fetch), so only their URLs and scales are checked."""
    if not req.loras and req.preset is None:
        return Chosen()
    if len(req.loras) > settings.max_loras:
        raise field_error("loras", f"takes at most {settings.max_loras} adapters (SDXL_MAX_LORAS) but has "
                          f"{len(req.loras)}", len(req.loras))
    urls = [lora.url for lora in req.loras]
    for i, lora in enumerate(req.loras):
        if lora.url is None:
            continue
        reason = check_adapter_url(lora.url, split_list(settings.adapter_url_hosts), settings.adapter_fetch_allow_http)
        if reason is not None:
            raise field_error(f"loras[{i}].url", reason, lora.url)
        if urls.index(lora.url) != i:
            raise field_error(f"loras[{i}].url", "is already in this request: it is named twice", lora.url)
        lo, hi = DEFAULT_SCALE_RANGE
        if not lo <= lora.scale <= hi:
            raise field_error(f"loras[{i}].scale", f"must be between {lo} and {hi} for an adapter by URL but is "
                              f"{lora.scale}", lora.scale)
    try:
        adapters, presets = registry(settings).adapters(), registry(settings).presets()
    except RegistryError as exc:
        raise unavailable(exc) from None
    preset = None
    refs: list[LoraRef] = []
    if req.preset is not None:
        preset = presets.get(req.preset)
        if preset is None:
            hint = f"; `{req.preset}` is an adapter: send it in `loras`" if req.preset in adapters else ""
            raise field_error("preset", f"is not a preset of this deployment ({_names(presets)}){hint}", req.preset)
        check_preset(req, preset)
        if preset.adapter is not None:
            own = adapters[preset.adapter]
            refs.append(LoraRef(name=own.name, sha256=own.sha256, scale=preset.adapter_scale))
    for i, lora in enumerate(req.loras):
        if lora.url is not None:
            if by_url is not None:
                refs.append(by_url[i])
            continue
        assert lora.name is not None  # LoraCreate: a name or a URL
        a = adapters.get(lora.name)
        if a is None:
            hint = f"; `{lora.name}` is a preset: send it as `preset`" if lora.name in presets else ""
            raise field_error(f"loras[{i}].name", f"is not an adapter of this deployment ({_names(adapters)}){hint}",
                              lora.name)
        if a.base != DEPLOYMENT_BASE:
            raise field_error(f"loras[{i}].name", f"is an adapter for `{a.base}` (from its {a.base_source}); this "
                              f"deployment serves `{DEPLOYMENT_BASE}`", lora.name)
        if any(r.name == a.name for r in refs):
            why = f"the preset `{preset.name}` applies it already" if preset and preset.adapter == a.name \
                else "it is named twice"
            raise field_error(f"loras[{i}].name", f"is already in this request: {why}", lora.name)
        if not a.scale_min <= lora.scale <= a.scale_max:
            raise field_error(f"loras[{i}].scale", f"must be between {a.scale_min} and {a.scale_max} for adapter "
                              f"`{a.name}` but is {lora.scale}", lora.scale)
        refs.append(LoraRef(name=a.name, sha256=a.sha256, scale=lora.scale))
    return Chosen(tuple(refs), preset)


def check_preset(req: GenerationCreate, preset: Preset) -> None:
    given = req.model_fields_set
    if "scheduler" in given:
        raise field_error("scheduler", f"is set by preset `{preset.name}` (`{preset.scheduler}`); leave it out",
                          req.scheduler)
    steps = req.num_inference_steps if "num_inference_steps" in given else preset.steps
    if not preset.steps_min <= steps <= preset.steps_max:
        raise field_error("num_inference_steps", f"must be between {preset.steps_min} and {preset.steps_max} with "
                          f"preset `{preset.name}` but is {steps}", steps)


def preset_fields(req: GenerationCreate, chosen: Chosen) -> dict[str, Any]:
    """The resolved parameters a preset sets (what the request gave itself wins where it may)."""
    p = chosen.preset
    if p is None:
        return {"loras": chosen.loras}
    given = req.model_fields_set
    return {"loras": chosen.loras, "preset": p.name, "scheduler": p.scheduler,
            "scheduler_config": dict(p.scheduler_config) or None,
            "num_inference_steps": req.num_inference_steps if "num_inference_steps" in given else p.steps,
            "guidance_scale": req.guidance_scale if "guidance_scale" in given else p.guidance_scale}


def _names(known: dict[str, Any]) -> str:
    if not known:
        return "it has none: SDXL_ADAPTERS_DIR"
    names = sorted(known)
    return "GET /v1/adapters lists them: " + ", ".join(f"`{n}`" for n in names[:10]) + (", ..." if len(names) > 10
                                                                                        else "")
