"""The GPU kit: `prepare` on a CPU machine what a bare GPU machine lacks, then `run` everything there in one go.

A lent GPU machine has Python 3.12 and a CUDA build of PyTorch but none of our web stack or diffusers,
and no network. `prepare` downloads wheels (CPython 3.12, manylinux x86_64) of every package the server,
the benchmarks and the GPU tests need, at exactly the versions installed in the environment it runs in
(the one our tests run with), into a folder that git ignores and the device machine can be sent. torch
and the packages built against it are the machine's own (see TAKEN_FROM_THE_MACHINE).

`run` does, within a time budget (default 8 minutes), stage by stage, each in its own process so a crash
or an out-of-memory in one leaves the others' results:

  env       the GPU, driver, versions, the bf16 (and fp8) matrix rate measured beside the datasheet's;
  pipeline  1024x1024, 8 steps, text-to-image and a 1 MP edit: plain Flux2KleinPipeline eager, ours eager
            and compiled in bf16, compiled fp8 with its drift against bf16 on the same seeds;
  tests     the `gpu` test tier (full-size random weights, compile once, no recompiles, CFG, edits, fp8);
  memory    peak memory of a 1 MP edit in bf16, trimmed, with the text encoder offloaded or on the CPU,
            and fp8, with what a new prompt costs in each;
  serving   a real `stepimage serve --random-weights` process, generations and edits at concurrency
            1, 2, 4, 8, with batching (--max-batch-size 4) and without (1).

Results land in one folder named after the GPU; `--pack` (the default with --out) turns it into one
.tar.gz plus a JSON and a text summary, so that three files come back from the device machine. `--cpu`
runs the same stages on this CPU with the tiny model, tiny sizes and few steps: CI runs it, so the kit
cannot rot between GPU sessions.

    scripts/gpu-kit.sh prepare          # here: wheels into .gpukit/
    scripts/gpu-kit.sh run              # there, with .gpukit carried: results into $OUT
    python -m benchmarks gpu-kit run --cpu --out /tmp/kit --no-pack     # the dry run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.stats import free_port, server_ready

REPO = Path(__file__).resolve().parent.parent
# In order of what the README needs most, should the budget run out: the pipeline figures first, then the test
# tier (its compiles hit the cache the pipeline stage filled), memory, serving.
STAGES = ("env", "pipeline", "tests", "memory", "serving")

# Targets of issue 12 for the headline table (milliseconds, GB, ratio).
TARGETS = {
    "edit_bf16_ms": 1000.0,
    "edit_fp8_ms": 700.0,
    "text_to_image_ms": 400.0,
    "speedup_vs_plain": 2.0,
    "edit_bf16_peak_gb": 20.0,
}


# -- prepare ---------------------------------------------------------------------------------------

# Not carried: torch and what is built against it or ships with it on the machine's CUDA image (a second
# copy would not match its CUDA libraries), and binary packages whose ABI follows the machine's numpy.
# Our code runs with any of their recent versions; `run` records the versions it found. Pure-Python needs
# that torch shares with our stack (typing-extensions, filelock, fsspec) are carried: pydantic and
# huggingface-hub want newer ones than an older image may have, and torch runs with newer ones.
TAKEN_FROM_THE_MACHINE = {
    "torch": "the CUDA build the machine has (carrying it would replace its CUDA stack)",
    "triton": "ships with the machine's torch",
    "numpy": "the machine's torch and compiled packages are built against its numpy",
    "pillow": "binary; any recent version decodes and encodes the same formats here",
    "matplotlib": "binary, built against the machine's numpy; used only for plots",
    "contourpy": "matplotlib's, as above",
    "kiwisolver": "matplotlib's, as above",
    "fonttools": "matplotlib's, as above",
    "pyparsing": "matplotlib's, as above",
    "cycler": "matplotlib's, as above",
    "python-dateutil": "matplotlib's, as above",
    "six": "python-dateutil's",
    "sympy": "torch's",
    "mpmath": "torch's",
    "networkx": "torch's",
    "jinja2": "torch's",
    "markupsafe": "torch's",
    "setuptools": "packaging tool",
    "pip": "packaging tool",
    "pytest": "the machine has it (the gpu tier needs only plain pytest)",
    "pluggy": "pytest's",
    "iniconfig": "pytest's",
    "pygments": "pytest's",
}
PREFIXES_FROM_THE_MACHINE = ("nvidia-", "cuda-")
# The machine's torch as last read there (python3 -m pip show torch): the pins that depend on torch are
# checked against it. `run` checks again against the torch it finds.
MACHINE_TORCH = "2.11.0"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
# What one device call may carry, working tree included (64 MiB); the wheels get what the tree leaves.
CARRY_LIMIT_BYTES = 64 * 2**20


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def taken_from_the_machine(name: str) -> bool:
    name = normalize(name)
    return name in TAKEN_FROM_THE_MACHINE or name.startswith(PREFIXES_FROM_THE_MACHINE)


def requirement_closure(roots: list[str], environment: dict[str, str]) -> dict[str, str]:
    """name -> installed version for `roots` (requirement strings, extras allowed) and everything they
    require, as installed in this environment, with markers evaluated for `environment`."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    queue = [(Requirement(root), ()) for root in roots]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while queue:
        requirement, _ = queue.pop()
        name = normalize(requirement.name)
        extras = tuple(sorted(requirement.extras))
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu-kit prepare: {name} is required but not installed here") from None
        found[name] = distribution.version
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is not None:
                if not any(child.marker.evaluate({**environment, "extra": extra}) for extra in extras or ("",)):
                    continue
            queue.append((child, ()))
    return found


