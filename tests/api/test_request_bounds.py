"""What a client's request can do to the server: deeply nested JSON, huge echoed values, strict booleans, malformed
edit sizes, and the cap on output pixels per request (issue 13 items 3, 5 and 6)."""

from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

from tests.api.conftest import SMALL, assert_error
from tests.conftest import image_bytes

pytestmark = pytest.mark.api

FAST = {"prompt": "a red bicycle", "steps": 1, "response_format": "b64_json"}
# Long enough that echoing it whole would be obvious, short of the body limit.
HUGE = 100_000
# Messages quote at most a short piece of any client value.
MESSAGE_BOUND = 400


def generate(client, **fields):
    return client.post("/v1/images/generations", json={**FAST, "size": SMALL, **fields})


def edit_form(client, image: bytes, **fields):
    data = {key: str(value) for key, value in {**FAST, **fields}.items()}
    return client.post("/v1/images/edits", data=data, files=[("image", ("in.png", image, "image/png"))])


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def solid_png(width: int, height: int) -> bytes:
    # One colour compresses to a few kB even at 4096x4096, so a huge input is cheap to send.
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- deeply nested JSON ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1000, 100_000])
@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/edits"])
def test_deeply_nested_json_is_a_400_not_a_500(client, path, depth):
    # Before: RecursionError in json.loads, answered as a 500.
    response = client.post(path, content=nested(depth), headers={"content-type": "application/json"})
    error = assert_error(response, 400, None, "invalid_json")
    assert "nested too deeply" in error["message"]
    assert generate(client).status_code == 200


def test_deep_nesting_inside_a_field_is_a_clean_400(client):
    inner = json.loads(nested(500))
    response = client.post("/v1/images/generations", json={**FAST, "size": SMALL, "steps": inner})
    error = assert_error(response, 400, "steps")
    assert error["message"].endswith("got an array")


# -- echoed values are bounded ---------------------------------------------------------------------------------------


def test_a_huge_model_name_is_not_echoed_whole(client):
    # Before: the 404 quoted all 100,000 characters.
    error = assert_error(generate(client, model="m" * HUGE), 404, "model", "model_not_found")
    assert len(error["message"]) < MESSAGE_BOUND and f"{HUGE} characters" in error["message"]


def test_a_huge_size_is_not_echoed_whole(client):
    error = assert_error(generate(client, size="1" * HUGE), 400, "size")
    assert len(error["message"]) < MESSAGE_BOUND


def test_huge_paths_content_types_and_headers_are_not_echoed_whole(client):
    error = assert_error(client.get("/" + "p" * 20_000), 404, None, "not_found")
    assert len(error["message"]) < MESSAGE_BOUND
    error = assert_error(client.delete("/v1/images/generations" + "/x" * 5_000), 404, None)
    assert len(error["message"]) < MESSAGE_BOUND
    response = client.post("/v1/images/edits", content=b"x", headers={"content-type": "image/" + "x" * 20_000})
    error = assert_error(response, 415, None, "unsupported_media_type")
    assert len(error["message"]) < MESSAGE_BOUND
    response = client.post(
        "/v1/images/generations", json={**FAST, "size": SMALL}, headers={"x-request-timeout": "9" * 20_000 + "s"}
    )
    error = assert_error(response, 400, "x-request-timeout")
    assert len(error["message"]) < MESSAGE_BOUND


def test_a_long_part_name_is_not_echoed_whole(client):
    # 1,000 characters: longer part headers are refused by the multipart parser before any message quotes them.
    name = "f" * 1_000
    files = [("image", ("in.png", image_bytes(64, 64), "image/png")), (name, ("x.txt", b"x", "text/plain"))]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=files)
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert len(error["message"]) < MESSAGE_BOUND and len(error["param"] or "") <= 64


# -- strict booleans, one message ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", "on", "t", 1, "true"])
def test_json_text_mode_takes_only_booleans(client, value):
    # Before: pydantic's lax booleans took all of these.
    assert_error(generate(client, text_mode=value), 400, "text_mode")


@pytest.mark.parametrize("value", ["yes", "on", "t", "y"])
def test_form_text_mode_takes_only_true_false_1_0(client, value):
    assert_error(edit_form(client, image_bytes(64, 64), text_mode=value), 400, "text_mode")


def test_one_message_for_a_bad_value_from_json_or_a_form(client):
    from_form = assert_error(edit_form(client, image_bytes(64, 64), text_mode="sometimes"), 400, "text_mode")
    body = {**FAST, "text_mode": "sometimes", "image": "data:image/png;base64,AAAA"}
    from_json = assert_error(client.post("/v1/images/edits", json=body), 400, "text_mode")
    assert from_form["message"] == from_json["message"]


