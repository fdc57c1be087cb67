"""Pure pieces of the server: field validation messages, settings, keys, error mapping."""

from __future__ import annotations

import pytest

from server import errors
from server.auth import key_is_valid
from server.cli import build_parser, settings_from_args
from server.config import Settings
from server.protocol import EditsBody, GenerationsBody, parse_fields, parse_size
from server.serving import server_timing

pytestmark = pytest.mark.unit


def invalid(raw: dict) -> errors.InvalidRequest:
    with pytest.raises(errors.InvalidRequest) as caught:
        parse_fields(GenerationsBody, raw)
    return caught.value


def test_defaults_live_in_the_wire_model():
    fields = parse_fields(GenerationsBody, {"prompt": "x"})
    assert (fields.steps, fields.cfg_scale, fields.negative_prompt, fields.text_mode) == (8, 1.0, "", False)
    assert (fields.response_format, fields.size, fields.n, fields.output_format) == ("url", "1024x1024", 1, "png")
    assert fields.seed is None


@pytest.mark.parametrize(
    ("raw", "param", "message"),
    [
        ({}, "prompt", "prompt is required"),
        ({"prompt": " "}, "prompt", "prompt must not be blank"),
        ({"prompt": "x" * 600}, "prompt", "prompt must be at most 512 characters, got 600"),
        ({"prompt": "x", "steps": 0}, "steps", "steps must be an integer between 1 and 50, got 0"),
        ({"prompt": "x", "seed": -5}, "seed", "seed must be an integer between 0 and 2147483647, got -5"),
        ({"prompt": "x", "cfg_scale": 11}, "cfg_scale", "cfg_scale must be a number between 1.0 and 10.0, got 11"),
        (
            {"prompt": "x", "response_format": "png"},
            "response_format",
            'response_format must be one of url, b64_json, got "png"',
        ),
        (
            {"prompt": "x", "text_mode": "sometimes"},
            "text_mode",
            'text_mode must be true or false (in a form: true, false, 1 or 0, in any case), got "sometimes"',
        ),
        ({"prompt": "x", "steps": True}, "steps", "steps must be an integer between 1 and 50, got true"),
    ],
)
def test_messages_quote_value_and_rule(raw, param, message):
    error = invalid(raw)
    assert (error.param, error.message, error.status) == (param, message, 400)


def test_form_strings_are_coerced():
    fields = parse_fields(
        EditsBody, {"prompt": "x", "steps": "4", "cfg_scale": "2.5", "text_mode": "TRUE", "seed": "9"}, form=True
    )
    assert (fields.steps, fields.cfg_scale, fields.text_mode, fields.seed) == (4, 2.5, True, 9)


def test_sizes_are_height_by_width():
    assert parse_size("768x1360") == (768, 1360)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("STEPIMAGE_API_KEYS", "k1, k2,,")
    monkeypatch.setenv("STEPIMAGE_URL_TTL", "60")
    monkeypatch.setenv("STEPIMAGE_EXTRA_SIZES", "64x64,128x256")
    settings = Settings()
    assert settings.api_keys == ["k1", "k2"]
    assert settings.url_ttl == 60
    assert settings.sizes[-2:] == ("64x64", "128x256")


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("STEPIMAGE_PORT", "9000")
    monkeypatch.setenv("STEPIMAGE_MODEL_NAME", "from-env")
    args = build_parser().parse_args(["serve", "--port", "9100", "--api-key", "a", "--api-key", "b", "--no-warmup"])
    settings = settings_from_args(args)
    assert (settings.port, settings.api_keys, settings.warmup, settings.model_name) == (
        9100,
        ["a", "b"],
        False,
        "from-env",
    )


def test_bad_extra_size_is_refused():
    with pytest.raises(ValueError):
        Settings(extra_sizes=["100x100"])


def test_keys_compare_all_without_early_exit():
    assert key_is_valid("b", ["a", "b"])
    assert not key_is_valid("c", ["a", "b"])
    assert not key_is_valid("", ["a"])
    assert not key_is_valid("a", [])


@pytest.mark.parametrize(
    ("error", "status", "kind", "code"),
    [
        (errors.InvalidRequest("steps", "m"), 400, "invalid_request_error", "invalid_value"),
        (errors.AuthenticationFailed("m"), 401, "invalid_request_error", "invalid_api_key"),
        (errors.ModelNotFound("m"), 404, "invalid_request_error", "model_not_found"),
        (errors.NotFound("m"), 404, "invalid_request_error", "not_found"),
        (errors.RequestTooLarge("m"), 413, "invalid_request_error", "request_too_large"),
        (errors.UnsupportedMediaType("m"), 415, "invalid_request_error", "unsupported_media_type"),
        (errors.Overloaded("m", retry_after=3), 429, "rate_limit_error", "server_overloaded"),
        (errors.NotReady("m", retry_after=5), 503, "server_error", "not_ready"),
        (errors.Timeout("m"), 504, "server_error", "timeout"),
        (errors.StorageUnavailable("m", retry_after=10), 503, "server_error", "storage_unavailable"),
        (errors.InsufficientStorage("m", retry_after=10), 507, "server_error", "insufficient_storage"),
        (errors.internal_error("rid"), 500, "server_error", "internal_error"),
    ],
)
def test_one_mapping_from_errors_to_http(error, status, kind, code):
    response = errors.to_response(error)
    assert response.status == status
    assert response.body["error"]["type"] == kind
    assert response.body["error"]["code"] == code
    if error.retry_after is not None:
        assert response.headers == {"Retry-After": str(error.retry_after)}


def test_server_timing_header():
    assert server_timing({"queue": 1.23, "total": 10}) == "queue;dur=1.2, total;dur=10.0"
