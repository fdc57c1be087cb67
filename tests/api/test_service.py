"""Keys, stored files, readiness, queueing, deadlines, body limits and the error envelope for everything."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pipelines.base import ModelLoadError
from server.app import create_app
from server.config import Settings
from tests.api.conftest import SMALL, assert_error, wait_ready
from tests.conftest import assert_same_image_across_batches, image_bytes

pytestmark = pytest.mark.api

BODY = {"prompt": "a lighthouse", "size": SMALL, "steps": 1}


def post(client, headers=None, **fields):
    return client.post("/v1/images/generations", json={**BODY, **fields}, headers=headers or {})


# -- API keys -------------------------------------------------------------------------------------


def test_keys_guard_the_image_and_model_routes(make_client):
    client = make_client(api_keys=["key-a", "key-b"])
    assert_error(post(client), 401, None, "invalid_api_key")
    assert_error(post(client, {"authorization": "Bearer wrong"}), 401, None, "invalid_api_key")
    assert_error(post(client, {"authorization": "Basic key-a"}), 401, None, "invalid_api_key")
    assert post(client, {"authorization": "Bearer key-a"}).status_code == 200
    assert post(client, {"authorization": "Bearer key-b"}).status_code == 200
    edit = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", image_bytes(64, 64))})
    assert_error(edit, 401, None, "invalid_api_key")
    assert_error(client.get("/v1/models"), 401, None, "invalid_api_key")
    assert client.get("/v1/models", headers={"authorization": "Bearer key-b"}).status_code == 200
    # Liveness, readiness, metrics and stored files need no key.
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200


def test_key_error_does_not_echo_the_key(make_client):
    client = make_client(api_keys=["secret-key"])
    response = post(client, {"authorization": "Bearer secret-kez"})
    assert "secret" not in response.text


def test_metrics_can_require_a_key(make_client):
    client = make_client(api_keys=["k"], metrics_require_key=True)
    assert_error(client.get("/metrics"), 401, None, "invalid_api_key")
    response = client.get("/metrics", headers={"authorization": "Bearer k"})
    assert response.status_code == 200
    assert "stepimage_requests_total" in response.text


def test_open_server_without_keys(client):
    assert post(client).status_code == 200


# -- stored results -------------------------------------------------------------------------------


def test_url_results_are_served_without_a_key(make_client):
    client = make_client(api_keys=["k"])
    response = post(client, {"authorization": "Bearer k"})
    url = response.json()["data"][0]["url"]
    assert url.startswith("http://testserver/v1/images/files/")
    name = url.rsplit("/", 1)[1]
    # 32 url-safe characters = 192 random bits.
    assert len(name.split(".")[0]) == 32
    fetched = client.get(url)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.content.startswith(b"\x89PNG")


def test_url_uses_the_public_url(make_client):
    client = make_client(public_url="https://images.example.com/")
    url = post(client).json()["data"][0]["url"]
    assert url.startswith("https://images.example.com/v1/images/files/")


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_stored_files_keep_their_format(client, fmt):
    url = post(client, output_format=fmt).json()["data"][0]["url"]
    assert client.get(url).headers["content-type"] == f"image/{fmt}"


def test_expired_files_are_404_and_deleted(make_client, tmp_path):
    client = make_client(url_ttl=60)
    url = post(client).json()["data"][0]["url"]
    name = url.rsplit("/", 1)[1]
    path = tmp_path / "files" / name
    assert path.exists()
    old = time.time() - 61
    os.utime(path, (old, old))
    assert_error(client.get(url), 404, None, "not_found")
    assert not path.exists()


def test_unknown_and_malformed_file_names_are_404(client):
    for name in ("A" * 32 + ".png", "../../etc/passwd", "..%2F..%2Fsecret.png", "x.png"):
        response = client.get(f"/v1/images/files/{name}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


# -- errors for everything ------------------------------------------------------------------------


def test_unknown_routes_and_methods_use_the_envelope(client):
    assert_error(client.get("/v1/nothing"), 404, None, "not_found")
    assert_error(client.get("/v1/images/generations"), 405, None, "method_not_allowed")
    assert_error(client.delete("/health"), 405, None, "method_not_allowed")


def test_request_id_is_echoed_or_made(client):
    assert client.get("/health").headers["x-request-id"]
    assert client.get("/health", headers={"x-request-id": "trace-123"}).headers["x-request-id"] == "trace-123"
    # An id that could smuggle text into logs or headers is replaced.
    assert client.get("/health", headers={"x-request-id": "bad id\twith spaces"}).headers["x-request-id"] != (
        "bad id\twith spaces"
    )


class ExplodingBackend:
    """A backend whose failure message holds things a client must never see."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info
        self.explode = True

    def generate(self, request, cancel=None):
        if self.explode:
            raise RuntimeError("CUDA failure in /opt/secret/path/model.py with key sk-123")
        return self.inner.generate(request, cancel)

    def warm_up(self, sizes, progress=None):
        pass


def test_unexpected_failures_are_a_short_500(make_client, tiny_backend):
    backend = ExplodingBackend(tiny_backend)
    client = make_client(backend=backend)
    response = post(client)
    error = assert_error(response, 500, None, "internal_error")
    assert error["type"] == "server_error"
    assert response.headers["x-request-id"] in error["message"]
    for leak in ("/opt/secret", "sk-123", "Traceback", "RuntimeError"):
        assert leak not in response.text
    backend.explode = False
    assert post(client).status_code == 200


