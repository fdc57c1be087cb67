"""The app in-process (TestClient) around the shared tiny backend, with per-test settings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from pipelines.base import Cancelled
from server.app import create_app
from server.config import Settings

SMALL = "64x64"


@pytest.fixture
def make_client(tiny_backend, tmp_path) -> Callable[..., TestClient]:
    """Build a started TestClient; keyword arguments override Settings fields."""
    opened: list[TestClient] = []

    def build(backend=tiny_backend, **overrides) -> TestClient:
        values = dict(storage_dir=tmp_path / "files", warmup=False, extra_sizes=[SMALL])
        values.update(overrides)
        client = TestClient(create_app(Settings(**values), backend=backend), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        wait_ready(client)
        return client

    yield build
    for client in opened:
        client.__exit__(None, None, None)


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError("the app never became ready")


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def assert_error(response, status: int, param: str | None, code: str | None = None) -> dict:
    """The response is an OpenAI error envelope with this status, param and (optionally) code."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"]
    assert "x-request-id" in response.headers
    return error


class GatedBackend:
    """The tiny backend behind a gate: records every request, and holds each job until the gate opens.

    Lets tests fill the queue, pass a deadline or poll /health while a job is provably in flight.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.info = inner.info
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.requests = []

    def _hold(self, requests, cancel) -> None:
        """Record the job, then wait at the gate, giving up if the job is cancelled meanwhile."""
        self.requests.extend(requests)
        self.started.set()
        while not self.gate.wait(0.01):
            if cancel is not None and cancel.is_set():
                raise Cancelled()

    def generate(self, request, cancel=None):
        self._hold([request], cancel)
        return self.inner.generate(request, cancel)

    def warm_up(self, sizes, progress=None):
        self.inner.warm_up(sizes, progress)


@pytest.fixture
def gated(tiny_backend) -> GatedBackend:
    backend = GatedBackend(tiny_backend)
    yield backend
    backend.gate.set()


class GatedBatchingBackend(GatedBackend):
    """A gated backend that batches like the real one and records each pipeline call's requests."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.batches: list[list] = []

    def batch_key(self, request):
        return self.inner.batch_key(request)

    def generate_batch(self, requests, cancel=None):
        self.batches.append(list(requests))
        self._hold(requests, cancel)
        return self.inner.generate_batch(requests, cancel)
