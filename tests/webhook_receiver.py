"""A real webhook receiver for tests: an HTTP server on 127.0.0.1 in a thread that verifies every delivery
with `standardwebhooks.Webhook(secret).verify`, once per secret, and behaves according to the request path:

  /ok/<tag>                 204
  /fail/<n>/<tag>           500 for the first n attempts of each webhook-id, then 200
  /slow/<s>/<tag>           first attempt of each webhook-id: answer only after s seconds; then 200
  /retry-after/<s>/<tag>    first attempt: 503 with `Retry-After: s`; then 200
  /gone/<tag>               410
  /dead/<tag>               500, always
  /redirect/<tag>           307 to /ok/<tag>-target (a dispatcher must not follow it)
"""

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: list[bool]  # one per secret, in order
    received_at: float  # time.monotonic()
    attempt_seen: int  # how many times this path saw this webhook-id, this one included

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Receiver:
    secrets: list[str]
    tls: ssl.SSLContext | None = None  # serve https with this server context
    deliveries: list[Delivery] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, str], int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                receiver.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        # polling every 50 ms (not 0.5 s): stop() returns at once
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name="receiver", daemon=True)

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verify(self, body: bytes, headers: dict[str, str]) -> list[bool]:
        results = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(body, headers)
                results.append(True)
            except Exception:
                results.append(False)
        return results

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length)
        headers = {k.lower(): v for k, v in h.headers.items()}
        key = (h.path, headers.get("webhook-id", ""))
        with self.lock:
            self.seen[key] = n = self.seen.get(key, 0) + 1
            self.deliveries.append(Delivery(h.path, headers, body, self.verify(body, headers), time.monotonic(), n))
        parts = h.path.strip("/").split("/")
        kind = parts[0]
        status, extra = 204, {}
        if kind == "fail" and n <= int(parts[1]):
            status = 500
        elif kind == "slow" and n == 1:
            time.sleep(float(parts[1]))  # the dispatcher has given up by now
        elif kind == "retry-after" and n == 1:
            status, extra = 503, {"Retry-After": parts[1]}
        elif kind == "gone":
            status = 410
        elif kind == "dead":
            status = 500
        elif kind == "redirect":
            status, extra = 307, {"Location": f"/ok/{parts[1]}-target"}
        try:
            h.send_response(status)
            for k, v in extra.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "0")
            h.end_headers()
        except OSError:
            pass  # the client timed out and hung up

    def to(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path == path]

    def prefixed(self, prefix: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.path.startswith(prefix)]
