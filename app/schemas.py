"""HTTP wire types: what clients send and receive."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.contract.params import MAX_SEED, SCHEDULERS, LongPrompt, OutputFormat, RefinerMode

Pair = tuple[int, int]
EVENT_TYPES = Literal[
    "generation.started", "generation.progress", "generation.succeeded", "generation.failed", "generation.canceled"
]


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
    events: list[EVENT_TYPES] = Field(
        default_factory=lambda: ["generation.succeeded", "generation.failed", "generation.canceled"]
    )


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
    width: int = Field(1024, description="Pixels, a multiple of 8")
    height: int = Field(1024, description="Pixels, a multiple of 8")
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
    refiner: RefinerCreate = Field(default_factory=RefinerCreate)
    output_format: OutputFormat = OutputFormat.png
    output_quality: int = Field(90, ge=1, le=100, description="webp/jpeg quality")
    long_prompt: LongPrompt = Field(
        LongPrompt.chunk, description="Over 77 tokens: `chunk` encodes 77-token chunks, `reject` answers 422"
    )
    priority: int = Field(0, ge=0, le=2, description="Orders this key's own queued work (higher first)")
    deadline: float | None = Field(None, gt=0, le=86400, description="Seconds this may wait in the queue")
    webhook: WebhookCreate | None = None

    @field_validator("prompt", "prompt_2")
    @classmethod
    def _not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8 but is {v}")
        return v


class Progress(BaseModel):
    step: int
    total_steps: int
    stage: str
    eta_seconds: float | None = None


class Image(BaseModel):
    index: int
    seed: int
    width: int
    height: int
    content_type: str
    bytes: int
    sha256: str
    url: str


class GenerationError(BaseModel):
    type: str = Field(..., examples=["pipeline_error"])
    message: str


class Generation(BaseModel):
    """A generation as the service tracks it."""

    id: str = Field(..., examples=["gen_3q2Vd0yq8zS0mN6pW1xYbA"])
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    queue_position: int | None = None
    progress: Progress
    params: dict[str, Any] | None
    token_counts: dict[str, int] | None = None
    images: list[Image]
    error: GenerationError | None = None
    attempt: int = 1
    created_at: str | None
    started_at: str | None = None
    finished_at: str | None = None
    expires_at: str | None = None
    timings: dict[str, float]
    manifest: dict[str, Any] | None = None
    webhook: dict[str, Any] | None = None


class FieldError(BaseModel):
    field: str
    message: str
    value: Any = None


class ProblemDetails(BaseModel):
    """RFC 9457 problem details; `type` is stable per error kind."""

    type: str = Field(..., examples=["urn:sdxl:problem:validation-error"])
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


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
