"""Fixtures shared by every tier: the tiny backend (loaded once), small in-memory images, a real S3 server."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
from PIL import Image

# A real S3 server (SeaweedFS) for any tier that needs a bucket; see tests/s3server.py.
from tests.s3server import s3_server  # noqa: F401


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


# Batched rows are computed by kernels of another batch size, whose float reductions may round
# differently: up to 1 grey level was measured (mean ~1e-5) between a batched row and the same request
# alone. Images that must be "the same request" are compared with this allowance, and no more.
BATCH_TOLERANCE_LEVELS = 2


def as_array(picture) -> np.ndarray:
    """An image given as PIL, PNG bytes or base64 PNG text, as int16 pixels."""
    if isinstance(picture, str):
        import base64

        picture = base64.b64decode(picture)
    if isinstance(picture, bytes):
        picture = decode_png(picture)
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def assert_same_image_across_batches(first, second) -> None:
    a, b = as_array(first), as_array(second)
    assert a.shape == b.shape
    difference = np.abs(a - b)
    assert difference.max() <= BATCH_TOLERANCE_LEVELS, difference.max()
    assert difference.mean() < 0.01, difference.mean()


def metric(client, name: str) -> float:
    """A sample's value from /metrics of an in-process TestClient or a real server's httpx client (0 if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, flags=re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll until `predicate()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """Server-sent events as (event name, JSON data), in order; every frame must be a named event with JSON data."""
    import json

    events = []
    for frame in text.replace("\r\n", "\n").split("\n\n"):
        if not frame.strip():
            continue
        fields = dict(line.split(": ", 1) for line in frame.split("\n") if line and not line.startswith(":"))
        assert set(fields) == {"event", "data"}, frame
        events.append((fields["event"], json.loads(fields["data"])))
    return events
