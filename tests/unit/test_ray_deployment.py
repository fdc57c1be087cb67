"""The Ray Serve config files, the KubeRay RayService and the application's options agree with the code.

No cluster is needed: Serve's own schema validates the configs, the import path is imported, the arguments
go through the same validation `serve run` applies, and the application graph is built (not deployed).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

from ray.serve import Application  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from server.config import Settings  # noqa: E402
from server.ray_serve.app import (  # noqa: E402
    INGRESS_HEADROOM,
    INGRESS_RETRY_AFTER_S,
    SHUTDOWN_GRACE_S,
    StepImageIngress,
    StepImageModel,
    build_app,
)
from server.ray_serve.options import DEPLOYMENT_SETTINGS, RayAppOptions  # noqa: E402
from server.ray_serve.remote import _image_from_payload, _image_payload  # noqa: E402

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = sorted((ROOT / "deploy" / "ray").glob("*.yaml"))
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
SETTING_ENV_NAMES = {f"STEPIMAGE_{name.upper()}" for name in Settings.model_fields} | {"STEPIMAGE_API_KEY"}


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def serve_configs() -> list[tuple[str, dict]]:
    configs = [(path.name, yaml.safe_load(path.read_text())) for path in SERVE_CONFIGS]
    configs.append((RAYSERVICE.name, yaml.safe_load(rayservice()["spec"]["serveConfigV2"])))
    return configs


def import_object(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_there_is_a_tiny_config_and_a_gpu_config():
    names = {path.name for path in SERVE_CONFIGS}
    assert {"stepimage-tiny.yaml", "stepimage.yaml"} <= names


@pytest.mark.parametrize("name, config", serve_configs(), ids=lambda value: value if isinstance(value, str) else "")
def test_serve_configs_are_valid_and_build_the_application(name, config):
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["route_prefix"] == "/"
    assert import_object(application["import_path"]) is build_app
    RayAppOptions.model_validate(application["args"])
    # The settings are `stepimage serve`'s own, by name.
    assert set(application["args"]["settings"]) <= set(Settings.model_fields)
    built = build_app(application["args"])
    assert isinstance(built, Application)


def test_gpu_configs_put_one_replica_on_each_gpu_and_the_tiny_one_on_cpus():
    for name, config in serve_configs():
        options = RayAppOptions.model_validate(config["applications"][0]["args"])
        settings = options.build_settings()
        if name == "stepimage-tiny.yaml":
            assert settings.backend == "tiny" and options.model_gpus == 0
            assert options.threads == 1
        else:
            assert settings.backend == "flux2-klein" and options.model_gpus == 1
            assert options.max_model_replicas > options.min_model_replicas  # autoscaled
            assert not settings.api_keys  # keys come from the hosts' environment, never the file
            # Several ingress replicas only with results in a bucket, where each serves every link.
            assert options.ingress_replicas == 1 or settings.storage == "s3"


def test_rayservice_runs_the_pinned_ray_with_weights_and_gpus_where_the_config_says():
    spec = rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    assert f"ray[serve]=={cluster['rayVersion']}" in extra
    assert cluster["rayVersion"] == ray.__version__
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    options = RayAppOptions.model_validate(args)
    settings = options.build_settings()

    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    (workers,) = cluster["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    (container,) = pod["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= options.model_gpus
    # A worker pod fits one model replica and an ingress replica.
    assert float(container["resources"]["limits"]["cpu"]) >= options.model_cpus + options.ingress_cpus
    assert workers["maxReplicas"] * gpus >= options.max_model_replicas * options.model_gpus
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[str(settings.weights_dir)]["readOnly"] is True
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes[mounts[str(settings.weights_dir)]["name"]]["persistentVolumeClaim"]["readOnly"] is True
    # Results go to a bucket, so every ingress replica serves every link.
    assert settings.storage == "s3" and settings.s3_bucket
    assert options.ingress_replicas > 1
    for group in (head["template"]["spec"], pod):
        for entry in group["containers"][0].get("env", []):
            assert entry["name"].startswith(("STEPIMAGE_", "HF_")), entry
            if entry["name"].startswith("STEPIMAGE_"):
                assert entry["name"] in SETTING_ENV_NAMES, entry
    # Keys and bucket credentials come from Secrets, never from the manifest.
    assert "api_keys" not in args["settings"]
    assert "AWS_SECRET_ACCESS_KEY" not in RAYSERVICE.read_text().split("kind: RayService")[1]
    secrets = [source["secretRef"]["name"] for source in container["envFrom"]]
    assert len(secrets) == 2
    # Every pod an ingress replica may land on has them: the head too (its num-cpus 0 keeps replicas off it only
    # while ingress_cpus > 0), or an ingress there would serve without keys.
    (head_container,) = head["template"]["spec"]["containers"]
    assert [source["secretRef"]["name"] for source in head_container["envFrom"]] == secrets
    assert head_container["env"] == container["env"]


def test_the_kuberay_image_adds_the_ray_extra_and_wget_to_the_project_image():
    dockerfile = (ROOT / "deploy" / "kuberay" / "Dockerfile").read_text()
    assert 'pip install --no-cache-dir -c /build/constraints.txt "/app[ray,s3]"' in dockerfile
    assert "COPY constraints.txt /build/" in (ROOT / "Dockerfile").read_text()
    assert "wget" in dockerfile
    images = {
        c["image"] for c in rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    }
    assert all(image.endswith("stepimage-ray:cuda") for image in images)


# -- the options' own checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        ({"settings": {"max_qeue": 4}}, "unknown setting(s) max_qeue"),
        ({"settings": {"port": 9000}}, "http_options"),
        ({"settings": {"max_connections": 64}}, "Ray Serve's proxy serves HTTP"),
        ({"settings": {"devices": ["cuda:0", "cuda:1"]}}, "one device"),
        ({"settings": {"max_queue": 0}}, "max_queue"),
        ({"min_model_replicas": 4, "max_model_replicas": 2}, "below min_model_replicas"),
        ({"model_replicas": 2}, "model_replicas"),  # a misspelt knob is an error, not ignored
        ({"backend_loader": "tests.ray.backends.load"}, "module:function"),
    ],
)
def test_bad_options_fail_before_anything_is_deployed(args, message):
    with pytest.raises(ValidationError) as failure:
        build_app(args)
    assert message in str(failure.value)


def test_replica_counts_become_servers_own_options():
    fixed = RayAppOptions.model_validate({"min_model_replicas": 3})
    assert fixed.replica_counts() == {"num_replicas": 3}
    scaled = RayAppOptions.model_validate(
        {"min_model_replicas": 1, "max_model_replicas": 4, "target_ongoing_requests": 3}
    )
    autoscaling = scaled.replica_counts()["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"], autoscaling["target_ongoing_requests"]) == (
        1,
        4,
        3,
    )
    settings = Settings(max_queue=5)
    assert scaled.model_capacity(settings) == 20
    assert scaled.queue_at_router(settings) == 5
    assert RayAppOptions.model_validate({"router_queue": 2}).queue_at_router(settings) == 2


def test_the_deployments_get_the_admission_bounds_from_the_settings():
    app = build_app({"settings": {"max_queue": 3}, "min_model_replicas": 2, "model_gpus": 1, "router_queue": 5})
    ingress = app._bound_deployment  # Serve's application graph: the ingress, bound to the model's application
    model = ingress.init_args[1]._bound_deployment
    assert (ingress.name, model.name) == (StepImageIngress.name, StepImageModel.name)
    assert model.max_ongoing_requests == 3
    # Serve's own queue bound is only a backstop, above the tier's size: the ingress keeps the bound exactly.
    assert model.max_queued_requests == 2 * 3 + 5
    assert ingress.init_args[2] == 5  # the ingress's router queue
    assert model.num_replicas == 2
    assert model.ray_actor_options["num_gpus"] == 1
    # The ingress is never the one that is full: it holds the model tier's capacity and room for downloads, probes
    # and refusals besides.
    assert ingress.max_ongoing_requests == 2 * 3 + 5 + INGRESS_HEADROOM
    # Were it full, each proxy would hold a bounded number of requests for it (not Serve's default, -1: without
    # bound), then answer 503 with a Retry-After.
    assert ingress.max_queued_requests == ingress.max_ongoing_requests
    backpressure = ingress._deployment_config.backpressure_config
    assert (backpressure.status_code, backpressure.retry_after_s) == (503, INGRESS_RETRY_AFTER_S)


def test_replicas_get_the_bounds_the_deployment_was_built_with_and_secrets_from_their_own_host(monkeypatch):
    """Serve's bounds come from the settings where the application is built; a replica on a host whose STEPIMAGE_*
    environment differs must still use the same ones, while keys stay each host's and never enter the arguments."""
    built_with = {"MAX_QUEUE": "3", "MAX_BATCH_SIZE": "2", "REQUEST_TIMEOUT": "90", "DRAIN_TIMEOUT": "7"}
    for name, value in {**built_with, "API_KEYS": "build-host-key"}.items():
        monkeypatch.setenv(f"STEPIMAGE_{name}", value)
    app = build_app({"settings": {"backend": "tiny"}, "min_model_replicas": 2})
    ingress = app._bound_deployment
    model = ingress.init_args[1]._bound_deployment
    assert model.max_ongoing_requests == 3 and ingress.init_args[2] == 3  # sized by the build's max_queue
    assert model._deployment_config.graceful_shutdown_timeout_s == 7 + SHUTDOWN_GRACE_S

    # A replica's host: other bounds and its own key in its environment.
    for name, value in {
        "MAX_QUEUE": "16",
        "MAX_BATCH_SIZE": "8",
        "REQUEST_TIMEOUT": "600",
        "DRAIN_TIMEOUT": "60",
    }.items():
        monkeypatch.setenv(f"STEPIMAGE_{name}", value)
    monkeypatch.setenv("STEPIMAGE_API_KEYS", "replica-host-key")
    for bound in (model.init_args[0], ingress.init_args[0]):
        assert set(bound) == {"backend", *DEPLOYMENT_SETTINGS}
        replica = Settings(**bound)
        assert (replica.max_queue, replica.max_batch_size, replica.request_timeout, replica.drain_timeout) == (
            3,
            2,
            90,
            7,
        )
        assert replica.backend == "tiny" and replica.api_keys == ["replica-host-key"]


# -- images between processes ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_images_cross_processes_unchanged(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).convert(mode)
    copy = _image_from_payload(_image_payload(image))
    assert copy.mode == image.mode and copy.size == image.size
    assert copy.tobytes() == image.tobytes()
    if mode == "P":
        assert copy.getpalette() == image.getpalette()