def test_bodies_over_the_limit_get_413(make_client):
    client = make_client(max_body_mb=0.05)
    big = image_bytes(400, 400)  # ~480 kB of noise
    response = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("a.png", big)})
    assert_error(response, 413, None, "request_too_large")
    response = client.post("/v1/images/generations", json={**BODY, "prompt": "x" * 100_000})
    assert_error(response, 413, None, "request_too_large")
    assert post(client).status_code == 200


def test_streamed_body_without_length_is_still_limited(make_client):
    client = make_client(max_body_mb=0.01)

    def chunks():
        for _ in range(100):
            yield b"x" * 1024

    response = client.post("/v1/images/generations", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, None, "request_too_large")


# -- readiness, queueing, deadlines ----------------------------------------------------------------


def test_not_ready_until_loaded_then_ready(tiny_backend, tmp_path):
    release = threading.Event()

    def slow_loader(settings, device):
        release.wait(10)
        return tiny_backend

    from fastapi.testclient import TestClient

    app = create_app(Settings(storage_dir=tmp_path, warmup=False, extra_sizes=[SMALL]), backend_loader=slow_loader)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
        assert_error(response, 503, None, "not_ready")
        assert response.headers["retry-after"]
        assert_error(post(client), 503, None, "not_ready")
        release.set()
        wait_ready(client)
        assert post(client).status_code == 200


def test_load_failure_keeps_ready_at_503_with_a_reason(tmp_path):
    def failing_loader(settings, device):
        raise ModelLoadError("no diffusers pipeline at /somewhere")

    from fastapi.testclient import TestClient

    app = create_app(Settings(storage_dir=tmp_path, warmup=False), backend_loader=failing_loader)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while app.state.stepimage.load_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        error = assert_error(client.get("/ready"), 503, None, "not_ready")
        assert "failed to load" in error["message"]
        assert "/somewhere" not in error["message"]


def test_warm_up_runs_every_size_before_ready(make_client, tiny_backend):
    class CountingWarmUp(ExplodingBackend):
        def warm_up(self, sizes, progress=None):
            self.sizes = list(sizes)

    backend = CountingWarmUp(tiny_backend)
    make_client(backend=backend, warmup=True, extra_sizes=["128x256"])
    assert backend.sizes == [(1024, 1024), (768, 1360), (896, 1184), (1360, 768), (1184, 896), (128, 256)]


def test_ready_turns_503_while_draining(client):
    client.app.state.stepimage.draining = True
    assert_error(client.get("/ready"), 503, None, "not_ready")


def _in_background(fn):
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("response", fn()))
    thread.start()
    return thread, outcome


def test_health_answers_while_an_image_is_being_made(make_client, gated):
    client = make_client(backend=gated)
    gated.gate.clear()
    thread, outcome = _in_background(lambda: post(client))
    assert gated.started.wait(10)
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    gated.gate.set()
    thread.join(30)
    assert outcome["response"].status_code == 200


def test_full_queue_gets_429_with_retry_after(make_client, gated):
    client = make_client(backend=gated, max_queue=1)
    gated.gate.clear()
    thread, outcome = _in_background(lambda: post(client, seed=1))
    assert gated.started.wait(10)
    response = post(client, seed=2)
    error = assert_error(response, 429, None, "server_overloaded")
    assert error["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
    gated.gate.set()
    thread.join(30)
    # The accepted request's work is not lost, and the queue frees up.
    assert outcome["response"].status_code == 200
    assert post(client, seed=3).status_code == 200


def test_deadline_gives_504_and_the_server_recovers(make_client, gated):
    # The short deadline is the client's own, so the request after it has the server's roomy one, however slow the
    # machine running the test.
    client = make_client(backend=gated, request_timeout=60)
    gated.gate.clear()
    response = client.post(
        "/v1/images/generations", json={"prompt": "late", "size": "64x64"}, headers={"x-request-timeout": "0.3"}
    )
    error = assert_error(response, 504, None, "timeout")
    assert error["type"] == "server_error"
    gated.gate.set()
    assert post(client).status_code == 200


def test_concurrent_requests_do_not_corrupt_each_other(client):
    expected = {seed: post(client, seed=seed, response_format="b64_json").json() for seed in (1, 2, 3)}
    results = {}
    threads = [
        threading.Thread(
            target=lambda s=seed: results.setdefault(s, post(client, seed=s, response_format="b64_json").json())
        )
        for seed in (1, 2, 3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for seed in (1, 2, 3):
        # Concurrent requests may have been batched together.
        assert_same_image_across_batches(results[seed]["data"][0]["b64_json"], expected[seed]["data"][0]["b64_json"])


# -- models and metrics ---------------------------------------------------------------------------


def test_models_list(make_client):
    client = make_client(model_aliases=["alias-1"])
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    ids = [entry["id"] for entry in body["data"]]
    assert ids == ["step-image-edit-2", "alias-1"]
    for entry in body["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert entry["owned_by"]
        # The tiny model says loudly that it is not a real one.
        assert entry["random_weights"] is True


def test_metrics_count_requests_and_stages(client):
    post(client)
    text = client.get("/metrics").text
    assert 'stepimage_requests_total{route="/v1/images/generations",status="200"}' in text
    assert 'stepimage_stage_seconds_count{stage="denoise"}' in text
    assert "stepimage_ready 1.0" in text
