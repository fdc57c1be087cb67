"""End to end: a real `stepimage serve` process on the tiny backend, driven over HTTP.

Three kinds of client, because each one catches different breakage: the official `openai` SDK (what most users
will point at this server), plain multipart/JSON shaped exactly like the hosted API's curl examples, and hostile or
malformed requests that must come back as clean error envelopes without hurting the process.

64x64 (enabled with --extra-size) and 2 steps keep each image in the tens of milliseconds on CPU.
"""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import requests
from openai import OpenAI
from PIL import Image

from tests.conftest import assert_same_image_across_batches

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "step-image-edit-2"
KEY = "test-key-1"
SECOND_KEY = "test-key-2"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Fields that keep every request cheap; tests add what they exercise.
FAST = {"steps": 2, "cfg_scale": 1.0}


# -- helpers ---------------------------------------------------------------------------------------------------------


def make_image(width: int, height: int, fmt: str = "png") -> bytes:
    """A small picture with structure (a gradient and a block), so lossy codecs have something real to encode."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(xs * 255 // max(width - 1, 1)), (ys * 255 // max(height - 1, 1)), ((xs + ys) % 64) * 4], axis=-1
    ).astype(np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 20)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt])
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid-looking PNG whose header declares width x height pixels, with almost no data behind it. Decoding it
    naively would allocate ~10 GiB; the server must refuse it from the header alone."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    # One compressed row of zeros: a few bytes that would inflate to far more if the decoder kept reading.
    data = zlib.compress(b"\x00" * (1 + 3 * 1024))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def decode_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def item_extra(item, name: str):
    """A field the hosted API adds to each data item (seed, finish_reason) that the SDK's model does not declare."""
    extra = item.model_extra or {}
    return extra[name] if name in extra else getattr(item, name)


def assert_envelope(response, status: int, *, code: str | None = None, param: str | None = None) -> dict:
    """The response is `status` with OpenAI's error envelope and nothing that leaks internals."""
    text = response.text
    assert response.status_code == status, text
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert "Traceback" not in text and str(REPO_ROOT) not in text, text
    assert "detail" not in body
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def generate(http: httpx.Client, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "a red square on a grey field", "size": "64x64", "response_format": "b64_json"}
    body.update(FAST)
    body.update(fields)
    return http.post("/v1/images/generations", json=body)


def sdk_generate(client: OpenAI, seed: int, **extra):
    return client.images.generate(
        model=MODEL,
        prompt="a lighthouse on a cliff",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": seed, **FAST, **extra},
    )


# -- process and configuration --------------------------------------------------------------------------------------


def test_ready_metrics_need_no_key_models_does(server, base_url):
    with httpx.Client(base_url=base_url, timeout=30.0) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
        assert anonymous.get("/ready").status_code == 200
        metrics = anonymous.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "# TYPE" in metrics.text
        assert_envelope(anonymous.get("/v1/models"), 401, code="invalid_api_key")
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer not-a-key"})
        assert_envelope(wrong, 401, code="invalid_api_key")
        for key in (KEY, SECOND_KEY):
            listed = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert listed.status_code == 200, listed.text
            assert MODEL in [entry["id"] for entry in listed.json()["data"]]


