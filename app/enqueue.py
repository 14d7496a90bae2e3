"""A validated request -> a generation record, an rq job, and a place in the fair-share line."""

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aredis
from rq import Queue
from rq.serializers import JSONSerializer

from app.adapters import preset_fields, resolve_adapters
from app.error_messages import merge
from app.errors import Problem, field_error
from app.schemas import GenerationCreate
from app.settings import Settings
from app.tokens import CLIP_WINDOW, TokenCounter
from common.contract import keys, queueing
from common.contract.params import (
    DEFAULT_PREVIEW_EVERY,
    MAX_SEED,
    SDXL_BUCKETS,
    GenerationParams,
    InputImage,
    JobPayload,
    LongPrompt,
    LoraRef,
    RefinerMode,
    RefinerParams,
)
from common.contract.records import encode
from common.contract.status import GenerationStatus, Stage
from common.images import nearest_valid_size
from common.retention import RECORD_GRACE_SECONDS
from common.state import GenerationState, generation_job, no_image_urls
from common.usage import day_expires_at, utc_day


def new_generation_id() -> str:
    return "gen_" + secrets.token_urlsafe(16)  # 128 random bits: unguessable


def nearest_bucket(width: int, height: int) -> tuple[int, int]:
    ratio = width / height
    return min(SDXL_BUCKETS, key=lambda b: abs(b[0] / b[1] - ratio))


DEFAULT_STRENGTH = {"img2img": 0.3, "inpaint": 0.9999}  # diffusers' own defaults for each SDXL pipeline


def input_size(req: GenerationCreate, settings: Settings, image: InputImage) -> tuple[int, int]:
    """The output size of an image request: the input's, unless the request names one (then it is resized)."""
    given = {"width", "height"} & req.model_fields_set
    if given == {"width", "height"}:
        return req.width, req.height
    if given:  # one side named: the other keeps the input's aspect ratio
        if "width" in given:
            return req.width, max(8, round(req.width * image.height / image.width / 8) * 8)
        return max(8, round(req.height * image.width / image.height / 8) * 8), req.height
    w, h = image.width, image.height
    if w % 8 or h % 8 or not settings.min_size <= w <= settings.max_width \
            or not settings.min_size <= h <= settings.max_height:
        nw = nearest_valid_size(w, settings.min_size, settings.max_width)
        nh = nearest_valid_size(h, settings.min_size, settings.max_height)
        raise field_error("image", f"is {w}x{h}; the output takes the input's size, which must be multiples of 8 "
                          f"between {settings.min_size} and {settings.max_width}x{settings.max_height}: the nearest "
                          f"valid size is {nw}x{nh}. Send `width` and `height` to have it resized", f"{w}x{h}")
    return w, h


def check_input_fields(req: GenerationCreate, has_image: bool, has_mask: bool) -> None:
    """What can be refused before any input is fetched or stored."""
    if has_mask and not has_image:
        raise field_error("mask_image", "needs `image` (the picture to inpaint)", "<mask without image>")
    if not has_image and req.strength is not None:
        raise field_error("strength", "applies to image inputs only; send `image` too", req.strength)
    if not has_mask and req.padding_mask_crop is not None:
        raise field_error("padding_mask_crop", "applies to inpainting only; send `mask_image` too",
                          req.padding_mask_crop)


def check_inputs(req: GenerationCreate, image: InputImage | None, mask: InputImage | None) -> None:
    check_input_fields(req, image is not None, mask is not None)
    if image is not None and mask is not None and (mask.width, mask.height) != (image.width, image.height):
        raise field_error("mask_image", f"is {mask.width}x{mask.height} but `image` is {image.width}x"
                          f"{image.height}; they must be the same size", f"{mask.width}x{mask.height}")


