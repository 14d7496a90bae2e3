"""The function rq runs for each generation job (enqueued by dotted path, so the API never imports it)."""

from typing import Any

from rq import get_current_job

from worker import state


def run_generation(payload: dict[str, Any]) -> dict[str, Any]:
    job = get_current_job()
    return state.runner().run_job(payload, job.id if job else "")
