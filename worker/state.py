"""The process's resident runner: set once at start, after the models are loaded."""

from worker.runner import Runner

_runner: Runner | None = None


def set_runner(runner: Runner) -> None:
    global _runner
    _runner = runner


def runner() -> Runner:
    if _runner is None:
        raise RuntimeError("worker.tasks runs only inside a started SDXL worker (python -m worker)")
    return _runner
