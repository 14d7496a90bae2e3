"""LoRA adapters given by URL (`loras: [{url, scale}]`): the checks the API and the worker both make.

The API takes an `https` URL only from a host the operator allows (SDXL_ADAPTER_URL_HOSTS; empty: adapters by URL
are off), fetches it at submit through the SSRF policy (app/adapter_fetch.py), checks that the bytes are a
safetensors LoRA, and stores them once in the object store under their sha256 (`adapters/<sha256>.safetensors`).
The request carries the URL and that sha256; the worker reads the bytes back by the hash and checks them again
before loading, so the same request always runs the same bytes, whatever the URL serves later.
"""

import hashlib
import json
import re
import struct
from typing import Any
from urllib.parse import unquote, urlsplit

from common.adapters import MAX_HEADER_BYTES, base_family, metadata_base

# tensor-name marks of the LoRA layouts diffusers' load_lora_weights reads: PEFT/diffusers, kohya, old diffusers
LORA_MARKS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", "lora_linear_layer")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


class LoraFileError(ValueError):
    """The bytes are not a safetensors LoRA (or not the bytes the request was accepted with); the message says."""


def adapter_key(prefix: str, sha256: str) -> str:
    """The object-store key of an adapter fetched by URL: content-addressed, shared by every request naming it."""
    return f"{prefix}{sha256}.safetensors"


def check_lora_file(data: bytes, sha256: str | None = None) -> dict[str, Any]:
    """The header of `data` if it is a complete safetensors file holding LoRA weights; LoraFileError otherwise.
    `sha256`: the hash the bytes must have (the worker's check of what the API accepted)."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise LoraFileError(f"its bytes do not have the sha256 the request was accepted with ({sha256[:12]}...)")
    if len(data) < 8:
        raise LoraFileError(f"is not a safetensors file ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(MAX_HEADER_BYTES, len(data) - 8):
        raise LoraFileError(f"is not a safetensors file (header length {n} in {len(data)} bytes)")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise LoraFileError("is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise LoraFileError("is not a safetensors file (its header is not an object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = (int(x) for x in entry["data_offsets"])
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            width = DTYPE_BYTES[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraFileError(f"is not a safetensors file (tensor `{str(name)[:80]}` is malformed)") from None
        if not 0 <= lo <= hi or hi - lo != count * width:
            raise LoraFileError(f"is not a safetensors file (tensor `{str(name)[:80]}` has bad offsets)")
        end = max(end, hi)
    if end != len(data) - 8 - n:
        raise LoraFileError(f"is not a complete safetensors file (its tensors need {end} bytes after the header, "
                            f"it has {len(data) - 8 - n})")
    if not any(mark in name for name in header for mark in LORA_MARKS):
        raise LoraFileError("is a safetensors file but holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up "
                            "tensors): a full model checkpoint is not an adapter")
    return header


def file_base(header: dict[str, Any]) -> str | None:
    """The model family a LoRA's kohya metadata names, if any (`sdxl`, `sd1`, ...)."""
    found = metadata_base(header)
    return base_family(found) if found else None


def url_name(url: str) -> str:
    """A readable name for an adapter by URL (its file's stem): logs and the manifest; the sha256 identifies it."""
    stem = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2]).removesuffix(".safetensors")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:64]
    return name or "url-adapter"


def host_allowed(host: str, allowed: list[str]) -> bool:
    """`host` is one of `allowed`: exact names, or `*.example.com` for that domain's subdomains."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]):
                return True
        elif host == entry:
            return True
    return False


def check_adapter_url(url: str, hosts: list[str], allow_http: bool) -> str | None:
    """Why `url` may not name an adapter here (None: it may be fetched, subject to the SSRF policy)."""
    if not hosts:
        return "adapters by URL are off in this deployment (SDXL_ADAPTER_URL_HOSTS is empty); name a registry " \
               "adapter (`GET /v1/adapters`)"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "is not a valid URL"
    if parts.scheme != "https" and not (parts.scheme == "http" and allow_http):
        return f"must be an https URL, not `{parts.scheme or 'relative'}`"
    if not host:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials (user:password@)"
    if not host_allowed(host, hosts):
        return f"host `{host}` is not among the hosts adapters may come from (SDXL_ADAPTER_URL_HOSTS: " \
               f"{', '.join(hosts)})"
    return None
