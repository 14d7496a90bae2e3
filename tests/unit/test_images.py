"""common/images.py: what the API accepts as an input image or mask, and how the worker reads it (Pillow only)."""

import hashlib
import io
import random
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from common import images
from common.images import InvalidImage

MAX = 1024 * 1024  # max_pixels for the tests that are not about it


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: they compress badly, so a truncated file really lacks pixel data."""
    rng = random.Random(seed)
    channels = len(mode) if mode != "L" else 1
    return Image.frombytes(mode, size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * channels)))


def px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple), value
    return value


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def png_header_claiming(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR says `width`x`height` (its CRC recomputed, so the file parses): its pixel data
    is one pixel's, so only a check made from the header, before decoding, can refuse it for its size."""
    data = bytearray(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def refused(data: bytes, max_pixels: int = MAX, fn: Any = images.inspect) -> str:
    with pytest.raises(InvalidImage) as exc:
        fn(data, max_pixels)
    return str(exc.value)


# --- formats --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,ext,ctype", [("PNG", "png", "image/png"), ("JPEG", "jpeg", "image/jpeg"),
                                           ("WEBP", "webp", "image/webp")])
def test_each_accepted_format_is_described(fmt: str, ext: str, ctype: str) -> None:
    data = encode(Image.new("RGB", (24, 16), (200, 100, 50)), fmt)
    info = images.inspect(data, MAX)
    assert (info.width, info.height, info.format, info.content_type) == (24, 16, ext, ctype)
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.bytes == len(data)
    assert info.has_alpha is False
    rgb = images.to_rgb(data, MAX)
    assert rgb.mode == "RGB" and rgb.size == (24, 16)
    assert all(abs(a - b) <= 8 for a, b in zip(px(rgb, (12, 8)), (200, 100, 50), strict=True))


def test_alpha_is_reported() -> None:
    assert images.inspect(encode(Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "PNG"), MAX).has_alpha is True
    assert images.inspect(encode(Image.new("RGBA", (8, 8), (1, 2, 3, 4)), "WEBP", lossless=True), MAX).has_alpha


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_by_name(fmt: str) -> None:
    message = refused(encode(Image.new("RGB", (8, 8), (9, 9, 9)), fmt))
    assert message == f"is {fmt}; accepted formats are PNG, JPEG and WebP"


@pytest.mark.parametrize("data", [b"hello, world", b"<html><body>not an image</body></html>", bytes(range(256))])
def test_not_an_image(data: bytes) -> None:
    assert refused(data) == "is not an image (PNG, JPEG or WebP expected)"


