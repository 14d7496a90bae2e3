"""PIL image -> file bytes with the reproducibility manifest inside (PNG text chunk, EXIF for JPEG/WebP).

Nothing run-specific (ids, timestamps) goes into the file, so the same parameters give the same bytes.
"""

import hashlib
import io
import json
import struct
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from common.contract.params import CONTENT_TYPES, OutputFormat

zlib_ng: Any
try:  # installed with the worker; Pillow encodes PNGs where it is missing
    from zlib_ng import zlib_ng
except ImportError:  # pragma: no cover - the worker extra always has it
    zlib_ng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

MANIFEST_KEY = "sdxl-manifest"
EXIF_IMAGE_DESCRIPTION = 0x010E


def encode(image: Image.Image, fmt: OutputFormat, quality: int, manifest: dict[str, Any],
           png_level: int = 1) -> tuple[bytes, str]:
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    buf = io.BytesIO()
    if fmt == OutputFormat.png and zlib_ng is not None and image.mode == "RGB":
        return png_with_text(image, MANIFEST_KEY, text, png_level), CONTENT_TYPES[fmt]
    if fmt == OutputFormat.png:
        info = PngInfo()
        info.add_text(MANIFEST_KEY, text)
        image.save(buf, format="PNG", pnginfo=info, compress_level=png_level)
    else:
        exif = Image.Exif()
        exif[EXIF_IMAGE_DESCRIPTION] = text
        pil_format = "JPEG" if fmt == OutputFormat.jpeg else "WEBP"
        image.convert("RGB").save(buf, format=pil_format, quality=quality, exif=exif.tobytes())
    return buf.getvalue(), CONTENT_TYPES[fmt]


def png_with_text(image: Image.Image, key: str, text: str, level: int) -> bytes:
    """An 8-bit RGB PNG: every row Up-filtered (numpy), deflated by zlib-ng with the run-length strategy, and
    one tEXt chunk after IHDR.

    Pillow tries all five row filters on every row, which dominates its time at low zlib levels. One fixed
    filter plus Z_RLE (matches at distance 1, then Huffman: the idea behind fpng) was faster and smaller than
    Pillow, or libpng with the Sub filter and zlib's default strategy, on noise, a photograph and UI
    screenshots; only artificial repeating patterns compress worse. zlib-ng runs that 1.7x faster than zlib
    (numbers in BENCHMARKS.md). `text` must be Latin-1 (the manifest is ASCII JSON)."""
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, width * 3)
    filtered = np.empty((height, width * 3 + 1), np.uint8)
    filtered[:, 0] = 2  # Up: each byte minus the one above it, modulo 256 (uint8 arithmetic wraps)
    filtered[0, 0] = 0  # None: the first row has none above it
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    deflate = zlib_ng.compressobj(level, zlib_ng.DEFLATED, 15, 8, zlib_ng.Z_RLE)
    idat = deflate.compress(filtered) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolor, deflate, adaptive, no interlace
    return b"".join((PNG_SIGNATURE, _chunk(b"IHDR", ihdr),
                     _chunk(b"tEXt", key.encode("latin-1") + b"\0" + text.encode("latin-1")),
                     _chunk(b"IDAT", idat), _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib_ng.crc32(data, zlib_ng.crc32(kind)))


def read_manifest(data: bytes) -> dict[str, Any]:
    """Read the manifest back from an encoded image (used by tests and the CLI)."""
    img = Image.open(io.BytesIO(data))
    if img.format == "PNG":
        return json.loads(img.text[MANIFEST_KEY])  # type: ignore[attr-defined,no-any-return]
    return json.loads(img.getexif()[EXIF_IMAGE_DESCRIPTION])  # type: ignore[no-any-return]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
