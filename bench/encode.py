"""PNG encoding: the worker's encoder (worker/encode.py) against Pillow and libpng, time and size per image.

Four kinds of 8-bit RGB image, built here so the run needs no files: `noise` (what the tiny random-weight
model draws), `photo_like` (a smooth field, upsampled, plus sensor-like noise: closest to a real SDXL output),
`flat_ui` (flat rectangles and thin lines, like an illustration or a screenshot) and `ramps` (short repeating
gradients: the case a run-length strategy handles worst). Median of `--runs` encodes, one thread.

    python bench/encode.py                # 256 and 1024 px
    python bench/encode.py --sizes 1024 --runs 3
"""

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import emit, start_line  # noqa: E402

from worker.encode import png_with_text  # noqa: E402


def images(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    field = Image.fromarray((rng.random((size // 32, size // 32, 3)) * 255).astype("uint8"))
    photo = np.asarray(field.resize((size, size), Image.Resampling.BICUBIC)).astype(np.int16)
    photo = np.clip(photo + rng.normal(0, 2.5, photo.shape), 0, 255).astype("uint8")
    ui = np.full((size, size, 3), 245, np.uint8)
    for i in range(24):
        x, y = rng.integers(0, size - size // 4, 2)
        ui[y:y + size // 6, x:x + size // 4] = rng.integers(0, 255, 3)
        ui[(i * size) // 24, :] = 30  # thin dark lines
    y, x = np.mgrid[0:size, 0:size]
    ramps = np.stack([(x * 8) % 256, (y * 8) % 256, ((x + y) * 4) % 256], -1).astype("uint8")
    return {"noise": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "photo_like": photo,
            "flat_ui": ui, "ramps": ramps}


def encoders(level: int) -> dict[str, Callable[[Image.Image], bytes]]:
    import cv2

    def pillow(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=level)
        return buf.getvalue()

    def libpng(filt: int, strategy: int) -> Callable[[Image.Image], bytes]:
        params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, filt, cv2.IMWRITE_PNG_STRATEGY, strategy]
        return lambda img: cv2.imencode(".png", np.asarray(img)[:, :, ::-1].copy(), params)[1].tobytes()

    return {
        "pillow_adaptive": pillow,
        "libpng_sub_default": libpng(cv2.IMWRITE_PNG_FILTER_SUB, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
        "libpng_up_rle": libpng(cv2.IMWRITE_PNG_FILTER_UP, cv2.IMWRITE_PNG_STRATEGY_RLE),
        "worker_up_rle_zlib_ng": lambda img: png_with_text(img, "k", "{}", level),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--level", type=int, default=1, help="zlib level (the worker's SDXL_PNG_COMPRESS_LEVEL)")
    args = ap.parse_args()
    start_line("encode", sizes=args.sizes, runs=args.runs, level=args.level)
    speedup, size_ratio = {}, {}
    for size in (int(s) for s in args.sizes.split(",")):
        for kind, pixels in images(size).items():
            img = Image.fromarray(pixels)
            row: dict[str, object] = {"figure": "png_encode", "size": size, "image": kind}
            for name, enc in encoders(args.level).items():
                times = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    data = enc(img)
                    times.append(time.perf_counter() - t0)
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels), name
                row[name] = {"ms": round(statistics.median(times) * 1000, 2), "kb": round(len(data) / 1024, 1)}
            emit(row)
            ours, pil = row["worker_up_rle_zlib_ng"], row["pillow_adaptive"]
            assert isinstance(ours, dict) and isinstance(pil, dict)
            speedup[f"{kind}_{size}"] = round(pil["ms"] / ours["ms"], 2)
            size_ratio[f"{kind}_{size}"] = round(ours["kb"] / pil["kb"], 3)
    emit({"event": "summary", "bench": "encode", "worker_speedup_over_pillow": speedup,
          "worker_bytes_over_pillow": size_ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
