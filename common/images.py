"""Input images: what the API accepts (checked at submit) and how the worker reads them (the same code).

Pillow only, no torch: the API validates by decoding fully, so nothing the worker cannot open is ever queued.
The rules (docs/images.md):
- PNG, JPEG and WebP; one frame (an animated file is refused, not silently cut to its first frame);
- at most `max_pixels` pixels, checked from the header before any pixel is decoded (decompression bombs);
- EXIF orientation is applied, so the image is the way up a browser shows it;
- alpha is flattened onto white (the OpenAI edit endpoint reads alpha as the mask before that: app/openai_images);
- a mask is grayscale: white is repainted, black kept; a mask with colour in it is refused as ambiguous.
"""

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"PNG": ("png", "image/png"), "JPEG": ("jpeg", "image/jpeg"), "WEBP": ("webp", "image/webp")}
CONTENT_TYPES = {ctype for _ext, ctype in FORMATS.values()}
MASK_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I", "I;16"}  # convertible to one channel
# Pillow's own bomb guard (it warns past this and raises past twice this) is set explicitly, for the process:
# our own, lower `max_pixels` is checked first, so Pillow's guard is only a backstop.
Image.MAX_IMAGE_PIXELS = 64 * 1024 * 1024


class InvalidImage(ValueError):
    """Refused: the message is for the client and names no internals (the caller adds the field name)."""


@dataclass(frozen=True)
class ImageInfo:
    """What the API learned from a valid image: enough to size the generation and to store it."""

    width: int  # after EXIF orientation
    height: int
    format: str  # "png" | "jpeg" | "webp"
    content_type: str
    sha256: str  # of the bytes as received
    bytes: int
    has_alpha: bool


# what Pillow raises on a file it cannot read, besides UnidentifiedImageError (an OSError): every one of these
# has come out of Image.open, load or getexif on a corrupted PNG, JPEG or WebP (tests/unit/test_images.py)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
                 ZeroDivisionError, Image.DecompressionBombWarning)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Decoded and EXIF-oriented (the original's `format` kept), or InvalidImage."""
    if not data:
        raise InvalidImage("is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked next
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("is not an image (PNG, JPEG or WebP expected)") from None
    except Image.DecompressionBombError:
        raise InvalidImage(f"has more than {max_pixels} pixels (a decompression bomb?)") from None
    except DECODE_ERRORS as exc:  # a header Pillow recognised but could not parse
        raise InvalidImage(f"could not be decoded ({type(exc).__name__}: truncated or corrupt)") from None
    if img.format not in FORMATS:
        raise InvalidImage(f"is {img.format or 'an unknown format'}; accepted formats are PNG, JPEG and WebP")
    fmt = img.format
    w, h = img.size
    if w * h > max_pixels:
        raise InvalidImage(f"is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    try:
        animated = getattr(img, "is_animated", False) or getattr(img, "n_frames", 1) > 1
    except DECODE_ERRORS as exc:  # counting frames reads past the header
        raise InvalidImage(f"could not be decoded ({type(exc).__name__}: truncated or corrupt)") from None
    if animated:
        raise InvalidImage("is animated; send a single frame")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except DECODE_ERRORS as exc:
        raise InvalidImage(f"could not be decoded ({type(exc).__name__}: truncated or corrupt)") from None
    try:
        oriented = ImageOps.exif_transpose(img)
    except DECODE_ERRORS as exc:  # which way up it is cannot be known: refused, not guessed
        raise InvalidImage(f"has EXIF metadata that could not be read ({type(exc).__name__})") from None
    oriented.format = fmt
    return oriented


def _gray8(img: Image.Image) -> Image.Image:
    """One 8-bit channel; 16-bit grayscale (PNG opens as I;16) scaled down, not clipped at 255."""
    if img.mode in ("I", "I;16"):
        return img.convert("I").point(lambda v: v / 257).convert("L")
    return img.convert("L")


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def inspect(data: bytes, max_pixels: int) -> ImageInfo:
    """Decode fully and describe, or raise InvalidImage."""
    img = _open(data, max_pixels)
    fmt, ctype = FORMATS[str(img.format)]
    return ImageInfo(width=img.width, height=img.height, format=fmt, content_type=ctype,
                     sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), has_alpha=_has_alpha(img))


def to_rgb(data: bytes, max_pixels: int) -> Image.Image:
    """The image as the pipeline sees it: EXIF-oriented RGB, alpha flattened onto white."""
    img = _open(data, max_pixels)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I", "I;16"):
        return _gray8(img).convert("RGB")
    return img.convert("RGB")


def to_mask(data: bytes, max_pixels: int) -> Image.Image:
    """A mask as one channel (L): white is repainted. A mask with colour in it is refused, not guessed at."""
    img = _open(data, max_pixels)
    if img.mode not in MASK_MODES:
        raise InvalidImage(f"has mode {img.mode}, which is not convertible to a single-channel mask")
    if img.mode in ("RGB", "RGBA", "P", "PA"):
        rgb = img.convert("RGB")
        r, g, b = rgb.split()
        if r.tobytes() != g.tobytes() or g.tobytes() != b.tobytes():
            raise InvalidImage("has colour; a mask must be grayscale (white: repaint, black: keep)")
        return r
    return _gray8(img)


def mask_from_alpha(data: bytes, max_pixels: int) -> bytes | None:
    """OpenAI's edit convention: transparent pixels (alpha below half) are the area to edit. A PNG mask in our
    convention (white: repaint), or None when the image has no transparent pixel."""
    img = _open(data, max_pixels)
    if not _has_alpha(img):
        return None
    alpha = img.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a < 128 else 0)
    if mask.getbbox() is None:  # fully opaque: nothing to edit, so no mask
        return None
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def nearest_valid_size(value: int, lo: int, hi: int) -> int:
    """The multiple of 8 nearest `value` within [lo, hi] (for the 422 that refuses an unusable input size)."""
    return max(lo + (-lo % 8), min(hi - hi % 8, round(value / 8) * 8))
