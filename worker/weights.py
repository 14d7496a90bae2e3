"""`python -m worker.weights download|wait`: fetch the models the worker settings name into the hub cache once,
before any worker starts (deploy/kubernetes: the `sdxl-weights` Job, and each worker's init container).

`download` fetches exactly the files the worker's `from_pretrained` calls read (diffusers' own
`DiffusionPipeline.download`, with the same variant and revisions; the refiner without the text encoder and VAE it
borrows from the base), plus the inpainting UNet and the hub's preview decoder when the settings name them. Then it
writes a marker, `$HF_HOME/sdxl-weights/<digest>.json`, whose digest covers those settings. `wait` returns once
the marker for the *current* settings exists, so workers whose models changed wait for a new download instead of
starting on a cache that lacks them. Local directories need no download: their marker is written at once.
"""

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

from common.logs import configure
from worker.previews import HUB_TAESD_XL, preview_source
from worker.settings import WorkerSettings

log = logging.getLogger("worker.weights")

WAIT_INTERVAL_SECONDS = 5.0
WAIT_REMIND_SECONDS = 60.0


def wanted(settings: WorkerSettings) -> dict[str, str | None]:
    """What the workers will load: the marker's digest covers all of it."""
    return {
        "base_model": settings.base_model,
        "revision": settings.revision,
        "refiner_model": settings.refiner_model,
        "refiner_revision": settings.refiner_revision or settings.revision,
        "inpaint_model": settings.inpaint_model,
        "inpaint_revision": settings.inpaint_revision,
        "variant": settings.variant,
        "preview_vae": preview_source(settings),
    }


def marker(settings: WorkerSettings, hf_home: Path) -> Path:
    digest = hashlib.sha256(json.dumps(wanted(settings), sort_keys=True).encode()).hexdigest()[:16]
    return hf_home / "sdxl-weights" / f"{digest}.json"


def _on_hub(name: str | None) -> bool:
    return bool(name) and not Path(str(name)).is_dir()


def download(settings: WorkerSettings, hf_home: Path) -> Path:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from huggingface_hub import snapshot_download

    want = wanted(settings)
    if _on_hub(settings.base_model):
        log.info("downloading %s", settings.base_model)
        StableDiffusionXLPipeline.download(settings.base_model, revision=settings.revision, variant=settings.variant)
    if settings.refiner_model and _on_hub(settings.refiner_model):
        log.info("downloading %s", settings.refiner_model)
        # the worker hands the refiner the base's text_encoder_2 and VAE: their folders are not fetched
        StableDiffusionXLImg2ImgPipeline.download(settings.refiner_model, revision=want["refiner_revision"],
                                                  variant=settings.variant, text_encoder_2=None, vae=None)
    if settings.inpaint_model and _on_hub(settings.inpaint_model):
        log.info("downloading %s (unet)", settings.inpaint_model)
        snapshot_download(settings.inpaint_model, revision=settings.inpaint_revision, allow_patterns=["unet/*"])
    if want["preview_vae"] == HUB_TAESD_XL:
        log.info("downloading %s", HUB_TAESD_XL)
        snapshot_download(HUB_TAESD_XL)  # a few MB: the whole repo
    done = marker(settings, hf_home)
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps({**want, "finished_at": time.time()}, indent=1))
    tmp.replace(done)  # atomic: a waiting worker never reads half a marker
    log.info("weights ready: %s", done)
    return done


def wait(settings: WorkerSettings, hf_home: Path, timeout: float | None = None) -> bool:
    done = marker(settings, hf_home)
    started = reminded = time.monotonic()
    log.info("waiting for the weights (%s)", done)
    while not done.is_file():
        now = time.monotonic()
        if timeout is not None and now - started >= timeout:
            return False
        if now - reminded >= WAIT_REMIND_SECONDS:
            log.info("still waiting for %s after %.0fs: has the weights Job run with these settings?", done,
                     now - started)
            reminded = now
        time.sleep(WAIT_INTERVAL_SECONDS)
    log.info("weights ready: %s", done)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["download", "wait", "marker"])
    parser.add_argument("--timeout", type=float, default=None, help="wait: give up after this many seconds")
    args = parser.parse_args(argv)
    settings = WorkerSettings()
    configure("worker", settings.log_level)
    from huggingface_hub import constants

    hf_home = Path(constants.HF_HOME)
    if args.command == "marker":
        print(marker(settings, hf_home))
        return 0
    if args.command == "download":
        download(settings, hf_home)
        return 0
    return 0 if wait(settings, hf_home, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
