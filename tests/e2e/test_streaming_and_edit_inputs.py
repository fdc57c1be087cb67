"""A real `stepimage serve` process, driven by the official openai SDK and a raw HTTP client: streamed partial
images, several reference images, masks, and a client that hangs up mid-stream."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import metric, parse_sse, wait_for

pytestmark = pytest.mark.e2e

MODEL = "step-image-edit-2"


def png(width: int, height: int, seed: int, alpha: np.ndarray | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    if alpha is not None:
        picture.putalpha(Image.fromarray(alpha))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_sdk_streams_a_generation(client):
    stream = client.images.generate(
        model=MODEL,
        prompt="a kite",
        size="64x64",
        stream=True,
        partial_images=2,
        response_format="b64_json",
        extra_body={"steps": 4, "seed": 9},
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    completed = events[-1]
    assert completed.model_extra["seed"] == 9 and completed.size == "64x64"
    assert completed.usage.output_tokens == 16
    assert rgb(base64.b64decode(completed.b64_json)).shape == (64, 64, 3)


def test_sdk_streams_an_edit_of_several_images_with_a_mask(client):
    alpha = np.full((64, 96), 255, dtype=np.uint8)
    alpha[16:48, 32:64] = 0
    source = png(96, 64, seed=1)
    stream = client.images.edit(
        model=MODEL,
        image=[("a.png", source, "image/png"), ("b.png", png(64, 64, seed=2), "image/png")],
        mask=("m.png", png(96, 64, seed=3, alpha=alpha), "image/png"),
        prompt="put image 2 in the hole",
        stream=True,
        partial_images=1,
        response_format="b64_json",
        extra_body={"steps": 3, "seed": 4},
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    completed = events[-1]
    assert completed.usage.input_tokens_details.image_tokens == 24 + 16
    out, original = rgb(base64.b64decode(completed.b64_json)), rgb(source)
    keep = np.ones((64, 96), dtype=bool)
    keep[16 - 8 : 48 + 8, 32 - 8 : 64 + 8] = False
    assert np.array_equal(out[keep], original[keep])


def test_sdk_masked_edit_without_streaming(client):
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[:20, :20] = 0
    source = png(64, 64, seed=6)
    response = client.images.edit(
        model=MODEL,
        image=("a.png", source, "image/png"),
        mask=("m.png", png(64, 64, seed=7, alpha=alpha), "image/png"),
        prompt="x",
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 1},
    )
    out, original = rgb(base64.b64decode(response.data[0].b64_json)), rgb(source)
    assert np.array_equal(out[28:, 28:], original[28:, 28:])
    assert response.size == "64x64" and response.output_format == "png"


def test_raw_sse_client_sees_each_event_as_it_is_made(http):
    body = {"prompt": "a kite", "size": "64x64", "steps": 4, "seed": 2, "stream": True, "partial_images": 3}
    arrivals = []
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = ""
        for chunk in response.iter_text():
            text += chunk
            arrivals.append(text.count("\n\n"))
    events = parse_sse(text)
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    # The events came in more than one piece: the stream was not buffered until the end.
    assert len(set(arrivals)) > 1
    assert events[-1][1]["url"].startswith("http")


def test_a_client_that_hangs_up_mid_stream_stops_its_job(server, http):
    cancelled_before = metric(http, "stepimage_cancellations_total")
    made_before = metric(http, 'stepimage_images_generated_total{kind="generation"}')
    # Long enough on the tiny model that the hang-up comes many steps before the end.
    body = {"prompt": "slow", "size": "1024x1024", "steps": 50, "seed": 1, "stream": True, "partial_images": 3}
    with httpx.Client(base_url=server.base_url, timeout=120, headers=http.headers) as own:
        with own.stream("POST", "/v1/images/generations", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    assert json.loads(line[6:])["type"] == "image_generation.partial_image"
                    break
    # Leaving the block closed the connection after the first preview.
    wait_for(lambda: metric(http, "stepimage_cancellations_total") > cancelled_before, timeout=60)
    wait_for(lambda: metric(http, "stepimage_in_flight") == 0, timeout=60)
    time.sleep(0.5)
    assert metric(http, 'stepimage_images_generated_total{kind="generation"}') == made_before
