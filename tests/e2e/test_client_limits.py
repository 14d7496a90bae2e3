"""Slow and oversized clients against a real uvicorn (`python -m app`): the body-read timeout (408, then the
connection closes), header size and count limits (431) and the per-process connection cap (503)."""

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.procs import Service, wait_for


@pytest.fixture(scope="module")
def api(idle_stack: Service) -> Iterator[str]:
    """An API process of this module's own, with the limits under test, on the idle stack's Redis (no worker)."""
    svc = idle_stack.view()
    try:
        yield svc.start_api(SDXL_BODY_READ_TIMEOUT_SECONDS="1", SDXL_MAX_CONNECTIONS="4",
                            SDXL_MAX_HEADERS="50", SDXL_MAX_HEADER_BYTES="8192")
    finally:
        svc.stop()


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += sock.recv(65536)
    return status, headers, body


def test_a_body_that_never_arrives_gets_408_and_the_connection_closes(api: str) -> None:
    sock = connect(api)
    try:
        sock.sendall(b"POST /v1/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        status, headers, body = read_response(sock)
        waited = time.monotonic() - t0
        assert status == 408, body
        assert headers["content-type"] == "application/problem+json"
        problem = json.loads(body)
        assert problem["type"] == "urn:sdxl:problem:request-timeout"
        assert "SDXL_BODY_READ_TIMEOUT_SECONDS" in problem["detail"]
        assert headers.get("connection") == "close"
        assert waited < 8, waited  # the 1 s timeout, not the client's pace
        sock.settimeout(5)
        assert sock.recv(1024) == b"", "the server must close the connection after a 408"
    finally:
        sock.close()


def test_a_body_that_arrives_in_time_is_served(api: str) -> None:
    r = httpx.post(f"{api}/v1/generations", json={"prompt": "x", "width": 7})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "width"


@pytest.mark.parametrize("headers, what", [
    ({"x-big": "a" * 9000}, "SDXL_MAX_HEADER_BYTES"),
    ({"x-huge": "a" * 1_000_000}, "SDXL_MAX_HEADER_BYTES"),
    ({f"x-h{i}": "1" for i in range(5000)}, "SDXL_MAX_HEADERS"),
])
def test_oversized_headers_get_431_in_the_error_format(api: str, headers: dict[str, str], what: str) -> None:
    r = httpx.post(f"{api}/v1/generations", json={"prompt": "x"}, headers=headers, timeout=30)
    assert r.status_code == 431, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:sdxl:problem:headers-too-large" and what in r.json()["detail"]


def test_headers_within_the_limits_pass(api: str) -> None:
    r = httpx.get(f"{api}/healthz", headers={f"x-h{i}": "1" * 100 for i in range(40)})
    assert r.status_code == 200, r.text


def test_the_connection_cap_answers_503_and_frees_up(api: str) -> None:
    idle = [connect(api) for _ in range(4)]  # SDXL_MAX_CONNECTIONS=4, all held by clients that send nothing
    try:
        time.sleep(0.3)  # the server has accepted them
        r = httpx.get(f"{api}/healthz")
        assert r.status_code == 503, r.text
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: httpx.get(f"{api}/healthz").status_code == 200, 10, "the cap to free up")
