"""Lets long-polls (and streams) in flight answer when this API process is told to stop.

On SIGTERM uvicorn stops accepting connections, then waits `--timeout-graceful-shutdown` seconds for open
requests before cancelling them, which a client sees as a connection cut mid-request. A long-poll waiting
for a generation that will not finish in that window should rather answer at once with the current resource
(the client polls again, on another replica). uvicorn does not tell the app, so we chain its signal handler.
"""

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def watch(event: asyncio.Event) -> Callable[[], None]:
    """Set `event` on SIGTERM/SIGINT, then hand the signal to the server's own handler. Returns an undo.

    Only where a server installed a Python handler in the main thread (uvicorn, gunicorn workers); elsewhere
    (tests calling create_app in-process) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    installed: dict[int, Any] = {}

    for sig in SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous) -> None:
            loop.call_soon_threadsafe(event.set)
            previous(signum, frame)

        signal.signal(sig, handler)
        installed[sig] = (handler, previous)

    def undo() -> None:
        for sig, (handler, previous) in installed.items():
            if signal.getsignal(sig) is handler:  # the server may have restored its own already
                signal.signal(sig, previous)

    return undo
