"""Settings that could never work are refused at start, in one line that echoes no secret: infinite sizes and
durations, API keys that no HTTP client could send. And the request body's pace guard, at the ASGI level."""

from __future__ import annotations

import asyncio

import pytest

from server.app import MIN_BODY_BYTES_PER_S, BodyLimitMiddleware
from server.cli import main
from server.config import Settings
from server.errors import RequestTimeout


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--max-body-mb", "inf"], "--max-body-mb"),
        (["--storage-min-free-mb", "Infinity"], "--storage-min-free-mb"),
        (["--request-timeout", "inf"], "--request-timeout"),
        (["--batch-wait-ms", "nan"], "--batch-wait-ms"),
    ],
)
def test_infinite_values_are_a_usage_error_not_a_traceback(flags, flag, capsys):
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stepimage serve: {flag}: ") and "finite" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("key", [" padded ", "clé-secrète", "two words", "tab\tkey"])
def test_keys_no_client_could_send_are_refused_without_echoing_them(key, capsys, monkeypatch):
    assert main(["serve", "--api-key", "fine-key", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert "API key 2 of 2" in err and "printable ASCII" in err
    assert key.strip() not in err and "fine-key" not in err
    monkeypatch.setenv("STEPIMAGE_API_KEYS", f"fine-key,{key.strip()}")
    if key.strip().isascii() and " " not in key.strip() and "\t" not in key.strip():
        assert Settings().api_keys == ["fine-key", key.strip()]  # the list's own spaces are only separators
    else:
        assert main(["serve"]) == 2
        err = capsys.readouterr().err
        assert "API key 2 of 2" in err and key.strip() not in err


def test_every_printable_ascii_key_is_accepted():
    key = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) != ",")
    assert Settings(api_keys=[key]).api_keys == [key]


def _run_guard(chunks_every_s: float, chunk: bytes, total: int, idle_timeout: float) -> list[dict]:
    seen: list[dict] = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(message)
            if not message.get("more_body"):
                return

    sent = 0

    async def dripping():
        nonlocal sent
        if sent:
            await asyncio.sleep(chunks_every_s)
        sent += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": sent < total}

    guard = BodyLimitMiddleware(app, max_bytes=10 * 1024 * 1024, idle_timeout=idle_timeout)
    asyncio.run(guard({"type": "http", "headers": []}, dripping, None))
    return seen


def test_a_body_dripping_below_the_minimum_pace_gets_408_after_the_grace():
    # A byte every 0.05 s never leaves a 0.3 s gap, but averages far below the minimum.
    with pytest.raises(RequestTimeout) as stopped:
        _run_guard(0.05, b" ", 10_000, idle_timeout=0.3)
    assert "too slowly" in stopped.value.message and f"{MIN_BODY_BYTES_PER_S // 1024} KiB/s" in stopped.value.message
    assert stopped.value.close_connection


def test_a_body_at_a_steady_pace_above_the_minimum_is_taken_whole():
    # Twice the minimum pace, for longer than the grace: every chunk is taken.
    chunk = b"x" * (MIN_BODY_BYTES_PER_S // 10)
    seen = _run_guard(0.05, chunk, len(chunk) * 12, idle_timeout=0.2)
    assert sum(len(message["body"]) for message in seen) == len(chunk) * 12
    assert seen[-1]["more_body"] is False
