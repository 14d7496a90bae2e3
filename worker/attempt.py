"""One attempt at a generation as the worker running it sees it (a micro-batch has several)."""

from dataclasses import dataclass, field
from typing import Any

from common.contract.params import JobPayload
from worker.pipeline import Progress


@dataclass
class Member:
    """One generation inside the current pipeline call."""

    payload: JobPayload
    rq_job_id: str
    record: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None  # canceled / superseded / finishing once decided
    step: int = 0  # latest progress, kept in memory (Redis sees it throttled)
    total_steps: int = 0
    # False once a change's answer was lost (the script may have run): `record` may then be behind the hash
    record_exact: bool = True
    # marks on this attempt, not on the generation id: a later attempt of the same generation on this worker
    # starts clean (a mark keyed by id would abort it at its first step)
    cancel_requested: bool = False
    superseded: bool = False

    @property
    def gen_id(self) -> str:
        return self.payload.generation_id

    @property
    def token(self) -> str:
        return self.payload.token


def progress_value(progress: Progress) -> dict[str, Any]:
    return {"step": progress.step, "total_steps": progress.total_steps, "stage": progress.stage,
            "eta_seconds": progress.eta()}
