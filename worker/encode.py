"""PIL image -> file bytes with the reproducibility manifest inside (PNG text chunk, EXIF for JPEG/WebP).

Nothing run-specific (ids, timestamps) goes into the file, so the same parameters give the same bytes.
"""

import hashlib
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.contract.params import CONTENT_TYPES, OutputFormat

cv2: Any
try:  # installed with the worker (invisible-watermark needs it); Pillow encodes PNGs where it is missing
    import cv2
except ImportError:  # pragma: no cover - the worker extra always has it
    cv2 = None

MANIFEST_KEY = "sdxl-manifest"
EXIF_IMAGE_DESCRIPTION = 0x010E


def encode(image: Image.Image, fmt: OutputFormat, quality: int, manifest: dict[str, Any],
           png_level: int = 1) -> tuple[bytes, str]:
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    buf = io.BytesIO()
    if fmt == OutputFormat.png and cv2 is not None and image.mode == "RGB":
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
    """PNG through libpng (OpenCV) with the Up row filter and zlib's run-length strategy, plus one tEXt chunk.

    Pillow always tries every row filter (adaptive), which dominates its time at low zlib levels. One fixed
    filter plus Z_RLE (matches of distance 1 only, then Huffman: the idea behind fpng) was both faster and
    smaller than Pillow or Sub with zlib's default strategy on noise, a photograph and UI screenshots; only
    artificial repeating patterns compress worse (numbers in BENCHMARKS.md). `text` must be Latin-1 (the
    manifest is ASCII JSON)."""
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    ok, out = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, level,
                                         cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP,
                                         cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise ValueError("PNG encoding failed")
    png = out.tobytes()
    body = b"tEXt" + key.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length+type, its 13 bytes, its CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def read_manifest(data: bytes) -> dict[str, Any]:
    """Read the manifest back from an encoded image (used by tests and the CLI)."""
    img = Image.open(io.BytesIO(data))
    if img.format == "PNG":
        return json.loads(img.text[MANIFEST_KEY])  # type: ignore[attr-defined,no-any-return]
    return json.loads(img.getexif()[EXIF_IMAGE_DESCRIPTION])  # type: ignore[no-any-return]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