def test_empty() -> None:
    assert refused(b"") == "is empty"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_is_refused_as_undecodable(fmt: str) -> None:
    data = encode(noise((64, 64)), fmt)
    message = refused(data[: len(data) // 2])
    assert message.startswith("could not be decoded (") and "truncated or corrupt" in message


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_truncation_is_refused_not_raised(fmt: str) -> None:
    """Pillow raises OSError, ValueError, SyntaxError... from different depths of a cut file: each must come
    out as InvalidImage (a 422), never as something else (a 500). A cut that keeps every pixel (a PNG without
    its zlib checksum or IEND trailer) may pass, with the picture intact."""
    img = noise((16, 16), seed=3)
    data = encode(img, fmt, exif=exif_orientation(6), **({"lossless": True} if fmt == "WEBP" else {}))
    whole = images.to_rgb(data, MAX).tobytes()
    accepted = []
    for n in range(len(data)):
        try:
            got = images.to_rgb(data[:n], MAX)
        except InvalidImage:
            continue
        assert got.tobytes() == whole, n
        accepted.append(n)
    assert all(n > len(data) - 24 for n in accepted), accepted


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data": corrupt it is
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_corrupted_files_are_refused_not_raised(fmt: str) -> None:
    rng = random.Random(fmt)
    data = encode(Image.new("RGB", (40, 24), (10, 20, 30)), fmt, exif=exif_orientation(6))
    outcomes = {"refused": 0, "read": 0}
    for _ in range(400):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(len(bad))] = rng.randrange(256)
        for fn in (images.inspect, images.to_rgb, images.to_mask, images.mask_from_alpha):
            try:
                out = fn(bytes(bad), MAX)  # anything but InvalidImage fails the test
            except InvalidImage:
                outcomes["refused"] += 1
                continue
            assert out is None or isinstance(out, bytes | Image.Image | images.ImageInfo)
            outcomes["read"] += 1
    assert outcomes["refused"] > 0, outcomes  # the corruption reached the decoder


def test_unreadable_exif_is_refused() -> None:
    """Which way up the picture is cannot be known: refused, not guessed."""
    broken = b"Exif\x00\x00XX\x00*\x00\x00\x00\x08" + bytes(32)  # no TIFF byte order
    data = encode(Image.new("RGB", (8, 8)), "WEBP", exif=broken)
    assert refused(data).startswith("has EXIF metadata that could not be read")


# --- size limits ----------------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = png_header_claiming(30000, 30000)
    assert len(bomb) < 100
    assert "pixels" in refused(bomb, 16 * 1024 * 1024)


def test_header_over_the_limit_is_refused_before_decoding() -> None:
    # under Pillow's own guard: refused by ours, from the header (decoding would fail: one pixel of data)
    assert refused(png_header_claiming(5000, 5000), 16 * 1024 * 1024) == \
        "is 5000x5000 = 25000000 pixels; the limit is 16777216"


def test_over_max_pixels() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert refused(data, 5000) == "is 100x100 = 10000 pixels; the limit is 5000"
    assert images.inspect(data, 10000).width == 100  # the limit itself is allowed


# --- animation ------------------------------------------------------------------------------------------


def frames() -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_is_refused(fmt: str) -> None:
    first, *rest = frames()
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3  # an animation indeed
    assert refused(data) == "is animated; send a single frame"
    assert refused(data, fn=images.to_rgb) == "is animated; send a single frame"


# --- EXIF orientation -----------------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    data = encode(stored, "JPEG", quality=95, exif=exif_orientation(6))  # 6: show rotated 90 degrees clockwise
    info = images.inspect(data, MAX)
    assert (info.width, info.height) == (20, 40)
    rgb = images.to_rgb(data, MAX)
    assert rgb.size == (20, 40)
    top, bottom = px(rgb, (10, 5)), px(rgb, (10, 35))
    assert top[0] > 200 and top[2] < 60, top  # the stored left (red) is the top once turned clockwise
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_exif_orientation_applies_to_masks() -> None:
    stored = Image.new("L", (40, 20), 0)
    stored.paste(255, (0, 0, 20, 20))
    mask = images.to_mask(encode(stored, "PNG", exif=exif_orientation(6)), MAX)
    assert mask.size == (20, 40) and mask.getpixel((10, 5)) == 255 and mask.getpixel((10, 35)) == 0


# --- alpha ----------------------------------------------------------------------------------------------


def test_rgba_is_flattened_onto_white() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((1, 0), (255, 0, 0, 255))  # opaque red
    img.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    rgb = images.to_rgb(encode(img, "PNG"), MAX)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 0, 0)
    assert all(120 <= c <= 135 for c in px(rgb, (2, 0)))


def test_la_is_flattened_onto_white() -> None:
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (40, 255))
    data = encode(img, "PNG")
    assert images.inspect(data, MAX).has_alpha
    rgb = images.to_rgb(data, MAX)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (40, 40, 40)


def test_palette_with_transparency_is_flattened_onto_white() -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 0, 128, 0] + [0] * (254 * 3))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    data = encode(img, "PNG", transparency=0)
    assert images.inspect(data, MAX).has_alpha
    rgb = images.to_rgb(data, MAX)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (0, 128, 0)


def test_sixteen_bit_grayscale_image_is_scaled_not_clipped() -> None:
    img = Image.new("I;16", (2, 1))
    img.putpixel((0, 0), 32768)
    img.putpixel((1, 0), 65535)
    rgb = images.to_rgb(encode(img, "PNG"), MAX)
    assert rgb.getpixel((0, 0)) == (127, 127, 127) and rgb.getpixel((1, 0)) == (255, 255, 255)


