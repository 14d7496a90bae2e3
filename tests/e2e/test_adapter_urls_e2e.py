"""LoRA adapters by URL end to end: an API that allows adapters from a loopback server (and nothing else) fetches
a tiny LoRA (tools/models.py build-tiny-adapters) at submit, stores it by sha256, and the shared worker loads it
from the object store; refusals come at submit, naming the field."""

import hashlib
import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.file_server import FileServer, serve_files
from tests.procs import Service, free_port

OCT = "application/octet-stream"

SMALL = {"prompt": "a red door", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 11}
MAX_BYTES = 400_000  # between the tiny style LoRA (~270 kB) and the tiny Lightning one (~490 kB)


def not_a_lora() -> bytes:
    """A valid safetensors file without LoRA tensors: what a full checkpoint looks like to the check."""
    header = json.dumps({"conv.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


@pytest.fixture(scope="module")
def files(tiny_adapters: Path) -> Iterator[FileServer]:
    with serve_files({
        "/style.safetensors": (OCT, (tiny_adapters / "tiny-style.safetensors").read_bytes()),
        "/big.safetensors": (OCT, (tiny_adapters / "tiny-lightning.safetensors").read_bytes()),
        "/full.safetensors": (OCT, not_a_lora()),
        "/page.safetensors": (OCT, b"<html>moved</html>"),
    }) as server:
        yield server


@pytest.fixture(scope="module")
def file_server(files: FileServer) -> str:
    return files.url


@pytest.fixture(scope="module")
def api(service: Service, file_server: str) -> Iterator[str]:
    """An API on the shared worker that takes adapters by URL from the loopback server's address only."""
    port = file_server.rsplit(":", 1)[1]
    view = service.view()
    try:
        yield view.start_api(SDXL_ADAPTER_URL_HOSTS="127.0.0.1", SDXL_ADAPTER_FETCH_ALLOW_HTTP="true",
                             SDXL_ADAPTER_FETCH_ALLOW_ADDRESSES=f"127.0.0.1:{port}",
                             SDXL_ADAPTER_URL_MAX_BYTES=str(MAX_BYTES))
    finally:
        view.stop()


def post(api: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{api}/v1/generations", json={**SMALL, **body}, headers={"Prefer": "wait=60"}, timeout=70)


def generate(api: str, **body: Any) -> dict[str, Any]:
    r = post(api, **body)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "succeeded", r.json()
    return r.json()  # type: ignore[no-any-return]


def refused(api: str, url: str, **lora: Any) -> dict[str, Any]:
    r = post(api, loras=[{"url": url, **lora}])
    assert r.status_code == 422, r.text
    return r.json()["errors"][0]  # type: ignore[no-any-return]


def metric(api: str, pattern: str) -> float:
    text = httpx.get(f"{api}/metrics", timeout=10).text
    return sum(float(m[1]) for m in re.finditer(rf"^{pattern} (\S+)$", text, re.M))


def test_an_adapter_by_url_changes_the_image_and_a_second_request_uses_the_cache(api: str, file_server: str,
                                                                                 files: FileServer) -> None:
    url = f"{file_server}/style.safetensors"
    sha256 = hashlib.sha256(files.data("/style.safetensors")).hexdigest()
    plain = generate(api)
    styled = generate(api, loras=[{"url": url, "scale": 0.8}])
    assert styled["images"][0]["sha256"] != plain["images"][0]["sha256"]
    assert styled["manifest"]["adapters"] == [{"name": "style", "sha256": sha256, "scale": 0.8, "url": url}]
    assert files.hits["/style.safetensors"] == 1
    cached = metric(api, r'sdxl_adapter_url_fetches_total\{result="cached"\}')
    file_loads = metric(api, r'sdxl_adapter_events_total\{event="load",tier="file"\}')
    again = generate(api, loras=[{"url": url, "scale": 0.8}])
    assert again["images"][0]["sha256"] == styled["images"][0]["sha256"]  # the same bytes: the same image
    assert files.hits["/style.safetensors"] == 1  # not fetched again: the URL's sha256 is known
    assert metric(api, r'sdxl_adapter_url_fetches_total\{result="cached"\}') == cached + 1
    assert metric(api, r'sdxl_adapter_events_total\{event="load",tier="file"\}') == file_loads  # resident


def test_an_adapter_by_url_counts_with_registry_adapters_and_the_cli_sends_it(api: str, file_server: str,
                                                                              tmp_path: Path) -> None:
    url = f"{file_server}/style.safetensors"
    both = generate(api, loras=[{"name": "tiny-kohya"}, {"url": url, "scale": -0.5}])
    assert [a.get("url") for a in both["manifest"]["adapters"]] == [None, url]
    out = tmp_path / "cli.png"
    # `--lora URL:SCALE`: the CLI sends it as {"url", "scale"}; a URL misread as a name would be refused with 422
    done = subprocess.run([sys.executable, "-m", "cli.sdxl", "--url", api, "generate", "a red door", "--width", "64",
                           "--height", "64", "--steps", "3", "--lora", f"{url}:0.8", "-o", str(out), "-q"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG")


def test_refusals_name_the_field_and_say_why(api: str, file_server: str, files: FileServer,
                                            service: Service) -> None:
    err = refused(api, f"{file_server}/big.safetensors")
    assert err["field"] == "loras[0].url" and "SDXL_ADAPTER_URL_MAX_BYTES" in err["message"]
    err = refused(api, f"{file_server}/full.safetensors")
    assert "holds no LoRA weights" in err["message"]
    assert "not a safetensors file" in refused(api, f"{file_server}/page.safetensors")["message"]
    assert "HTTP 404" in refused(api, f"{file_server}/missing.safetensors")["message"]
    hits = dict(files.hits)
    port = file_server.rsplit(":", 1)[1]
    err = refused(api, f"http://localhost:{port}/style.safetensors")  # loopback, but not an allowed host name
    assert "SDXL_ADAPTER_URL_HOSTS" in err["message"] and "localhost" in err["message"]
    assert "https" in refused(api, f"ftp://127.0.0.1:{port}/style.safetensors")["message"]
    err = refused(api, f"http://127.0.0.1:{free_port()}/style.safetensors")  # an allowed host, a blocked port
    assert "SDXL_ADAPTER_FETCH_ALLOW_ADDRESSES" in err["message"]
    err = refused(api, f"{file_server}/style.safetensors", scale=2.5)
    assert err["field"] == "loras[0].scale"
    assert files.hits == hits  # none of these fetched anything
    r = post(api, loras=[{"name": "tiny-style", "url": f"{file_server}/style.safetensors"}])
    assert r.status_code == 422 and "exactly one" in r.text
    # the shared API allows no host: adapters by URL are off there
    r = post(service.url, loras=[{"url": f"{file_server}/style.safetensors"}])
    assert r.status_code == 422 and "SDXL_ADAPTER_URL_HOSTS" in r.json()["errors"][0]["message"]
