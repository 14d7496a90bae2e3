"""Generation statuses, progress stages and typed error kinds."""

from enum import StrEnum


class GenerationStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {GenerationStatus.succeeded, GenerationStatus.failed, GenerationStatus.canceled}
)


class Stage(StrEnum):
    queued = "queued"
    base = "base"
    refiner = "refiner"
    decoding = "decoding"
    encoding = "encoding"
    uploading = "uploading"
    done = "done"


class ErrorType(StrEnum):
    """Stable error kinds a failed generation reports; never a traceback."""

    pipeline_error = "pipeline_error"
    storage_unavailable = "storage_unavailable"
    out_of_memory = "out_of_memory"
    worker_lost = "worker_lost"
    deadline_exceeded = "deadline_exceeded"
    invalid_payload = "invalid_payload"
    nan_output = "nan_output"
    prompt_too_long = "prompt_too_long"
    input_missing = "input_missing"  # an input image's upload was deleted or expired before the job ran
    adapter_unavailable = "adapter_unavailable"  # a LoRA file changed, vanished or failed to load after submit
