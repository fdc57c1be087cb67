"""scripts/install_torch.py: which torch build `make serve`/`make test` install, from where, and how loudly.

The decision is tested over every combination of its inputs; the probes are tested against real things (a fake
`nvidia-smi` on PATH, find-links directories, a local HTTP index and a closed port); the whole script is run as
`make` runs it, with --dry-run.
"""

from __future__ import annotations

import http.server
import importlib.util
import itertools
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.conftest import free_port

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "install_torch.py"
_spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
install_torch = sys.modules["install_torch"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_torch)

VERSION = "2.13.0"
WHEEL = Path("/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def probe(build="auto", linux=True, gpu=False, wheel=None, reachable=False):
    return install_torch.Probe(build, linux, gpu, wheel, CPU_INDEX, reachable)


@pytest.mark.parametrize(
    ("gpu", "wheel", "reachable"), list(itertools.product([False, True], [None, WHEEL], [False, True]))
)
def test_auto_on_linux_over_every_combination(gpu, wheel, reachable):
    plan = install_torch.choose(probe(gpu=gpu, wheel=wheel, reachable=reachable), VERSION)
    assert plan.error is None
    if gpu:
        # The CUDA build from the configured index, whatever CPU sources exist.
        assert (plan.source, plan.pip_installs, plan.warning) == ("index", [["torch==2.13.0"]], None)
    elif wheel is not None:
        # A local wheel wins over the network: it is what this machine was given.
        assert (plan.source, plan.pip_installs, plan.warning) == ("local-wheel", [[str(WHEEL)]], None)
    elif reachable:
        assert plan.source == "cpu-index"
        assert plan.warning is None
        # torch alone from the CPU-only index, then its dependencies from the usual one.
        assert plan.pip_installs == [["--no-deps", "--index-url", CPU_INDEX, "torch==2.13.0"], ["torch==2.13.0"]]
    else:
        # Only a plain index: it still installs, and says loudly what that costs and how to avoid it.
        assert plan.source == "index-cuda-fallback"
        assert plan.pip_installs == [["torch==2.13.0"]]
        assert "CUDA build" in plan.warning and "several GB" in plan.warning
        assert "TORCH_CPU_INDEX" in plan.warning and "PIP_FIND_LINKS" in plan.warning


def test_asking_for_cpu_never_falls_back_to_cuda():
    plan = install_torch.choose(probe(build="cpu", gpu=True), VERSION)
    assert plan.source == "none" and plan.pip_installs == []
    assert "not reachable" in plan.error
    assert install_torch.choose(probe(build="cpu", gpu=True, wheel=WHEEL), VERSION).source == "local-wheel"
    assert install_torch.choose(probe(build="cpu", gpu=True, reachable=True), VERSION).source == "cpu-index"


def test_asking_for_cuda_ignores_cpu_sources():
    plan = install_torch.choose(probe(build="cuda", wheel=WHEEL, reachable=True), VERSION)
    assert (plan.source, plan.pip_installs) == ("index", [["torch==2.13.0"]])


def test_other_systems_take_the_index_build():
    # PyPI's macOS and Windows wheels are CPU (or MPS) builds: nothing to avoid there.
    plan = install_torch.choose(probe(linux=False), VERSION)
    assert (plan.source, plan.pip_installs, plan.warning) == ("index", [["torch==2.13.0"]], None)


def test_the_pinned_version_is_the_constraints_file_line(tmp_path):
    assert install_torch.pinned_version() == VERSION
    pins = tmp_path / "constraints.txt"
    pins.write_text("# comment\nnumpy>=1\ntorch == 2.9.1  # why\n")
    assert install_torch.pinned_version(pins) == "2.9.1"
    pins.write_text("numpy>=1\n")
    with pytest.raises(SystemExit):
        install_torch.pinned_version(pins)


@pytest.mark.parametrize(
    ("name", "fits"),
    [
        ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", True),
        ("torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl", True),
        ("torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", False),  # PyPI's: the CUDA build
        ("torch-2.13.0+cu130-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        ("torch-2.12.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", False),  # another version than the pin
        ("torch-2.13.0+cpu-cp312-cp312-manylinux_2_28_x86_64.whl", False),  # another Python
        ("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_aarch64.whl", False),  # another CPU
        ("torch-2.13.0+cpu-cp311-cp311-win_amd64.whl", False),
        ("torchvision-0.28.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        ("torch-2.13.0+cpu.tar.gz", False),
    ],
)
def test_which_local_wheels_fit(name, fits):
    assert install_torch.wheel_fits(name, VERSION, (3, 11), "x86_64") is fits


def test_local_wheel_is_found_in_find_links_directories(tmp_path):
    empty, wheels = tmp_path / "empty", tmp_path / "wheels"
    empty.mkdir()
    wheels.mkdir()
    (wheels / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    assert install_torch.find_local_wheel([empty, wheels], VERSION, (3, 11), "x86_64") is None
    good = wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    good.touch()
    assert install_torch.find_local_wheel([empty, wheels], VERSION, (3, 11), "x86_64") == good


def test_find_links_come_from_the_environment_and_pip_configuration(tmp_path):
    from_env, from_config, missing = tmp_path / "env", tmp_path / "config", tmp_path / "missing"
    from_env.mkdir()
    from_config.mkdir()
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {from_config}\n")
    environ = {**os.environ, "PIP_CONFIG_FILE": str(config), "PIP_FIND_LINKS": f"file://{from_env} {missing}"}
    found = install_torch.find_links_locations(environ)
    assert from_env in found and from_config in found and missing not in found
    # With no configuration at all, nothing is found.
    bare = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": ""}
    assert install_torch.find_links_locations(bare) == []


def fake_nvidia_smi(directory: Path, output: str, status: int) -> None:
    smi = directory / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    smi.chmod(0o755)


@pytest.mark.parametrize(
    ("output", "status", "present"),
    [
        ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1234)", 0, True),
        # Installed tools without a working driver: no GPU to use.
        ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9, False),
        ("No devices were found", 6, False),
    ],
)
def test_gpu_detection_asks_nvidia_smi(tmp_path, monkeypatch, output, status, present):
    fake_nvidia_smi(tmp_path, output, status)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        assert install_torch.nvidia_gpu_present() is present
    else:  # a real GPU host: the kernel module's list counts too
        assert install_torch.nvidia_gpu_present() is True


class _Index(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server interface
        found = self.path == "/whl/cpu/torch/"
        self.send_response(200 if found else 404)
        self.end_headers()
        self.wfile.write(
            b'<a href="torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl">torch</a>' if found else b""
        )

    def log_message(self, *args):
        pass


def test_index_probe_against_a_real_server_and_a_closed_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert install_torch.index_reachable(base + "/whl/cpu") is True
        assert install_torch.index_reachable(base + "/whl/cpu/") is True
        assert install_torch.index_reachable(base + "/elsewhere") is False
    finally:
        server.shutdown()
        server.server_close()
    assert install_torch.index_reachable(f"http://127.0.0.1:{free_port()}/whl/cpu", timeout=2) is False
    assert install_torch.index_reachable("not a url") is False


def run_script(
    tmp_path: Path, *args: str, find_links: str = "", index: str | None = None
) -> subprocess.CompletedProcess:
    # No nvidia-smi on PATH, no pip configuration: the script sees only what the test gives it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_FIND_LINKS": find_links,
        "TORCH_CPU_INDEX": index or f"http://127.0.0.1:{free_port()}/whl/cpu",
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.skipif(not sys.platform.startswith("linux") or Path("/proc/driver/nvidia/gpus").is_dir(), reason="GPU")
def test_script_end_to_end_without_a_gpu(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = wheels / f"torch-{VERSION}+cpu-{tag}-{tag}-manylinux_2_28_{platform.machine()}.whl"
    wheel.touch()
    local = run_script(tmp_path, find_links=str(wheels))
    assert local.returncode == 0, local.stderr
    assert f"pip install -q {wheel}" in local.stdout
    assert "!!" not in local.stderr

    # Nothing but a plain index: still installs, with the banner.
    fallback = run_script(tmp_path)
    assert fallback.returncode == 0, fallback.stderr
    assert "pip install -q torch==2.13.0" in fallback.stdout
    assert "!! no NVIDIA GPU found, but PyTorch's CPU index" in fallback.stderr

    refused = run_script(tmp_path, "--build", "cpu")
    assert refused.returncode == 1
    assert "pip install" not in refused.stdout
    assert "not reachable" in refused.stderr

    # A GPU host: the CUDA build, and the CPU sources are not even looked at.
    fake_nvidia_smi(tmp_path / "bin", "GPU 0: NVIDIA L4 (UUID: GPU-1)", 0)
    gpu = run_script(tmp_path, find_links=str(wheels))
    assert gpu.returncode == 0, gpu.stderr
    assert "an NVIDIA GPU is present" in gpu.stdout and "pip install -q torch==2.13.0" in gpu.stdout


def test_too_old_python_is_refused_by_name():
    # The script as a Python 3.10 would run it (CI has no 3.10): only the version it sees differs.
    pretend = (
        "import sys; sys.version_info = (3, 10, 9, 'final', 0); sys.argv = ['install_torch.py', '--check-python']; "
        f"path = {str(SCRIPT)!r}; exec(compile(open(path).read(), path, 'exec'), "
        "{'__name__': '__main__', '__file__': path})"
    )
    old = subprocess.run([sys.executable, "-c", pretend], capture_output=True, text=True, timeout=60)
    assert old.returncode == 2
    assert "needs Python 3.11 or newer" in old.stderr and "3.10.9" in old.stderr
    current = subprocess.run([sys.executable, str(SCRIPT), "--check-python"], capture_output=True, timeout=60)
    assert current.returncode == 0


def test_requires_python_matches_the_script():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">={}.{}".format(*install_torch.MIN_PYTHON)
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/install_torch.py --build $(TORCH_BUILD)" in makefile
    assert "-c constraints.txt" in makefile


def test_a_python_without_ensurepip_is_refused_with_the_package_to_install(monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *rest: None if name == "ensurepip" else real_find_spec(name, *rest)
    )
    assert install_torch.main(["--check-python"]) == 2
    err = capsys.readouterr().err
    assert "ensurepip" in err and "apt-get install python3-venv" in err and len(err.splitlines()) == 1


def test_make_serve_installs_the_server_without_the_test_tiers_extras():
    makefile = (ROOT / "Makefile").read_text()
    serve_stamp = makefile.split("serve:", 1)[1].split("\n", 1)[0].strip()
    test_stamp = makefile.split("\ntest:", 1)[1].split("\n", 1)[0].strip()
    assert serve_stamp == "$(BIN)/.installed" and test_stamp == "$(BIN)/.installed-test"
    serve_recipe = makefile.split(f"{serve_stamp}:", 1)[1].split("\n\n", 1)[0]
    assert "-e '.[s3]'" in serve_recipe and "ray" not in serve_recipe and "test" not in serve_recipe
    test_recipe = makefile.split(f"{test_stamp}:", 1)[1].split("\n\n", 1)[0]
    assert test_recipe.startswith(" $(BIN)/.installed\n") and "'.[test,bench,ray]'" in test_recipe
