"""Inputs for the benchmarks, made on the spot: edit images of several sizes and aspect ratios, and prompts.

Nothing is downloaded; the same images come back on every machine (fixed drawing, no randomness).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
# (width, height): square, both API landscape/portrait shapes, small, large, and a panorama.
EDIT_SIZES = ((1024, 1024), (1360, 768), (768, 1360), (512, 512), (2048, 1536), (1600, 400))


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_image(width: int, height: int, index: int = 0) -> Image.Image:
    """A picture with gradients, shapes and text: something an encoder and an editor have to work on."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(0, height, 4):
        shade = int(255 * y / max(1, height - 1))
        draw.rectangle([0, y, width, y + 4], fill=(shade, (shade + 85 * index) % 256, 255 - shade))
    step = max(16, min(width, height) // 6)
    for n, x in enumerate(range(step // 2, width, step)):
        radius = step // 3
        y = height // 2 + ((n * 37 + index * 11) % max(1, height // 3)) - height // 6
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=((n * 53) % 256, 200, (n * 97) % 256))
    draw.text((step // 4, step // 4), f"STEPIMAGE {width}x{height}", fill=(255, 255, 255))
    return image


def edit_inputs(fmt: str = "PNG", sizes: tuple[tuple[int, int], ...] = EDIT_SIZES) -> list[tuple[str, bytes]]:
    """(file name, encoded bytes) for every benchmark edit size, (width, height) each."""
    inputs = []
    for index, (width, height) in enumerate(sizes):
        buffer = io.BytesIO()
        test_image(width, height, index).save(buffer, format=fmt)
        inputs.append((f"input-{width}x{height}.{fmt.lower()}", buffer.getvalue()))
    return inputs
