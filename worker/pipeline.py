"""SDXL base + refiner, loaded once, called as one batch of image specs -> decoded images.

Runs on the worker's main thread only: a diffusers pipeline is not safe to share between threads and
torch's CPU thread pool is per thread.
"""

import copy
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from PIL import Image

from common.contract.params import GenerationParams, LongPrompt, RefinerMode, RefinerParams
from worker.adapters import AdapterCache
from worker.prompts import long_prompt_embeds, needs_chunks
from worker.settings import WorkerSettings

log = logging.getLogger("worker.pipeline")
diffusers.utils.logging.disable_progress_bar()  # one JSON line per event: no tqdm bars in worker logs

SCHEDULER_CLASSES: dict[str, tuple[type[Any], dict[str, Any]]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    # few-step schedulers for presets (LCM-LoRA; Hyper-SD's TCD): their settings come with the preset
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}

WATERMARK_MIN_PIXELS = 256 * 256
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# inductor modes that record CUDA graphs -> the same mode without them (for the VAE decode, see compile_vae)
WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
FP8_MIN_CAPABILITY = (8, 9)  # float8 matrix units: Ada and Hopper


class StepAbort(Exception):
    """Raised from the step callback to stop a pipeline call (cancel, shutdown, lost ownership)."""


@dataclass
class ImageSpec:
    """One image of a call: its prompts and its own seed (batched images keep their own generators)."""

    prompt: str
    prompt_2: str | None
    negative_prompt: str | None
    negative_prompt_2: str | None
    seed: int


@dataclass
class Inputs:
    """A call's input image and mask, decoded (common/images.py) and at the output size; shared by its images."""

    image: Image.Image
    mask: Image.Image | None = None


@dataclass
class Progress:
    step: int = 0
    total_steps: int = 0
    stage: str = "base"
    started: float = field(default_factory=time.monotonic)

    def eta(self) -> float | None:
        if self.step <= 0 or self.total_steps <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return round(elapsed / self.step * max(self.total_steps - self.step, 0), 3)


# (progress) -> None; may raise StepAbort
StepHook = Callable[[Progress], None]
# (progress, the batch's latents after that step) -> None: live previews every `params.preview_every` steps
PreviewHook = Callable[[Progress, torch.Tensor], None]


@dataclass
class StageTimes:
    base: float = 0.0
    refiner: float = 0.0
    decoding: float = 0.0


