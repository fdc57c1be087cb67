"""Fixtures shared by every tier: the tiny backend (loaded once) and small in-memory images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_backend():
    from pipelines.flux2_klein import RunOptions
    from pipelines.tiny import load_tiny_backend

    return load_tiny_backend(RunOptions())


def image_bytes(width: int = 96, height: int = 64, fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> bytes:
    """A small random image encoded in `fmt`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


def decode_png(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture
