"""Code every process shares (API, worker, dispatcher, cleanup, CLI): imports neither FastAPI nor torch."""
