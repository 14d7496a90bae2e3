"""`python -m app`: the API under uvicorn, with the connection limits taken from the settings.

uvicorn's own flags would work too, but then SDXL_MAX_CONNECTIONS and the header bound live in two places.
"""

import uvicorn

from app.settings import get_settings

# uvicorn's h11 parser refuses a request head beyond this with its own plain 400; below it, the app answers
# 431 in the error format (SDXL_MAX_HEADER_BYTES). It bounds the memory one connection's headers can take.
PARSER_HEAD_FACTOR = 64


def main() -> None:
    s = get_settings()
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=s.host,
        port=s.port,
        http="h11",  # the parser with a head-size bound (httptools has none)
        h11_max_incomplete_event_size=max(s.max_header_bytes * PARSER_HEAD_FACTOR, 1 << 20),
        limit_concurrency=s.max_connections,
        timeout_graceful_shutdown=s.graceful_shutdown_seconds,
        access_log=False,  # app/metrics.py logs each request as JSON
    )


if __name__ == "__main__":
    main()
