"""Validation messages in the service's words: pydantic's error types rewritten, unknown fields answered with the
nearest known name, and several problems of one field merged into one entry (app/errors.py uses these)."""

import difflib
from functools import cache
from typing import Any

# what other SDXL front ends call our fields (A1111, ComfyUI, cog, fal, OpenAI): answered with our name
SYNONYMS = {
    "steps": "num_inference_steps",
    "num_steps": "num_inference_steps",
    "cfg": "guidance_scale",
    "cfg_scale": "guidance_scale",
    "guidance": "guidance_scale",
    "negative": "negative_prompt",
    "n": "num_images_per_prompt",
    "num_outputs": "num_images_per_prompt",
    "batch_size": "num_images_per_prompt",
    "n_iter": "num_images_per_prompt",
    "sampler": "scheduler",
    "sampler_name": "scheduler",
    "init_image": "image",
    "init_images": "image",
    "image_url": "image",
    "mask": "mask_image",
    "mask_url": "mask_image",
    "denoising_strength": "strength",
    "prompt_strength": "strength",
    "format": "output_format",
    "quality": "output_quality",
    "webhook_url": "webhook",
    "refiner_mode": "refiner",
}


@cache
def known_fields() -> dict[str, tuple[str, ...]]:
    """Field names by the dotted prefix of the object that holds them ("" for the request body)."""
    from app.schemas import GenerationCreate, RefinerCreate, WebhookCreate

    return {"": tuple(GenerationCreate.model_fields), "refiner": tuple(RefinerCreate.model_fields),
            "webhook": tuple(WebhookCreate.model_fields)}


def nearest_field(field: str) -> str | None:
    """`did you mean` for an unknown field: a known synonym, else the closest known name at that level."""
    prefix, _, name = field.rpartition(".")
    names = known_fields().get(prefix)
    if not names:
        return None
    if prefix == "" and name.lower() in SYNONYMS:
        return SYNONYMS[name.lower()]
    close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
    if close:
        return f"{prefix}.{close[0]}" if prefix else close[0]
    return None


def _choices(expected: str) -> str:
    # pydantic's "'png', 'webp' or 'jpeg'" -> "`png`, `webp` or `jpeg`"
    return expected.replace("'", "`")


def message(err: dict[str, Any], field: str) -> str:
    """One pydantic error as the service says it (its message when the type is not one we rewrite)."""
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    raw = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        hint = nearest_field(field)
        return f"is not a known field; did you mean `{hint}`?" if hint else "is not a known field"
    simple = {
        "missing": "is required",
        "int_parsing": "must be a whole number",
        "int_type": "must be a whole number",
        "int_from_float": "must be a whole number, without a fraction",
        "float_parsing": "must be a number",
        "float_type": "must be a number",
        "finite_number": "must be a finite number",
        "string_type": "must be a string",
        "bool_parsing": "must be true or false",
        "bool_type": "must be true or false",
        "model_type": "must be a JSON object",
        "model_attributes_type": "must be a JSON object",
        "dict_type": "must be a JSON object",
        "list_type": "must be a JSON array",
        "tuple_type": "must be a JSON array",
        "none_required": "must be null",
    }
    if kind in simple:
        return simple[kind]
    bounds = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le"),
              "greater_than": ("greater than", "gt"), "less_than": ("less than", "lt")}
    if kind in bounds:
        words, key = bounds[kind]
        return f"must be {words} {ctx.get(key)}"
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind in ("literal_error", "enum"):
        return f"must be one of {_choices(str(ctx.get('expected', '')))}"
    if kind in ("too_short", "too_long") and "Tuple" in raw:
        return "must be a pair of whole numbers, [a, b]"
    if kind == "too_long":
        return f"must hold at most {ctx.get('max_length')} items"
    if kind == "too_short":
        return f"must hold at least {ctx.get('min_length')} items"
    if kind == "string_pattern_mismatch":
        return f"must match the pattern {ctx.get('pattern')}"
    return raw


def merge(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per field: pydantic reports a union's branches (`int | None`) and our own checks may report one
    field for two encoders; the client gets each field once, its distinct messages joined."""
    merged: dict[str, dict[str, Any]] = {}
    for e in errors:
        if e["field"] not in merged:
            merged[e["field"]] = dict(e)
            continue
        entry = merged[e["field"]]
        if e["message"] not in entry["message"].split("; "):
            entry["message"] += "; " + e["message"]
    return list(merged.values())
