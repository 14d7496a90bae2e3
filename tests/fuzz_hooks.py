"""Schemathesis hooks for tests/e2e/test_fuzz.py: the published spec as the fuzz deployment narrows it.

A deployment's limits (SDXL_MAX_WIDTH, SDXL_MAX_STEPS, ...) are settings, so openapi/openapi.json cannot state
them. This view writes the fuzz service's own limits into the *request* schema only (responses are checked
against the spec exactly as published): valid data is then data this deployment accepts, so generations really
get created and the linked operations (get, cancel, delete, events, images) are reached with real ids, while
invalid data includes values just past the limits, which must be refused.
"""

from typing import Any

import schemathesis

# must match test_fuzz.LIMITS
MIN_SIZE, MAX_SIZE, MAX_STEPS, MAX_IMAGES, MAX_PROMPT_CHARS = 64, 128, 2, 1, 4000
CONTROL = r"\x00-\x08\x0b\x0c\x0e-\x1f"
TEXT = f"[^{CONTROL}]"
PROMPTS = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")


def _branches(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """The non-null schemas of a property (`X | None` is an anyOf with a null branch)."""
    return [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]


@schemathesis.hook
def before_load_schema(context: Any, raw_schema: dict[str, Any]) -> None:
    schemas = raw_schema["components"]["schemas"]
    create = schemas["GenerationCreate"]
    props = create["properties"]
    for name in ("width", "height"):
        props[name].update(minimum=MIN_SIZE, maximum=MAX_SIZE)
    props["num_inference_steps"]["maximum"] = MAX_STEPS
    props["num_images_per_prompt"]["maximum"] = MAX_IMAGES
    props["snap_to_bucket"]["const"] = False  # snapping picks a ~1024 px bucket, over this deployment's limit
    # their defaults (1024 px, 30 steps) are over this deployment's limits: valid requests must send them
    create["required"] = sorted({*create.get("required", []), "width", "height", "num_inference_steps"})
    for name in PROMPTS:
        for branch in _branches(props[name]):
            branch["maxLength"] = MAX_PROMPT_CHARS
            # no control characters but tab and newlines; a prompt must say something (an empty negative prompt
            # is meaningful). Fixed rules of GenerationCreate that its schema does not spell out.
            if name in ("prompt", "prompt_2"):
                branch["pattern"] = f"^{TEXT}*[^\\s{CONTROL}]{TEXT}*$"
            else:
                branch["pattern"] = f"^{TEXT}*$"
    for branch in _branches(schemas["RefinerCreate"]["properties"]["num_inference_steps"]):
        branch["maximum"] = MAX_STEPS
