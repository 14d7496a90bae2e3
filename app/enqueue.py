"""A validated request -> a generation record, an rq job, and a place in the fair-share line."""

import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from app.contract import keys, queueing
from app.contract.params import MAX_SEED, GenerationParams, JobPayload, LongPrompt, RefinerMode, RefinerParams
from app.contract.records import encode
from app.errors import Problem, field_error
from app.retention import RECORD_GRACE_SECONDS
from app.schemas import GenerationCreate
from app.settings import Settings
from app.tokens import CLIP_WINDOW, TokenCounter

SDXL_BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536)]


def new_generation_id() -> str:
    return "gen_" + secrets.token_urlsafe(16)  # 128 random bits: unguessable


def nearest_bucket(width: int, height: int) -> tuple[int, int]:
    ratio = width / height
    return min(SDXL_BUCKETS, key=lambda b: abs(b[0] / b[1] - ratio))


def resolve(req: GenerationCreate, settings: Settings, refiner_available: bool) -> GenerationParams:
    """Apply deployment defaults and limits; refuse what this deployment cannot serve (422 at submit)."""
    width, height = req.width, req.height
    if req.snap_to_bucket:
        width, height = nearest_bucket(width, height)
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
    mode = req.refiner.mode or settings.resolved_default_refiner_mode
    if mode != RefinerMode.none and not refiner_available:
        raise field_error("refiner.mode", "needs a refiner, and this deployment has none", mode.value)
    refiner = RefinerParams(**{**req.refiner.model_dump(), "mode": mode})
    seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED + 1)
    data = req.model_dump(exclude={"snap_to_bucket", "priority", "deadline", "webhook", "refiner", "seed"})
    return GenerationParams(**{**data, "width": width, "height": height, "seed": seed, "refiner": refiner})


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
        if errors:
            raise Problem(422, "; ".join(f"`{e['field']}` {e['message']}" for e in errors), errors=errors,
                          kind="prompt-too-long")
    return counts


@dataclass
class Submission:
    gen_id: str
    record: dict[str, Any]


class Enqueuer:
    """Writes everything one submission needs in one round trip, then feeds the rq queue."""

    def __init__(self, r: redis.Redis, settings: Settings) -> None:
        self.r = r
        self.settings = settings
        self.queue = Queue(keys.GENERATION_QUEUE, connection=r, serializer=JSONSerializer)
        self._submit = r.register_script(queueing.SUBMIT)
        self.feed_script = r.register_script(queueing.FEED)

    def feed(self) -> int:
        return int(self.feed_script(keys=[keys.RQ_QUEUE_KEY, keys.ACTIVE_OWNERS],
                                    args=[self.settings.queue_feed_depth, keys.PREFIX]))

    def submit(
        self,
        params: GenerationParams,
        owner: str,
        priority: int = 0,
        deadline: float | None = None,
        webhook: dict[str, Any] | None = None,
        token_counts: dict[str, int] | None = None,
        request_id: str | None = None,
        extra: dict[str, Any] | None = None,
        gen_id: str | None = None,  # chosen earlier when an admission check or Idempotency-Key reserved it
    ) -> Submission:
        gen_id = gen_id or new_generation_id()
        token = secrets.token_hex(8)
        rq_job_id = f"{gen_id}-1"
        now = time.time()
        ttl = self.settings.generation_ttl_seconds
        payload = JobPayload(generation_id=gen_id, token=token, attempt=1, params=params, request_id=request_id)
        job = self.queue.create_job(
            "worker.tasks.run_generation",
            args=[payload.model_dump(mode="json")],
            job_id=rq_job_id,
            timeout=self.settings.job_timeout_seconds,
            result_ttl=600,
            failure_ttl=ttl,
            ttl=ttl,
        )
        fields = {
            "id": gen_id,
            "owner": owner,
            "status": "queued",
            "params": params.model_dump(mode="json"),
            "progress": {"step": 0, "total_steps": 0, "stage": "queued", "eta_seconds": None},
            "images": [],
            "timings": {},
            "token": token,
            "attempt": 1,
            "rq_job_id": rq_job_id,
            "created_at": now,
            "expires_at": now + ttl,
            "deadline_at": now + deadline if deadline else None,
            "batch_key": params.batch_key(),
            "webhook": webhook,
            "token_counts": token_counts,
            "request_id": request_id,
            **(extra or {}),
        }
        record: dict[Any, Any] = encode(fields)
        pipe = self.r.pipeline(transaction=True)
        job.save(pipeline=pipe)
        pipe.hset(keys.generation(gen_id), mapping=record)
        pipe.expire(keys.generation(gen_id), ttl + RECORD_GRACE_SECONDS)  # see app.retention
        pipe.zadd(keys.owner_index(owner), {gen_id: now})
        pipe.zadd(keys.EXPIRY, {gen_id: now + ttl})
        pipe.sadd(keys.RQ_QUEUES_SET, keys.RQ_QUEUE_KEY)
        self._submit(
            keys=[keys.pending(owner), keys.ACTIVE_OWNERS],
            args=[gen_id, queueing.pending_score(priority, int(now * 1000)), keys.PREFIX, owner],
            client=pipe,
        )
        pipe.execute()
        self.feed()
        return Submission(gen_id=gen_id, record=fields)
