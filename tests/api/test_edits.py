"""POST /v1/images/edits: multipart and JSON bodies, every image input users send, every bad one."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.api.conftest import assert_error
from tests.conftest import decode_png, image_bytes

pytestmark = pytest.mark.api

FIELDS = {"prompt": "make it blue", "steps": "2", "response_format": "b64_json", "seed": "3"}


def edit(client, image=None, part="image", fields=None, **extra):
    data = {**FIELDS, **(fields or {})}
    files = None
    if image is not None:
        files = [(part, ("input.png", image, "application/octet-stream"))]
    return client.post("/v1/images/edits", data=data, files=files, **extra)


def result_image(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return decode_png(base64.b64decode(response.json()["data"][0]["b64_json"]))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_output_is_exactly_the_input_size(client, fmt):
    assert result_image(edit(client, image_bytes(150, 100, fmt))).size == (150, 100)


@pytest.mark.parametrize("size", [(64, 64), (64, 600), (1000, 64), (4096, 64), (1500, 1000)])
def test_odd_and_extreme_sizes_round_trip(client, size):
    picture = Image.new("RGB", size, (200, 30, 30))
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    assert result_image(edit(client, buffer.getvalue(), fields={"steps": "1"})).size == size


def test_image_array_part_name_from_the_openai_sdk(client):
    assert result_image(edit(client, image_bytes(80, 64), part="image[]")).size == (80, 64)


def test_more_images_than_the_limit_are_refused(make_client):
    client = make_client(max_edit_images=2)
    files = [("image[]", (f"{index}.png", image_bytes(64, 64, seed=index), "image/png")) for index in range(3)]
    response = client.post("/v1/images/edits", data=FIELDS, files=files)
    error = assert_error(response, 400, "image")
    assert "at most 2" in error["message"] and "got 3" in error["message"]


def test_missing_image(client):
    assert_error(edit(client), 400, "image", "missing_required_parameter")


def test_base64_and_data_url_in_a_text_part(client):
    raw = image_bytes(72, 64)
    encoded = base64.b64encode(raw).decode()
    for value in (encoded, f"data:image/png;base64,{encoded}"):
        # A text part of a multipart body (filename None), and the same field url-encoded.
        multipart = client.post("/v1/images/edits", data=FIELDS, files=[("image", (None, value))])
        assert result_image(multipart).size == (72, 64)
        urlencoded = client.post("/v1/images/edits", data={**FIELDS, "image": value})
        assert result_image(urlencoded).size == (72, 64)


def test_json_body_with_a_base64_image(client):
    encoded = base64.b64encode(image_bytes(64, 80, "JPEG")).decode()
    body = {"prompt": "x", "steps": 2, "response_format": "b64_json", "image": f"data:image/jpeg;base64,{encoded}"}
    assert result_image(client.post("/v1/images/edits", json=body)).size == (64, 80)
    assert_error(client.post("/v1/images/edits", json={"prompt": "x"}), 400, "image")
    assert_error(client.post("/v1/images/edits", json={"prompt": "x", "image": 5}), 400, "image")


def _bomb_png(side: int = 60000) -> bytes:
    """A valid PNG header declaring side x side greyscale pixels: a few hundred bytes on the wire."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = zlib.compress(b"\x00" * (side + 1) * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", rows)
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, this is plain text\n" * 10, id="text"),
        pytest.param(np.random.default_rng(0).bytes(4000), id="random-bytes"),
        pytest.param(image_bytes(200, 200)[:300], id="truncated-png"),
        pytest.param(image_bytes(200, 200, "JPEG")[:500], id="truncated-jpeg"),
        pytest.param(_bomb_png(), id="decompression-bomb"),
        pytest.param(image_bytes(63, 100), id="too-small"),
        pytest.param(None, id="too-large"),
    ],
)
def test_bad_images_get_a_400_naming_image(client, payload):
    if payload is None:
        buffer = io.BytesIO()
        Image.new("L", (4097, 64)).save(buffer, "PNG")
        payload = buffer.getvalue()
    assert_error(edit(client, payload), 400, "image")
    # ... and the server keeps serving.
    assert result_image(edit(client, image_bytes(64, 64))).size == (64, 64)


