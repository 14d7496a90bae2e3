"""Finishing: encode, store (with retries), the final transition with its event and webhook, and the local
bookkeeping; inline, or on the background finisher while the next pipeline call runs."""

# The methods are Runner's (worker/runner.py), typed with `self: "Runner"`: mypy's "misc" refuses such a self
# type on a class that is not yet its base, and checks the bodies against Runner all the same.
# mypy: disable-error-code="misc"

import logging
import time
from typing import TYPE_CHECKING, Any

from common import logs
from common.contract.events import EventType
from common.contract.status import ErrorType, GenerationStatus, Stage
from common.storage import StorageUnavailable, image_key, put_with_retry
from common.usage import Success
from worker import encode as encoding
from worker.attempt import Member, progress_value
from worker.pipeline import Progress

if TYPE_CHECKING:
    from worker.runner import Runner

log = logging.getLogger("worker.finish")


class Finishing:
    def finish_in_background(self: "Runner", parts: list[tuple[Member, list[Any]]], manifest: dict[str, Any],
                             pipeline_seconds: float, times: Any, batch_images: int) -> None:
        for m, imgs in parts:
            with logs.bind(request_id=m.payload.request_id, generation_id=m.gen_id):
                try:
                    self.store_and_finish(m, imgs, manifest, pipeline_seconds, times, batch_images)
                except Exception:
                    # as when a job raises: the lease lapses and the reaper runs the generation again
                    log.exception("finishing generation %s failed; its lease will lapse", m.gen_id)
                finally:
                    self.forget(m)

    def drain(self: "Runner", timeout: float) -> bool:
        """Shutdown: let results already computed be stored and finished."""
        return self.finisher is None or self.finisher.close(timeout)

    def store_and_finish(self: "Runner", m: Member, images: list[Any], manifest: dict[str, Any],
                         pipeline_seconds: float, times: Any, batch_images: int = 1) -> None:
        params = m.payload.params  # the caller published the `encoding` stage
        t0 = time.monotonic()
        encoded = []
        for i, img in enumerate(images):
            data, ctype = encoding.encode(img, params.output_format, params.output_quality,
                                          {**manifest, "seed": params.image_seed(i), "index": i},
                                          self.settings.png_compress_level)
            encoded.append((i, data, ctype, img.width, img.height))
        encoding_seconds = time.monotonic() - t0
        # the `uploading` change is also the ownership check before writing: a superseded worker must not
        # store a second result, and one deleted or failed meanwhile (deadline sweep) stores nothing
        uploading = Progress(step=m.step, total_steps=m.total_steps, stage="uploading")
        outcome, _ = self.state.progress(m, progress_value(uploading))
        if outcome.startswith("stale"):
            log.warning("generation %s was handed to another worker; dropping this copy", m.gen_id)
            return
        if outcome != "OK":
            self.state.release(m.gen_id)
            self.after_final(m, outcome, EventType.succeeded)
            return
        t1 = time.monotonic()
        records = []
        try:
            for i, data, ctype, w, h in encoded:
                key = image_key(self.settings.storage_prefix, m.gen_id, i, params.output_format.value)
                digest = encoding.sha256(data)
                put_with_retry(self.store, key, data, ctype, {"sha256": digest, "generation-id": m.gen_id},
                               self.settings.storage_retry_seconds)
                records.append({"index": i, "seed": params.image_seed(i), "width": w, "height": h,
                                "content_type": ctype, "bytes": len(data), "sha256": digest, "key": key})
        except StorageUnavailable as exc:
            self.fail_all([m], ErrorType.storage_unavailable, f"object storage unavailable: {exc}")
            return
        uploading_seconds = time.monotonic() - t1
        now = time.time()
        created = float(m.record.get("created_at") or now)
        started = float(m.record.get("started_at") or now)
        # usage counts this generation's share of the call from the `pipeline` figure its record shows
        usage = Success.of(now, len(records), round(pipeline_seconds, 4), batch_images,
                           self.settings.usage_retention_days)
        timings = {
            "queued": round(started - created, 4),
            "pipeline": round(pipeline_seconds, 4),
            "base": round(times.base, 4),
            "refiner": round(times.refiner, 4),
            "decoding": round(times.decoding, 4),
            "encoding": round(encoding_seconds, 4),
            "uploading": round(uploading_seconds, 4),
            "total": round(now - created, 4),
            "batch_images": batch_images,  # images computed in the same pipeline call
            "gpu_seconds": usage.gpu_us / 1_000_000,  # this generation's share of the call: what usage counts
        }
        total = m.total_steps
        outcome = self.state.finish(m, {
            "status": GenerationStatus.succeeded.value, "finished_at": now, "images": records, "timings": timings,
            "manifest": manifest,
            "progress": {"step": total, "total_steps": total, "stage": Stage.done.value, "eta_seconds": 0},
        }, EventType.succeeded, usage)
        self.after_final(m, outcome, EventType.succeeded)
        if outcome == "OK":
            self.jobs_done += 1
            self.images_done += len(records)

    def finish_canceled(self: "Runner", m: Member) -> None:
        outcome = self.state.finish(m, {"status": GenerationStatus.canceled.value, "finished_at": time.time()},
                                    EventType.canceled)
        self.after_final(m, outcome, EventType.canceled)

    def fail_all(self: "Runner", members: list[Member], etype: ErrorType, message: str) -> None:
        for m in members:
            outcome = self.state.finish(m, {
                "status": GenerationStatus.failed.value, "finished_at": time.time(),
                "error": {"type": etype.value, "message": message},
            }, EventType.failed)
            self.after_final(m, outcome, EventType.failed)

    def after_final(self: "Runner", m: Member, outcome: str, event: EventType) -> None:
        """Local bookkeeping once `state.finish` has ended the generation."""
        self.forget(m)
        if outcome == "OK":
            log.info("generation %s", event.value.rpartition(".")[2], extra={
                "generation_id": m.gen_id, "request_id": m.payload.request_id, "attempt": m.payload.attempt})
        elif outcome.startswith("canceled") and event != EventType.canceled:
            log.info("generation %s was canceled while finishing; result dropped", m.gen_id)