def resolve(req: GenerationCreate, settings: Settings, refiner_available: bool, image: InputImage | None = None,
            mask: InputImage | None = None, by_url: dict[int, LoraRef] | None = None) -> GenerationParams:
    """Apply deployment defaults and limits; refuse what this deployment cannot serve (422 at submit).

    `image`/`mask`: the request's inputs, already stored (app/uploads.py); `by_url`: its adapters by URL, fetched
    and stored (app/adapter_fetch.py)."""
    check_inputs(req, image, mask)
    chosen = resolve_adapters(req, settings, by_url)  # loras and preset (app/adapters.py)
    adapter_fields = preset_fields(req, chosen)
    if chosen.preset is not None:  # the preset's steps and guidance, where the request did not set its own
        req = req.model_copy(update={k: adapter_fields[k] for k in ("num_inference_steps", "guidance_scale")})
    width, height = req.width, req.height
    if req.snap_to_bucket:
        if image is not None and not {"width", "height"} & req.model_fields_set:
            width, height = image.width, image.height  # snap the input's shape, not the default size
        width, height = nearest_bucket(width, height)
    elif image is not None:
        width, height = input_size(req, settings, image)
    for name, value, hi in (("width", width, settings.max_width), ("height", height, settings.max_height)):
        if not settings.min_size <= value <= hi:
            raise field_error(name, f"must be between {settings.min_size} and {hi} but is {value}", value)
    if req.num_inference_steps > settings.max_steps:
        raise field_error("num_inference_steps", f"must be at most {settings.max_steps}", req.num_inference_steps)
    refiner_steps = req.refiner.num_inference_steps  # img2img runs these on top: the same limit applies
    if refiner_steps is not None and refiner_steps > settings.max_steps:
        raise field_error("refiner.num_inference_steps", f"must be at most {settings.max_steps}", refiner_steps)
    if req.num_images_per_prompt > settings.max_images_per_prompt:
        raise field_error(
            "num_images_per_prompt", f"must be at most {settings.max_images_per_prompt}", req.num_images_per_prompt
        )
    for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        text = getattr(req, name)
        if text is not None and len(text) > settings.max_prompt_chars:
            raise field_error(name, f"must be at most {settings.max_prompt_chars} characters", text[:50] + "...")
    # presets run base-only unless the request names a refiner mode itself
    mode = req.refiner.mode or (RefinerMode.none if chosen.preset else settings.resolved_default_refiner_mode)
    if mask is not None and req.padding_mask_crop is not None and mode == RefinerMode.ensemble:
        # the refiner would finish latents of the crop, not of the picture: no ensemble with a crop
        if req.refiner.mode == RefinerMode.ensemble:
            raise field_error("refiner.mode", "cannot be `ensemble` with `padding_mask_crop`; use `img2img` or "
                              "`none`", "ensemble")
        mode = RefinerMode.none  # the deployment's default gives way (the resolved params say so)
    if mode != RefinerMode.none and not refiner_available:
        raise field_error("refiner.mode", "needs a refiner, and this deployment has none", mode.value)
    refiner = RefinerParams(**{**req.refiner.model_dump(), "mode": mode})
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    data = req.model_dump(exclude={"snap_to_bucket", "priority", "deadline", "webhook", "refiner", "seed", "image",
                                   "mask_image", "strength", "loras", "preset"})
    input_mode = "inpaint" if mask else "img2img" if image else None
    strength = (req.strength or DEFAULT_STRENGTH[input_mode]) if input_mode else None
    # diffusers denoises int(steps * strength) steps of an input image: none would fail the job in the worker
    if strength is not None and int(req.num_inference_steps * strength) < 1:
        raise field_error("strength", f"{strength} of num_inference_steps={req.num_inference_steps} is no whole "
                          "denoising step; raise either so their product is at least 1", strength)
    if mode == RefinerMode.img2img:
        r_steps = req.refiner.num_inference_steps or req.num_inference_steps
        if int(r_steps * req.refiner.strength) < 1:
            raise field_error("refiner.strength", f"{req.refiner.strength} of {r_steps} refiner steps is no whole "
                              "denoising step; raise either so their product is at least 1", req.refiner.strength)
    if req.preview_every is not None and not req.previews:
        raise field_error("preview_every", "applies to live previews only; send `previews: true` too",
                          req.preview_every)
    preview_every = (req.preview_every or DEFAULT_PREVIEW_EVERY) if req.previews else None
    return GenerationParams(**{**data, **adapter_fields, "width": width, "height": height, "seed": seed,
                               "refiner": refiner,
                               "image": image, "mask_image": mask, "strength": strength,
                               "preview_every": preview_every})


