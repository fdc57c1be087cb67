#!/usr/bin/env python3
"""Installs the right PyTorch build into the running interpreter's environment, before the project itself.

PyPI's Linux torch wheel is the CUDA build: it pulls several GB of CUDA libraries (cuda-toolkit, cuDNN, NCCL, ...)
that a machine without an NVIDIA GPU cannot use. This script decides which build to install and from where:

- an NVIDIA GPU is present (or ``--build cuda``): the pinned version from the configured index (PyPI: CUDA build);
- not Linux: the pinned version from the configured index (PyPI's macOS and Windows wheels carry no CUDA);
- Linux without a GPU (or ``--build cpu``), first that applies:
  1. a local CPU wheel of the pinned version in a find-links directory (PIP_FIND_LINKS or pip's configuration);
  2. PyTorch's CPU index (``TORCH_CPU_INDEX``, default https://download.pytorch.org/whl/cpu) when it answers;
  3. with ``--build auto`` only: the CUDA build from the configured index, announced in a loud banner, because the
     install must still work where only a plain package index is reachable. ``--build cpu`` fails instead.

The decision (`choose`) is a pure function of what `probe` found, so it is tested without a GPU or a network.
The pinned version is the ``torch==`` line of constraints.txt, the file every install of the project uses.
Standard library only: this runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The index answers in well under a second where it is reachable; where DNS or a firewall blocks it, waiting
# longer only delays the fallback.
INDEX_PROBE_TIMEOUT_S = 5.0
MIN_PYTHON = (3, 11)
BUILDS = ("auto", "cpu", "cuda")
# What PyPI's Linux wheel of each pinned torch is built for: its CUDA line and the oldest host driver that runs it
# (NVIDIA's minor-version compatibility: any R580+ driver runs every CUDA 13.x runtime), from the wheel's own
# requirements (torch 2.13.0 requires cuda-toolkit 13.0.3). The CUDA image's base (Dockerfile) and the README follow
# this table; tests/unit/test_deployment.py checks that they agree.
PYPI_CUDA_BUILD = {"2.13.0": {"cuda": "13.0", "min_driver": "580"}}


@dataclass(frozen=True)
class Probe:
    """What the machine offers; every field is an input of `choose`."""

    build: str  # what was asked: auto, cpu or cuda
    linux: bool
    gpu: bool
    local_wheel: Path | None
    cpu_index: str
    cpu_index_reachable: bool


@dataclass(frozen=True)
class Plan:
    """The pip commands to run (argument lists after `pip install`), why, and a warning to shout, if any."""

    source: str  # local-wheel, cpu-index, index, index-cuda-fallback, or none
    reason: str
    pip_installs: list[list[str]] = field(default_factory=list)
    warning: str | None = None
    error: str | None = None


def pinned_version(constraints: Path = CONSTRAINTS) -> str:
    for line in constraints.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip().replace(" ", "")
        if requirement.lower().startswith("torch=="):
            return requirement.split("==", 1)[1]
    raise SystemExit(f"install_torch: no torch==VERSION line in {constraints.name}")


def choose(probe: Probe, version: str) -> Plan:
    requirement = f"torch=={version}"
    if probe.build == "cuda" or (probe.build == "auto" and probe.gpu):
        why = "asked for the CUDA build" if probe.build == "cuda" else "an NVIDIA GPU is present"
        build = PYPI_CUDA_BUILD.get(version)
        needs = f" (CUDA {build['cuda']}: NVIDIA driver {build['min_driver']} or newer)" if build else ""
        return Plan("index", f"{why}: the CUDA build of torch {version}{needs}", [[requirement]])
    if not probe.linux:
        return Plan("index", f"not Linux: the package index's torch {version} has no CUDA libraries", [[requirement]])
    why = "asked for the CPU build" if probe.build == "cpu" else "no NVIDIA GPU found"
    if probe.local_wheel is not None:
        return Plan("local-wheel", f"{why}: the local CPU wheel {probe.local_wheel}", [[str(probe.local_wheel)]])
    if probe.cpu_index_reachable:
        # Torch alone from the CPU index, which holds CPU builds only; its dependencies then come from the usual
        # index, where the already installed CPU build satisfies the pin.
        return Plan(
            "cpu-index",
            f"{why}: the CPU build of torch {version} from {probe.cpu_index}",
            [["--no-deps", "--index-url", probe.cpu_index, requirement], [requirement]],
        )
    unavailable = (
        f"PyTorch's CPU index ({probe.cpu_index}) is not reachable and no local CPU wheel of torch {version} is "
        "configured"
    )
    remedy = (
        "To get the CPU build: make that index reachable, set TORCH_CPU_INDEX to a mirror of it, or put "
        f"torch-{version}+cpu-*.whl in a directory named by PIP_FIND_LINKS; then run `make clean` and try again."
    )
    if probe.build == "cpu":
        return Plan("none", why, error=f"{unavailable}.\n{remedy}")
    warning = (
        f"{why}, but {unavailable}: installing torch {version} from the package index, which on Linux is the "
        f"CUDA build and brings several GB of CUDA libraries this machine cannot use.\n{remedy}"
    )
    return Plan("index-cuda-fallback", why + ": the CUDA build as a fallback", [[requirement]], warning=warning)


# -- probing the machine --------------------------------------------------------------------------------------


def nvidia_gpu_present() -> bool:
    """True when the NVIDIA driver reports a GPU: `nvidia-smi -L` lists one, or the kernel module lists one."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            listed = None
        if listed is not None and listed.returncode == 0 and "GPU" in listed.stdout:
            return True
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def _split_locations(value: str) -> list[str]:
    return [item for item in value.replace(",", " ").split() if item]


