"""Resolved generation parameters and the versioned job payload.

The API resolves every default (seed included) before enqueueing, so the worker never guesses and the
resource shows exactly what ran. Field names follow diffusers where one exists.
"""

import hashlib
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

MAX_SEED = 2**53 - 1  # seeds stay exact in JavaScript numbers
PAYLOAD_VERSION = 1


class RefinerMode(StrEnum):
    none = "none"
    ensemble = "ensemble"  # base denoising_end == refiner denoising_start on the same latents
    img2img = "img2img"  # refiner re-denoises the decoded base image with `strength`


class LongPrompt(StrEnum):
    chunk = "chunk"  # 77-token chunks, embeddings concatenated
    reject = "reject"  # 422 that reports the token counts


class OutputFormat(StrEnum):
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


# the sizes SDXL was trained at (width, height): snap_to_bucket's targets and the compile warm-up's default
SDXL_BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536)]

SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "unipc", "heun",
              "lcm", "tcd")  # the last two: few-step schedulers, for presets (common/adapters.py)

CONTENT_TYPES = {OutputFormat.png: "image/png", OutputFormat.webp: "image/webp", OutputFormat.jpeg: "image/jpeg"}
DEFAULT_PREVIEW_EVERY = 5  # steps between live previews when a request turns them on without saying


class RefinerParams(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    mode: RefinerMode = RefinerMode.none
    denoising_start: float = 0.8
    strength: float = 0.3
    num_inference_steps: int | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


class InputImage(BaseModel):
    """An input image (or mask) as the worker fetches it: an upload in the object store (app/uploads.py)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    upload_id: str
    key: str  # object-store key of the bytes as received
    sha256: str  # of those bytes: the manifest's proof of what went in
    width: int  # after EXIF orientation
    height: int


class LoraRef(BaseModel):
    """One LoRA adapter of a generation, by registry name and the sha256 of the file (the manifest's proof); an
    adapter given by URL also carries the URL (its bytes are in the object store under their sha256)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    sha256: str
    scale: float
    url: str | None = None

    @model_serializer(mode="wrap")
    def _without_absent_url(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("url") is None:
            data.pop("url", None)  # registry adapters: {name, sha256, scale}, as the manifest has always said
        return data


class GenerationParams(BaseModel):
    """Every parameter of one generation, fully resolved by the API."""

    # extra="ignore": an older worker accepts a newer API's additive fields during a rolling upgrade.
    model_config = ConfigDict(extra="ignore", frozen=True)

    prompt: str
    prompt_2: str | None = None
    negative_prompt: str | None = None
    negative_prompt_2: str | None = None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    seed: int = Field(ge=0, le=MAX_SEED)
    num_images_per_prompt: int = 1
    scheduler: str = "euler"
    original_size: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_original_size: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    refiner: RefinerParams = RefinerParams()
    output_format: OutputFormat = OutputFormat.png
    output_quality: int = 90
    long_prompt: LongPrompt = LongPrompt.chunk
    # image to image: `image` alone; inpainting: `image` and `mask_image` (white: repaint). Resized to
    # width x height by the worker when they differ from the image's size (asked for explicitly at submit).
    image: InputImage | None = None
    mask_image: InputImage | None = None
    strength: float | None = None  # set whenever `image` is: diffusers' defaults per mode, resolved by the API
    padding_mask_crop: int | None = None
    # LoRA adapters in the order they are applied (a preset's own first), and the preset that chose them, its
    # scheduler, steps and guidance; scheduler_config: the preset's overrides of the scheduler's config
    loras: tuple[LoraRef, ...] = ()
    preset: str | None = None
    scheduler_config: dict[str, str | int | float | bool] | None = None
    # live previews every this many denoising steps (None: off). They leave the images alone (the manifest leaves
    # it out), but the batch key keeps it: a micro-batch shares one preview cadence
    preview_every: int | None = None

    @property
    def mode(self) -> str:
        return "inpaint" if self.mask_image else "img2img" if self.image else "text2img"

    def image_seed(self, index: int) -> int:
        return (self.seed + index) % (MAX_SEED + 1)

    def batch_key(self) -> str:
        """Jobs with equal keys can share one pipeline call (everything but prompts and seeds)."""
        shared = self.model_dump(
            mode="json",
            exclude={"prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "seed", "num_images_per_prompt",
                     "image", "mask_image"},
        )
        # inputs batch together only when they are the same pixels (equal bytes, whatever upload holds them)
        shared["_inputs"] = [self.image.sha256 if self.image else None,
                             self.mask_image.sha256 if self.mask_image else None]
        # absent vs empty negative prompts take different code paths in the pipeline: never mix them
        shared["_absent"] = [self.prompt_2 is None, self.negative_prompt is None, self.negative_prompt_2 is None]
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


class JobPayload(BaseModel):
    """What travels through rq. `v` lets an old worker refuse what it cannot understand."""

    model_config = ConfigDict(extra="ignore")

    v: int = PAYLOAD_VERSION
    generation_id: str
    token: str
    attempt: int = 1
    params: GenerationParams
    request_id: str | None = None