def machine_environment(python_version: str) -> dict[str, str]:
    """Marker values of the GPU machine: CPython `python_version` on x86-64 Linux."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
        "implementation_version": f"{python_version}.0",
    }


def download_command(name: str, version: str, dest: Path, python_version: str) -> list[str]:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp", "--dest", str(dest)]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return [*command, f"{name}=={version}"]


def tree_bytes() -> int:
    """What the working tree sends to the device machine: tracked and untracked, non-ignored files."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout.split(b"\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return 0
    return sum(
        (REPO / os.fsdecode(path)).stat().st_size for path in listed if path and (REPO / os.fsdecode(path)).is_file()
    )


def prepare(args: argparse.Namespace) -> int:
    from pipelines.quantize import MIN_TORCH_FOR_TORCHAO, TORCHAO_VERSION, _version_tuple

    dest = Path(args.dest)
    wheels = dest / "wheels"
    roots = [f"stepimage[{','.join(args.extras)}]", "pytest"]
    closure = requirement_closure(roots, machine_environment(args.python_version))
    closure.pop("stepimage", None)
    carried = {name: version for name, version in sorted(closure.items()) if not taken_from_the_machine(name)}
    skipped = {name: TAKEN_FROM_THE_MACHINE.get(name, "CUDA stack of the machine's torch")
               for name in sorted(closure) if taken_from_the_machine(name)}  # fmt: skip
    problems = []
    if "torchao" in carried and _version_tuple(args.machine_torch)[:2] < MIN_TORCH_FOR_TORCHAO:
        minimum = ".".join(map(str, MIN_TORCH_FOR_TORCHAO))
        problems.append(f"torchao {carried['torchao']} needs torch >= {minimum}; "
                        f"the machine has {args.machine_torch}")  # fmt: skip
    if carried.get("torchao") not in (None, TORCHAO_VERSION):
        problems.append(f"torchao {carried['torchao']} is installed here but pipelines.quantize is tested with "
                        f"{TORCHAO_VERSION}")  # fmt: skip
    if problems:
        for problem in problems:
            sys.stderr.write(f"gpu-kit prepare: {problem}\n")
        return 1
    commands = [download_command(name, version, wheels, args.python_version) for name, version in carried.items()]
    if args.list:
        for command in commands:
            sys.stdout.write(" ".join(command) + "\n")
        return 0
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    for command in commands:
        subprocess.run(command, check=True)
    sizes = {path.name: path.stat().st_size for path in sorted(wheels.glob("*.whl"))}
    budget = CARRY_LIMIT_BYTES - tree_bytes()
    manifest = {
        "python": args.python_version,
        "platforms": list(PLATFORMS),
        "carried": carried,
        "wheels": sizes,
        "wheels_mib": round(sum(sizes.values()) / 2**20, 1),
        "left_for_wheels_mib": round(budget / 2**20, 1),
        "taken_from_the_machine": skipped,
        "machine_torch": args.machine_torch,
        "torch_here": closure.get("torch"),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sys.stdout.write(
        f"{len(sizes)} wheels, {manifest['wheels_mib']} MiB in {wheels} (the working tree leaves "
        f"{manifest['left_for_wheels_mib']} MiB of the 64 MiB a call carries)\n"
    )
    if sum(sizes.values()) > budget:
        sys.stderr.write("gpu-kit prepare: the wheels and the working tree exceed what one device call carries\n")
        return 1
    return 0


# -- run -------------------------------------------------------------------------------------------


def _list(*items: str):
    return field(default_factory=lambda: list(items))


@dataclass
class Plan:
    """Sizes and settings of one run. The defaults are the real thing on a GPU; `cpu_plan` is the dry run."""

    device: str = "cuda:0"
    source: list[str] = _list("--random-weights")
    sizes: str = "1024x1024"
    edit_input: str = "1024x1024"
    steps: int = 8
    repeats: int = 3
    variants: list[str] = _list("eager:bf16", "compiled:bf16", "compiled:bf16+fp8")
    memory_variants: list[str] = _list(
        "eager:bf16", "eager:bf16+trim", "eager:bf16+trim+offload", "eager:bf16+fp8+trim+offload",
        "eager:bf16+trim+te-cpu",
    )  # fmt: skip
    drift_cases: int = 2
    encode_repeats: int = 3
    matmul_size: int = 8192
    concurrency: str = "1,2,4,8"
    requests: int = 8
    point_seconds: float = 15.0
    serving_size: str = "1024x1024"
    server_args: list[str] = _list("--backend", "flux2-klein", "--random-weights")
    # Loading, compiling and warming up every size of a full-size server.
    server_ready_s: float = 420.0
    pytest_args: list[str] = _list()
    pipeline_args: list[str] = _list()
    # What the probe said of fp8 here: "available" or why not.
    fp8: str = "unknown"


def cpu_plan() -> Plan:
    # The tiny model at 64x64 with 2 steps: each stage runs its real code path in seconds. fp8 stays in the
    # variant list so that its refusal on a CPU is exercised and recorded too.
    return Plan(
        device="cpu",
        source=["--tiny"],
        sizes="64x64",
        edit_input="64x96",
        steps=2,
        repeats=1,
        variants=["eager:fp32", "eager:bf16+fp8"],
        memory_variants=["eager:fp32+trim+offload"],
        drift_cases=1,
        encode_repeats=2,
        matmul_size=256,
        concurrency="1,2",
        requests=2,
        point_seconds=20.0,
        serving_size="64x64",
        server_args=["--backend", "tiny", "--device", "cpu", "--no-warmup", "--extra-size", "64x64"],
        server_ready_s=120.0,
        pipeline_args=["--small-warm-up"],
    )


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def python_env() -> dict[str, str]:
    """The environment for child processes: the repository importable, output unbuffered, no downloads."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{path}" if path else str(REPO)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_logged(command: list[str], log: Path, timeout: float) -> int:
    """Run `command`, output to `log`; on timeout kill its process group and return 124."""
    with log.open("ab") as sink:
        sink.write(("$ " + " ".join(command) + "\n").encode())
        sink.flush()
        process = subprocess.Popen(command, cwd=REPO, env=python_env(), stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            return process.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            sink.write(f"\n[gpu-kit] stopped after {timeout:.0f} s: out of the kit's time budget\n".encode())
            return 124


REPORTED_VERSIONS = (
    "torch", "torchao", "diffusers", "transformers", "tokenizers", "huggingface-hub", "accelerate", "safetensors",
    "fastapi", "starlette", "uvicorn", "pydantic", "numpy", "pillow", "httpx", "pytest",
)  # fmt: skip


def probe(device: str, matmul_size: int = 0) -> dict[str, Any]:
    """The device, the versions, whether fp8 can run, and (with `matmul_size`) the measured matrix rates.

    Run in a child process (`probe_device`), so that the kit's own process never holds a CUDA context:
    device memory figures of the later stages are then theirs alone.
    """
    import torch

    from benchmarks.hardware import describe_gpu, measure_matmul_tflops
    from benchmarks.stats import machine
    from pipelines.quantize import fp8_problem

    report: dict[str, Any] = {"machine": machine(), "gpu": describe_gpu(device), "torch_cuda": torch.version.cuda}
    report["fp8"] = fp8_problem(device, "bf16") or "available"
    if matmul_size:
        report["matmul_measured"] = measure_matmul_tflops(device, size=matmul_size)
        datasheet = report["gpu"].get("datasheet_tflops")
        if datasheet:
            report["matmul_fraction_of_datasheet"] = round(report["matmul_measured"]["tflops"] / datasheet["bf16"], 3)
    versions = {}
    for name in REPORTED_VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    report["versions"] = versions
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        report["nvidia_smi"] = smi.stdout.strip()
    return report


def probe_device(device: str, matmul_size: int = 0, timeout: float = 300) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.gpu_kit", "probe", "--device", device,
               "--matmul-size", str(matmul_size)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"probing {device} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage_env(plan: Plan, folder: Path, budget: Budget) -> dict[str, Any]:
    report = probe_device(plan.device, plan.matmul_size, timeout=max(5.0, budget.left()))
    (folder / "env.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"gpu": report["gpu"].get("name"), "fp8": report["fp8"], "matmul": report.get("matmul_measured")}


def junit_summary(path: Path) -> dict[str, Any]:
    """Counts and failures from a pytest JUnit XML report."""
    if not path.is_file():
        return {"error": "no report written"}
    root = ElementTree.parse(path).getroot()
    cases = list(root.iter("testcase"))
    summary: dict[str, Any] = {"tests": len(cases), "passed": 0, "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            summary["failed"].append({"test": name, "message": (failure.get("message") or "")[:500]})
        elif skipped is not None:
            summary["skipped"].append({"test": name, "reason": (skipped.get("message") or "")[:200]})
        else:
            summary["passed"] += 1
    return summary


def stage_tests(plan: Plan, folder: Path, budget: Budget) -> dict[str, Any]:
    xml = folder / "gpu-tests.xml"
    command = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *plan.pytest_args]  # fmt: skip
    code = run_logged(command, folder / "gpu-tests.log", budget.left())
    return {"exit_code": code, **junit_summary(xml)}


def runnable(variants: list[str], fp8: str) -> tuple[list[str], dict[str, str]]:
    """The variants that can run, and why the others cannot (fp8 where the probe refused it)."""
    if fp8 == "available":
        return variants, {}
    return [v for v in variants if "+fp8" not in v], {v: fp8 for v in variants if "+fp8" in v}


def stage_pipeline(plan: Plan, folder: Path, budget: Budget) -> dict[str, Any]:
    variants, refused = runnable(plan.variants, plan.fp8)
    out = folder / "pipeline.json"
    command = [sys.executable, "-m", "benchmarks", "pipeline", *plan.source, "--device", plan.device,
               "--variants", ",".join(variants), "--baseline", "--sizes", plan.sizes, "--edit-input", plan.edit_input,
               "--steps", str(plan.steps), "--repeats", str(plan.repeats), "--drift-cases", str(plan.drift_cases),
               "--matmul-size", str(plan.matmul_size), "--out", str(out), *plan.pipeline_args]  # fmt: skip
    code = run_logged(command, folder / "pipeline.log", budget.left())
    result: dict[str, Any] = {"exit_code": code, "refused": refused}
    if out.is_file():
        result["report"] = "pipeline.json"
    return result


def stage_memory(plan: Plan, folder: Path, budget: Budget) -> dict[str, Any]:
    variants, refused = runnable(plan.memory_variants, plan.fp8)
    out = folder / "memory.json"
    command = [sys.executable, "-m", "benchmarks", "memory", *plan.source, "--device", plan.device,
               "--variants", ",".join(variants), "--steps", str(plan.steps), "--edit-input", plan.edit_input,
               "--encode-repeats", str(plan.encode_repeats), "--out", str(out)]  # fmt: skip
    code = run_logged(command, folder / "memory.log", budget.left())
    return {"exit_code": code, "refused": refused, **({"report": "memory.json"} if out.is_file() else {})}


def stop(process: subprocess.Popen, grace: float = 60) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


@dataclass
class Server:
    label: str
    base: str
    process: subprocess.Popen
    log: Any
    storage: Path
    started: float


def start_server(plan: Plan, folder: Path, batch: int) -> Server:
    port = free_port()
    storage = Path(tempfile.mkdtemp(prefix="gpu-kit-files-"))
    command = [sys.executable, "-m", "server", "serve", "--port", str(port), "--storage-dir", str(storage),
               "--max-batch-size", str(batch), "--max-queue", "64", *plan.server_args]  # fmt: skip
    label = f"batch{batch}"
    log = (folder / f"server-{label}.log").open("ab")
    process = subprocess.Popen(command, cwd=REPO, env=python_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    return Server(label, f"http://127.0.0.1:{port}", process, log, storage, time.monotonic())


def stage_serving(plan: Plan, folder: Path, budget: Budget) -> dict[str, Any]:
    # Both servers load, compile and warm up at once; measuring starts when both are ready, so that one's warm-up
    # never shares the GPU with the other's measurements (a ready, idle server does no GPU work).
    servers = [start_server(plan, folder, batch) for batch in (4, 1)]
    results: dict[str, Any] = {}
    try:
        for server in servers:
            entry: dict[str, Any] = {}
            results[server.label] = entry
            if server_ready(server.base, server.process, min(plan.server_ready_s, budget.left()), poll_s=1):
                entry["ready_s"] = round(time.monotonic() - server.started, 1)
            else:
                entry["error"] = "the server never became ready (see its log)"
        for server in servers:
            entry = results[server.label]
            if "error" in entry:
                continue
            for endpoint in ("generations", "edits"):
                if budget.left() < 10:
                    entry[endpoint] = {"skipped": "out of the kit's time budget"}
                    continue
                out = folder / f"serving-{endpoint}-{server.label}.json"
                command = [sys.executable, "-m", "benchmarks", "serving", "--base-url", f"{server.base}/v1",
                           "--endpoint", endpoint, "--size", plan.serving_size, "--edit-sizes", plan.edit_input,
                           "--steps", str(plan.steps), "--concurrency", plan.concurrency, "--requests",
                           str(plan.requests), "--duration", str(plan.point_seconds), "--warmup", "2",
                           "--out", str(out)]  # fmt: skip
                code = run_logged(command, folder / f"serving-{server.label}.log", budget.left())
                entry[endpoint] = out.name if code == 0 and out.is_file() else {"exit_code": code}
            entry["exit_code"] = stop(server.process)
    finally:
        for server in servers:
            code = stop(server.process)
            results.setdefault(server.label, {}).setdefault("exit_code", code)
            server.log.close()
            shutil.rmtree(server.storage, ignore_errors=True)
    return results


STAGE_FUNCTIONS = {
    "env": stage_env,
    "tests": stage_tests,
    "pipeline": stage_pipeline,
    "memory": stage_memory,
    "serving": stage_serving,
}
# Seconds a stage needs at the least to be worth starting (a GPU run; the dry run needs far less).
STAGE_MINIMUM_S = {"env": 5, "tests": 60, "pipeline": 90, "memory": 45, "serving": 60}


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else None


def headline(folder: Path, stages: dict[str, Any]) -> dict[str, Any]:
    """The figures the README's Performance section wants, each beside its target."""
    figures: dict[str, Any] = {}
    env = _load(folder, "env.json") or {}
    if env:
        figures["gpu"] = env["gpu"].get("name")
        figures["matmul_bf16_tflops_measured"] = env["matmul_measured"]["tflops"]
        figures["matmul_fp8_tflops_measured"] = env["matmul_measured"].get("fp8_rowwise_tflops")
        figures["matmul_tflops_datasheet"] = env["gpu"].get("datasheet_tflops")
    pipeline = _load(folder, "pipeline.json") or {}
    variants = {entry["variant"]: entry for entry in pipeline.get("variants", [])}

    def total(variant: str, case: str) -> float | None:
        entry = variants.get(variant)
        if not entry:
            return None
        numbers = entry["edit"] if case == "edit" else next(iter(entry["text_to_image"].values()))
        return numbers["median_ms"]["total"]

    compiled_bf16 = next((name for name in variants if name.startswith("compiled:") and "+" not in name), None)
    compiled_fp8 = next((name for name in variants if name.startswith("compiled:") and "+fp8" in name), None)
    checks = []

    def check(name: str, value: float | None, target: float, higher_is_better: bool = False) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        checks.append({"figure": name, "value": value, "target": target, "met": met})

    if compiled_bf16:
        entry = variants[compiled_bf16]
        check("edit, compiled bf16, median total ms", total(compiled_bf16, "edit"), TARGETS["edit_bf16_ms"])
        check("text-to-image, compiled bf16, median total ms", total(compiled_bf16, "t2i"), TARGETS["text_to_image_ms"])
        speedup = entry.get("speedup_vs_plain_diffusers", {})
        check(
            "speed-up vs plain diffusers, text-to-image",
            speedup.get("text_to_image"),
            TARGETS["speedup_vs_plain"],
            True,
        )
        check("speed-up vs plain diffusers, edit", speedup.get("edit"), TARGETS["speedup_vs_plain"], True)
        check(
            "peak reserved GB, edit, compiled bf16", entry["edit"].get("peak_reserved_gb"), TARGETS["edit_bf16_peak_gb"]
        )
    if compiled_fp8:
        check("edit, compiled fp8, median total ms", total(compiled_fp8, "edit"), TARGETS["edit_fp8_ms"])
        figures["fp8_drift"] = variants[compiled_fp8].get("drift")
        if compiled_bf16 and total(compiled_fp8, "edit"):
            figures["fp8_speedup_edit"] = round(total(compiled_bf16, "edit") / total(compiled_fp8, "edit"), 2)
            figures["fp8_speedup_text_to_image"] = round(total(compiled_bf16, "t2i") / total(compiled_fp8, "t2i"), 2)
    for name, entry in variants.items():
        if name.startswith("compiled:"):
            check(f"graphs compiled after warm-up, {name}", entry.get("graphs_compiled_after_warm_up"), 0)
    figures["checks"] = checks
    memory = _load(folder, "memory.json") or {}
    figures["memory"] = {
        entry["variant"]: {key: entry.get(key) for key in ("peak_reserved_gb", "device_used_gb", "smallest_card_gib")}
        | {
            "edit_new_prompt_ms": entry["runs"]["new_prompt"]["total_ms"],
            "edit_cached_prompt_ms": entry["runs"]["cached_prompt"]["total_ms"],
            "encode_new_prompt_ms": entry["encode"]["new_prompt_ms"],
            "text_encoder_copy_in_ms": entry["encode"]["of_which_copy_in_ms"],
        }
        for entry in memory.get("measured", [])
    }
    serving_points = {}
    for path in sorted(folder.glob("serving-*.json")):
        report = json.loads(path.read_text())
        serving_points[path.stem] = [
            {
                "concurrency": point["concurrency"],
                "p50_ms": point["latency_ms"]["p50"],
                "images_per_s": point["images_per_s"],
                "errors": point["errors"],
            }  # fmt: skip
            for point in report["points"]
        ]
    figures["serving"] = serving_points
    tests = stages.get("tests", {})
    if "passed" in tests:
        figures["gpu_tests"] = {"passed": tests["passed"], "failed": len(tests["failed"]),
                                "skipped": len(tests["skipped"])}  # fmt: skip
    return figures


def summary_text(summary: dict[str, Any]) -> str:
    figures = summary["headline"]
    lines = [f"gpu-kit on {figures.get('gpu') or summary['name']}  ({summary['wall_s']} s)"]
    for stage, result in summary["stages"].items():
        status = result.get("status")
        lines.append(f"  stage {stage:<9} {status} {result.get('seconds', '')} s {result.get('error', '')}".rstrip())
    if "matmul_bf16_tflops_measured" in figures:
        measured = f"bf16 {figures['matmul_bf16_tflops_measured']}, fp8 {figures.get('matmul_fp8_tflops_measured')}"
        lines.append(f"  matmul TFLOP/s measured {measured}; datasheet {figures.get('matmul_tflops_datasheet')}")
    for check in figures.get("checks", []):
        mark = {True: "met", False: "MISSED", None: "n/a"}[check["met"]]
        lines.append(f"  {check['figure']:<48} {check['value']!s:>8}  target {check['target']:<7} {mark}")
    if figures.get("fp8_drift"):
        drift = figures["fp8_drift"]
        lines.append(f"  fp8 drift vs bf16: worst PSNR {drift['worst_psnr_db']} dB, worst latent rel. error "
                     f"{drift['worst_latent_relative_error']}")  # fmt: skip
    for variant, memory in figures.get("memory", {}).items():
        lines.append(f"  memory {variant:<28} {memory}")
    for name, points in figures.get("serving", {}).items():
        lines.append(f"  {name:<28} " + "  ".join(f"c{p['concurrency']}: p50 {p['p50_ms']} ms {p['images_per_s']}/s"
                                                    for p in points))  # fmt: skip
    if "gpu_tests" in figures:
        lines.append(f"  gpu tests {figures['gpu_tests']}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    plan = cpu_plan() if args.cpu else Plan()
    try:
        device = probe_device(plan.device)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        sys.stderr.write(f"gpu-kit run: {exc}\n")
        return 2
    if not args.cpu and device["gpu"].get("name", "cpu") == "cpu":
        sys.stderr.write("gpu-kit run: no CUDA device here; use --cpu for the dry run with the tiny model\n")
        return 2
    plan.fp8 = device["fp8"]
    name = "cpu-dry-run" if args.cpu else slug(device["gpu"]["name"])
    stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        sys.stderr.write(
            f"gpu-kit run: unknown stage(s) {', '.join(sorted(unknown))}; stages are {', '.join(STAGES)}\n"
        )
        return 2
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu-kit-")) if args.pack else out
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gpu-kit-inductor"))
    budget = Budget(args.budget_s)
    started = time.monotonic()
    summary: dict[str, Any] = {"name": name, "plan": vars(plan), "budget_s": args.budget_s, "stages": {}}
    for stage in stages:
        minimum = 1 if args.cpu else STAGE_MINIMUM_S[stage]
        if budget.left() < minimum:
            summary["stages"][stage] = {"status": "skipped", "error": "out of the kit's time budget: run it with "
                                        f"--stages {stage}"}  # fmt: skip
            continue
        began = time.monotonic()
        sys.stdout.write(f"[gpu-kit] {stage} ({budget.left():.0f} s left)\n")
        sys.stdout.flush()
        try:
            result = STAGE_FUNCTIONS[stage](plan, folder, budget)
            failed = result.get("exit_code") not in (None, 0) or result.get("failed")
            result["status"] = "failed" if failed else "done"
        except Exception as exc:  # one stage's failure must not cost the others their results
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - began, 1)
        summary["stages"][stage] = result
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["headline"] = headline(folder, summary["stages"])
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    text = summary_text(summary)
    (folder / "summary.txt").write_text(text)
    if args.pack:
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out / f"{name}.tar.gz", "w:gz") as archive:
            archive.add(folder, arcname=name)
        shutil.copy(folder / "summary.json", out / f"{name}-summary.json")
        shutil.copy(folder / "summary.txt", out / f"{name}-summary.txt")
        shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(text)
    return 0 if all(result.get("status") == "done" for result in summary["stages"].values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepimage bench gpu-kit", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    prep = verbs.add_parser("prepare", help="download the wheels the GPU machine lacks (run here)")
    prep.add_argument("--dest", default=str(REPO / ".gpukit"), help="the folder to carry (ignored by git)")
    prep.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    prep.add_argument("--machine-torch", default=MACHINE_TORCH, help="the GPU machine's torch version")
    prep.add_argument("--extras", default="bench,fp8", type=lambda text: text.split(","))
    prep.add_argument("--list", action="store_true", help="print the downloads instead of running them")
    look = verbs.add_parser("probe", help="print the device's description as JSON (used by run)")
    look.add_argument("--device", required=True)
    look.add_argument("--matmul-size", type=int, default=0, help="also measure the matrix rate at this size")
    go = verbs.add_parser("run", help="run every stage (on the GPU machine; --cpu for the dry run)")
    go.add_argument("--out", default=os.environ.get("OUT") or "gpu-kit-out", help="where results go (default $OUT)")
    go.add_argument("--cpu", action="store_true", help="dry run on this CPU with the tiny model")
    go.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    go.add_argument("--budget-s", type=float, default=480.0, help="seconds for all stages together")
    go.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                    help="one .tar.gz plus summaries in --out (what the device machine can send back)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "probe":
        sys.stdout.write(json.dumps(probe(args.device, args.matmul_size), default=str) + "\n")
        return 0
    return prepare(args) if args.verb == "prepare" else run(args)


if __name__ == "__main__":
    sys.exit(main())