def test_environment_configuration(env_server):
    """STEPIMAGE_* variables alone configure a server: both keys from the comma list work, others get 401; and
    SIGTERM during a request drains it (the request gets its image) and exits 0."""
    with httpx.Client(base_url=env_server.base_url, timeout=30.0) as anonymous:
        for key in ("k1", "k2"):
            listed = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert listed.status_code == 200, listed.text
        assert_envelope(
            anonymous.get("/v1/models", headers={"Authorization": "Bearer k3"}), 401, code="invalid_api_key"
        )
        assert_envelope(
            anonymous.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}), 401, code="invalid_api_key"
        )
        # The extra size came from the environment too.
        made = anonymous.post(
            "/v1/images/generations",
            headers={"Authorization": "Bearer k2"},
            json={"prompt": "env", "size": "64x64", "steps": 1, "seed": 3, "response_format": "b64_json"},
        )
        assert made.status_code == 200, made.text
        assert decode_b64(made.json()["data"][0]["b64_json"]).size == (64, 64)

        # Graceful drain: SIGTERM while a request is running must let that request finish, then exit 0.
        outcome: dict[str, object] = {}

        def slow_request() -> None:
            try:
                outcome["response"] = httpx.post(
                    f"{env_server.base_url}/v1/images/generations",
                    headers={"Authorization": "Bearer k1"},
                    json={"prompt": "drain", "steps": 2, "seed": 1, "response_format": "b64_json"},
                    timeout=60.0,
                )
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=slow_request)
        worker.start()
        deadline = time.monotonic() + 10
        while "stepimage_in_flight 1.0" not in anonymous.get("/metrics").text:
            assert worker.is_alive() and time.monotonic() < deadline, "the request never showed as in flight"
            time.sleep(0.01)
    # A failure above leaves the process to the session teardown, which stops it regardless.
    env_server.assert_stops_cleanly()
    worker.join(timeout=30)
    assert "error" not in outcome, outcome
    drained = outcome["response"]
    assert drained.status_code == 200, drained.text
    assert decode_b64(drained.json()["data"][0]["b64_json"]).size == (1024, 1024)


# -- the openai SDK ----------------------------------------------------------------------------------------------------


def test_sdk_generate_b64(client):
    response = client.images.generate(
        model=MODEL,
        prompt="a lighthouse on a cliff at dusk",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 1, "steps": 2, "cfg_scale": 1.0, "text_mode": True, "negative_prompt": ""},
    )
    assert len(response.data) == 1
    item = response.data[0]
    assert item.url is None
    image = decode_b64(item.b64_json)
    assert image.format == "PNG"
    assert image.size == (64, 64)
    assert item_extra(item, "seed") == 1
    assert item_extra(item, "finish_reason") == "success"
    assert abs(response.created - time.time()) < 600


def test_sdk_generate_default_size_as_url(client, base_url):
    response = client.images.generate(
        model=MODEL, prompt="a wide mountain valley", response_format="url", extra_body={"seed": 5, "steps": 1}
    )
    item = response.data[0]
    assert item.b64_json is None
    assert item.url.startswith(f"{base_url}/v1/images/files/")
    # Download links work without a key, like the hosted API's.
    downloaded = httpx.get(item.url, timeout=30.0)
    assert downloaded.status_code == 200
    assert downloaded.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(downloaded.content))
    assert image.format == "PNG"
    assert image.size == (1024, 1024)
    # A name nobody was given is a 404 envelope, not a file listing or a 500.
    name = item.url.rsplit("/", 1)[1]
    guessed = name[:-5] + ("A" if name[-5] != "A" else "B") + ".png"
    assert_envelope(httpx.get(f"{base_url}/v1/images/files/{guessed}", timeout=30.0), 404, code="not_found")


def test_sdk_same_seed_same_pixels_other_seed_differs(client):
    first = sdk_generate(client, 7).data[0].b64_json
    again = sdk_generate(client, 7).data[0].b64_json
    other = sdk_generate(client, 8).data[0].b64_json
    assert first == again
    assert not np.array_equal(pixels(decode_b64(first)), pixels(decode_b64(other)))


