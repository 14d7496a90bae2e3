"""worker/encode.py: PNG with the Up filter, deflated by zlib-ng (Z_RLE), plus our manifest chunk, decoded by
independent readers (Pillow, libpng via OpenCV, a chunk-by-chunk CRC walk); the Pillow fallback; JPEG/WebP."""

import io
import struct
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from common.contract.params import OutputFormat
from worker import encode

MANIFEST = {"params": {"prompt": "a cat, 猫, über", "seed": 7}, "versions": {"diffusers": "x"}}


def image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each CRC as a strict decoder does."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        pos += 12 + length
    return out


def test_png_is_lossless_valid_and_carries_the_manifest() -> None:
    img = image()
    data, ctype = encode.encode(img, OutputFormat.png, 90, MANIFEST, 1)
    assert ctype == "image/png"
    kinds = [k for k, _ in chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[1] == b"tEXt" and kinds[-1] == b"IEND"
    assert encode.read_manifest(data) == MANIFEST
    back = Image.open(io.BytesIO(data))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(img))
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # libpng: strict about CRCs
    assert decoded is not None and np.array_equal(decoded[:, :, ::-1], np.asarray(img))
    assert encode.encode(img, OutputFormat.png, 90, MANIFEST, 1)[0] == data  # same input, same bytes


def test_png_uses_the_up_filter_on_every_row() -> None:
    data, _ = encode.encode(image(), OutputFormat.png, 90, MANIFEST, 1)
    raw = zlib.decompress(b"".join(d for k, d in chunks(data) if k == b"IDAT"))
    stride = 1 + 64 * 3
    filters = [raw[i] for i in range(0, len(raw), stride)]
    assert len(filters) == 64 and set(filters[1:]) == {2}, filters  # the first row has no row above it


def test_pillow_fallback_without_opencv(monkeypatch: Any) -> None:
    monkeypatch.setattr(encode, "zlib_ng", None)
    img = image(seed=1)
    data, _ = encode.encode(img, OutputFormat.png, 90, MANIFEST, 1)
    assert encode.read_manifest(data) == MANIFEST
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(img))


@pytest.mark.parametrize("fmt", [OutputFormat.jpeg, OutputFormat.webp])
def test_lossy_formats_carry_the_manifest_in_exif(fmt: OutputFormat) -> None:
    data, ctype = encode.encode(image(), fmt, 80, MANIFEST, 1)
    assert ctype == f"image/{fmt.value}" and encode.read_manifest(data) == MANIFEST


@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_of_any_shape_and_level_decodes_to_the_same_pixels(level: int) -> None:
    rng = np.random.default_rng(level)
    pixels = (rng.random((53, 37, 3)) * 255).astype("uint8")  # width != height: rows are not columns
    pixels[10:30] = pixels[10]  # runs of identical rows: what the Up filter and Z_RLE make small
    data, _ = encode.encode(Image.fromarray(pixels), OutputFormat.png, 90, MANIFEST, level)
    assert [k for k, _ in chunks(data)] == [b"IHDR", b"tEXt", b"IDAT", b"IEND"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), pixels)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1], pixels)
