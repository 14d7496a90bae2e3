"""HTTP wire types: what clients send and receive."""

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from common.contract.params import MAX_SEED, SCHEDULERS, GenerationParams, LongPrompt, OutputFormat, RefinerMode

Pair = tuple[int, int]
EVENT_TYPES = Literal[
    "generation.started", "generation.progress", "generation.succeeded", "generation.failed", "generation.canceled"
]
DEFAULT_WEBHOOK_EVENTS: tuple[EVENT_TYPES, ...] = ("generation.succeeded", "generation.failed", "generation.canceled")


class RefinerCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: RefinerMode | None = Field(None, description="`none`, `ensemble` or `img2img`; default set per deployment")
    denoising_start: float = Field(0.8, gt=0.0, lt=1.0, description="ensemble: fraction of steps run by the base")
    strength: float = Field(0.3, gt=0.0, le=1.0, description="img2img: how much the refiner re-noises")
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="img2img: refiner steps")
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0)
    negative_aesthetic_score: float = Field(2.5, ge=0.0, le=10.0)


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., max_length=2048, examples=["https://example.com/hooks/sdxl"])
    events: list[EVENT_TYPES] = Field(default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))


class LoraCreate(BaseModel):
    """One LoRA adapter for a request: a name from `GET /v1/adapters`, or an `https` URL of a safetensors LoRA
    from a host this deployment allows (SDXL_ADAPTER_URL_HOSTS), and its weight."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=64, description="An adapter's name "
                             "(`GET /v1/adapters`); give `name` or `url`", examples=["tiny-style"])
    url: str | None = Field(None, min_length=1, max_length=2048, description="An `https` URL of a safetensors "
                            "LoRA (PEFT or kohya format), where the deployment allows adapters by URL: fetched at "
                            "submit and stored by sha256 (the manifest records URL, sha256 and scale)",
                            examples=["https://huggingface.co/org/repo/resolve/main/lora.safetensors"])
    scale: float = Field(1.0, description="Its weight; within the adapter's `scale_min`..`scale_max` (-2 to 2 for "
                         "an adapter by URL)", examples=[0.8])

    @model_validator(mode="after")
    def _name_or_url(self) -> "LoraCreate":
        if (self.name is None) == (self.url is None):
            raise ValueError("give exactly one of `name` (a registry adapter) and `url`")
        return self


class GenerationCreate(BaseModel):
    """A text-to-image request. Absent fields take the deployment's defaults, reported back in `params`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"prompt": "a lighthouse at dusk, oil painting", "width": 1024, "height": 1024, "seed": 42}]
        },
    )

    prompt: str = Field(..., min_length=1, description="What to draw (first text encoder, and second by default)")
    prompt_2: str | None = Field(None, min_length=1, description="Prompt for the second text encoder")
    negative_prompt: str | None = Field(
        None, description="Absent: SDXL's zeroed negative embedding. Empty string: the encoded empty prompt."
    )
    negative_prompt_2: str | None = None
    width: int = Field(1024, description="Pixels, a multiple of 8", json_schema_extra={"multipleOf": 8})
    height: int = Field(1024, description="Pixels, a multiple of 8", json_schema_extra={"multipleOf": 8})
    snap_to_bucket: bool = Field(False, description="Replace width/height by the nearest SDXL training bucket")
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: float = Field(5.0, ge=0.0, le=30.0)
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    clip_skip: int | None = Field(None, ge=1, le=10)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Random when absent; image i uses seed + i")
    num_images_per_prompt: int = Field(1, ge=1)
    scheduler: Literal[SCHEDULERS] = "euler"  # type: ignore[valid-type]
    original_size: Pair | None = None
    target_size: Pair | None = None
    crops_coords_top_left: Pair = (0, 0)
    negative_original_size: Pair | None = None
    negative_target_size: Pair | None = None
    negative_crops_coords_top_left: Pair | None = None
    refiner: RefinerCreate = Field(default_factory=lambda: RefinerCreate.model_validate({}))
    output_format: OutputFormat = OutputFormat.png
    output_quality: int = Field(90, ge=1, le=100, description="webp/jpeg quality")
    long_prompt: LongPrompt = Field(
        LongPrompt.chunk, description="Over 77 tokens: `chunk` encodes 77-token chunks, `reject` answers 422"
    )
    priority: int = Field(0, ge=0, le=2, description="Orders this key's own queued work (higher first)")
    deadline: float | None = Field(None, gt=0, le=86400, description="Seconds this may wait in the queue")
    webhook: WebhookCreate | None = None
    previews: bool = Field(False, description="Live previews: `generation.preview` server-sent events with a small "
                           "WebP/JPEG of the image as it denoises (never sent to webhooks)")
    preview_every: int | None = Field(None, ge=1, le=1000, description="With `previews`: one preview every this "
                                      "many denoising steps (default 5)")
    image: str | None = Field(
        None, description="Image to image, or inpainting with `mask_image`: an image upload id (`upl_...`), a "
        "base64 `data:` URI, or an https URL the API fetches at submit. PNG, JPEG or WebP; EXIF orientation is "
        "applied and alpha flattened onto white. The output takes its size unless `width`/`height` are given "
        "(then it is resized to them). In multipart/form-data, a file part.",
        examples=["upl_3q2Vd0yq8zS0mN6pW1xYbA"])
    mask_image: str | None = Field(
        None, description="Inpainting: white is repainted, black kept; the same size as `image`, grayscale. "
        "Same forms as `image`.")
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="How much of `image` is re-noised: 0.3 by default for image to image, "
        "0.9999 for inpainting (diffusers' defaults)")
    padding_mask_crop: int | None = Field(
        None, ge=0, le=1024, description="Inpainting: repaint only the mask's bounding box grown by this many "
        "pixels, at full resolution, and paste it back")
    loras: list[LoraCreate] = Field(
        default_factory=list, description="LoRA adapters from the registry (`GET /v1/adapters`), applied in this "
        "order to the base (and the refiner where the adapter has weights for it); at most SDXL_MAX_LORAS",
        examples=[[{"name": "tiny-style", "scale": 0.8}]])
    preset: str | None = Field(
        None, max_length=64, description="A few-step preset (`GET /v1/adapters`, kind `preset`): its adapter, "
        "scheduler, steps and guidance, and no refiner unless `refiner.mode` says otherwise. "
        "`num_inference_steps` may be set within the preset's range; `scheduler` is the preset's own",
        examples=["lcm"])

    @field_validator("prompt", "prompt_2")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
    @classmethod
    def _clean_text(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if any(ord(c) < 32 and c not in "\t\n\r" for c in v):
            raise ValueError("must not contain control characters")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 but is {v}")
        return v


class Progress(BaseModel):
    """How far the worker is; steps count base and refiner denoising steps together."""

    step: int = Field(..., description="Denoising steps done", examples=[12])
    total_steps: int = Field(..., description="Denoising steps in all (0 until a worker starts it)", examples=[30])
    stage: str = Field(..., description="`queued`, `base`, `refiner`, `decoding`, `encoding`, `uploading` or `done`",
                       examples=["base"])
    eta_seconds: float | None = Field(None, description="Estimated seconds to the end, once measurable")


class Image(BaseModel):
    """One stored image of a succeeded generation."""

    index: int = Field(..., description="Position in the batch (0-based)", examples=[0])
    seed: int = Field(..., description="The seed that reproduces this image alone", examples=[42])
    width: int = Field(..., examples=[1024])
    height: int = Field(..., examples=[1024])
    content_type: str = Field(..., examples=["image/png"])
    bytes: int = Field(..., description="Size of the encoded image", examples=[1523342])
    sha256: str = Field(..., description="Hex sha256 of the image bytes",
                        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"])
    url: str = Field(..., description="Where to download it (this API, or a presigned object-store URL)",
                     examples=["/v1/generations/gen_3q2Vd0yq8zS0mN6pW1xYbA/images/0"])


class GenerationError(BaseModel):
    """Why a generation failed: a stable `type` and a message (never a traceback)."""

    type: str = Field(..., examples=["pipeline_error"], description="`pipeline_error`, `out_of_memory`, "
                      "`worker_lost`, `deadline_exceeded`, `storage_unavailable`, `nan_output`, ...")
    message: str = Field(..., examples=["the pipeline failed; the error was logged"])


# produced by common/contract/records.rfc3339 (UTC, milliseconds, `Z`); declared so clients parse a datetime
Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class Timings(BaseModel):
    """Seconds per phase of a succeeded generation (a failed one has what it reached); all absent until then."""

    model_config = ConfigDict(extra="allow")  # a newer worker may add phases: clients keep them as extras

    queued: float | None = Field(None, description="Created to started", examples=[0.01])
    pipeline: float | None = Field(None, description="The pipeline call (base, refiner and decoding)",
                                   examples=[2.4])
    base: float | None = None
    refiner: float | None = None
    decoding: float | None = None
    encoding: float | None = None
    uploading: float | None = None
    total: float | None = Field(None, description="Created to finished", examples=[2.6])
    batch_images: int | None = Field(None, description="Images computed in the same pipeline call", examples=[1])
    gpu_seconds: float | None = Field(None, description="This generation's share of the pipeline call (`pipeline` "
                                      "x its images / `batch_images`, to the microsecond): what `GET /v1/usage` "
                                      "counts", examples=[2.4])


class Generation(BaseModel):
    """A generation as the service tracks it."""

    id: str = Field(..., examples=["gen_3q2Vd0yq8zS0mN6pW1xYbA"])
    status: Literal["queued", "running", "succeeded", "failed", "canceled"] = Field(
        ..., description="`succeeded`, `failed` and `canceled` are final", examples=["queued"])
    queue_position: int | None = Field(None, description="0 = next to start; null unless queued")
    progress: Progress
    params: GenerationParams | None = Field(..., description="The resolved parameters: the request with the "
                                            "deployment's defaults filled in (seed included)")
    token_counts: dict[str, int] | None = Field(None, description="Tokens each text encoder sees, per prompt",
                                                examples=[{"text_encoder": 9, "text_encoder_2": 9}])
    images: list[Image] = Field(..., description="Empty until the generation succeeds")
    error: GenerationError | None = Field(None, description="Set when `status` is `failed`")
    attempt: int = Field(1, description="Incremented when a lost worker's job is run again")
    created_at: Timestamp | None = Field(..., description="RFC 3339, UTC", examples=["2025-01-01T12:00:00.000Z"])
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    expires_at: Timestamp | None = Field(None, description="When the record and its images are deleted")
    timings: Timings = Field(..., description="Seconds per phase (`queued`, `pipeline`, `encoding`, "
                             "`uploading`, ...)", examples=[{"queued": 0.01, "pipeline": 2.4}])
    manifest: dict[str, Any] | None = Field(None, description="What produced the images: parameters, "
                                            "scheduler configuration and model revisions")
    webhook: dict[str, Any] | None = Field(None, description="The webhook this generation notifies, if any")


class AdapterInfo(BaseModel):
    """A LoRA adapter (`kind: adapter`) or a few-step preset (`kind: preset`) this deployment serves."""

    name: str = Field(..., examples=["tiny-style"])
    kind: Literal["adapter", "preset"]
    description: str = ""
    base: str | None = Field(None, description="The model family it was trained for (`sdxl`)", examples=["sdxl"])
    base_source: str | None = Field(None, description="Where `base` comes from: `manifest`, `metadata` (the "
                                    "file's kohya metadata) or `assumed` (the deployment's own)")
    sha256: str | None = Field(None, description="Hex sha256 of the adapter file (a preset's: of its adapter)")
    bytes: int | None = Field(None, description="Size of the adapter file")
    scale_min: float | None = Field(None, description="Adapters: the lowest `scale` accepted", examples=[-2.0])
    scale_max: float | None = Field(None, description="Adapters: the highest `scale` accepted", examples=[2.0])
    refiner: bool | None = Field(None, description="Adapters: whether it has weights for the refiner too")
    adapter: str | None = Field(None, description="Presets: the adapter it applies")
    adapter_scale: float | None = None
    scheduler: str | None = Field(None, description="Presets: the scheduler", examples=["lcm"])
    scheduler_config: dict[str, Any] | None = Field(None, description="Presets: the scheduler's settings")
    steps: int | None = Field(None, description="Presets: default `num_inference_steps`", examples=[4])
    steps_min: int | None = None
    steps_max: int | None = None
    guidance_scale: float | None = Field(None, description="Presets: default `guidance_scale`", examples=[1.0])


class AdapterList(BaseModel):
    data: list[AdapterInfo] = Field(..., description="Adapters, then presets")
    max_loras: int = Field(..., description="`loras` per request (SDXL_MAX_LORAS)", examples=[4])


class FieldError(BaseModel):
    """One invalid field: its dotted name, why it was refused, and the value received."""

    field: str = Field(..., examples=["width"])
    message: str = Field(..., examples=["must be a multiple of 8 but is 1001"])
    value: Any = Field(None, examples=[1001])


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; `type` is stable per error kind."""

    type: str = Field(..., examples=["urn:sdxl:problem:validation-error"],
                      description="`urn:sdxl:problem:<kind>`: branch on this, it never changes for a kind")
    title: str = Field(..., description="Short summary of the kind", examples=["Invalid request"])
    status: int = Field(..., description="The HTTP status code", examples=[422])
    detail: str = Field(..., description="What went wrong in this request, for people",
                        examples=["`width` must be a multiple of 8 but is 1001"])
    instance: str | None = Field(None, description="The request path", examples=["/v1/generations"])
    errors: list[FieldError] | None = Field(None, description="Each invalid field (422 only)")


class WebhookAttempt(BaseModel):
    """One delivery attempt of one webhook event, as the dispatcher recorded it."""

    event_id: str = Field(..., description="The `webhook-id` header: the same on every attempt of one event")
    type: str = Field(..., examples=["generation.succeeded"])
    attempt: int
    url: str
    attempted_at: str | None
    status_code: int | None = Field(None, description="The receiver's answer; null on timeout or connection error")
    latency_ms: float | None = None
    error: str | None = None
    outcome: Literal["delivered", "retrying", "failed", "gone", "skipped", "dropped", "refused"]
    next_attempt_at: str | None = None


class WebhookAttemptList(BaseModel):
    data: list[WebhookAttempt]


class GenerationList(BaseModel):
    """One page of the caller's generations, newest first."""

    data: list[Generation]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last page")


class ImageUpload(BaseModel):
    """A stored input image, referenced by `id` from the `image` or `mask_image` of any number of generations."""

    id: str = Field(..., examples=["upl_3q2Vd0yq8zS0mN6pW1xYbA"])
    content_type: str = Field(..., examples=["image/png"])
    width: int = Field(..., description="After EXIF orientation", examples=[1024])
    height: int = Field(..., examples=[1024])
    bytes: int = Field(..., examples=[1523342])
    sha256: str = Field(..., description="Hex sha256 of the bytes as received (the manifest records it)",
                        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"])
    created_at: Timestamp = Field(..., examples=["2025-01-01T12:00:00.000Z"])
    expires_at: Timestamp = Field(..., description="When it is deleted (unless an unfinished generation still uses it)",
                            examples=["2025-01-02T12:00:00.000Z"])


class ImageUploadList(BaseModel):
    data: list[ImageUpload] = Field(..., description="This key's live uploads, newest first")


# --- OpenAI-compatible images API (app/routes/openai_images.py, app/openai_images.py, docs/openai.md) ----------

OpenAIQuality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]


class OpenAIImageOptions(BaseModel):
    """OpenAI's image fields. Any field of `GenerationCreate` is accepted besides (`seed`, `negative_prompt`,
    `num_inference_steps`, `refiner`, ...), as an extension; `size` and `n` stand for `width`/`height` and
    `num_images_per_prompt`."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={"examples": [{"prompt": "a lighthouse at dusk", "size": "1024x1024", "n": 1,
                                         "response_format": "url", "seed": 42}]},
    )

    prompt: str = Field(..., description="What to draw (or, for an edit, what the edited picture shows)")
    n: int | None = Field(None, ge=1, description="Images to make; at most SDXL_MAX_IMAGES_PER_PROMPT")
    size: str | None = Field(None, max_length=16, description="`WIDTHxHEIGHT` in pixels, multiples of 8, within "
                             "the deployment's bounds; `auto` or absent: 1024x1024, or an edit's input size",
                             examples=["1024x1024"])
    response_format: Literal["url", "b64_json"] = Field(
        "url", description="`url`: a link fetchable without a key (signed, or presigned with S3), valid for "
        "SDXL_SIGNED_URL_SECONDS; `b64_json`: the image bytes inline")
    output_format: OutputFormat | None = Field(None, description="`png` (default), `jpeg` or `webp`")
    model: str | None = Field(None, max_length=256, description="Recorded with the generation; this deployment "
                              "serves the one model it was started with")
    quality: OpenAIQuality | None = Field(None, description="Recorded with the generation and echoed back; "
                                          "`num_inference_steps` sets the work done")
    style: Literal["vivid", "natural"] | None = Field(None, description="Recorded; not used")
    user: str | None = Field(None, max_length=256, description="The end user, recorded with the generation")


class OpenAIImage(BaseModel):
    """One image: `url` or `b64_json`, as `response_format` asked."""

    url: str | None = Field(None, description="Fetchable without a key until it expires",
                            examples=["https://sdxl.example.com/v1/signed-images/gen_3q2Vd0yq8zS0mN6pW1xYbA/0"
                                      "?expires=1735732800&signature=4kX0..."])
    b64_json: str | None = Field(None, description="The image file, base64")
    revised_prompt: str | None = Field(None, description="Always null: the prompt is used as given")


class OpenAIImagesResponse(BaseModel):
    """OpenAI's images answer. The generation's id is in the `X-Generation-Id` header."""

    created: int = Field(..., description="Unix time the generation was created", examples=[1735732800])
    data: list[OpenAIImage]
    size: str | None = Field(None, examples=["1024x1024"])
    output_format: str | None = Field(None, examples=["png"])
    quality: str | None = Field(None, description="The request's `quality`, when it sent one")


class OpenAIErrorDetail(BaseModel):
    message: str = Field(..., examples=["`size` must be `WIDTHxHEIGHT` (such as `1024x1024`) or `auto`"])
    type: str = Field(..., description="`invalid_request_error` (4xx), `requests` (429) or `server_error` (5xx)",
                      examples=["invalid_request_error"])
    param: str | None = Field(None, description="The invalid field, when one is to blame", examples=["size"])
    code: str | None = Field(None, description="Stable per kind of error (our problem kinds, snake case)",
                             examples=["validation_error"])


class OpenAIError(BaseModel):
    """OpenAI's error envelope: what every error of the /v1/images routes answers (not RFC 9457)."""

    error: OpenAIErrorDetail


class UsageFigures(BaseModel):
    """What a key's generations produced (succeeded ones, counted when they finished) and what it submitted."""

    images: int = Field(..., description="Images of succeeded generations", examples=[12])
    gpu_seconds: float = Field(..., description="GPU time of those generations (`gpu_microseconds` / 1e6): each "
                               "one's share of its pipeline call, `timings.gpu_seconds`", examples=[28.8])
    gpu_microseconds: int = Field(..., description="The same, exact, in integer microseconds", examples=[28800000])
    generations: int = Field(..., description="Succeeded generations", examples=[5])
    images_submitted: int = Field(..., description="Images asked for by generations admitted (submitted) that "
                                  "day, whatever became of them: what the daily quota counts", examples=[13])


class UsageDay(UsageFigures):
    date: dt.date = Field(..., description="The UTC day", examples=["2026-12-07"])


class UsageQuota(BaseModel):
    daily_images: int = Field(..., description="Images this key may submit per UTC day", examples=[100])
    submitted_today: int = Field(..., examples=[13])
    remaining_today: int = Field(..., examples=[87])
    resets_at: Timestamp = Field(..., description="The next UTC midnight")


class UsageReport(BaseModel):
    """The calling key's usage per UTC day, oldest first (every day of the range, zeros included), and totals."""

    model_config = ConfigDict(populate_by_name=True)

    key: str = Field(..., description="The API key's name (`open` where the deployment has no keys)",
                     examples=["team-a"])
    from_: dt.date = Field(..., alias="from", description="First UTC day of the range")
    to: dt.date = Field(..., description="Last UTC day of the range")
    retention_days: int = Field(..., description="How many UTC days back the figures are kept "
                                "(`SDXL_USAGE_RETENTION_DAYS`)", examples=[90])
    days: list[UsageDay]
    totals: UsageFigures
    quota: UsageQuota | None = Field(None, description="The key's daily image quota; null when it has none")