@pytest.mark.parametrize("value", ["not base64 at all!!!", "data:text/plain;base64,aGVsbG8=", "data:image/png;base64,"])
def test_bad_base64_gets_a_400_naming_image(client, value):
    assert_error(client.post("/v1/images/edits", data={**FIELDS, "image": value}), 400, "image")


def test_exif_orientation_is_applied_first(client):
    stored = Image.new("RGB", (120, 64), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes())
    assert result_image(edit(client, buffer.getvalue())).size == (64, 120)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "1", "CMYK"])
def test_unusual_modes_are_accepted(client, mode):
    if mode == "I;16":
        ramp = np.tile(np.linspace(0, 65535, 80, dtype=np.uint16), (64, 1))
        picture = Image.fromarray(ramp)
    else:
        picture = Image.open(io.BytesIO(image_bytes(80, 64))).convert(mode)
    buffer = io.BytesIO()
    picture.save(buffer, "TIFF" if mode == "CMYK" else "PNG")
    assert result_image(edit(client, buffer.getvalue())).size == (80, 64)


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("TRUE", True), ("1", True), ("False", False), ("0", False)]
)
def test_text_mode_form_values(make_client, gated, value, expected):
    client = make_client(backend=gated)
    assert edit(client, image_bytes(64, 64), fields={"text_mode": value}).status_code == 200
    assert gated.requests[-1].text_mode is expected


def test_form_fields_reach_the_pipeline(make_client, gated):
    client = make_client(backend=gated)
    fields = {"steps": "4", "cfg_scale": "2.5", "negative_prompt": "dull", "seed": "99", "n": "2", "size": "512x512"}
    response = edit(client, image_bytes(96, 64), fields=fields)
    assert response.status_code == 200, response.text
    request = gated.requests[-1]
    assert (request.steps, request.cfg_scale, request.negative_prompt, request.seed, request.n) == (
        4,
        2.5,
        "dull",
        99,
        2,
    )
    # size is accepted and ignored: the edit keeps the input's size.
    assert (request.width, request.height) == (96, 64)
    assert [item["seed"] for item in response.json()["data"]] == [99, 100]


def test_form_field_errors(client):
    assert_error(edit(client, image_bytes(64, 64), fields={"text_mode": "maybe"}), 400, "text_mode")
    assert_error(edit(client, image_bytes(64, 64), fields={"steps": "0"}), 400, "steps")
    assert_error(edit(client, image_bytes(64, 64), fields={"prompt": ""}), 400, "prompt")
    assert_error(edit(client, image_bytes(64, 64), fields={"model": "other"}), 404, "model", "model_not_found")


def test_a_file_where_text_belongs(client):
    files = [
        ("image", ("a.png", image_bytes(64, 64), "image/png")),
        ("prompt", ("p.txt", b"make it blue", "text/plain")),
    ]
    assert_error(client.post("/v1/images/edits", data={"steps": "1"}, files=files), 400, "prompt")


def test_other_content_types_get_415(client):
    response = client.post("/v1/images/edits", content=b"image", headers={"content-type": "image/png"})
    assert_error(response, 415, None, "unsupported_media_type")
    response = client.post("/v1/images/edits", content=b"prompt: x", headers={"content-type": "text/plain"})
    assert_error(response, 415, None, "unsupported_media_type")


def test_edits_honour_seed(client):
    source = image_bytes(64, 64)
    first = edit(client, source, fields={"seed": "8"}).json()["data"][0]["b64_json"]
    again = edit(client, source, fields={"seed": "8"}).json()["data"][0]["b64_json"]
    other = edit(client, source, fields={"seed": "9"}).json()["data"][0]["b64_json"]
    assert first == again != other
