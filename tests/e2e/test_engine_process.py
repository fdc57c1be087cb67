"""The engine seen from outside a real server process: SIGTERM drains, a client that hangs up frees the GPU."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.conftest import metric, wait_for
from tests.e2e.conftest import free_port, launch, wait_ready

pytestmark = pytest.mark.e2e

# Long enough on the tiny model (about 2 s on 2 cores) for a test to act while it runs.
SLOW = {"prompt": "a slow one", "size": "1024x1024", "steps": 16, "seed": 1, "response_format": "b64_json"}
QUICK = {"prompt": "a quick one", "size": "64x64", "steps": 1, "seed": 2, "response_format": "b64_json"}


@pytest.fixture
def own_server(tmp_path):
    port = free_port()
    args = ["--backend", "tiny", "--host", "127.0.0.1", "--port", str(port), "--storage-dir", str(tmp_path / "files"),
            "--extra-size", "64x64", "--no-warmup", "--drain-timeout", "60"]  # fmt: skip
    server = launch("engine", port, args, tmp_path)
    wait_ready(server)
    yield server
    server.stop()


def test_sigterm_drains_accepted_work_refuses_new_work_and_exits_0(own_server):
    outcome = {}
    with httpx.Client(base_url=own_server.base_url, timeout=60) as http:
        worker = threading.Thread(
            target=lambda: outcome.setdefault("slow", http.post("/v1/images/generations", json=SLOW))
        )
        worker.start()
        wait_for(lambda: metric(http, "stepimage_in_flight") == 1, timeout=30)
        own_server.proc.terminate()
        # Still listening while it drains: readiness says no, new work is refused with a reason to retry.
        wait_for(lambda: http.get("/ready").status_code == 503, timeout=30)
        refused = http.post("/v1/images/generations", json=QUICK)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "not_ready"
        assert refused.headers["retry-after"]
        worker.join(60)
    assert outcome["slow"].status_code == 200
    assert own_server.proc.wait(60) == 0


def test_a_client_that_hangs_up_frees_the_gpu_for_the_next(own_server):
    with httpx.Client(base_url=own_server.base_url, timeout=60) as http:
        with pytest.raises(httpx.ReadTimeout):
            # The client gives up long before a 40-step 1 MP image is done, and closes the connection.
            httpx.post(own_server.base_url + "/v1/images/generations", json={**SLOW, "steps": 40}, timeout=0.5)
        wait_for(lambda: metric(http, "stepimage_cancellations_total") == 1, timeout=30)
        wait_for(lambda: metric(http, "stepimage_in_flight") == 0, timeout=30)
        quick = http.post("/v1/images/generations", json=QUICK)
        assert quick.status_code == 200
