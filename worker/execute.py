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
from common.contract.params import GenerationParams, InputImage
from common.contract.status import ErrorType
from common.storage import ObjectNotFound, StorageUnavailable, get_with_retry
from worker.attempt import Member, progress_value
from worker.pipeline import ImageSpec, Inputs, NonFiniteOutput, Progress, PromptTooLong, StepAbort, is_oom

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
        active = members
        while active:
            specs = [ImageSpec(m.payload.params.prompt, m.payload.params.prompt_2, m.payload.params.negative_prompt,
                               m.payload.params.negative_prompt_2, m.payload.params.image_seed(i))
                     for m in active for i in range(m.payload.params.num_images_per_prompt)]
            try:
                images, times = self.run_with_oom_fallback(params, specs, hook, inputs)
            except StepAbort as abort:
                if str(abort) == "shutdown":
                    for m in active:
                        self.requeue(m, "worker shutting down past its grace period")
                    return
                for m in active:
                    if m.outcome == "canceled":
                        self.finish_canceled(m)
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
            "params": params.model_dump(mode="json", exclude={"image": by_content, "mask_image": by_content}),
            "scheduler_config": self.engine.scheduler_config(params.scheduler),
            **self.engine.model_info(),
        }

    def run_with_oom_fallback(self: "Runner", params: GenerationParams, specs: list[ImageSpec],
                              hook: Any, inputs: Inputs | None = None) -> tuple[list[Any], Any]:
        try:
            return self.engine.run(params, specs, hook, inputs)
        except Exception as exc:
            if not is_oom(exc) or len(specs) == 1:
                raise
            self.engine.free_memory()
            log.warning("out of memory at batch %d: retrying one image at a time", len(specs))
            images: list[Any] = []
            times = None
            for spec in specs:
                imgs, times = self.engine.run(params, [spec], hook, inputs)
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
