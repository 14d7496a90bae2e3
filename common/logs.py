"""Structured JSON logs, one line per event, for every process (API, worker, dispatcher, cleanup).

`bind(request_id=..., generation_id=...)` puts fields on every line logged in that context (an HTTP request,
one job), so a generation can be followed from the API through the worker and the dispatcher by its
`request_id`. Prompts never reach the logs unless SDXL_LOG_PROMPTS is on: the formatter drops the fields that
may carry them (ours, and rq's `arguments`/`kwargs`, which hold the whole job payload).
"""

import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# fields that may hold a prompt or a whole job payload (which also carries the ownership token)
SENSITIVE = frozenset({"prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "arguments", "kwargs", "payload"})

_context: ContextVar[dict[str, Any] | None] = ContextVar("sdxl_log_context", default=None)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` (None values skipped) to every log line in this context (thread or asyncio task)."""
    current = _context.get() or {}
    token = _context.set({**current, **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def context() -> dict[str, Any]:
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound context onto each record; fields passed with `extra=` win."""

    def filter(self, record: logging.LogRecord) -> bool:
        for k, v in (_context.get() or {}).items():
            if not hasattr(record, k):
                setattr(record, k, v)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str, log_prompts: bool = False) -> None:
        super().__init__()
        self.process = process
        self.log_prompts = log_prompts

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "process": self.process,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k in _STD or k.startswith("_") or (k in SENSITIVE and not self.log_prompts):
                continue
            out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(process: str, level: str = "INFO", log_prompts: bool = False) -> None:
    """JSON lines on stderr through the root logger; safe to call again (it replaces its own handler only)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process, log_prompts))
    handler.addFilter(ContextFilter())
    handler._sdxl = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    # keep handlers someone else installed (pytest's capture); replace a previous one of ours
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_sdxl", False)] + [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers have their own plain-text handlers: route them through ours instead. Its access
    # log is replaced by the API's request line (app/metrics.py), which carries the request id and route.
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    access.disabled = True