def token_counts(params: GenerationParams, counter: "TokenCounter | None") -> dict[str, int] | None:
    """Tokens each encoder sees (BOS/EOS included); refuses over-window prompts when asked to."""
    if counter is None:
        return None
    texts = {
        "text_encoder": ("prompt", params.prompt, 1),
        "text_encoder_2": ("prompt_2" if params.prompt_2 else "prompt", params.prompt_2 or params.prompt, 2),
    }
    if params.negative_prompt is not None:
        texts["negative_text_encoder"] = ("negative_prompt", params.negative_prompt, 1)
        neg2 = params.negative_prompt_2 if params.negative_prompt_2 is not None else params.negative_prompt
        texts["negative_text_encoder_2"] = (
            "negative_prompt_2" if params.negative_prompt_2 is not None else "negative_prompt", neg2, 2)
    counts = {name: counter.count(text, enc) for name, (_f, text, enc) in texts.items()}
    if params.long_prompt == LongPrompt.reject:
        errors = [
            {"field": field, "value": counts[name],
             "message": f"is {counts[name]} tokens for {name.removeprefix('negative_')}; the limit is {CLIP_WINDOW}"
                        " (long_prompt=chunk encodes longer prompts in 77-token chunks)"}
            for name, (field, _t, _e) in texts.items() if counts[name] > CLIP_WINDOW
        ]
        errors = merge(errors)  # `prompt` feeds both encoders when prompt_2 is absent: one entry, both counts
        if errors:
            raise Problem(422, "; ".join(f"`{e['field']}` {e['message']}" for e in errors), errors=errors,
                          kind="prompt-too-long")
    return counts


@dataclass
class Submission:
    gen_id: str
    record: dict[str, Any]
    # admission code: 0 written, 1 owner at its cap, 2 queue full, 3 over the daily quota (nothing written then)
    admitted: int = 0
    # the owner's unfinished generations when admitted, else the refusing count or depth (3: images admitted today)
    count: int = 0
    position: int | None = None  # jobs ahead of it once fed; None when not waiting


def rq_job_fields(queue: Queue, job_id: str, payload: Any, timeout: int, ttl: int, func: str = keys.RQ_FUNCTION
                  ) -> tuple[str, bytes]:
    """The hash rq's `Queue.create_job(...).save()` would write, as (every field but `data` as JSON text, `data`),
    so CREATE writes it in the same atomic script as the record. Built by rq itself, through its public API."""
    job = generation_job(queue, job_id, payload, timeout, ttl, func)
    enc = queue.connection.get_encoder()  # the bytes redis-py would send for each value
    mapping = {name: enc.encode(value) for name, value in job.to_dict().items()}
    data = mapping.pop("data")
    return json.dumps({k: v.decode() for k, v in mapping.items()}, separators=(",", ":")), data


