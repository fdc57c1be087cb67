"""Stopping a real `stepimage serve` process: what each signal does, what every open request hears, the exit status.

The first signal drains (tests/e2e/test_engine_process.py shows accepted work finishing and exit 0). Here: a second
signal, a drain timeout that runs out, and a model that cannot load. Each open request must get the API's 503
envelope with Retry-After, never a dropped connection or a plain-text 500, and the log must hold no traceback.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from server.cli import EXIT_CUT_SHORT, EXIT_LOAD_FAILED
from tests.conftest import metric, wait_for
from tests.e2e.conftest import free_port, launch, wait_ready
from tests.e2e.raw_http import assert_envelope as assert_raw_envelope
from tests.e2e.raw_http import connect, parse, read_until_closed

pytestmark = pytest.mark.e2e

# 50 steps at 2048x2048 take minutes on the tiny model on 2 cores: a request that is answered within the bounds
# below was provably cut short, not finished.
LONG = {"prompt": "a long one", "size": "2048x2048", "steps": 50, "seed": 1, "response_format": "b64_json"}
# Generous bounds for "promptly": far below the work's own duration, far above any scheduling hiccup.
ANSWER_WITHIN_S = 60


def start(tmp_path, *extra: str):
    port = free_port()
    args = ["--backend", "tiny", "--host", "127.0.0.1", "--port", str(port), "--storage-dir", str(tmp_path / "files"),
            "--no-warmup", "--extra-size", "2048x2048", "--max-batch-size", "1", *extra]  # fmt: skip
    server = launch("shutdown", port, args, tmp_path)
    wait_ready(server)
    return server


def assert_shutting_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "not_ready"
    assert int(response.headers["retry-after"]) >= 1


def assert_clean_log(server) -> None:
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "CancelledError" not in log, server.log_tail()


def busy_server(server):
    """One request running, one queued behind it, one still uploading its body; returns their outcomes."""
    outcome: dict[str, httpx.Response] = {}

    def post(name: str, body: dict) -> None:
        with httpx.Client(base_url=server.base_url, timeout=300) as own:
            outcome[name] = own.post("/v1/images/generations", json=body)

    threads = [threading.Thread(target=post, args=("running", LONG))]
    threads[0].start()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        wait_for(lambda: metric(http, "stepimage_in_flight") == 1, timeout=60)
        threads.append(threading.Thread(target=post, args=("queued", {**LONG, "seed": 2})))
        threads[1].start()
        wait_for(lambda: metric(http, "stepimage_queue_depth") == 1, timeout=60)
    upload = connect(server.port)
    upload.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"prompt": "still uploading'
    )
    return threads, outcome, upload


def assert_all_answered_and_exit_cut_short(server, threads, outcome, upload) -> None:
    for thread in threads:
        thread.join(ANSWER_WITHIN_S)
    assert_shutting_down(outcome["running"])
    assert_shutting_down(outcome["queued"])
    # The upload never finished: it is answered too, once the grace for open requests is over.
    assert_raw_envelope(parse(read_until_closed(upload, ANSWER_WITHIN_S)), 503, "not_ready")
    assert server.proc.wait(ANSWER_WITHIN_S) == EXIT_CUT_SHORT


def test_a_second_signal_answers_every_open_request_503_and_exits_4(tmp_path):
    server = start(tmp_path)
    threads, outcome, upload = busy_server(server)
    try:
        server.proc.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=server.base_url, timeout=30) as http:
            # Draining: still listening, refusing new work; the running request goes on.
            wait_for(lambda: http.get("/ready").status_code == 503, timeout=30)
            assert metric(http, "stepimage_in_flight") == 1
        stopped_at = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert_all_answered_and_exit_cut_short(server, threads, outcome, upload)
        assert time.monotonic() - stopped_at < ANSWER_WITHIN_S
    finally:
        upload.close()
        server.stop()
    assert_clean_log(server)
    log = server.log_path.read_text()
    assert "SIGINT again: stopping now" in log and "answered 503" in log


def test_requests_left_when_the_drain_timeout_runs_out_get_503_not_a_plain_500(tmp_path):
    server = start(tmp_path, "--drain-timeout", "1")
    threads, outcome, upload = busy_server(server)
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert_all_answered_and_exit_cut_short(server, threads, outcome, upload)
    finally:
        upload.close()
        server.stop()
    assert_clean_log(server)
    assert "still unfinished after 1 s: answering them 503" in server.log_path.read_text()


def test_a_model_that_cannot_load_exits_1_without_posing_as_a_signal(tmp_path):
    port = free_port()
    empty = tmp_path / "no-weights"
    empty.mkdir()
    args = ["--backend", "flux2-klein", "--weights-dir", str(empty), "--host", "127.0.0.1", "--port", str(port),
            "--storage-dir", str(tmp_path / "files")]  # fmt: skip
    server = launch("no-weights", port, args, tmp_path, env_overrides={"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    try:
        assert server.proc.wait(120) == EXIT_LOAD_FAILED
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "the model could not be loaded" in log and "stepimage weights pull" in log
    assert "SIG" not in log and "signal" not in log and "draining" not in log, log
    assert_clean_log(server)
