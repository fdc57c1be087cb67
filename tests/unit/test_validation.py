"""Validation as strict as documented, with one message per bad value whatever carried it, and bounded echoes."""

from __future__ import annotations

import json

import pytest

from server import errors
from server.protocol import QUOTED_CHARS, EditsBody, GenerationsBody, parse_fields, quoted

pytestmark = pytest.mark.unit

BOOLEAN_MESSAGE = "text_mode must be true or false (in a form: true, false, 1 or 0, in any case), got "


def invalid(model, raw: dict, *, form: bool = False) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as caught:
        parse_fields(model, raw, form=form)
    return caught.value


@pytest.mark.parametrize(
    ("value", "expected"), [("true", True), ("TRUE", True), ("1", True), ("False", False), ("0", False)]
)
def test_form_booleans_are_true_false_1_0_in_any_case(value, expected):
    assert parse_fields(EditsBody, {"prompt": "x", "text_mode": value}, form=True).text_mode is expected


@pytest.mark.parametrize("value", ["yes", "no", "on", "off", "t", "f", "y", "n", "2", " true", "1.0"])
def test_other_form_spellings_are_refused(value):
    error = invalid(EditsBody, {"prompt": "x", "text_mode": value}, form=True)
    assert (error.param, error.message) == ("text_mode", BOOLEAN_MESSAGE + json.dumps(value))


def test_an_empty_form_field_is_absent_but_an_empty_json_string_is_a_value():
    fields = parse_fields(EditsBody, {"prompt": "x", "text_mode": "", "seed": "", "model": ""}, form=True)
    assert (fields.text_mode, fields.seed, fields.model) == (False, None, None)
    assert invalid(EditsBody, {"prompt": "x", "text_mode": ""}).param == "text_mode"
    assert invalid(EditsBody, {"prompt": ""}, form=True).message == "prompt must not be blank"


@pytest.mark.parametrize("value", ["true", "yes", "on", 1, 0, 1.0, [], {}])
def test_json_booleans_are_only_true_and_false(value):
    # pydantic on its own takes "yes", "on", 1 and 0 as booleans; the README promises JSON booleans.
    error = invalid(GenerationsBody, {"prompt": "x", "text_mode": value})
    assert error.param == "text_mode"
    assert error.message.startswith(BOOLEAN_MESSAGE)
    assert parse_fields(GenerationsBody, {"prompt": "x", "text_mode": True}).text_mode is True


@pytest.mark.parametrize(
    ("field", "value"),
    [("text_mode", "maybe"), ("steps", "many"), ("cfg_scale", "high"), ("response_format", "png"), ("n", "two")],
)
def test_a_bad_value_gets_one_message_whether_json_or_form(field, value):
    from_json = invalid(EditsBody, {"prompt": "x", field: value})
    from_form = invalid(EditsBody, {"prompt": "x", field: value}, form=True)
    assert (from_json.param, from_json.message) == (from_form.param, from_form.message)
    assert from_json.param == field and json.dumps(value) in from_json.message


def test_values_are_quoted_as_json_not_as_python():
    assert invalid(GenerationsBody, {"prompt": "x", "steps": True}).message.endswith("got true")
    assert invalid(GenerationsBody, {"prompt": "x", "steps": 2.5}).message.endswith("got 2.5")
    assert invalid(GenerationsBody, {"prompt": "x", "steps": [[1]]}).message.endswith("got an array")
    assert invalid(GenerationsBody, {"prompt": "x", "steps": {"a": 1}}).message.endswith("got an object")


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "model", "size", "response_format", "output_format"])
def test_a_lone_surrogate_is_an_encoding_error_not_a_length_error(field):
    raw = {"prompt": "x", field: "a\ud800b"}
    error = invalid(GenerationsBody, raw)
    assert error.param == field
    assert "not valid Unicode" in error.message and "surrogate" in error.message
    assert "characters" not in error.message
    # The message itself must be encodable as UTF-8, or the response could not be sent.
    error.message.encode("utf-8")


def test_paired_surrogates_from_json_are_ordinary_text():
    prompt = json.loads('"\\ud83d\\ude00 a smiling face"')
    assert parse_fields(GenerationsBody, {"prompt": prompt}).prompt == prompt