def test_sdk_n2_uses_consecutive_seeds(client):
    pair = client.images.generate(
        model=MODEL, prompt="a lighthouse on a cliff", size="64x64", n=2, response_format="b64_json",
        extra_body={"seed": 100, **FAST},
    )  # fmt: skip
    assert [item_extra(item, "seed") for item in pair.data] == [100, 101]
    first, second = (pixels(decode_b64(item.b64_json)) for item in pair.data)
    assert not np.array_equal(first, second)
    alone = sdk_generate(client, 101).data[0].b64_json
    # The pair was one batch of two rows.
    assert_same_image_across_batches(pair.data[1].b64_json, alone)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_sdk_edit_keeps_input_size(client, fmt):
    source = make_image(150, 100, fmt)
    response = client.images.edit(
        model=MODEL,
        image=(f"in.{fmt}", source, f"image/{fmt}"),
        prompt="make the block blue",
        response_format="b64_json",
        # text_mode makes edits work at the full ~1 MP (seconds on CPU), so only one format pays for it.
        extra_body={"seed": 1, "steps": 2, "text_mode": fmt == "png"},
    )
    item = response.data[0]
    assert decode_b64(item.b64_json).size == (150, 100)
    assert item_extra(item, "seed") == 1
    assert item_extra(item, "finish_reason") == "success"


def test_sdk_edit_from_open_file(client, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(make_image(96, 80))
    with open(path, "rb") as handle:
        response = client.images.edit(
            model=MODEL, image=handle, prompt="add a hat", response_format="b64_json", extra_body={"seed": 2, **FAST}
        )
    assert decode_b64(response.data[0].b64_json).size == (96, 80)


def test_sdk_edit_image_list(client):
    source = ("in.png", make_image(80, 64), "image/png")
    reference = ("ref.png", make_image(64, 96), "image/png")
    # A list makes the SDK send the parts as image[]: one image, or the edited image and references.
    one = client.images.edit(
        model=MODEL, image=[source], prompt="x", response_format="b64_json", extra_body={"seed": 3, **FAST}
    )
    assert decode_b64(one.data[0].b64_json).size == (80, 64)
    two = client.images.edit(
        model=MODEL,
        image=[source, reference],
        prompt="put image 2 on the wall of image 1",
        response_format="b64_json",
        extra_body={"seed": 3, **FAST},
    )
    # The result has the first image's size; the reference's latents were read too.
    assert decode_b64(two.data[0].b64_json).size == (80, 64)
    assert two.usage.input_tokens_details.image_tokens > one.usage.input_tokens_details.image_tokens


def test_sdk_errors_are_typed(client, base_url):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk_generate(client, 1, steps=0)
    assert raised.value.status_code == 400
    assert raised.value.param == "steps"
    assert raised.value.code == "invalid_value"
    assert raised.value.type == "invalid_request_error"
    assert raised.value.body["param"] == "steps"
    assert "steps" in raised.value.body["message"]

    with pytest.raises(openai.NotFoundError) as raised:
        client.images.generate(model="dall-e-9", prompt="x", size="64x64", extra_body={"steps": 1})
    assert raised.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model=MODEL, prompt="x", size="512x512", extra_body={"steps": 1})
    assert raised.value.param == "size"

    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model=MODEL, prompt="x" * 513, size="64x64", extra_body={"steps": 1})
    assert raised.value.param == "prompt"

    with OpenAI(api_key="wrong-key", base_url=f"{base_url}/v1", max_retries=0, timeout=30.0) as stranger:
        with pytest.raises(openai.AuthenticationError) as raised:
            stranger.images.generate(model=MODEL, prompt="x", size="64x64")
        assert raised.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()


def test_sdk_accepts_512_chinese_characters(client):
    prompt = ("山水画中的小船" * 80)[:512]
    assert len(prompt) == 512 and len(prompt.encode("utf-8")) > 512
    response = client.images.generate(
        model=MODEL, prompt=prompt, size="64x64", response_format="b64_json", extra_body={"seed": 4, "steps": 1}
    )
    assert decode_b64(response.data[0].b64_json).size == (64, 64)


def test_sdk_models_list(client):
    assert MODEL in [model.id for model in client.models.list()]
    retrieved_ids = [model.id for model in client.models.list().data]
    assert retrieved_ids[0] == MODEL


# -- requests shaped like the hosted API's curl examples -------------------------------------------------------------


