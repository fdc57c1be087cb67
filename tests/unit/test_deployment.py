"""The Dockerfile and compose files agree with the project: commands, settings, paths, ports, health checks.

No Docker engine is needed: the files are read as text and YAML and checked against the code.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from server.app import create_app
from server.cli import build_parser
from server.config import Settings
from weights.manifest import get_checkpoint

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.multi-gpu.yml")
SETTING_ENV_NAMES = {f"STEPIMAGE_{name.upper()}" for name in Settings.model_fields} | {"STEPIMAGE_API_KEY"}
# Variables compose itself substitutes on the host, not settings of the server.
HOST_VARIABLES = {"STEPIMAGE_HOST_PORT", "STEPIMAGE_MODELS_DIR", "STEPIMAGE_GPU"}


def compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def dockerfile_env() -> dict[str, str]:
    values: dict[str, str] = {}
    for block in re.findall(r"^ENV (.+?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S):
        for token in shlex.split(block.replace("\\\n", " ")):
            key, _, value = token.partition("=")
            values[key] = value
    return values


def app_paths(tmp_path: Path) -> set[str]:
    app = create_app(Settings(storage_dir=tmp_path), backend=None)
    return {path for path in app.openapi()["paths"]}


def services() -> list[tuple[str, str, dict]]:
    return [
        (name, service_name, service)
        for name in COMPOSE_FILES
        for service_name, service in compose(name)["services"].items()
    ]


def test_entry_point_is_the_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["stepimage"]' in DOCKERFILE
    assert "stepimage" in scripts
    build_parser().parse_args(["serve"])


def test_every_variant_has_a_base_stage():
    variant = re.search(r"^ARG VARIANT=(\w+)", DOCKERFILE, flags=re.M).group(1)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", DOCKERFILE, flags=re.M))
    assert "FROM ${VARIANT}-base AS app" in DOCKERFILE
    assert {f"{variant}-base", "cuda-base", "cpu-base"} <= stages
    for name, _, service in services():
        args = (service.get("build") or {}).get("args", {})
        if "VARIANT" in args:
            assert f"{args['VARIANT']}-base" in stages, name


def test_copied_sources_exist():
    for source in re.findall(r"^COPY (\S+) ", DOCKERFILE, flags=re.M):
        assert (ROOT / source).exists(), source
    for line in re.findall(r"^COPY (.+) \./$", DOCKERFILE, flags=re.M):
        for source in line.split():
            assert (ROOT / source).exists(), source


def test_dockerfile_environment_names_settings_and_serves_offline():
    env = dockerfile_env()
    assert env["HF_HUB_OFFLINE"] == "1"
    for key in env:
        if key.startswith("STEPIMAGE_"):
            assert key in SETTING_ENV_NAMES, key
    assert f"EXPOSE {env['STEPIMAGE_PORT']}" in DOCKERFILE
    assert env["STEPIMAGE_HOST"] == "0.0.0.0"
    assert "USER stepimage" in DOCKERFILE


def test_health_checks_probe_readiness_on_the_served_port(tmp_path):
    paths = app_paths(tmp_path)
    port = dockerfile_env()["STEPIMAGE_PORT"]
    docker_check = re.search(r"HEALTHCHECK .*?CMD (.+)$", DOCKERFILE, flags=re.S | re.M).group(1)
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", docker_check)
    assert (url.group(1), url.group(2)) == (port, "/ready")
    assert "/ready" in paths
    for name, service_name, service in services():
        if "healthcheck" in service:
            test = " ".join(service["healthcheck"]["test"])
            assert f"http://127.0.0.1:{port}/ready" in test, (name, service_name)


def test_compose_ports_volumes_and_environment_match_the_image():
    env = dockerfile_env()
    weights_dir, storage_dir = env["STEPIMAGE_WEIGHTS_DIR"], env["STEPIMAGE_STORAGE_DIR"]
    for name, service_name, service in services():
        if service_name == "balancer":
            continue
        for port in service.get("ports", []):
            assert port.endswith(f":{env['STEPIMAGE_PORT']}"), (name, service_name)
        # Host paths may be ${VAR:-default} substitutions, whose ':-' is not a separator.
        targets = [re.sub(r"\$\{[^}]*\}", "HOST", volume).split(":")[1] for volume in service.get("volumes", [])]
        assert all(target in (weights_dir, "/data") for target in targets), (name, service_name, targets)
        if service_name != "weights":
            assert storage_dir.startswith("/data/") and "/data" in targets
        for key in service.get("environment") or {}:
            if key.startswith("STEPIMAGE_"):
                assert key in SETTING_ENV_NAMES, (name, service_name, key)
        for value in re.findall(r"\$\{(STEPIMAGE_\w+)", yaml.safe_dump(service)):
            assert value in HOST_VARIABLES | SETTING_ENV_NAMES, value


def test_the_served_weights_are_read_only_and_the_puller_writes_them():
    main = compose("docker-compose.yml")["services"]
    assert any(volume.endswith(":/weights:ro") for volume in main["stepimage"]["volumes"])
    puller = main["weights"]
    assert puller["profiles"] == ["weights"]
    assert any(volume.endswith(":/weights") for volume in puller["volumes"])
    argv = [*puller["entrypoint"][1:], *puller["command"]]
    args = build_parser().parse_args(argv)
    assert Path(args.weights_dir) == Path(dockerfile_env()["STEPIMAGE_WEIGHTS_DIR"])
    get_checkpoint(args.name)


def test_env_example_only_names_real_settings():
    for line in (ROOT / "stepimage.env.example").read_text().splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("STEPIMAGE_") and "=" in line:
            assert line.split("=", 1)[0] in SETTING_ENV_NAMES, line
    for name, service_name, service in services():
        if "env_file" in service:
            assert service["env_file"] == ["stepimage.env"], (name, service_name)


def test_multi_gpu_replicas_use_distinct_gpus_behind_the_balancer():
    spec = compose("docker-compose.multi-gpu.yml")["services"]
    replicas = {name: service for name, service in spec.items() if name.startswith("gpu")}
    devices = [
        tuple(service["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"])
        for service in replicas.values()
    ]
    assert len(set(devices)) == len(devices) >= 2
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert set(re.findall(r"server (gpu\d+):8000", nginx)) == set(replicas)
    assert set(spec["balancer"]["depends_on"]) == set(replicas)


# -- the CUDA stack, the air-gapped list, the slow-client settings, the docs ---------------------------------------

README = (ROOT / "README.md").read_text()


def install_torch_module():
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("install_torch", ROOT / "scripts" / "install_torch.py")
    module = sys.modules["install_torch"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cuda_image_torch_and_driver_agree_and_are_stated():
    install_torch = install_torch_module()
    torch_version = install_torch.pinned_version()
    build = install_torch.PYPI_CUDA_BUILD[torch_version]
    image = re.search(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE, flags=re.M).group(1)
    tag = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-base-ubuntu\d+\.\d+", image)
    assert tag, image
    assert f"{tag.group(1)}.{tag.group(2)}" == build["cuda"]
    # Both bases install torch through the same script and pin, and the app stage keeps it.
    assert DOCKERFILE.count("COPY constraints.txt /build/") == 2
    assert "install_torch.py --build cuda" in DOCKERFILE and "install_torch.py --build cpu" in DOCKERFILE
    assert 'pip install -c /build/constraints.txt ".[${EXTRAS}]"' in DOCKERFILE
    for fact in (image, f"CUDA {build['cuda']}", f"{build['min_driver']} or newer", f"({torch_version})"):
        assert fact in README, fact
    assert f"NVIDIA driver {build['min_driver']} or newer" in DOCKERFILE


def test_the_air_gapped_list_carries_everything_compose_needs():
    section = README[README.index("**Air-gapped hosts.**") : README.index("**Several GPUs on one host**")]
    saved = re.search(r"^docker save (.+?) \|", section, flags=re.M).group(1).split()
    for name in COMPOSE_FILES:
        for service_name, service in compose(name)["services"].items():
            if service.get("profiles"):
                continue  # the one-shot puller and the CPU trial are not part of the offline service
            assert service["image"] in saved, (name, service_name)
            assert f"docker pull {service['image']}" in section or "build" in service, service["image"]
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if source.startswith("./deploy/"):
                    assert source.removeprefix("./") in section, source
        assert name in section
    assert "stepimage.env" in section and "models/flux2-klein-4b" in section
    assert "weights verify" in section


def test_nginx_recommendation_matches_the_server_limits():
    from server.connections import MAX_HEAD_BYTES

    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    defaults = Settings()

    def seconds(directive: str) -> float:
        return float(re.search(rf"^\s*{directive} (\d+)s;", nginx, flags=re.M).group(1))

    assert seconds("client_header_timeout") == defaults.header_timeout
    assert seconds("client_body_timeout") == defaults.body_timeout
    assert re.search(rf"large_client_header_buffers \d+ {MAX_HEAD_BYTES // 1024}k;", nginx)
    assert re.search(r"limit_conn stepimage_per_client \d+;", nginx)
    assert f"client_header_timeout {seconds('client_header_timeout'):g}s" in README


def test_docs_link_only_to_files_in_the_repository():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for document in documents:
        text = document.read_text()
        assert "../shared" not in text, document
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), (document.name, target)
    assert "(docs/api-contract.md)" in README


def test_the_contract_documents_every_error_the_server_sends():
    import server.engine  # noqa: F401 - defines the 499 a disconnected client is counted as
    from server import errors

    contract = (ROOT / "docs" / "api-contract.md").read_text()

    def every(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from every(sub)

    for error in every(errors.ApiError):
        if not error.__module__.startswith("server."):
            continue  # defined by a test
        assert str(error.status) in contract, error.__name__
        if error.code != errors.InvalidRequest.code:
            assert f"`{error.code}`" in contract, (error.__name__, error.code)


def test_readme_states_the_exit_statuses_and_new_options():
    from server import cli

    section = README[README.index("## Shutdown") : README.index("## Slow clients")]
    for name in ("EXIT_OK", "EXIT_LOAD_FAILED", "EXIT_USAGE", "EXIT_CANNOT_LISTEN", "EXIT_CUT_SHORT"):
        assert f"| {getattr(cli, name)} |" in section, name
    assert f"{cli.SHUTDOWN_GRACE_S} more seconds" in section
    for flag in ("--header-timeout", "--body-timeout", "--keep-alive-timeout", "--max-connections"):
        default = Settings.model_fields[flag[2:].replace("-", "_")].default
        assert f"| `{flag}` | {default:g} |" in README, flag


def test_each_image_installs_extras_the_project_has():
    """The CUDA image carries what --quantize fp8 and --storage s3 need; the CPU image what --storage s3 needs."""
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    per_variant = dict(re.findall(r"^FROM \S+ AS (\w+)-base$.*?EXTRAS=(\S+)$", DOCKERFILE, flags=re.M | re.S))
    assert set(per_variant) == {"cuda", "cpu"}, per_variant
    assert set(per_variant["cuda"].split(",")) == {"fp8", "s3"}
    assert set(per_variant["cpu"].split(",")) == {"s3"}
    for names in per_variant.values():
        assert set(names.split(",")) <= set(extras)
