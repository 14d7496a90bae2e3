"""A loopback HTTP server of fixed files for the by-URL tests (input images, adapters): path -> (type, bytes).

It counts GETs per path, so a test can tell a cache hit (no fetch) from a fetch.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.procs import free_port


@dataclass
class FileServer:
    files: dict[str, tuple[str, bytes]]
    url: str = ""
    hits: dict[str, int] = field(default_factory=dict)

    def data(self, path: str) -> bytes:
        return self.files[path][1]


@contextmanager
def serve_files(files: dict[str, tuple[str, bytes]]) -> Iterator[FileServer]:
    state = FileServer(files)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.hits[self.path] = state.hits.get(self.path, 0) + 1
            entry = state.files.get(self.path)
            if entry is None:
                self.send_error(404)
                return
            content_type, data = entry
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    state.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
