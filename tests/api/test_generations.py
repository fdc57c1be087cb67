"""POST /v1/images/generations: every field, default, range and error of the contract."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from tests.api.conftest import SMALL, assert_error
from tests.conftest import assert_same_image_across_batches, decode_png

pytestmark = pytest.mark.api


def generate(client, **fields):
    body = {"prompt": "a red bicycle", "size": SMALL, "steps": 2, "response_format": "b64_json", **fields}
    body = {key: value for key, value in body.items() if value is not ...}
    return client.post("/v1/images/generations", json=body)


def only_image(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return decode_png(base64.b64decode(response.json()["data"][0]["b64_json"]))


def test_response_shape_and_headers(client):
    response = generate(client, seed=7)
    body = response.json()
    assert set(body) == {"created", "data", "usage", "output_format", "size"}
    assert isinstance(body["created"], int)
    assert body["data"] == [{"seed": 7, "finish_reason": "success", "b64_json": body["data"][0]["b64_json"]}]
    assert (body["output_format"], body["size"]) == ("png", SMALL)
    usage = body["usage"]
    # A 64x64 image is 4x4 latent tokens; a text-to-image request reads no input image.
    assert usage["output_tokens"] == 16
    assert usage["input_tokens_details"]["image_tokens"] == 0
    assert usage["input_tokens_details"]["text_tokens"] > 0
    assert usage["input_tokens"] == usage["input_tokens_details"]["text_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert only_image(response).size == (64, 64)
    assert response.headers["x-request-id"]
    timing = response.headers["server-timing"]
    for stage in ("queue", "encode_prompt", "denoise", "decode", "encode_image", "total"):
        assert f"{stage};dur=" in timing


def test_defaults_reach_the_pipeline(make_client, gated):
    client = make_client(backend=gated)
    response = client.post("/v1/images/generations", json={"prompt": "defaults", "size": SMALL})
    assert response.status_code == 200, response.text
    request = gated.requests[-1]
    assert (request.steps, request.cfg_scale, request.negative_prompt, request.text_mode, request.n) == (
        8,
        1.0,
        "",
        False,
        1,
    )
    assert 0 <= request.seed <= 2147483647
    assert response.json()["data"][0]["seed"] == request.seed
    assert "url" in response.json()["data"][0] and "b64_json" not in response.json()["data"][0]


def test_every_field_reaches_the_pipeline(make_client, gated):
    client = make_client(backend=gated)
    response = generate(
        client, seed=11, steps=3, cfg_scale=2.5, negative_prompt="blurry", text_mode=True, size="768x1360"
    )
    request = gated.requests[-1]
    assert (request.seed, request.steps, request.cfg_scale, request.negative_prompt, request.text_mode) == (
        11,
        3,
        2.5,
        "blurry",
        True,
    )
    # HEIGHTxWIDTH: 768x1360 is landscape, 1360 wide.
    assert (request.height, request.width) == (768, 1360)
    assert only_image(response).size == (1360, 768)


def test_default_size_is_1024_square(client):
    response = client.post(
        "/v1/images/generations", json={"prompt": "square", "steps": 1, "response_format": "b64_json"}
    )
    assert only_image(response).size == (1024, 1024)


@pytest.mark.parametrize("size", ["896x1184", "1360x768", "1184x896"])
def test_every_hosted_size_is_height_by_width(client, size):
    height, width = (int(side) for side in size.split("x"))
    assert only_image(generate(client, size=size, steps=1)).size == (width, height)


@pytest.mark.parametrize("size", ["512x512", "1024", "1024x1024x3", "64X64 ", ""])
def test_unknown_size_is_rejected(client, size):
    error = assert_error(generate(client, size=size), 400, "size")
    assert "1024x1024" in error["message"]


def test_an_upper_case_x_names_the_same_served_size(client):
    response = generate(client, size="64X64", steps=1)
    assert only_image(response).size == (64, 64)
    assert response.json()["size"] == "64x64"


def test_extra_sizes_are_configurable(make_client):
    client = make_client(extra_sizes=["128x256"])
    assert only_image(generate(client, size="128x256", steps=1)).size == (256, 128)
    assert_error(generate(client, size=SMALL), 400, "size")


def test_same_seed_same_pixels_different_seed_different_pixels(client):
    first = generate(client, seed=5).json()["data"][0]["b64_json"]
    again = generate(client, seed=5).json()["data"][0]["b64_json"]
    other = generate(client, seed=6).json()["data"][0]["b64_json"]
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("steps", 51),
        ("steps", 2.5),
        ("steps", "many"),
        ("steps", True),
        ("seed", -1),
        ("seed", 2147483648),
        ("seed", 1.5),
        ("seed", "abc"),
        ("cfg_scale", 0.99),
        ("cfg_scale", 10.01),
        ("cfg_scale", "high"),
        ("text_mode", "maybe"),
        ("text_mode", 2),
        ("response_format", "xml"),
        ("n", 0),
        ("n", 5),
        ("output_format", "gif"),
        ("output_compression", 101),
        ("output_compression", -1),
        ("negative_prompt", "x" * 513),
        ("negative_prompt", 5),
    ],
)
def test_out_of_range_fields_name_the_field(client, field, value):
    extra = {"output_format": "jpeg"} if field == "output_compression" else {}
    error = assert_error(generate(client, **{field: value}, **extra), 400, field)
    assert error["type"] == "invalid_request_error"
    assert field in error["message"]


def test_message_quotes_value_and_range(client):
    error = assert_error(generate(client, steps=0), 400, "steps", "invalid_value")
    assert error["message"] == "steps must be an integer between 1 and 50, got 0"


@pytest.mark.parametrize("value", [0, 2147483647])
def test_seed_bounds_are_accepted(client, value):
    assert generate(client, seed=value).json()["data"][0]["seed"] == value


@pytest.mark.parametrize(("field", "value"), [("steps", 1), ("steps", 50), ("cfg_scale", 1.0), ("cfg_scale", 10)])
def test_range_bounds_are_accepted(client, field, value):
    assert generate(client, **{field: value}).status_code == 200


def test_prompt_rules(client):
    assert_error(generate(client, prompt=...), 400, "prompt", "missing_required_parameter")
    assert_error(generate(client, prompt="   "), 400, "prompt")
    assert_error(generate(client, prompt=""), 400, "prompt")
    error = assert_error(generate(client, prompt="a" * 513), 400, "prompt")
    assert "513" in error["message"] and "512" in error["message"]
    assert generate(client, prompt="a" * 512).status_code == 200
    # 512 code points of Chinese are 1536 UTF-8 bytes: still valid.
    assert generate(client, prompt="猫" * 512).status_code == 200
    assert_error(generate(client, prompt=42), 400, "prompt")


def test_json_nulls_mean_defaults_and_unknown_fields_are_ignored(make_client, gated):
    client = make_client(backend=gated)
    response = generate(client, seed=None, steps=None, negative_prompt=None, user="u-1", quality="high", style="x")
    assert response.status_code == 200, response.text
    assert gated.requests[-1].steps == 8


def test_model_names(make_client):
    client = make_client(model_aliases=["my-alias"])
    assert generate(client, model="step-image-edit-2").status_code == 200
    assert generate(client, model="my-alias").status_code == 200
    assert_error(generate(client, model="dall-e-3"), 404, "model", "model_not_found")


def test_configured_model_name(make_client):
    client = make_client(model_name="house-model")
    assert generate(client, model="house-model").status_code == 200
    assert_error(generate(client, model="step-image-edit-2"), 404, "model", "model_not_found")


def test_n_images_use_consecutive_seeds(client):
    data = generate(client, n=2, seed=40).json()["data"]
    assert [item["seed"] for item in data] == [40, 41]
    alone = generate(client, seed=41).json()["data"][0]["b64_json"]
    # The two images were made as one batch of two.
    assert_same_image_across_batches(data[1]["b64_json"], alone)
    assert data[0]["b64_json"] != data[1]["b64_json"]


def test_max_n_is_configurable(make_client):
    client = make_client(max_n=1)
    error = assert_error(generate(client, n=2), 400, "n")
    assert "between 1 and 1" in error["message"]


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil_format):
    data = base64.b64decode(generate(client, output_format=fmt).json()["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(data)).format == pil_format


def test_output_compression_sets_quality(client):
    low = base64.b64decode(generate(client, output_format="jpeg", output_compression=10).json()["data"][0]["b64_json"])
    high = base64.b64decode(generate(client, output_format="jpeg", output_compression=95).json()["data"][0]["b64_json"])
    assert len(low) < len(high)
    assert_error(generate(client, output_compression=50), 400, "output_compression")


def test_body_must_be_json(client):
    response = client.post("/v1/images/generations", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert_error(response, 415, None, "unsupported_media_type")
    response = client.post("/v1/images/generations", data={"prompt": "x"})
    assert_error(response, 415, None, "unsupported_media_type")
    bad = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(bad, 400, None, "invalid_json")
    array = client.post("/v1/images/generations", json=["prompt"])
    assert_error(array, 400, None, "invalid_json")
