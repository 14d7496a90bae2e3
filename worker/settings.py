"""The worker process's settings: `SDXL_*` environment variables (see README)."""

import json
import secrets
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common.contract.params import SDXL_BUCKETS
from common.settings import CommonSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


class WorkerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    worker_id: str = ""

    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    refiner_model: str | None = "stabilityai/stable-diffusion-xl-refiner-1.0"
    revision: str | None = None
    refiner_revision: str | None = None
    # a dedicated SDXL inpainting UNet (hub id or directory with `unet/`, e.g. diffusers/stable-diffusion-xl-1.0-
    # inpainting-0.1), loaded once at start; unset: inpainting runs on the base UNet
    inpaint_model: str | None = None
    inpaint_revision: str | None = None
    variant: str | None = None  # "fp16" on the hub's SDXL repos
    # auto: CUDA (in float16) where torch sees a GPU, else the CPU (in float32)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    # torch.compile the UNets at start: "default", or "reduce-overhead" / "max-autotune", which also run them as
    # CUDA graphs (one recorded per shape; no launch overhead) and, for max-autotune, pick GEMM kernels by timing
    compile_mode: str | None = None
    compile_backend: str = "inductor"  # torch.compile's backend ("eager" and "aot_eager" trace without codegen)
    # with compile on, warm-up runs each of these sizes once, so no request at a declared size compiles inside
    # it (torch's automatic dynamic shapes make the later ones cheap); default: SDXL's nine trained buckets
    warmup_sizes: Annotated[list[tuple[int, int]], NoDecode] = list(SDXL_BUCKETS)
    fuse_qkv: bool = False
    # torch.compile the VAE decode too (the compile mode's inductor settings without CUDA graphs)
    compile_vae: bool = False
    # the dtype the VAE decodes in; auto: float32 where SDXL's VAE would overflow in float16 (its force_upcast),
    # from a float32 copy of its decoder made once at start (~0.2 GB), else the model's dtype. bfloat16 has
    # float32's range, so it decodes without the upcast at tensor-core speed (images differ slightly)
    vae_decode_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # opt-in: torchao float8 dynamic activation + weight quantization of the UNets' linear layers (per-tensor
    # scales); needs torchao and a CUDA GPU of compute capability 8.9+ (Ada, Hopper); changes the images
    fp8: bool = False
    channels_last: bool = True
    vae_slicing: bool = True  # decode batch members one at a time: bounded peak memory at batch > 1
    watermark: bool | None = None  # None: on where invisible-watermark is installed
    warmup: bool = True
    # LoRA adapters (worker/adapters.py, docs/adapters.md): the API's registry folder, and the LRU of loaded ones
    adapters_dir: Path | None = None
    adapter_cache_max: int = Field(default=8, ge=1)  # adapters kept loaded (on the device)
    adapter_cache_bytes: int = Field(default=4 * 1024**3, ge=1)  # their LoRA weights' bytes, all together
    # the CPU tier: adapters evicted from the device wait here (pinned memory on a GPU) and come back with one
    # copy, no file read; 0 turns the tier off
    adapter_cpu_cache_max: int = Field(default=32, ge=0)
    adapter_cpu_cache_bytes: int = Field(default=16 * 1024**3, ge=0)


    png_compress_level: int = Field(default=1, ge=0, le=9)  # zlib level: speed on the worker vs file size
    # when another job waits, encode/store/finish on a background thread while the next job's pipeline runs
    # (the GPU never waits on the CPU); off: each job is finished before the worker takes the next
    finish_in_background: bool = True
    storage_retry_seconds: float = 30.0  # total backoff budget inside one job before storage_unavailable
    heartbeat_seconds: float = 3.0
    shutdown_grace_seconds: float = 60.0  # after SIGTERM, finish the current job within this or requeue it
    batch_max: int = 1  # micro-batching off by default: lowest latency
    batch_wait_ms: int = 0
    progress_interval_seconds: float = 0.25
    # live previews (a request's `previews`): TAESD-XL, `auto` = a `taesd` folder beside a local base model, else
    # madebyollin/taesdxl; `none`: this worker sends none
    preview_vae: str = "auto"
    preview_max_size: int = Field(default=256, ge=8, le=1024)  # the preview's longer side, pixels
    preview_format: Literal["webp", "jpeg"] = "webp"
    preview_quality: int = Field(default=70, ge=1, le=100)
    # larger previews go to the object store (under the generation's prefix) and the event carries their URL
    preview_inline_max_bytes: int = Field(default=65536, ge=0)
    redis_retry_seconds: float = 300.0  # how long a worker rides out a Redis outage before giving up
    metrics_port: int | None = None  # serve this process's own metrics (CPU, memory, GC) here; cluster view: API
    metrics_host: str = "0.0.0.0"

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _sizes(cls, v: object) -> object:
        """`1024x1024,1152x896` (or a JSON list of pairs)."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [tuple(int(n) for n in part.lower().split("x")) for part in v.split(",") if part.strip()]
        return v

    def resolved_worker_id(self) -> str:
        return self.worker_id or _default_worker_id()

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float16" if self.resolved_device.startswith("cuda") else "float32"