class Engine:
    """Holds the resident pipelines and runs one batch at a time."""

    load_count = 0  # process-wide: proves models are loaded once, not per job

    def __init__(self, settings: WorkerSettings, pipelines: tuple[Any, Any] | None = None) -> None:
        """Load from `settings` (hub id or local directory), or adopt already-built pipelines (benchmarks)."""
        self.settings = settings
        self.device = torch.device(settings.resolved_device)
        self.dtype = DTYPES[settings.resolved_dtype]
        # before any loading: a worker that cannot quantize says so at once, not after minutes of loading
        self._fp8 = self._fp8_quantizer() if settings.fp8 else None
        t0 = time.monotonic()
        self.refiner: StableDiffusionXLImg2ImgPipeline | None = None
        if pipelines is not None:
            self.base, self.refiner = pipelines
        else:
            self.base = StableDiffusionXLPipeline.from_pretrained(
                settings.base_model, revision=settings.revision, variant=settings.variant, dtype=self.dtype,
                add_watermarker=False,
            )
        if pipelines is None and settings.refiner_model:
            # shares text_encoder_2 and the VAE with the base: ~1.5 GB less in fp16
            self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
                settings.refiner_model, revision=settings.refiner_revision or settings.revision,
                variant=settings.variant, dtype=self.dtype,
                text_encoder_2=self.base.text_encoder_2, vae=self.base.vae, add_watermarker=False,
            )
        for pipe in self.pipes():
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            if settings.channels_last:
                pipe.unet.to(memory_format=torch.channels_last)
            if settings.fuse_qkv:
                pipe.fuse_qkv_projections()
            if self._fp8 is not None:
                self._fp8(pipe.unet)
            if settings.compile_mode:
                pipe.unet = self._compile(pipe.unet)
        # our own decode path (Engine.decode) decodes with `decode_vae`: the shared VAE, or, where it must decode in
        # another dtype (SDXL's VAE overflows in float16: force_upcast), a copy of its decoder in that dtype made
        # once here, rather than casting the whole shared VAE there and back around every decode
        self.decode_vae = self.decode_vae_for(self._decode_dtype())
        self._vae_decode = self._compile(self.decode_vae.decode, cudagraphs=False) if settings.compile_vae else None
        # image to image and inpainting: the same modules as the text-to-image pipelines (from_pipe shares them,
        # compiled UNet included), so these modes cost no second copy of any weight (bench/images.py measures it).
        # from_pipe ends with `.to(dtype)`, float32 unless told: without `dtype` it would cast the shared modules,
        # the base's own, to float32 in place (twice the memory in fp16)
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.base, dtype=self.dtype)
        self.inpaint = self._inpaint_pipeline(settings)
        self.refiner_inpaint = StableDiffusionXLInpaintPipeline.from_pipe(self.refiner, dtype=self.dtype) \
            if self.refiner else None
        for pipe in (self.img2img, self.inpaint, self.refiner_inpaint):
            if pipe is not None:
                pipe.set_progress_bar_config(disable=True)
        self.watermarker = self._watermarker(settings.watermark)
        self._schedulers: dict[tuple[int, str, str], Any] = {}
        # LoRA adapters (worker/adapters.py): fused into these pipelines' weights per request
        self.adapters = AdapterCache({"base": self.base, "refiner": self.refiner}, settings)
        Engine.load_count += 1
        self.load_seconds = time.monotonic() - t0
        log.info("models loaded", extra={"seconds": round(self.load_seconds, 3), "base": settings.base_model,
                                         "refiner": settings.refiner_model})

    def _decode_dtype(self) -> torch.dtype:
        """SDXL_VAE_DECODE_DTYPE; auto: float32 where the VAE asks for the upcast in float16, else the model's."""
        if self.settings.vae_decode_dtype != "auto":
            return DTYPES[self.settings.vae_decode_dtype]
        vae = self.base.vae
        return torch.float32 if vae.dtype == torch.float16 and vae.config.force_upcast else vae.dtype

    def decode_vae_for(self, dtype: torch.dtype) -> Any:
        """The shared VAE if it is in `dtype`, else a copy of its decoding half (no encoder) in `dtype`."""
        vae = self.base.vae
        if vae.dtype == dtype:
            return vae
        encoder, vae.encoder = vae.encoder, None  # not copied: decoding never uses it
        try:
            decoder = copy.deepcopy(vae)
        finally:
            vae.encoder = encoder
        return decoder.to(dtype=dtype)

    def _compile(self, module: Any, cudagraphs: bool = True) -> Any:
        backend = self.settings.compile_backend
        # `mode` is inductor's: other backends take none
        mode = self.settings.compile_mode if backend == "inductor" else None
        if mode and not cudagraphs:
            mode = WITHOUT_CUDAGRAPHS.get(mode, mode)
        return torch.compile(module, backend=backend, mode=mode, fullgraph=False)

    def _fp8_quantizer(self) -> Callable[[Any], None]:
        """SDXL_FP8: torchao's float8 dynamic activation + weight quantization, applied to a UNet in place."""
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_
        except ImportError as exc:
            raise RuntimeError(f"SDXL_FP8=true needs torchao, which is not importable here ({exc}): install it "
                               "(`pip install torchao`) or set SDXL_FP8=false") from exc
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < FP8_MIN_CAPABILITY:
            found = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
            raise RuntimeError(f"SDXL_FP8=true needs a CUDA GPU of compute capability 8.9 or later (Ada, Hopper), "
                               f"but this worker runs on {found}: set SDXL_FP8=false")
        # per-tensor scales (they also take fp16 activations); inductor's settings left alone: torchao's recommended
        # ones (coordinate-descent tuning of every kernel, TF32 matmuls) would change the whole process's compiles
        config = Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)

        def quantize(unet: Any) -> None:
            quantize_(unet, config)

        return quantize

    def _inpaint_pipeline(self, settings: WorkerSettings) -> Any:
        """Inpainting on the base UNet, or on a dedicated inpainting UNet (9 input channels) when one is named:
        loaded once here, beside the base, for deployments that want its better seams."""
        if not settings.inpaint_model:
            return StableDiffusionXLInpaintPipeline.from_pipe(self.base, dtype=self.dtype)
        unet = UNet2DConditionModel.from_pretrained(settings.inpaint_model, subfolder="unet",
                                                    revision=settings.inpaint_revision, variant=settings.variant,
                                                    dtype=self.dtype).to(self.device)
        if settings.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self._fp8 is not None:
            self._fp8(unet)
        if settings.compile_mode:
            unet = self._compile(unet)
        return StableDiffusionXLInpaintPipeline.from_pipe(self.base, unet=unet, dtype=self.dtype)

    def pipes(self) -> list[Any]:
        return [p for p in (self.base, self.refiner) if p is not None]

    @staticmethod
    def _watermarker(enabled: bool | None) -> Any:
        from diffusers.utils import is_invisible_watermark_available

        if enabled is False:
            return None
        if not is_invisible_watermark_available():
            if enabled:
                raise RuntimeError("SDXL_WATERMARK=true but invisible-watermark is not installed")
            return None
        from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker

        return StableDiffusionXLWatermarker()

    def model_info(self) -> dict[str, Any]:
        import diffusers
        import transformers

        return {
            "base_model": self.settings.base_model,
            "base_revision": self.settings.revision,
            "refiner_model": self.settings.refiner_model,
            "refiner_revision": self.settings.refiner_revision or self.settings.revision,
            "inpaint_model": self.settings.inpaint_model,
            "variant": self.settings.variant,
            "dtype": self.settings.resolved_dtype,
            "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__.split("+")[0]},
        }

    def scheduler(self, pipe: Any, name: str, config: dict[str, Any] | None = None) -> Any:
        """`config`: a preset's settings over the table's (GenerationParams.scheduler_config)."""
        key = (id(pipe), name, json.dumps(config or {}, sort_keys=True))
        if key not in self._schedulers:
            cls, overrides = SCHEDULER_CLASSES[name]
            self._schedulers[key] = cls.from_config(pipe.scheduler.config, **{**overrides, **(config or {})})
        return self._schedulers[key]

    def scheduler_config(self, name: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
        # some configs hold infinities (DPM-Solver's lambda_min_clipped = -inf), which JSON cannot carry:
        # the manifest travels in the resource, SSE data and webhooks, so they are written as strings
        return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in self.scheduler(self.base, name, config).config.items()}

    def full_step_count(self, name: str, steps: int, config: dict[str, Any] | None = None) -> int:
        cls, overrides = SCHEDULER_CLASSES[name]
        sched = cls.from_config(self.base.scheduler.config, **{**overrides, **(config or {})})
        sched.set_timesteps(steps)
        return len(sched.timesteps)

    # --- running ----------------------------------------------------------------------------------
    def run(self, params: GenerationParams, specs: list[ImageSpec], hook: StepHook, inputs: Inputs | None = None,
            preview: PreviewHook | None = None) -> tuple[list[Image.Image], StageTimes]:
        """Base (+ refiner) for every spec with the shared params; returns PIL images in spec order.

        `inputs`: image to image (an image) or inpainting (and a mask), as `params.mode` says."""
        times = StageTimes()
        self.adapters.apply(params.loras)  # no-op when they are applied already (the runner applies them first)
        mode = params.refiner.mode if self.refiner is not None else RefinerMode.none
        if (params.image is None) != (inputs is None):
            raise ValueError("inputs must be given exactly when params name an image")
        progress = Progress(stage="base")
        full = self.full_step_count(params.scheduler, params.num_inference_steps, params.scheduler_config)
        progress.total_steps = full
        if mode == RefinerMode.img2img:
            r_steps = params.refiner.num_inference_steps or params.num_inference_steps
            r_full = self.full_step_count(params.scheduler, r_steps, params.scheduler_config)
            progress.total_steps += max(1, int(r_full * params.refiner.strength))

        def callback(stage: str, offset: int) -> Callable[..., dict[str, Any]]:
            def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
                if i == 0:
                    if stage == "base":
                        base_total = pipe.num_timesteps
                        if mode == RefinerMode.none:
                            progress.total_steps = base_total
                        elif mode == RefinerMode.img2img:
                            progress.total_steps = base_total + (progress.total_steps - full)
                    else:
                        progress.total_steps = offset + pipe.num_timesteps
                progress.stage = stage
                progress.step = offset + i + 1
                hook(progress)
                if preview is not None and params.preview_every and progress.step % params.preview_every == 0:
                    preview(progress, kwargs["latents"])  # the refiner's latents too: the same latent space
                return {}

            return on_step_end

        common = self._common_kwargs(params, specs)
        base_common, refiner_common = self._prompt_kwargs(params, common, mode)
        t0 = time.monotonic()
        base_kwargs: dict[str, Any] = dict(
            **base_common,
            num_inference_steps=params.num_inference_steps,
            guidance_rescale=params.guidance_rescale,
            **self._micro_conditioning(params),
            output_type="latent",
            callback_on_step_end=callback("base", 0),
            callback_on_step_end_tensor_inputs=["latents"],
        )
        base_pipe: Any = self.base
        if inputs is None:
            base_kwargs.update(width=params.width, height=params.height)
        elif inputs.mask is None:
            base_pipe = self.img2img
            base_kwargs.update(image=inputs.image, strength=params.strength)
        else:
            base_pipe = self.inpaint
            image, mask = inputs.image, inputs.mask
            if params.padding_mask_crop is not None:
                # diffusers crops only when it decodes itself (output_type="pil"); we keep latents for the refiner
                # and our own decode, so the crop is made here as diffusers makes it, and pasted back below
                image, mask = self._crop(inputs, params)
            base_kwargs.update(image=image, mask_image=mask, strength=params.strength,
                               width=params.width, height=params.height)
        base_pipe.scheduler = self.scheduler(self.base, params.scheduler, params.scheduler_config)
        if mode == RefinerMode.ensemble:
            base_kwargs["denoising_end"] = params.refiner.denoising_start
        latents = base_pipe(**base_kwargs).images
        times.base = time.monotonic() - t0
        base_steps = progress.step

        if mode != RefinerMode.none:
            refiner: Any = self.refiner  # diffusers' pipelines are untyped enough to confuse mypy
            assert refiner is not None
            scheduler = self.scheduler(refiner, params.scheduler, params.scheduler_config)
            if mode == RefinerMode.ensemble and inputs is not None and inputs.mask is not None:
                # the refiner finishes the inpainting: it needs the mask too (base latents as its image)
                refiner = self.refiner_inpaint
            refiner.scheduler = scheduler
            refiner_kwargs: dict[str, Any] = dict(
                **refiner_common,
                aesthetic_score=params.refiner.aesthetic_score,
                negative_aesthetic_score=params.refiner.negative_aesthetic_score,
                **self._micro_conditioning(params),
                guidance_rescale=params.guidance_rescale,
                output_type="latent",
                callback_on_step_end=callback("refiner", base_steps),
                callback_on_step_end_tensor_inputs=["latents"],
            )
            if mode == RefinerMode.ensemble:
                refiner_kwargs.update(image=latents, num_inference_steps=params.num_inference_steps,
                                      denoising_start=params.refiner.denoising_start)
                if refiner is self.refiner_inpaint:
                    assert inputs is not None
                    refiner_kwargs.update(mask_image=inputs.mask, width=params.width, height=params.height)
            else:
                progress.stage = "decoding"
                hook(progress)
                # img2img takes images in [0, 1] (the VAE decodes to [-1, 1])
                decoded = (self.decode(latents) / 2 + 0.5).clamp(0, 1)
                refiner_kwargs.update(image=decoded, strength=params.refiner.strength,
                                      num_inference_steps=params.refiner.num_inference_steps
                                      or params.num_inference_steps)
            t1 = time.monotonic()
            latents = refiner(**refiner_kwargs).images
            times.refiner = time.monotonic() - t1

        progress.stage = "decoding"
        hook(progress)
        t2 = time.monotonic()
        images = self.to_pil(self.decode(latents))
        if inputs is not None and inputs.mask is not None and params.padding_mask_crop is not None:
            # as diffusers does it when it decodes itself: the repainted crop goes back into the original
            crop = self._crop_region(inputs, params)
            images = [self.inpaint.image_processor.apply_overlay(inputs.mask, inputs.image, img, crop)
                      for img in images]
        times.decoding = time.monotonic() - t2
        return images, times

    def _crop_region(self, inputs: Inputs, params: GenerationParams) -> tuple[int, int, int, int]:
        region: tuple[int, int, int, int] = self.inpaint.mask_processor.get_crop_region(
            inputs.mask, params.width, params.height, pad=params.padding_mask_crop)
        return region

    def _crop(self, inputs: Inputs, params: GenerationParams) -> tuple[Image.Image, Image.Image]:
        """The mask's box (grown by padding_mask_crop, at the output's aspect ratio), at full output size."""
        assert inputs.mask is not None
        box = self._crop_region(inputs, params)
        w, h = params.width, params.height
        image = self.inpaint.image_processor.resize(inputs.image.crop(box), h, w, resize_mode="fill")
        mask = self.inpaint.mask_processor.resize(inputs.mask.crop(box), h, w, resize_mode="fill")
        return image, mask

    def _prompt_kwargs(self, params: GenerationParams, common: dict[str, Any],
                       mode: RefinerMode) -> tuple[dict[str, Any], dict[str, Any]]:
        """Prompt arguments for base and refiner: texts, or chunked embeddings past the 77-token window."""
        prompt_keys = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2")
        shared = {k: v for k, v in common.items() if k not in prompt_keys}
        texts = [common[k] for k in prompt_keys if common[k] is not None]
        chunks = needs_chunks(self.base, texts)
        if chunks == 1:
            base = {**common, "clip_skip": params.clip_skip}
            refiner = {**shared, "prompt": common["prompt_2"], "negative_prompt": common["negative_prompt_2"]}
            return base, refiner
        if params.long_prompt == LongPrompt.reject:
            raise PromptTooLong(f"a prompt needs {chunks} windows of 77 tokens and long_prompt is reject")
        base = {**shared, **long_prompt_embeds(self.base, common["prompt"], common["prompt_2"],
                                               common["negative_prompt"], common["negative_prompt_2"], chunks,
                                               params.clip_skip)}
        refiner = dict(shared)
        if mode != RefinerMode.none and self.refiner is not None:
            refiner.update(long_prompt_embeds(self.refiner, [], common["prompt_2"], common["negative_prompt"],
                                              common["negative_prompt_2"], chunks, None))
        return base, refiner

    @staticmethod
    def _micro_conditioning(params: GenerationParams) -> dict[str, Any]:
        """SDXL size/crop conditioning; unset values are left out so diffusers applies its own defaults."""
        values = {
            "original_size": params.original_size,
            "target_size": params.target_size,
            "crops_coords_top_left": params.crops_coords_top_left,
            "negative_original_size": params.negative_original_size,
            "negative_target_size": params.negative_target_size,
            "negative_crops_coords_top_left": params.negative_crops_coords_top_left,
        }
        return {k: tuple(v) for k, v in values.items() if v is not None}

    def _common_kwargs(self, params: GenerationParams, specs: list[ImageSpec]) -> dict[str, Any]:
        negative_absent = params.negative_prompt is None
        return {
            "prompt": [s.prompt for s in specs],
            "prompt_2": [s.prompt_2 or s.prompt for s in specs],
            # absent negative prompt -> None, so SDXL zeroes the negative embedding (force_zeros_for_empty_prompt)
            "negative_prompt": None if negative_absent else [s.negative_prompt or "" for s in specs],
            "negative_prompt_2": None if negative_absent else [
                s.negative_prompt_2 if s.negative_prompt_2 is not None else (s.negative_prompt or "") for s in specs
            ],
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": 1,
            "generator": [torch.Generator(device="cpu").manual_seed(s.seed) for s in specs],
        }

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode as diffusers does it (in float32 where the VAE asks for it), one image at a time when slicing
        (bounded peak memory)."""
        vae = self.decode_vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor
        chunks = latents.split(1) if self.settings.vae_slicing else [latents]
        decode = self._vae_decode or vae.decode
        out = torch.cat([decode(c, return_dict=False)[0] for c in chunks])
        if not torch.isfinite(out).all():
            raise NonFiniteOutput("the VAE produced NaN or Inf pixels")
        return out

    def to_pil(self, decoded: torch.Tensor) -> list[Image.Image]:
        # the watermark library refuses images under 256x256 pixels in area; diffusers skips only those under
        # 256 wide, so e.g. 256x192 would fail the job: such small images are left unmarked
        if self.watermarker is not None and decoded.shape[-1] * decoded.shape[-2] >= WATERMARK_MIN_PIXELS:
            decoded = self.watermarker.apply_watermark(decoded)
        return self.base.image_processor.postprocess(decoded, output_type="pil")  # type: ignore[no-any-return]

    def free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warmup(self) -> None:
        """Runs before the first job, so no user request pays lazy initialisation or compilation.

        Without compile, one small run. With compile, each size in SDXL_WARMUP_SIZES once (and the largest
        micro-batch at the first), so a request at a declared size never compiles inside itself: the first shapes
        compile, and torch's automatic dynamic shapes turn the later ones into hits on a dynamic graph."""
        refiner = RefinerParams(mode=RefinerMode.ensemble if self.refiner else RefinerMode.none)
        compiled = bool(self.settings.compile_mode or self.settings.compile_vae)
        sizes = self.settings.warmup_sizes if compiled else [(256, 256)]
        runs = [(w, h, 1) for w, h in sizes]
        if compiled and self.settings.batch_max > 1 and sizes:
            runs.append((sizes[0][0], sizes[0][1], self.settings.batch_max))
        t0 = time.monotonic()
        for w, h, n in runs:
            p = GenerationParams(prompt="warm-up", width=w, height=h, num_inference_steps=2, guidance_scale=5.0,
                                 seed=0, refiner=refiner)
            self.run(p, [ImageSpec("warm-up", None, None, None, i) for i in range(n)], lambda _p: None)
        log.info("warm-up done", extra={"seconds": round(time.monotonic() - t0, 3), "runs": len(runs),
                                        "compile": self.settings.compile_mode,
                                        "compile_vae": self.settings.compile_vae})

    def memory(self) -> dict[str, int]:
        if self.device.type != "cuda":
            return {}
        return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}


def freeze_heap() -> None:
    """Once the models are loaded and warm: every object alive now moves to the collector's permanent generation.

    Python's full (generation 2) collections traverse every tracked object of the process; a worker holds
    hundreds of thousands (torch, diffusers, transformers, the modules of the pipelines) that live as long as it
    does, so each full collection, which a request that allocates many objects (an adapter load makes PEFT layers
    by the hundred) sets off at some later point, pauses whichever request is running then (bench/adapters.py
    counts them per request). Frozen, a full collection traverses only what was made since."""
    gc.collect()
    gc.freeze()


class NonFiniteOutput(Exception):
    pass


class PromptTooLong(Exception):
    pass


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