def find_links_locations(environ: dict[str, str] | None = None) -> list[Path]:
    """Local directories pip searches for wheels: PIP_FIND_LINKS and find-links in pip's configuration files."""
    environ = dict(os.environ) if environ is None else environ
    values = _split_locations(environ.get("PIP_FIND_LINKS", ""))
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, env=environ
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            values += _split_locations(" ".join(shlex.split(value)))
    directories: list[Path] = []
    for value in values:
        path = Path(value.removeprefix("file://"))
        if "://" not in value.removeprefix("file://") and path.is_dir() and path not in directories:
            directories.append(path)
    return directories


def wheel_fits(filename: str, version: str, python: tuple[int, int], machine: str) -> bool:
    """Whether `filename` is a Linux CPU torch wheel of `version` for this CPython and CPU architecture."""
    if not filename.endswith(".whl"):
        return False
    parts = filename[: -len(".whl")].split("-")
    if len(parts) < 5 or parts[0] != "torch":
        return False
    wheel_version, python_tag, platform_tag = parts[1], parts[-3], parts[-1]
    return (
        wheel_version == f"{version}+cpu"
        and python_tag == f"cp{python[0]}{python[1]}"
        and "linux" in platform_tag
        and platform_tag.endswith(machine)
    )


def find_local_wheel(
    directories: list[Path], version: str, python: tuple[int, int] | None = None, machine: str | None = None
) -> Path | None:
    python = python or (sys.version_info.major, sys.version_info.minor)
    machine = machine or platform.machine()
    for directory in directories:
        for candidate in sorted(directory.glob("torch-*.whl")):
            if wheel_fits(candidate.name, version, python, machine):
                return candidate
    return None


def index_reachable(index_url: str, timeout: float = INDEX_PROBE_TIMEOUT_S) -> bool:
    """Whether the index answers for torch (PEP 503: `<index>/torch/`)."""
    try:
        with urllib.request.urlopen(index_url.rstrip("/") + "/torch/", timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def probe(build: str, version: str) -> Probe:
    cpu_index = os.environ.get("TORCH_CPU_INDEX") or DEFAULT_CPU_INDEX
    linux = sys.platform.startswith("linux")
    gpu = build != "cpu" and nvidia_gpu_present()
    wants_cpu = linux and (build == "cpu" or (build == "auto" and not gpu))
    local_wheel = find_local_wheel(find_links_locations(), version) if wants_cpu else None
    reachable = wants_cpu and local_wheel is None and index_reachable(cpu_index)
    return Probe(build, linux, gpu, local_wheel, cpu_index, reachable)


# -- running it ----------------------------------------------------------------------------------------------


def banner(text: str) -> str:
    rule = "!" * 100
    return "\n".join([rule, *(f"!! {line}" for line in text.splitlines()), rule])


def venv_can_install_pip() -> bool:
    """Whether `python -m venv` can put pip into the environment it makes. Debian and Ubuntu ship ensurepip in a
    package of its own; without it the venv is made without pip, and every later step fails less clearly."""
    import importlib.util

    if importlib.util.find_spec("ensurepip") is not None:
        return True
    minor = "{}.{}".format(*sys.version_info[:2])
    sys.stderr.write(
        f"{sys.executable} cannot create a virtual environment with pip: its ensurepip module is missing. "
        f"On Debian or Ubuntu: apt-get install python3-venv (or python{minor}-venv), then run make again.\n"
    )
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", choices=BUILDS, default=os.environ.get("TORCH_BUILD") or "auto")
    parser.add_argument("--dry-run", action="store_true", help="print the decision and the pip commands only")
    parser.add_argument("--check-python", action="store_true", help="only check this Python's version")
    args = parser.parse_args(argv)
    if sys.version_info[:2] < MIN_PYTHON:
        found = ".".join(map(str, sys.version_info[:3]))
        wanted = ".".join(map(str, MIN_PYTHON))
        sys.stderr.write(
            f"stepimage needs Python {wanted} or newer; {sys.executable} is Python {found}. "
            "Run make with PY=python3.11 (or newer).\n"
        )
        return 2
    if args.check_python:
        return 0 if venv_can_install_pip() else 2
    version = pinned_version()
    plan = choose(probe(args.build, version), version)
    print(f"torch: {plan.reason}", flush=True)
    if plan.error is not None:
        sys.stderr.write(banner(plan.error) + "\n")
        return 1
    if plan.warning is not None:
        sys.stderr.write(banner(plan.warning) + "\n")
        sys.stderr.flush()
    for install in plan.pip_installs:
        command = [sys.executable, "-m", "pip", "install", "-q", *install]
        print("+ " + shlex.join(command[2:]), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
