"""stream: true with partial_images: OpenAI's image streaming events, through the engine's queue and deadlines."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading

import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from pipelines.base import Cancelled, PartialImages
from server.config import Settings
from server.engine import Engine
from server.metrics import Metrics
from server.serving import ClientContext, ImageService
from server.storage import open_store
from tests.api.conftest import SMALL, assert_error
from tests.conftest import decode_png, image_bytes, parse_sse

pytestmark = pytest.mark.api

GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


def stream_generation(client, headers=None, **fields):
    body = {"prompt": "a red kite", "size": SMALL, "steps": 4, "seed": 5, "stream": True, "response_format": "b64_json"}
    body.update(fields)
    return client.post(GENERATIONS, json=body, headers=headers)


def events_of(response) -> list[tuple[str, dict]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return parse_sse(response.text)


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_png(base64.b64decode(b64)).convert("RGB"))


def test_generation_streams_partial_images_then_the_completed_image(client):
    events = events_of(stream_generation(client, partial_images=2))
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for index, (name, data) in enumerate(events[:2]):
        assert data["type"] == name
        assert data["partial_image_index"] == index
        assert (data["size"], data["output_format"], data["seed"]) == (SMALL, "png", 5)
        assert isinstance(data["created_at"], int)
        assert pixels(data["b64_json"]).shape == (64, 64, 3)
        assert "usage" not in data
    completed = events[-1][1]
    assert (completed["type"], completed["seed"], completed["size"]) == ("image_generation.completed", 5, SMALL)
    assert completed["usage"]["output_tokens"] == 16
    assert completed["usage"]["total_tokens"] == completed["usage"]["input_tokens"] + 16
    # The stages a response without streaming carries in its server-timing header, previews among them.
    timings = completed["timings"]
    assert {"queue", "encode_prompt", "denoise", "previews", "decode", "encode_image", "total"} <= set(timings)
    assert timings["total"] >= timings["denoise"] > 0
    # Streaming changes how the image travels, not the image.
    plain = client.post(
        GENERATIONS, json={"prompt": "a red kite", "size": SMALL, "steps": 4, "seed": 5, "response_format": "b64_json"}
    )
    assert np.array_equal(pixels(completed["b64_json"]), pixels(plain.json()["data"][0]["b64_json"]))


def test_fewer_steps_than_previews_gives_fewer_partial_images(client):
    names = [name for name, _ in events_of(stream_generation(client, steps=2, partial_images=3))]
    assert names == ["image_generation.partial_image", "image_generation.completed"]
    names = [name for name, _ in events_of(stream_generation(client, steps=1, partial_images=3))]
    assert names == ["image_generation.completed"]
    # partial_images 0 (the default): the image comes as one event.
    names = [name for name, _ in events_of(stream_generation(client))]
    assert names == ["image_generation.completed"]


def test_edit_streams_n_images_with_url_results(client):
    data = {
        "prompt": "make it blue",
        "steps": "3",
        "seed": "11",
        "n": "2",
        "stream": "true",
        "partial_images": "1",
        "response_format": "url",
        "output_format": "jpeg",
    }
    files = [("image", ("in.png", image_bytes(96, 64), "image/png"))]
    events = events_of(client.post(EDITS, data=data, files=files))
    names = [name for name, _ in events]
    assert names == ["image_edit.partial_image"] * 2 + ["image_edit.completed"] * 2
    partials, completed = [data for _, data in events[:2]], [data for _, data in events[2:]]
    assert [(p["image_index"], p["partial_image_index"], p["seed"]) for p in partials] == [(0, 0, 11), (1, 0, 12)]
    assert all(p["output_format"] == "jpeg" and p["size"] == "64x96" for p in partials)
    assert [(c["image_index"], c["seed"]) for c in completed] == [(0, 11), (1, 12)]
    for item in completed:
        assert "b64_json" not in item
        fetched = client.get(item["url"].replace("http://testserver", ""))
        assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"partial_images": 2}, "partial_images"),  # previews need a stream
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "partial_images": -1}, "partial_images"),
        ({"stream": True, "partial_images": True}, "partial_images"),
        ({"stream": "sometimes"}, "stream"),
    ],
)
def test_bad_streaming_fields_are_plain_400s(client, fields, param):
    body = {"prompt": "x", "size": SMALL, **fields}
    assert_error(client.post(GENERATIONS, json=body), 400, param)


def test_a_full_queue_is_a_plain_429_before_any_event(make_client, gated):
    client = make_client(backend=gated, max_queue=1)
    gated.gate.clear()
    holder = threading.Thread(target=lambda: client.post(GENERATIONS, json={"prompt": "busy", "size": SMALL}))
    holder.start()
    try:
        assert gated.started.wait(10)
        response = stream_generation(client, partial_images=1)
        assert_error(response, 429, None, "server_overloaded")
        assert int(response.headers["retry-after"]) >= 1
    finally:
        gated.gate.set()
        holder.join(30)


class PreviewThenStall:
    """Sends one preview, then works until cancelled: the request's deadline passes mid-stream."""

    def __init__(self, inner, preview=None) -> None:
        self.inner = inner
        self.info = inner.info
        self.cancelled = threading.Event()
        # What the preview holds instead of a picture (a test's broken preview).
        self.preview = preview

    def batch_key(self, request):
        return self.inner.batch_key(request)

    def generate(self, request, cancel=None):
        return self.generate_batch([request], cancel)[0]

    def generate_batch(self, requests, cancel=None, progress=None):
        # The preview goes out at once, long before the request's deadline however slow the machine.
        preview = [self.preview or Image.new("RGB", (requests[0].width, requests[0].height), (90, 120, 200))]
        if progress is not None:
            progress(0, PartialImages(index=0, images=preview, step=1, steps=requests[0].steps))
        while not cancel.is_set():
            threading.Event().wait(0.01)
        self.cancelled.set()
        raise Cancelled()

    def warm_up(self, sizes, progress=None):
        pass


