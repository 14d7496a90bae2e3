"""Settings every process reads the same way (`SDXL_*`): Redis, the queue, attempts, timeouts, storage.

Each process's own class extends this one (app/settings.py, worker/settings.py, cleanup, the dispatcher's).
"""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.storage import StorageSettings


class CommonSettings(StorageSettings):
    model_config = SettingsConfigDict(env_prefix="SDXL_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    queue_feed_depth: int = 4  # ids kept in the rq queue at once; bounds how far fair share can lag
    job_timeout_seconds: int = Field(default=3600, ge=60)  # rq's timeout of every generation job, requeues too
    max_attempts: int = 2  # runs of a generation before it fails `worker_lost`
    lease_seconds: int = 12  # a worker silent this long is presumed dead and its job requeued
    webhook_progress_interval_seconds: float = 2.0  # progress webhooks: at most one per generation per this
    # input images (common/images.py): checked from the header before decoding, in the API and the worker
    max_input_pixels: int = Field(default=16 * 1024 * 1024, ge=64 * 64)
    # usage per key (common/usage.py): each UTC day's figures are kept this many days (API and worker write them)
    usage_retention_days: int = Field(default=90, ge=1, le=3660)
    log_level: str = "INFO"
    log_prompts: bool = False  # prompts stay out of the logs unless this is on
