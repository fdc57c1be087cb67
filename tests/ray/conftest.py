"""One real local Ray cluster for the whole session, running the stepimage Serve application.

`ray.init` with a small fixed resource count (4 logical CPUs, no dashboard, a small object store), Serve's
HTTP proxy on a free loopback port, and the application built from deploy/ray/stepimage-tiny.yaml's own
arguments with test overrides: two model replicas of the tiny backend, each wired to the probe
(tests/ray/backends.py), small queues so saturation is cheap to reach, and url results in a bucket of the
session's real S3 server (SeaweedFS, tests/s3server.py) with a short lifetime. Everything is shut down at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import free_port

ray = pytest.importorskip("ray", reason="the Ray tier needs the ray extra: pip install -e '.[ray]'")

from ray import serve  # noqa: E402

from tests.ray.backends import PROBE_NAME, PROBE_NAMESPACE, Probe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "deploy" / "ray" / "stepimage-tiny.yaml"
APP = "stepimage"
MODEL = "StepImageModel"
INGRESS = "StepImageIngress"
KEY = "ray-test-key"
SMALL = "64x64"
MODEL_REPLICAS = 2
MAX_QUEUE = 2
# Seconds a url result lives (longer than an ingress replica takes to be replaced, about 10 s on the busy 2-core
# machine), and between sweeps of expired ones: short, so that expiry and deletion can be seen.
URL_TTL = 30
SWEEP_INTERVAL = 1
ROUTER_QUEUE = 2
READY_TIMEOUT_S = 180.0


def config_args(path: Path = TINY_CONFIG) -> dict:
    return yaml.safe_load(path.read_text())["applications"][0]["args"]


def test_args(storage: dict) -> dict:
    """The tiny config's arguments, made small and observable for tests; `storage`: the result storage settings."""
    args = config_args()
    args["settings"].pop("storage_dir")
    args["settings"].update(
        api_keys=[KEY],
        **storage,
        url_ttl=URL_TTL,
        sweep_interval=SWEEP_INTERVAL,
        warmup=False,
        extra_sizes=[SMALL],
        max_queue=MAX_QUEUE,
        max_batch_size=1,
        request_timeout=60,
        drain_timeout=5,
    )
    args.update(
        min_model_replicas=MODEL_REPLICAS,
        model_cpus=1,
        ingress_cpus=0.5,
        router_queue=ROUTER_QUEUE,
        backend_loader="tests.ray.backends:load_probed_tiny",
        # A killed replica is noticed by its failed health check at the latest.
        health_check_period_s=1,
        health_check_timeout_s=10,
    )
    return args


@dataclass
class Cluster:
    base_url: str
    probe: object
    s3: object  # tests.s3server.S3Server
    bucket: str

    def events(self) -> list[dict]:
        return ray.get(self.probe.log.remote())

    @contextlib.contextmanager
    def gate_closed(self, free_polls: int = 0) -> Iterator[None]:
        """Jobs on the replicas wait at their step boundaries (after `free_polls` of them) until the block ends."""
        ray.get(self.probe.close_gate.remote(free_polls))
        try:
            yield
        finally:
            ray.get(self.probe.open_gate.remote())


def replica_tags(deployment: str = MODEL) -> set[str]:
    """Tags of the deployment's replicas whose actors are alive."""
    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return {
        actor["name"][len(prefix) :]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(prefix)
    }


def running_model_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[MODEL]
    return deployment.replica_states.get("RUNNING", 0)


def wait_ready(base_url: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"the Ray application was not ready after {timeout:.0f} s")


@pytest.fixture(scope="session")
def cluster(s3_server) -> Iterator[Cluster]:
    bucket = s3_server.new_bucket("ray")
    # The cluster's processes inherit this environment: no ambient STEPIMAGE_* setting may leak into the
    # application under test. The replicas find the probe's module in this checkout, and the bucket's
    # credentials where an operator puts them, in AWS_* variables.
    saved = {key: os.environ.pop(key) for key in list(os.environ) if key.startswith("STEPIMAGE_")}
    try:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=128 * 1024 * 1024,
            namespace=PROBE_NAMESPACE,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **s3_server.env()}},
        )
    finally:
        os.environ.update(saved)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        probe = Probe.options(name=PROBE_NAME, namespace=PROBE_NAMESPACE).remote()
        from server.ray_serve.app import build_app

        serve.run(build_app(test_args(s3_server.settings(bucket))), name=APP, route_prefix="/")
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url)
        yield Cluster(base_url=base_url, probe=probe, s3=s3_server, bucket=bucket)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def http(cluster: Cluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.base_url, timeout=60.0, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.fixture(scope="session")
def sdk(cluster: Cluster):
    from openai import OpenAI

    with OpenAI(api_key=KEY, base_url=f"{cluster.base_url}/v1", max_retries=0, timeout=60.0) as client:
        yield client
