"""Encode, store and finish on a background thread, so the main thread goes straight back to the pipeline.

Without it the model idles while the CPU encodes a PNG (tens of ms at 1024 px, against a ~1.2 s compiled
pipeline call on an H100) and uploads it. The runner hands work over only when another job is waiting;
otherwise it finishes inline, which is quicker for a lone request. The queue is bounded: when finishing falls
behind the pipeline, the main thread waits instead of piling decoded images up in memory. The PNG encoder
(numpy and zlib-ng's deflate) and the socket I/O release the GIL, so the two threads really overlap.
"""

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("worker.finisher")

Task = Callable[[], None]


class Finisher:
    def __init__(self, depth: int = 1) -> None:
        # `depth` pipeline calls' results may wait while one is being finished
        self._tasks: queue.Queue[Task | None] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._loop, name="finisher", daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> None:
        self._tasks.put(task)

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                task()
            except Exception:  # a task handles its own failures; this keeps the thread alive regardless
                log.exception("finishing task failed")
            finally:
                self._tasks.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until every submitted task has run (shutdown: results already computed are not thrown away)."""
        deadline = time.monotonic() + timeout
        done = self._tasks.all_tasks_done
        with done:
            while self._tasks.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not done.wait(remaining):
                    return False
        return True

    def close(self, timeout: float) -> bool:
        drained = self.drain(timeout)
        if drained:
            self._tasks.put(None)
            self._thread.join(timeout=1)
        return drained