def test_a_deadline_after_the_first_event_arrives_as_an_error_event(make_client, tiny_backend):
    backend = PreviewThenStall(tiny_backend)
    client = make_client(backend=backend)
    response = stream_generation(client, headers={"x-request-timeout": "2"}, partial_images=1)
    events = events_of(response)
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    error = events[-1][1]["error"]
    assert (error["code"], error["type"]) == ("timeout", "server_error")
    assert set(error) == {"message", "type", "param", "code"}
    # The job was stopped, not left running.
    assert backend.cancelled.wait(10)


def test_the_openai_sdk_reads_the_stream_and_raises_the_error_event(make_client, tiny_backend):
    client = make_client()
    sdk = OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=client, max_retries=0)
    events = list(
        sdk.images.generate(
            prompt="a kite", size=SMALL, stream=True, partial_images=1, extra_body={"steps": 2, "seed": 3}
        )
    )
    assert [type(event).__name__ for event in events] == ["ImageGenPartialImageEvent", "ImageGenCompletedEvent"]
    assert events[-1].usage.output_tokens == 16
    assert events[-1].model_extra["seed"] == 3

    stalling = make_client(backend=PreviewThenStall(tiny_backend))
    sdk = OpenAI(api_key="unused", base_url="http://testserver/v1", http_client=stalling, max_retries=0)
    stream = sdk.images.generate(
        prompt="a kite",
        size=SMALL,
        stream=True,
        partial_images=1,
        extra_headers={"x-request-timeout": "2"},
    )
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            pass
    assert raised.value.body["code"] == "timeout"


# -- a stream's end: the client leaving, a failure after the first event ----------------------------------------


async def open_stream(tmp_path, backend, disconnected):
    """A started streamed generation through the real service and engine: (engine, metrics, event stream)."""
    metrics = Metrics()
    settings = Settings(storage_dir=tmp_path / "files", warmup=False, extra_sizes=[SMALL])
    engine = Engine(max_queue=4, request_timeout=60, metrics=metrics)
    engine.start([("device-0", backend)])
    service = ImageService(settings, engine, open_store(settings, metrics), metrics)
    body = {"prompt": "a kite", "size": SMALL, "steps": 4, "stream": True, "partial_images": 1}
    fields = service.parse_generation({**body, "response_format": "b64_json"})
    stream = await service.stream_generation(fields, ClientContext(base_url="http://test", disconnected=disconnected))
    return engine, metrics, stream


def pending_queue_reads() -> list[asyncio.Task]:
    return [task for task in asyncio.all_tasks() if not task.done() and "Queue.get" in repr(task.get_coro())]


@pytest.mark.parametrize("watcher_first", [False, True])
def test_a_client_leaving_mid_stream_is_counted_once_and_leaves_nothing_pending(tmp_path, tiny_backend, watcher_first):
    """The stream waits for a preview or the result when the client leaves: the server cancels the task reading the
    stream (as for any response whose client left). The engine's disconnect watcher may notice first."""
    backend = PreviewThenStall(tiny_backend)

    async def scenario():
        left = asyncio.Event()

        async def disconnected() -> bool:
            return left.is_set()

        engine, metrics, stream = await open_stream(tmp_path, backend, disconnected)
        frames = aiter(stream)
        first = await anext(frames)
        reading = asyncio.create_task(anext(frames))
        await asyncio.sleep(0.2)
        left.set()
        if watcher_first:
            while metrics.cancellations._value.get() == 0:
                await asyncio.sleep(0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await reading
        await asyncio.sleep(0.05)
        pending = pending_queue_reads()
        assert await engine.wait_idle(10)
        await engine.drain(5)
        return first, pending, metrics.cancellations._value.get()

    first, pending, cancellations = asyncio.run(scenario())
    assert first.startswith(b"event: image_generation.partial_image")
    # A read of the preview queue left pending is destroyed with the stream: "Task was destroyed but it is pending!"
    assert pending == []
    assert cancellations == 1
    assert backend.cancelled.wait(10)


def test_a_preview_that_fails_to_encode_is_an_error_event_not_a_cancellation(tmp_path, tiny_backend):
    backend = PreviewThenStall(tiny_backend, preview=object())

    async def scenario():
        async def disconnected() -> bool:
            return False

        engine, metrics, stream = await open_stream(tmp_path, backend, disconnected)
        frames = [frame async for frame in stream]
        await engine.drain(5)
        return frames, metrics.cancellations._value.get()

    frames, cancellations = asyncio.run(scenario())
    assert [frame.split(b"\n")[0] for frame in frames] == [b"event: error"]
    assert b'"code":"internal_error"' in frames[0]
    assert cancellations == 0
    # The job was still stopped: nobody is left to send its result to.
    assert backend.cancelled.wait(10)