class Enqueuer:
    """Prepares a submission (record, rq job, fair-share line) for `GenerationState.submit`."""

    def __init__(self, r: redis.Redis, settings: Settings, ar: aredis.Redis | None = None,
                 state: GenerationState | None = None) -> None:
        self.r = r
        self.settings = settings
        self.queue = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
        self.state = state or GenerationState(r, settings, no_image_urls, ar)

    def feed(self) -> int:
        return self.state.feed()

    def prepare(
        self,
        params: GenerationParams,
        owner: str,
        priority: int = 0,
        deadline: float | None = None,
        webhook: dict[str, Any] | None = None,
        token_counts: dict[str, int] | None = None,
        request_id: str | None = None,
        extra: dict[str, Any] | None = None,
        gen_id: str | None = None,
        limits: tuple[int, int] | None = None,  # (max unfinished for the owner, max queue depth): admit first
        daily_quota: int = 0,  # images the owner may submit per UTC day (0: no quota)
    ) -> tuple[dict[str, Any], list[str], list[Any]]:
        """(record fields, CREATE keys, CREATE args) for one submission."""
        gen_id = gen_id or new_generation_id()
        token = secrets.token_hex(8)
        rq_job_id = f"{gen_id}-1"
        now_s = time.time()
        ttl = self.settings.generation_ttl_seconds
        payload = JobPayload(generation_id=gen_id, token=token, attempt=1, params=params,
                             request_id=request_id).model_dump(mode="json")
        params_json = payload["params"]
        fields = {
            "id": gen_id,
            "owner": owner,
            "status": GenerationStatus.queued.value,
            "params": params_json,
            "progress": {"step": 0, "total_steps": 0, "stage": Stage.queued.value, "eta_seconds": None},
            "images": [],
            "timings": {},
            "token": token,
            "attempt": 1,
            "rq_job_id": rq_job_id,
            "created_at": now_s,
            "expires_at": now_s + ttl,
            "deadline_at": now_s + deadline if deadline else None,
            "batch_key": params.batch_key(),
            "webhook": webhook,
            "token_counts": token_counts,
            "request_id": request_id,
            **(extra or {}),
        }
        record = json.dumps(encode(fields), separators=(",", ":"), ensure_ascii=False)
        cap, depth = limits or (0, 0)
        day = utc_day(now_s)  # the quota's day: the submit's, on this API's clock
        create_keys = [keys.generation(gen_id), keys.rq_job(rq_job_id), keys.active(owner),
                       keys.RQ_QUEUE_KEY, keys.ACTIVE_OWNERS, keys.pending(owner), keys.owner_index(owner),
                       keys.EXPIRY, keys.RQ_QUEUES_SET, keys.usage_day(owner, day)]
        args = [gen_id, repr(now_s), "1" if limits else "0", cap, depth, ttl, ttl + RECORD_GRACE_SECONDS,
                queueing.pending_score(priority, int(now_s * 1000)), owner, repr(now_s + ttl),
                self.settings.queue_feed_depth, keys.RQ_QUEUE_KEY,
                *rq_job_fields(self.queue, rq_job_id, payload, self.settings.job_timeout_seconds, ttl), record,
                params.num_images_per_prompt, daily_quota, day_expires_at(day, self.settings.usage_retention_days)]
        return fields, create_keys, args

    @staticmethod
    def _submission(fields: dict[str, Any], res: list[Any]) -> Submission:
        code, count, pos = (int(x) for x in res)
        return Submission(gen_id=fields["id"], record=fields, admitted=code, count=count,
                          position=pos if code == 0 and pos >= 0 else None)

    def submit(self, params: GenerationParams, owner: str, priority: int = 0, deadline: float | None = None,
               webhook: dict[str, Any] | None = None, token_counts: dict[str, int] | None = None,
               request_id: str | None = None, extra: dict[str, Any] | None = None,
               gen_id: str | None = None) -> Submission:
        """Blocking submit without admission limits (tools and tests)."""
        fields, create_keys, args = self.prepare(params, owner, priority, deadline, webhook, token_counts,
                                                 request_id, extra, gen_id)
        return self._submission(fields, self.state.submit(create_keys, args))

    async def submit_async(self, fields: dict[str, Any], create_keys: list[str], args: list[Any]) -> Submission:
        """The API's submit: `prepare(..., limits=...)` then this, on the event loop (no thread hop)."""
        return self._submission(fields, await self.state.submit_async(create_keys, args))
