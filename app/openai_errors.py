"""OpenAI's error envelope, for the OpenAI-compatible routes only (docs/openai.md).

OpenAI clients parse `{"error": {"message", "type", "param", "code"}}` and branch on the status code, so every
error under OPENAI_PREFIX answers that shape: app/errors.py's `problem_response` (used by every exception handler
and by the middleware's refusals) hands those paths here. Every other route keeps RFC 9457.
"""

from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse

if TYPE_CHECKING:
    from app.errors import Problem

OPENAI_PREFIX = "/v1/images/"
# OpenAI answers 400 for invalid input, where our own routes say 422
STATUS = {422: 400}
# where OpenAI's own code is known and clients may look for it; otherwise the problem kind, in snake case
CODES = {"unauthorized": "invalid_api_key", "rate-limited": "rate_limit_exceeded",
         "daily-quota-exceeded": "insufficient_quota"}


def applies(path: str) -> bool:
    return path.startswith(OPENAI_PREFIX)


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 429:
        return "requests"  # OpenAI's type for a request-rate limit
    return "invalid_request_error"


def body(p: "Problem") -> tuple[int, dict[str, Any]]:
    """(status, envelope) for one problem; `param` is the first invalid field, when the problem names one."""
    status = STATUS.get(p.status, p.status)
    param = p.errors[0].get("field") if p.errors else None
    error = {"message": p.detail, "type": error_type(status), "param": param,
             "code": CODES.get(p.kind, p.kind.replace("-", "_"))}
    return status, {"error": error}


def response(p: "Problem") -> JSONResponse:
    status, content = body(p)
    return JSONResponse(content, status_code=status, headers=p.headers)