def test_quoted_bounds_what_is_echoed():
    long = "m" * 100_000
    shown = quoted(long)
    assert len(shown) < QUOTED_CHARS + 40 and "100000 characters" in shown
    assert quoted("short") == '"short"'
    assert quoted("\ud800") == '"\\ud800"'
    quoted("\ud800").encode("utf-8")
    assert quoted(None) == "null" and quoted(False) == "false" and quoted(3) == "3"
    assert quoted(10**100) == "a 101-digit number"
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    assert quoted(nested) == "an array"


def test_long_values_are_not_echoed_whole_in_field_errors():
    for field in ("response_format", "output_format", "size"):
        error = invalid(GenerationsBody, {"prompt": "x", field: "v" * 100_000})
        assert len(error.message) < 300, (field, error.message[:200])


MALFORMED_SIZES = ["big", "1024", "1024x", "x1024", "1024*1024", "-64x64", "64x64x64", "1024 x 1024", "1e3x1e3"]


@pytest.mark.parametrize("size", MALFORMED_SIZES)
def test_a_malformed_size_gets_the_same_message_on_both_endpoints(size):
    generation = invalid(GenerationsBody, {"prompt": "x", "size": size})
    edit = invalid(EditsBody, {"prompt": "x", "size": size}, form=True)
    assert (
        (generation.param, generation.message)
        == (edit.param, edit.message)
        == (
            "size",
            f"size must be HEIGHTxWIDTH, e.g. 1024x1024, got {json.dumps(size)}",
        )
    )


@pytest.mark.parametrize("size", ["512x512", "1024x1024", "1536X1024", "auto"])
def test_edits_accept_and_ignore_a_well_formed_size(size):
    assert parse_fields(EditsBody, {"prompt": "x", "size": size}).size == size.lower()


SHAPE = '{"image_url": "<base64 or data URL>"}'
IMAGE_RULE = "a base64-encoded image or data URL string, or an array of them"
MASK_RULE = f"a base64-encoded image or data URL string, or an object {SHAPE}"


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"),
    [
        (
            {"images": "abc"},
            "images",
            "invalid_value",
            f"images must be an array of objects {SHAPE} (in a JSON body; a form sends image or image[] parts), "
            'got "abc"',
        ),
        ({"images": [{}]}, "images", "missing_required_parameter", "images[0].image_url is required"),
        (
            {"images": [{"image_url": "a"}, {"image_url": 5}]},
            "images",
            "invalid_value",
            "images[1].image_url must be a base64-encoded image or data URL string, got 5",
        ),
        (
            {"images": [{"image_url": "a", "detail": "x"}]},
            "images",
            "invalid_value",
            f'images[0] has an unknown key "detail": send {SHAPE}',
        ),
        ({"images": [1]}, "images", "invalid_value", f"images[0] must be an object {SHAPE}, got 1"),
        ({"mask": {}}, "mask", "missing_required_parameter", "mask.image_url is required"),
        ({"mask": 5}, "mask", "invalid_value", f"mask must be {MASK_RULE}, got 5"),
        ({"mask": ["a"]}, "mask", "invalid_value", f"mask must be {MASK_RULE}, got an array"),
        ({"image": [1]}, "image", "invalid_value", "image[0] must be a base64-encoded image or data URL string, got 1"),
        ({"image": {"image_url": "a"}}, "image", "invalid_value", f"image must be {IMAGE_RULE}, got an object"),
    ],
)
def test_image_fields_say_which_shape_they_take_and_where_a_value_breaks_it(fields, param, code, message):
    error = invalid(EditsBody, {"prompt": "x", **fields})
    assert (error.param, error.code, error.message) == (param, code, message)


@pytest.mark.parametrize(
    ("fields", "where"), [({"images": [{"file_id": "file-1"}]}, "images[0]"), ({"mask": {"file_id": "f"}}, "mask")]
)
def test_a_file_id_is_refused_as_openais_files_api_which_this_server_lacks(fields, where):
    error = invalid(EditsBody, {"prompt": "x", **fields})
    assert (error.param, error.code) == (where.split("[")[0], "unsupported_parameter")
    assert error.message.startswith(f"{where}.file_id refers to a file uploaded to OpenAI's Files API")
    assert SHAPE in error.message
