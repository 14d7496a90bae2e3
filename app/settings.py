"""The API process's settings: every one is an `SDXL_*` environment variable (see README)."""

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from common.contract.params import RefinerMode
from common.settings import CommonSettings


class Settings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    host: str = "127.0.0.1"  # where uvicorn listens, checked against the open-without-keys rule
    port: int = 8000  # `python -m app`
    # slow and oversized clients (`python -m app` hands the connection cap and parser bound to uvicorn)
    max_connections: int = Field(default=256, ge=1)  # per API process; uvicorn answers 503 beyond
    body_read_timeout_seconds: float = Field(default=30.0, gt=0)  # whole body; 408 and the connection closes
    max_header_bytes: int = Field(default=16384, ge=1024)  # names + values, all headers; 431 beyond
    max_headers: int = Field(default=100, ge=8)  # 431 beyond
    graceful_shutdown_seconds: int = Field(default=20, ge=0)  # SIGTERM: in-flight requests get this long


    # limits on a single request
    max_width: int = 2048
    max_height: int = 2048
    min_size: int = 64
    max_steps: int = 100
    max_images_per_prompt: int = 4
    max_prompt_chars: int = 4000
    max_wait_seconds: int = 60
    max_body_bytes: int = 65536  # JSON without images
    # input images (app/uploads.py, app/image_inputs.py; docs/images.md)
    max_image_body_bytes: int = Field(default=20 * 1024 * 1024, ge=65536)  # routes that carry images
    upload_ttl_seconds: int = Field(default=24 * 3600, ge=1)
    max_uploads_per_key: int = Field(default=100, ge=1)  # live uploads per API key
    max_upload_bytes_per_key: int = Field(default=512 * 1024 * 1024, ge=1)
    # `image` given as an URL: fetched at submit through the same SSRF rules as webhooks, with its own allows
    image_fetch_allow_addresses: str = ""  # comma-separated IPs or ip:port allowed even if private/loopback
    image_fetch_allow_http: bool = False
    image_fetch_timeout_seconds: float = Field(default=10.0, gt=0)  # the whole fetch, body included
    image_fetch_max_redirects: int = Field(default=3, ge=0)  # each hop is checked against the policy again
    # signed, expiring image URLs for clients without our key (OpenAI's `response_format: url`, local storage)
    url_signing_secret: SecretStr | None = None  # unset: one random secret kept in Redis, shared by replicas
    signed_url_seconds: int = Field(default=3600, ge=10)

    # the deployment's model: tokenizers for token counts, and whether a refiner exists
    base_model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    refiner_model: str | None = "stabilityai/stable-diffusion-xl-refiner-1.0"
    default_refiner_mode: RefinerMode | None = None  # None: ensemble when a refiner is configured
    # LoRA adapters and presets (common/adapters.py, docs/adapters.md): the registry the workers load from too
    adapters_dir: Path | None = None  # unset: no adapters, no presets
    max_loras: int = Field(default=4, ge=0)  # `loras` per request (a preset's own adapter not counted)
    # adapters by URL (`loras: [{url}]`, common/adapter_urls.py): hosts they may come from (exact names or
    # `*.example.com`; empty: off), fetched at submit through the SSRF policy with their own allows, stored once
    # in the object store by sha256; a URL fetched before is not fetched again for adapter_url_ttl_seconds
    adapter_url_hosts: str = ""
    adapter_url_max_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    adapter_url_ttl_seconds: int = Field(default=24 * 3600, ge=0)
    adapter_fetch_allow_addresses: str = ""  # comma-separated IPs or ip:port allowed even if private/loopback
    adapter_fetch_allow_http: bool = False
    adapter_fetch_timeout_seconds: float = Field(default=120.0, gt=0)  # the whole fetch, body included
    adapter_fetch_max_redirects: int = Field(default=5, ge=0)  # each hop is checked against the SSRF policy

    # webhook SSRF policy at submit (common/ssrf.py); the dispatcher applies the same two settings again
    webhook_allow_addresses: str = ""  # comma-separated exact IPs or ip:port allowed even if private/loopback
    webhook_allow_http: bool = False  # accept plain http webhook URLs (tests, closed networks)
    # access and limits (app/auth.py, app/limits.py; docs/access.md)
    api_keys: str | None = None  # JSON list of {name, sha256, rate_per_minute, burst, max_queued, max_priority,
    # daily_image_quota}
    api_keys_file: Path | None = None  # a file holding the same JSON list (python -m cli.apikeys create --file)
    allow_open: bool = Field(  # serve without keys on a non-loopback SDXL_HOST (otherwise refused at start)
        default=False, validation_alias=AliasChoices("SDXL_ALLOW_OPEN", "SDXL_ALLOW_OPEN_NON_LOOPBACK", "allow_open")
    )
    default_rate_per_minute: int = Field(default=60000, ge=0)  # per key (and the open principal) unless the key says
    default_burst: int = Field(default=1000, ge=1)
    default_max_queued: int = Field(default=10000, ge=1)  # non-final generations per key
    default_max_priority: int = Field(default=2, ge=0, le=2)
    max_queue_depth: int = Field(default=100000, ge=1)  # queued generations, all keys: 503 beyond
    # images a key may submit per UTC day unless its entry says (app/limits.py, common/usage.py); 0 = no quota
    default_daily_image_quota: int = Field(default=0, ge=0)
    cors_origins: Annotated[list[str], NoDecode] = []  # JSON list or comma-separated; none: no CORS headers
    # observability (app/metrics.py, common/logs.py; docs/operations.md)
    metrics_token: SecretStr | None = None  # set: /metrics wants `Authorization: Bearer <token>`; unset: open

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            return json.loads(v) if v.startswith("[") else [o.strip() for o in v.split(",") if o.strip()]
        return v

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