@pytest.mark.parametrize("field", ["prompt", "model", "negative_prompt"])
def test_a_lone_surrogate_is_reported_as_bad_encoding(client, field):
    body = json.dumps({**FAST, "size": SMALL, field: "abc"}).replace("abc", "\\ud800").encode()
    response = client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    error = assert_error(response, 400, field)
    assert "Unicode" in error["message"] and "characters" not in error["message"]


# -- edits' size -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["big", "1024", "64x", "1024*1024"])
def test_a_malformed_edit_size_is_refused_like_a_generation_size(client, size):
    # Before: an edit ignored any size, malformed or not.
    from_edit = assert_error(edit_form(client, image_bytes(64, 64), size=size), 400, "size")
    from_generation = assert_error(generate(client, size=size), 400, "size")
    assert from_edit["message"] == from_generation["message"]


@pytest.mark.parametrize("size", ["512x512", "1024x1536", "auto"])
def test_a_well_formed_edit_size_is_ignored(client, size):
    response = edit_form(client, image_bytes(96, 64), size=size)
    assert response.status_code == 200, response.text
    result = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert result.size == (96, 64)


# -- output pixels per request ---------------------------------------------------------------------------------------


def test_the_default_cap_refuses_four_4096_square_edits_before_any_work(make_client, gated):
    # The case: 4 x 4096x4096 would be a 117 MB response and +1 GB of memory.
    client = make_client(backend=gated)
    big = solid_png(4096, 4096)
    error = assert_error(edit_form(client, big, n=4), 400, "n")
    assert "16,777,216" in error["message"] and "n may be at most 1" in error["message"]
    assert gated.requests == []


def test_the_default_cap_still_allows_one_edit_of_the_largest_input(make_client, gated):
    client = make_client(backend=gated)
    gated.gate.clear()
    # Held at the gate: the request passed every check and reached the model.
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("r", edit_form(client, solid_png(4096, 4096), n=1)))
    worker.start()
    assert gated.started.wait(30)
    assert (gated.requests[0].width, gated.requests[0].height) == (4096, 4096)
    gated.gate.set()
    worker.join(60)
    assert outcome["r"].status_code == 200


def test_an_edit_over_the_cap_names_n_or_image(make_client, gated):
    client = make_client(backend=gated, max_output_pixels=96 * 64 * 2)
    assert edit_form(client, image_bytes(96, 64), n=2).status_code == 200
    error = assert_error(edit_form(client, image_bytes(96, 64), n=3), 400, "n")
    assert "n may be at most 2" in error["message"]
    error = assert_error(edit_form(client, image_bytes(200, 100), n=1), 400, "image")
    assert "200 pixels wide and 100 high" in error["message"]
    assert len(gated.requests) == 1


def test_a_generation_over_the_cap_names_n_or_size(make_client, gated):
    client = make_client(backend=gated, max_output_pixels=64 * 64 * 3)
    assert generate(client, n=3).status_code == 200
    assert_error(generate(client, n=4), 400, "n")
    assert_error(generate(client, size="1024x1024"), 400, "size")
    assert len(gated.requests) == 1


# -- forms as browsers send them -------------------------------------------------------------------------------------


def test_a_form_with_every_input_left_empty_is_the_same_as_leaving_them_out(make_client, gated):
    # A browser form (and Swagger UI's "Try it out") sends every input it shows: "" for those left empty, and an
    # empty part for a file input with no file. Before, seed="" or output_compression="" were 400s.
    client = make_client(backend=gated)
    empty = {name: "" for name in ("model", "seed", "output_compression", "size", "negative_prompt", "n", "stream")}
    files = [("image", ("in.png", image_bytes(64, 64), "image/png")), ("mask", ("", b"", "application/octet-stream"))]
    response = client.post("/v1/images/edits", data={**empty, "prompt": "x", "steps": "1"}, files=files)
    assert response.status_code == 200, response.text
    request = gated.requests[-1]
    assert (request.n, request.mask, request.negative_prompt) == (1, None, "")


def test_an_empty_prompt_in_a_form_is_still_blank_and_no_file_is_still_no_image(client):
    files = [("image", ("in.png", image_bytes(64, 64), "image/png"))]
    assert_error(client.post("/v1/images/edits", data={"prompt": ""}, files=files), 400, "prompt")
    empty_input = [("image", ("", b"", "application/octet-stream"))]
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files=empty_input)
    assert_error(response, 400, "image", "missing_required_parameter")


def test_an_empty_string_in_json_is_not_absent(client):
    # JSON has null for "absent"; an empty string there is a value, judged by the field's rule.
    assert_error(generate(client, seed=""), 400, "seed")
