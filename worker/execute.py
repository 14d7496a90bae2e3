"""Executing: one pipeline call for one attempt or a micro-batch, with cancel, shutdown and lost-ownership
aborts at every step and the out-of-memory fallback; results go on to finishing (worker/finish.py)."""

# The methods are Runner's (worker/runner.py), typed with `self: "Runner"`: mypy's "misc" refuses such a self
# type on a class that is not yet its base, and checks the bodies against Runner all the same.
# mypy: disable-error-code="misc"

import functools
import logging
import time
from typing import TYPE_CHECKING, Any

import redis
from PIL import Image

from common import images as input_images
from common.contract import stats
from common.contract.events import preview_key
from common.contract.params import GenerationParams, InputImage
from common.contract.status import ErrorType
from common.storage import ObjectNotFound, StorageUnavailable, get_with_retry
from worker.adapters import AdapterUnavailable
from worker.attempt import Member, progress_value
from worker.pipeline import (
    ImageSpec,
    Inputs,
    NonFiniteOutput,
    PreviewHook,
    Progress,
    PromptTooLong,
    StepAbort,
    is_oom,
)
from worker.previews import Preview, event_data, preview_name

if TYPE_CHECKING:
    from worker.runner import Runner

log = logging.getLogger("worker.execute")


class InputUnavailable(Exception):
    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class Executing:
    def execute(self: "Runner", members: list[Member]) -> None:
        t_start = time.monotonic()
        params = members[0].payload.params
        last_flush: list[Any] = [0.0, ""]

        def hook(progress: Progress) -> None:
            if self.shutdown_abort.is_set():
                raise StepAbort("shutdown")
            with self.lock:
                hit = [m for m in members if m.outcome is None and (m.cancel_requested or m.superseded)]
            if hit:
                for m in hit:
                    m.outcome = "superseded" if m.superseded else "canceled"
                raise StepAbort("cancel")
            for m in members:
                m.step, m.total_steps = progress.step, progress.total_steps
            now = time.monotonic()
            if now - last_flush[0] >= self.settings.progress_interval_seconds or progress.stage != last_flush[1]:
                last_flush[0], last_flush[1] = now, progress.stage
                self.publish_progress(members, progress)

        try:
            inputs = self.load_inputs(params)
        except InputUnavailable as exc:
            self.fail_all(members, exc.error_type, str(exc))
            return
        except input_images.InvalidImage as exc:  # checked at submit: only a store that changed the bytes gets here
            self.fail_all(members, ErrorType.invalid_payload, f"an input image {exc}")
            return
        if not self.apply_adapters(members, params):
            return
        active = members
        while active:
            specs = [ImageSpec(m.payload.params.prompt, m.payload.params.prompt_2, m.payload.params.negative_prompt,
                               m.payload.params.negative_prompt_2, m.payload.params.image_seed(i))
                     for m in active for i in range(m.payload.params.num_images_per_prompt)]
            # each image of the call, in spec order: (its generation, its index there), for the previews
            owners = [(m, i) for m in active for i in range(m.payload.params.num_images_per_prompt)]
            try:
                images, times = self.run_with_oom_fallback(params, specs, hook, inputs,
                                                           self.preview_hooks(params, owners))
            except StepAbort as abort:
                if str(abort) == "shutdown":
                    for m in active:
                        self.requeue(m, "worker shutting down past its grace period")
                    return
                for m in active:
                    if m.outcome == "canceled":
                        self.finish_canceled(m)
                    elif m.outcome == "superseded":
                        # its lease lapsed (a stall, or a network partition) and a reaper gave it a new token:
                        # the attempt now running elsewhere is the one that finishes; said in the same words as
                        # a copy dropped at the upload check (worker/finish.py), so one search finds either
                        log.warning("generation %s was handed to another worker; dropping this copy", m.gen_id,
                                    extra={"generation_id": m.gen_id, "attempt": m.payload.attempt})
                # the others run again without the canceled member: none is lost to another's cancel
                active = [m for m in active if m.outcome is None]
                continue
            except NonFiniteOutput as exc:
                self.fail_all(active, ErrorType.nan_output, str(exc))
                return
            except PromptTooLong as exc:
                self.fail_all(active, ErrorType.prompt_too_long, str(exc))
                return
            except Exception as exc:
                if is_oom(exc):
                    self.engine.free_memory()
                    self.fail_all(active, ErrorType.out_of_memory, "the GPU ran out of memory for this request")
                else:
                    log.exception("pipeline failed")
                    self.fail_all(active, ErrorType.pipeline_error, f"{type(exc).__name__} in the pipeline")
                return
            pipeline_seconds = time.monotonic() - t_start
            self.busy_seconds += pipeline_seconds
            manifest = self.manifest(params)  # here: the engine belongs to this thread
            parts = []
            offset = 0
            for m in active:
                n = m.payload.params.num_images_per_prompt
                parts.append((m, images[offset:offset + n]))
                offset += n
            # the `encoding` stage, which also says whether another job waits: only then does finishing go to
            # the background; with nothing to overlap, finishing here is quicker (no hand-off, and rq's
            # bookkeeping does not compete with it for the GIL)
            waiting = self.publish_progress(active, Progress(step=active[0].step, total_steps=active[0].total_steps,
                                                             stage="encoding"), queue_length=True)
            if self.finisher is None or waiting <= 0:
                for m, imgs in parts:
                    self.store_and_finish(m, imgs, manifest, pipeline_seconds, times, len(images))
                return
            for m, _ in parts:
                m.outcome = "finishing"
            self.finisher.submit(functools.partial(self.finish_in_background, parts, manifest, pipeline_seconds,
                                                   times, len(images)))
            return

    def apply_adapters(self: "Runner", members: list[Member], params: GenerationParams) -> bool:
        """The call's LoRA adapters fused into the weights (worker/adapters.py); False: the members failed."""
        adapters = getattr(self.engine, "adapters", None)
        if adapters is None:  # an engine without adapter support (test doubles)
            return True
        try:
            adapters.apply(params.loras)
        except AdapterUnavailable as exc:
            self.fail_all(members, ErrorType.adapter_unavailable, str(exc))
            return False
        finally:
            events = adapters.take_events()
            if events:
                try:
                    pipe = self.r.pipeline(transaction=False)
                    for kind, tier, seconds in events:
                        stats.count_adapter(pipe, kind, tier, seconds)
                    pipe.execute()
                except redis.RedisError:
                    log.warning("adapter metrics not recorded", exc_info=True)
        return True

    def load_inputs(self: "Runner", params: GenerationParams) -> Inputs | None:
        """The call's image and mask from the object store, decoded as the API checked them, at the output size."""
        if params.image is None:
            return None
        size = (params.width, params.height)

        def fetch(ref: InputImage) -> bytes:
            try:
                return get_with_retry(self.store, ref.key, self.settings.storage_retry_seconds).data
            except ObjectNotFound:
                raise InputUnavailable(ErrorType.input_missing,
                                       f"input image upload `{ref.upload_id}` is gone from storage") from None
            except StorageUnavailable as exc:
                raise InputUnavailable(ErrorType.storage_unavailable, f"input image could not be read: {exc}") \
                    from None

        image = input_images.to_rgb(fetch(params.image), self.settings.max_input_pixels)
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        mask = None
        if params.mask_image is not None:
            mask = input_images.to_mask(fetch(params.mask_image), self.settings.max_input_pixels)
            if mask.size != size:
                mask = mask.resize(size, Image.Resampling.LANCZOS)
        return Inputs(image=image, mask=mask)

    def manifest(self: "Runner", params: GenerationParams) -> dict[str, Any]:
        # inputs by content only: the manifest is written into the image file, and the same pixels in, sent
        # any way (another upload, a URL, multipart), must give the same bytes out
        inputs = {name: {"sha256": ref.sha256, "width": ref.width, "height": ref.height}
                  for name, ref in (("image", params.image), ("mask_image", params.mask_image)) if ref is not None}
        by_content = {"upload_id", "key"}
        return {
            "mode": params.mode,
            **({"inputs": inputs} if inputs else {}),
            # previews leave the pixels alone: a request with them gives the same bytes as one without
            "params": params.model_dump(mode="json", exclude={"image": by_content, "mask_image": by_content,
                                                              "preview_every": True}),
            "scheduler_config": self.engine.scheduler_config(params.scheduler, params.scheduler_config),
            # the LoRA files by content (also in `params`): what to fetch to reproduce the image
            **({"adapters": [r.model_dump() for r in params.loras], "preset": params.preset} if params.loras
               or params.preset else {}),
            **self.engine.model_info(),
        }

    def run_with_oom_fallback(self: "Runner", params: GenerationParams, specs: list[ImageSpec],
                              hook: Any, inputs: Inputs | None = None,
                              previews: Any = None) -> tuple[list[Any], Any]:
        """`previews`: (first spec's position, spec count) -> the call's preview hook, or None for no previews."""

        def run(call_specs: list[ImageSpec], first: int) -> tuple[list[Any], Any]:
            preview = previews(first, len(call_specs)) if previews is not None else None
            extra = {"preview": preview} if preview is not None else {}
            return self.engine.run(params, call_specs, hook, inputs, **extra)  # type: ignore[no-any-return]

        try:
            return run(specs, 0)
        except Exception as exc:
            if not is_oom(exc) or len(specs) == 1:
                raise
            self.engine.free_memory()
            log.warning("out of memory at batch %d: retrying one image at a time", len(specs))
            images: list[Any] = []
            times = None
            for k, spec in enumerate(specs):
                imgs, times = run([spec], k)
                images += imgs
            return images, times

    def publish_progress(self: "Runner", members: list[Member], progress: Progress, queue_length: bool = False) -> int:
        """Progress events never fail a job. Answers the rq queue's length when asked (-1: unknown)."""
        length = -1
        try:
            for m in members:
                if m.outcome in (None, "finishing"):
                    length = max(length, self.state.progress(m, progress_value(progress), queue_length)[1])
        except redis.RedisError:
            log.warning("progress update failed", exc_info=True)
        return length

    # --- live previews ----------------------------------------------------------------------------
    def preview_hooks(self: "Runner", params: GenerationParams, owners: list[tuple[Member, int]]) -> Any:
        """(first, count) -> the preview hook of a call on specs[first:first + count], or None (previews off,
        or this worker has no preview decoder)."""
        if not params.preview_every or self.previewer is None:
            return None

        def hooks(first: int, count: int) -> PreviewHook:
            def preview(progress: Progress, latents: Any) -> None:
                self.publish_previews(owners[first:first + count], progress, latents)

            return preview

        return hooks

    def publish_previews(self: "Runner", owners: list[tuple[Member, int]], progress: Progress, latents: Any) -> None:
        """Decode, encode and publish one preview per image, each on its own generation's stream. A preview that
        fails is logged and skipped: previews never fail a job."""
        assert self.previewer is not None
        try:
            rendered = self.previewer.render(latents)
        except Exception:
            log.warning("preview decode failed", exc_info=True)
            return
        for (m, index), pv in zip(owners, rendered, strict=True):
            if m.outcome is not None:  # canceled or superseded meanwhile: its stream is finished or about to be
                continue
            try:
                url = self.store_preview(m, index, progress.step, pv)
                self.state.preview(m, event_data(m.gen_id, index, progress.step, progress.total_steps,
                                                 progress.stage, pv, url))
            except Exception:
                log.warning("preview publish failed", exc_info=True, extra={"generation_id": m.gen_id})

    def store_preview(self: "Runner", m: Member, index: int, step: int, pv: Preview) -> str | None:
        """None when the preview goes inline; else it is stored under the generation's prefix (deleted with it)
        and this is its URL: presigned in presigned mode, else the API's."""
        if len(pv.data) <= self.settings.preview_inline_max_bytes:
            return None
        key = preview_key(self.settings.storage_prefix, m.gen_id, preview_name(index, step, pv.ext))
        self.store.put(key, pv.data, pv.content_type, {})
        if self.settings.image_url_mode == "presigned":
            url = self.store.presigned_url(key)
            if url:
                return url
        base = (self.settings.public_base_url or "").rstrip("/")
        return f"{base}/v1/generations/{m.gen_id}/previews/{preview_name(index, step, pv.ext)}"
