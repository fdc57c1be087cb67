"""create_app with an external engine (what the Ray ingress uses): the app loads nothing, serves every image
request through that engine and its metrics, follows its readiness both ways, and drains it on shutdown.

The external engine here is the real Engine with the shared tiny backend behind the external interface,
with a readiness the test sets; tests/ray runs the real RemoteEngine on a Ray cluster.
"""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from server import app as app_module
from server.app import create_app
from server.config import Settings
from server.engine import Engine, encode_outcome
from server.metrics import Metrics
from tests.api.conftest import SMALL
from tests.conftest import metric, wait_for

pytestmark = pytest.mark.api


class EngineBehindTheInterface:
    def __init__(self, backend) -> None:
        self.metrics = Metrics()
        self.inner = Engine(max_queue=4, request_timeout=30, metrics=self.metrics)
        self.model = backend
        self.replicas_ready = False
        self.drained = False
        self.submitted = 0

    @property
    def backend(self):
        return self.inner.backend

    @property
    def outstanding(self) -> int:
        return self.inner.outstanding

    async def submit(self, request, *, timeout=None, disconnected=None, on_partial=None, encoding=None):
        self.submitted += 1
        outcome = await self.inner.submit(request, timeout=timeout, disconnected=disconnected)
        # As a remote engine does: the images come back encoded, and the app serves those bytes.
        self.sent = encode_outcome(outcome, encoding)
        return self.sent

    async def ready(self) -> bool:
        if not self.inner.workers:
            self.inner.start([("cpu", self.model)])
        return self.replicas_ready

    def stop_accepting(self) -> None:
        self.inner.stop_accepting()

    async def wait_idle(self, timeout: float) -> bool:
        return await self.inner.wait_idle(timeout)

    async def drain(self, timeout: float) -> None:
        self.drained = True
        await self.inner.drain(timeout)

    async def fail_all(self, error) -> int:
        return await self.inner.fail_all(error)


@pytest.fixture
def external(tiny_backend, monkeypatch) -> EngineBehindTheInterface:
    monkeypatch.setattr(app_module, "READINESS_POLL_SECONDS", 0.02)
    return EngineBehindTheInterface(tiny_backend)


def test_the_app_follows_the_engines_readiness_and_serves_through_it(external, tmp_path):
    settings = Settings(storage_dir=tmp_path, warmup=False, extra_sizes=[SMALL])
    with TestClient(create_app(settings, engine=external), raise_server_exceptions=False) as client:
        not_ready = client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["error"]["code"] == "not_ready"
        external.replicas_ready = True
        wait_for(lambda: client.get("/ready").status_code == 200)
        assert metric(client, "stepimage_ready") == 1

        body = {"prompt": "a kite", "size": SMALL, "steps": 1, "seed": 3, "response_format": "b64_json"}
        response = client.post("/v1/images/generations", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["seed"] == 3
        assert external.submitted == 1
        assert base64.b64decode(response.json()["data"][0]["b64_json"]) == external.sent.encoded[0]
        assert response.json()["size"] == SMALL
        # The app's metrics are the engine's: one registry, counted by both.
        assert external.metrics.images.labels("generation")._value.get() == 1
        assert metric(client, 'stepimage_images_generated_total{kind="generation"}') == 1
        assert client.get("/v1/models").json()["data"][0]["backend"] == "tiny"

        external.replicas_ready = False
        wait_for(lambda: client.get("/ready").status_code == 503)
        assert metric(client, "stepimage_ready") == 0
    assert external.drained


def test_an_external_engine_excludes_a_local_backend(external, tiny_backend, tmp_path):
    settings = Settings(storage_dir=tmp_path)
    with pytest.raises(ValueError, match="external engine"):
        create_app(settings, backend=tiny_backend, engine=external)
    with pytest.raises(ValueError, match="external engine"):
        create_app(settings, backend_loader=lambda settings, device: tiny_backend, engine=external)
