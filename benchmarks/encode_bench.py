"""Times server.images.encode_image for each output format on a worst-case and a typical 1024x1024 image.

Records numbers only; it never judges them. With --sweep it also times the neighbouring Pillow settings (PNG zlib
levels and strategy, WebP methods) that the constants in server/images.py were chosen against, so the choice can be
revisited on other hardware or Pillow versions.

    python benchmarks/encode_bench.py --out benchmarks/results/encode-cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw

# Run as a script, sys.path[0] is benchmarks/; the server package lives one level up.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from server import images  # noqa: E402

SIDE = 1024


def noise_image(side: int) -> Image.Image:
    # Incompressible: the upper bound on PNG cost and size.
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def smooth_image(side: int) -> Image.Image:
    # Closer to model output: broad gradients, flat shapes with hard edges, and a little grain (decoded latents are
    # never perfectly flat, and perfectly flat areas would flatter every compressor).
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1)
    planes = np.stack([x * 255, y * 255, (1 - x) * (1 - y) * 128 + 64], axis=-1)
    planes += rng.normal(0.0, 2.0, planes.shape)
    image = Image.fromarray(planes.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    scale = side / 1024
    draw.ellipse([v * scale for v in (200, 200, 600, 600)], fill=(200, 40, 60))
    draw.rectangle([v * scale for v in (500, 100, 900, 400)], fill=(30, 160, 90))
    triangle = [(100 * scale, 900 * scale), (500 * scale, 700 * scale), (900 * scale, 1000 * scale)]
    draw.polygon(triangle, fill=(240, 220, 40))
    return image


def time_call(encode, runs: int) -> tuple[float, int]:
    encode()  # warm-up: first calls pay for codec initialisation
    durations = []
    size = 0
    for _ in range(runs):
        start = time.perf_counter()
        size = len(encode())
        durations.append((time.perf_counter() - start) * 1000)
    return statistics.median(durations), size


def pillow_encoder(image: Image.Image, fmt: str, **options):
    def encode() -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    return encode


_ZLIB_STRATEGIES = {zlib.Z_FILTERED: "Z_FILTERED", zlib.Z_HUFFMAN_ONLY: "Z_HUFFMAN_ONLY", zlib.Z_RLE: "Z_RLE"}


def describe(options: dict) -> str:
    def shown(key: str, value: object) -> object:
        return _ZLIB_STRATEGIES.get(value, value) if key == "compress_type" else value

    return ",".join(f"{key}={shown(key, value)}" for key, value in options.items())


def server_cases() -> list[tuple[str, str, int | None]]:
    # (format, settings as the server applies them, quality argument)
    return [
        ("png", describe(images.PNG_SAVE_OPTIONS), None),
        ("jpeg", f"quality={images.DEFAULT_QUALITY}", None),
        ("webp", f"quality={images.DEFAULT_QUALITY},method={images.WEBP_METHOD}", None),
    ]


def sweep_cases() -> list[tuple[str, dict]]:
    cases: list[tuple[str, dict]] = [("PNG", {"compress_level": level}) for level in (0, 1, 2, 3, 6)]
    cases.append(("PNG", {"compress_level": 1, "compress_type": zlib.Z_RLE}))
    cases += [("WEBP", {"quality": images.DEFAULT_QUALITY, "method": method}) for method in range(5)]
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON results here (default: stdout)")
    parser.add_argument("--runs", type=int, default=9, help="timed runs per case; the median is reported")
    parser.add_argument("--side", type=int, default=SIDE, help="square image side in pixels")
    parser.add_argument("--sweep", action="store_true", help="also time alternative Pillow settings")
    args = parser.parse_args(argv)

    sources = {"noise": noise_image(args.side), "smooth": smooth_image(args.side)}
    results = []
    for image_name, image in sources.items():
        for fmt, settings, quality in server_cases():
            median_ms, size = time_call(partial(images.encode_image, image, fmt, quality), args.runs)
            results.append(
                {
                    "format": fmt,
                    "image": image_name,
                    "settings": settings,
                    "via": "encode_image",
                    "median_ms": round(median_ms, 2),
                    "bytes": size,
                }
            )
        if args.sweep:
            for fmt, options in sweep_cases():
                median_ms, size = time_call(pillow_encoder(image, fmt, **options), args.runs)
                results.append(
                    {
                        "format": fmt.lower(),
                        "image": image_name,
                        "settings": describe(options),
                        "via": "pillow",
                        "median_ms": round(median_ms, 2),
                        "bytes": size,
                    }
                )

    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            # Other work on the machine skews every median; the load at the end says how much to trust them.
            "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "image_side": args.side,
        "runs": args.runs,
        "results": results,
    }
    text = json.dumps(report, indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