def test_curl_shaped_multipart_edit(base_url):
    # curl -F 'image=@input.webp' -F 'prompt=...' ... with every field a text part, as curl sends them. The
    # documented steps=8 is replaced by 2: with text_mode=true an edit works at ~1 MP whatever the input size, and
    # 8 steps of that cost ~8 s on a 2-core CPU; steps=8 itself is covered by the JSON example below.
    response = requests.post(
        f"{base_url}/v1/images/edits",
        headers={"Authorization": f"Bearer {KEY}"},
        files={"image": ("input.webp", make_image(64, 64, "webp"), "image/webp")},
        data={
            "model": MODEL,
            "prompt": 'Make the character ride a bicycle, holding a sign that says "Saudi Arabia"',
            "response_format": "b64_json",
            "cfg_scale": "1.0",
            "steps": "2",
            "seed": "1",
            "text_mode": "true",
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers.get("x-request-id")
    assert "denoise" in response.headers.get("server-timing", "")
    body = response.json()
    assert set(body) == {"created", "data", "usage", "output_format", "size"}
    (item,) = body["data"]
    assert set(item) == {"seed", "finish_reason", "b64_json"}
    assert item["seed"] == 1 and item["finish_reason"] == "success"
    assert decode_b64(item["b64_json"]).size == (64, 64)


def test_curl_shaped_json_generation(base_url):
    response = requests.post(
        f"{base_url}/v1/images/generations",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}", "x-request-id": "curl-123"},
        data=(
            '{"model": "step-image-edit-2", "prompt": "A serene alpine lake at sunset, mirror reflection, '
            'photorealistic", "response_format": "b64_json", "cfg_scale": 1.0, "steps": 8, "seed": 1, '
            '"text_mode": true, "size": "64x64"}'
        ),
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "curl-123"
    timing = response.headers["server-timing"]
    for stage in ("queue", "denoise", "decode", "total"):
        assert f"{stage};dur=" in timing, timing
    (item,) = response.json()["data"]
    assert item["seed"] == 1
    assert decode_b64(item["b64_json"]).size == (64, 64)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.parametrize("form", ["plain", "data_url"])
def test_multipart_image_as_base64_text_part(base_url, form):
    text = _b64(make_image(72, 64))
    if form == "data_url":
        text = "data:image/png;base64," + text
    response = requests.post(
        f"{base_url}/v1/images/edits",
        headers=AUTH,
        # A text part, not a file: requests sends `data` items without a filename.
        files={"image": (None, text)},
        data={"prompt": "x", "response_format": "b64_json", "seed": "1", "steps": "2"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert decode_b64(response.json()["data"][0]["b64_json"]).size == (72, 64)


def test_json_edit_with_data_url(http):
    response = http.post(
        "/v1/images/edits",
        json={
            "image": "data:image/png;base64," + _b64(make_image(64, 88)),
            "prompt": "x",
            "response_format": "b64_json",
            "seed": 1,
            "steps": 2,
        },
    )
    assert response.status_code == 200, response.text
    assert decode_b64(response.json()["data"][0]["b64_json"]).size == (64, 88)


# -- robustness -------------------------------------------------------------------------------------------------------

BAD_IMAGES = {
    "corrupt": ("in.png", make_image(64, 64)[:60] + b"\x00garbage" * 50, "image/png"),
    "empty": ("in.png", b"", "image/png"),
    "text_file": ("notes.txt", b"these are not the pixels you are looking for\n" * 20, "text/plain"),
    "bomb": ("bomb.png", bomb_png(), "image/png"),
    "tiny": ("in.png", make_image(16, 16), "image/png"),
    "bad_base64": (None, "this is not base64!!", None),
    "data_url_not_image": (None, "data:text/plain;base64," + _b64(b"hello"), None),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_clean_400s(base_url, case):
    filename, content, media_type = BAD_IMAGES[case]
    part = (filename, content) if media_type is None else (filename, content, media_type)
    started = time.perf_counter()
    response = requests.post(
        f"{base_url}/v1/images/edits",
        headers=AUTH,
        files={"image": part},
        data={"prompt": "x", "response_format": "b64_json", "seed": "1", "steps": "2"},
        timeout=60,
    )
    assert_envelope(response, 400, param="image")
    if case == "bomb":
        # Refused from the header: nothing near 60000x60000 pixels was ever decoded.
        assert time.perf_counter() - started < 10
        assert "4096" in response.json()["error"]["message"]


def test_protocol_level_errors(http):
    # A body over --max-body-mb 8, declared up front with its length.
    oversized = http.post(
        "/v1/images/generations", content=b"{" + b" " * (9 * 1024 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert_envelope(oversized, 413, code="request_too_large")

    # The same limit when no length is declared (chunked upload): it must trip while the body streams in.
    def streamed_upload():
        yield (
            b'--e2e\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
            b'--e2e\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(9 * 16):
            yield bytes(64 * 1024)
        yield b"\r\n--e2e--\r\n"

    chunked = http.post(
        "/v1/images/edits", content=streamed_upload(), headers={"Content-Type": "multipart/form-data; boundary=e2e"}
    )
    assert "content-length" not in chunked.request.headers
    assert_envelope(chunked, 413, code="request_too_large")

    for path in ("/v1/images/generations", "/v1/images/edits"):
        plain = http.post(path, content=b"prompt=x", headers={"Content-Type": "text/plain"})
        assert_envelope(plain, 415, code="unsupported_media_type")

    assert_envelope(http.get("/v1/nothing-here"), 404, code="not_found")
    assert_envelope(http.post("/v1/chat/completions", json={}), 404, code="not_found")
    broken_json = http.post(
        "/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_envelope(broken_json, 400)
    assert_envelope(generate(http, prompt="   "), 400, param="prompt")
    assert_envelope(generate(http, seed=-1), 400, param="seed")
    assert_envelope(generate(http, cfg_scale=10.5), 400, param="cfg_scale")
    assert_envelope(http.post("/v1/images/edits", data={"prompt": "x"}, files={"other": ("a", b"b")}), 400)


def test_server_survives_abuse(server, base_url, http):
    """Runs after the bad-input tests (pytest keeps file order): the process is alive and still does real work, and
    no bad input reached the catch-all handler (which logs a traceback)."""
    assert server.proc.poll() is None
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log_tail()
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{base_url}/ready", timeout=10).status_code == 200
    response = generate(http, seed=11)
    assert response.status_code == 200, response.text
    assert decode_b64(response.json()["data"][0]["b64_json"]).size == (64, 64)


# -- concurrency ------------------------------------------------------------------------------------------------------


def test_concurrent_generations_keep_health_responsive(base_url):
    seeds = [21, 22, 23, 24]
    in_flight = threading.Event()
    done = threading.Event()
    health_during_work: list[int] = []

    def poll_health() -> None:
        with httpx.Client(base_url=base_url, timeout=30.0) as poller:
            while not done.is_set():
                status = poller.get("/health").status_code
                if in_flight.is_set() and not done.is_set():
                    health_during_work.append(status)
                time.sleep(0.01)

    def one(seed: int) -> bytes:
        # One client per thread: the requests really are concurrent on the wire.
        with httpx.Client(base_url=base_url, timeout=60.0, headers=AUTH) as own:
            response = generate(own, seed=seed, prompt="a busy harbour")
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["b64_json"]

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
            in_flight.set()
            together = list(pool.map(one, seeds))
    finally:
        done.set()
        poller.join(timeout=30)

    # /health answered, every time, while images were being made: model work never holds the event loop.
    # (How fast it answers is the benchmarks' business, not a test's.)
    assert health_during_work and set(health_during_work) == {200}, health_during_work

    with httpx.Client(base_url=base_url, timeout=60.0, headers=AUTH) as alone:
        for seed, concurrent in zip(seeds, together):
            solo = generate(alone, seed=seed, prompt="a busy harbour").json()["data"][0]["b64_json"]
            # Concurrent requests may have been batched together.
            assert_same_image_across_batches(concurrent, solo)
    assert len({image for image in together}) == len(seeds)
