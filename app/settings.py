"""The API process's settings: every one is an `SDXL_*` environment variable (see README)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.contract.params import RefinerMode


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    public_base_url: str | None = Field(None, description="External URL of the API, for Location and image URLs")
    host: str = "127.0.0.1"  # where uvicorn listens, checked against the open-without-keys rule

    # storage (the worker uses the same names)
    storage_backend: Literal["local", "s3"] = "local"
    storage_dir: Path = Path(".data/images")
    storage_prefix: str = "generations/"
    image_url_mode: Literal["api", "presigned"] = "api"

    # limits on a single request
    max_width: int = 2048
    max_height: int = 2048
    min_size: int = 64
    max_steps: int = 100
    max_images_per_prompt: int = 4
    max_prompt_chars: int = 4000
    max_wait_seconds: int = 60
    max_body_bytes: int = 65536

    # the deployment's model: tokenizers for token counts, and whether a refiner exists
    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    refiner_model: str | None = "stabilityai/stable-diffusion-xl-refiner-1.0"
    default_refiner_mode: RefinerMode | None = None  # None: ensemble when a refiner is configured

    generation_ttl_seconds: int = 7 * 24 * 3600
    queue_feed_depth: int = 4  # ids kept in the rq queue at once; bounds how far fair share can lag
    job_timeout_seconds: int = 3600

    @property
    def refiner_configured(self) -> bool:
        return bool(self.refiner_model)

    @property
    def resolved_default_refiner_mode(self) -> RefinerMode:
        if self.default_refiner_mode is not None:
            return self.default_refiner_mode
        return RefinerMode.ensemble if self.refiner_configured else RefinerMode.none


@lru_cache
def get_settings() -> Settings:
    return Settings()