# --- masks ----------------------------------------------------------------------------------------------


def test_mask_grayscale_l() -> None:
    img = Image.new("L", (2, 1))
    img.putpixel((1, 0), 200)
    mask = images.to_mask(encode(img, "PNG"), MAX)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 0 and mask.getpixel((1, 0)) == 200


def test_mask_bilevel() -> None:
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    mask = images.to_mask(encode(img, "PNG"), MAX)
    assert mask.mode == "L" and (mask.getpixel((0, 0)), mask.getpixel((1, 0))) == (0, 255)


def test_mask_rgb_gray_is_accepted() -> None:
    img = Image.new("RGB", (2, 1), (0, 0, 0))
    img.putpixel((1, 0), (90, 90, 90))
    mask = images.to_mask(encode(img, "PNG"), MAX)
    assert mask.mode == "L" and (mask.getpixel((0, 0)), mask.getpixel((1, 0))) == (0, 90)


def test_mask_with_colour_is_refused() -> None:
    img = Image.new("RGB", (2, 1), (255, 255, 255))
    img.putpixel((1, 0), (255, 0, 0))
    assert refused(encode(img, "PNG"), fn=images.to_mask) == \
        "has colour; a mask must be grayscale (white: repaint, black: keep)"


def test_mask_cmyk_is_refused() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG")
    assert images.inspect(data, MAX).format == "jpeg"  # a valid image...
    assert refused(data, fn=images.to_mask) == \
        "has mode CMYK, which is not convertible to a single-channel mask"  # ...but no mask


def test_mask_sixteen_bit_grayscale_is_scaled_to_eight_bits() -> None:
    img = Image.new("I;16", (3, 1))
    img.putpixel((1, 0), 32768)
    img.putpixel((2, 0), 65535)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    mask = images.to_mask(data, MAX)
    assert mask.mode == "L" and [mask.getpixel((x, 0)) for x in range(3)] == [0, 127, 255]


# --- mask_from_alpha ------------------------------------------------------------------------------------


def test_mask_from_alpha_marks_transparent_pixels() -> None:
    img = Image.new("RGBA", (3, 1), (10, 20, 30, 255))
    img.putpixel((0, 0), (10, 20, 30, 0))  # transparent: edit here
    img.putpixel((2, 0), (10, 20, 30, 100))  # mostly transparent: edit here too
    out = images.mask_from_alpha(encode(img, "PNG"), MAX)
    assert out is not None
    mask = Image.open(io.BytesIO(out))
    assert mask.format == "PNG" and mask.mode == "L"
    assert [mask.getpixel((x, 0)) for x in range(3)] == [255, 0, 255]


def test_mask_from_alpha_fully_opaque_is_none() -> None:
    assert images.mask_from_alpha(encode(Image.new("RGBA", (4, 4), (1, 2, 3, 255)), "PNG"), MAX) is None


def test_mask_from_alpha_without_alpha_is_none() -> None:
    assert images.mask_from_alpha(encode(Image.new("RGB", (4, 4)), "PNG"), MAX) is None
    assert images.mask_from_alpha(encode(Image.new("RGB", (4, 4)), "JPEG"), MAX) is None


def test_mask_from_alpha_refuses_what_inspect_refuses() -> None:
    assert refused(b"nope", fn=images.mask_from_alpha) == "is not an image (PNG, JPEG or WebP expected)"


# --- nearest_valid_size ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value,lo,hi,expected", [
    (1000, 64, 2048, 1000),  # already valid
    (1001, 64, 2048, 1000),
    (1005, 64, 2048, 1008),
    (10, 64, 2048, 64),  # below the minimum
    (5000, 64, 2048, 2048),  # above the maximum
    (10, 60, 2048, 64),  # a minimum that is not a multiple of 8: the next multiple above it
    (3000, 64, 2044, 2040),  # a maximum that is not: the multiple below it
])
def test_nearest_valid_size(value: int, lo: int, hi: int, expected: int) -> None:
    got = images.nearest_valid_size(value, lo, hi)
    assert got == expected and got % 8 == 0 and lo <= got <= hi
