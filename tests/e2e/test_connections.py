"""Slow and hostile clients against a real `stepimage serve` process: header and body timeouts, the connection cap,
protocol-level rejections in the API's envelope, a client that leaves mid-upload.

A dedicated server runs with a small cap and short timeouts so that each behaviour shows within seconds; the
bounds asserted are generous multiples of those timeouts, never a measure of speed.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.conftest import wait_for
from tests.e2e.conftest import MAIN_KEYS, ServerProcess, free_port, launch, wait_ready
from tests.e2e.raw_http import assert_envelope, connect, exchange, parse, read_until_closed

pytestmark = pytest.mark.e2e

CAP = 4
HEADER_TIMEOUT_S = 5
BODY_TIMEOUT_S = 2
# A closed connection must be seen well within this: several times the timeout that closes it.
CLOSED_WITHIN_S = 60


@pytest.fixture(scope="module")
def guarded(tmp_path_factory) -> ServerProcess:
    tmp = tmp_path_factory.mktemp("guarded")
    port = free_port()
    args = ["--backend", "tiny", "--host", "127.0.0.1", "--port", str(port), "--storage-dir", str(tmp / "files"),
            "--no-warmup", "--extra-size", "64x64", "--max-connections", str(CAP),
            "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
            "--log-level", "debug"]  # fmt: skip
    server = launch("guarded", port, args, tmp)
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


def test_a_silent_connection_is_closed_by_the_header_timeout(guarded):
    with connect(guarded.port) as silent:
        opened = time.monotonic()
        assert read_until_closed(silent, CLOSED_WITHIN_S) == b""
        # Not before the timeout: an ordinary client is never cut off early.
        assert time.monotonic() - opened >= HEADER_TIMEOUT_S * 0.8


def test_a_slowloris_head_gets_408_even_while_bytes_keep_coming(guarded):
    head = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Slow: " + b"a" * 200
    with connect(guarded.port) as slow:
        opened = time.monotonic()
        answer = b""
        for byte in head:
            # One byte every 0.1 s: each one arrives well within any per-read idle timeout.
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            slow.settimeout(0.1)
            try:
                answer = slow.recv(65536)
            except TimeoutError:
                continue
            break
        assert time.monotonic() - opened < CLOSED_WITHIN_S
        answer += read_until_closed(slow, CLOSED_WITHIN_S)
    assert_envelope(parse(answer), 408, "request_timeout")


def test_a_body_that_stops_arriving_gets_408(guarded):
    stalled = exchange(
        guarded.port,
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b'Content-Length: 500\r\n\r\n{"prompt": "never fin',
        timeout=CLOSED_WITHIN_S,
    )
    error = assert_envelope(stalled, 408, "request_timeout")
    assert f"{BODY_TIMEOUT_S} seconds" in error["message"]


def test_a_body_dripped_a_byte_at_a_time_gets_408_though_no_gap_reaches_the_timeout(guarded):
    with connect(guarded.port) as slow:
        slow.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        opened = time.monotonic()
        answer = b""
        while time.monotonic() - opened < CLOSED_WITHIN_S:
            # A byte every half of the body timeout: no single gap is long enough to be an idle body.
            try:
                slow.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                break
            slow.settimeout(BODY_TIMEOUT_S / 2)
            try:
                answer = slow.recv(65536)
            except TimeoutError:
                continue
            break
        answer += read_until_closed(slow, CLOSED_WITHIN_S)
    error = assert_envelope(parse(answer), 408, "request_timeout")
    assert "too slowly" in error["message"] and "KiB/s" in error["message"]


def test_the_connection_cap_answers_503_and_frees_up_when_slow_clients_are_cut(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
    # CAP connections that say nothing hold every slot; the next request is refused with the envelope.
    holders = [connect(guarded.port) for _ in range(CAP)]
    try:
        time.sleep(0.2)
        refused = httpx.get(guarded.base_url + "/health", timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "too_many_connections"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["connection"] == "close"
        # The header timeout closes the silent ones, and the server serves again.
        for holder in holders:
            assert read_until_closed(holder, CLOSED_WITHIN_S) == b""
    finally:
        for holder in holders:
            holder.close()
    wait_for(lambda: httpx.get(guarded.base_url + "/health", timeout=30).status_code == 200, timeout=30)
    log = guarded.log_path.read_text()
    assert re.search(rf"request\(s\) refused with 503: \d+ connections open, --max-connections is {CAP}", log)


def test_probes_are_logged_at_debug_and_no_progress_bar_leaks(guarded):
    with httpx.Client(base_url=guarded.base_url, timeout=30) as http:
        assert http.get("/health").status_code == 200
    log = guarded.log_path.read_text()
    assert re.search(r"DEBUG server\.app: request_id=\S+ method=GET path=/health status=200", log)
    assert not re.search(r"INFO server\.app: request_id=\S+ method=GET path=/(health|ready)", log)
    # tqdm draws "xx%|####| n/m [..it/s]" while diffusers and transformers save and load the model.
    assert "it/s]" not in log and "%|" not in log, guarded.log_tail()
    # Nothing reaches the log around our format: not torch's own "W1123 ..." lines, not the library advice that
    # diffusers and torchao print with their own handlers when torchao (the fp8 extra) is installed.
    ours = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
    foreign = [line for line in log.splitlines() if line.strip() and not ours.match(line)]
    assert not foreign, foreign[:5]


# -- against the shared, flag-configured server ------------------------------------------------------------------


def requests_total(http: httpx.Client, status: int) -> float:
    text = http.get("/metrics").text
    found = re.findall(rf'^stepimage_requests_total{{route="[^"]*",status="{status}"}} (\S+)$', text, flags=re.M)
    return sum(float(value) for value in found)


def test_protocol_level_rejections_use_the_envelope_and_oversized_heads_get_431(server):
    oversized = exchange(
        server.port, b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 1024 * 1024 + b"\r\n\r\n"
    )
    assert "16 KiB" in assert_envelope(oversized, 431, "headers_too_large")["message"]
    many = b"".join(b"X-Header-%d: %s\r\n" % (index, b"b" * 100) for index in range(400))
    assert_envelope(exchange(server.port, b"GET /health HTTP/1.1\r\nHost: test\r\n" + many + b"\r\n"), 431)
    for bad in (
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",  # no Host
        b"GET /health HTTP/1.1\r\nHost: test\r\nBad Header Name: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: test\r\nBad Header Name: " + b"x" * 12000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS handshake on the plain port
    ):
        error = assert_envelope(exchange(server.port, bad), 400, "invalid_http")
        # h11 quotes the offending line; the answer quotes it bounded, as it does any client's text.
        assert len(error["message"]) < 300, error["message"]
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        assert http.get("/health").status_code == 200


def test_a_client_gone_mid_upload_is_a_499_cancellation_not_a_500(server):
    with httpx.Client(
        base_url=server.base_url, timeout=30, headers={"Authorization": f"Bearer {MAIN_KEYS[0]}"}
    ) as http:
        before_499, before_500 = requests_total(http, 499), requests_total(http, 500)
        log_before = server.log_path.read_text()
        with connect(server.port) as leaving:
            leaving.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + MAIN_KEYS[0].encode() + b"\r\n"
                b'Content-Length: 100000\r\n\r\n{"prompt": "' + b"a" * 1000
            )
            time.sleep(0.3)
        wait_for(lambda: requests_total(http, 499) == before_499 + 1, timeout=30)
        assert requests_total(http, 500) == before_500
    added = server.log_path.read_text()[len(log_before) :]
    assert "Traceback" not in added and "ClientDisconnect" not in added, added
    assert len(re.findall(r"path=/v1/images/generations status=499", added)) == 1, added
