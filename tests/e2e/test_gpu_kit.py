"""The GPU kit's `run` command, end to end, as the dry run on this CPU (what keeps it from rotting between GPU
sessions), and `prepare`'s choice of wheels (without downloading them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from benchmarks import gpu_kit
from tests.e2e.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def run_kit(out, *options, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "scripts/gpu-kit.sh", "run", "--cpu", "--out", str(out), *options],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_dry_run_runs_every_stage_and_packs_three_files(tmp_path):
    out = tmp_path / "out"
    done = run_kit(out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # What the device machine can send back: few files, no folders.
    assert sorted(path.name for path in out.iterdir()) == [
        "cpu-dry-run-summary.json", "cpu-dry-run-summary.txt", "cpu-dry-run.tar.gz",
    ]  # fmt: skip
    with tarfile.open(out / "cpu-dry-run.tar.gz") as archive:
        archive.extractall(tmp_path / "unpacked", filter="data")
    folder = tmp_path / "unpacked" / "cpu-dry-run"
    summary = json.loads((folder / "summary.json").read_text())
    assert {stage: result["status"] for stage, result in summary["stages"].items()} == dict.fromkeys(
        gpu_kit.STAGES, "done"
    )
    # The summary printed last is the one in the archive.
    assert (out / "cpu-dry-run-summary.txt").read_text() in done.stdout

    env = json.loads((folder / "env.json").read_text())
    assert env["gpu"]["name"] == "cpu" and env["matmul_measured"]["tflops"] > 0
    assert env["versions"]["torchao"] and env["versions"]["diffusers"]
    # fp8 is refused on a CPU, and the refusal is what the report says instead of a figure.
    assert "compute capability 8.9" in summary["stages"]["pipeline"]["refused"]["eager:bf16+fp8"]

    tests = summary["stages"]["tests"]
    assert tests["exit_code"] == 0 and tests["tests"] >= 1 and not tests["failed"]
    assert {skip["reason"] for skip in tests["skipped"]} <= {"needs a CUDA GPU", "needs CUDA and the weights"}

    pipeline = json.loads((folder / "pipeline.json").read_text())
    (variant,) = pipeline["variants"]
    assert variant["variant"] == "eager:fp32" and variant["graphs_compiled_after_warm_up"] == 0
    assert variant["text_to_image"]["64x64"]["floor_step_ms"] > 0
    assert pipeline["baseline_plain_diffusers"]["edit"]["median_total_ms"] > 0
    assert (folder / "pipeline.png").read_bytes().startswith(b"\x89PNG")

    memory = json.loads((folder / "memory.json").read_text())
    assert (
        memory["paper"]["modes"]["bf16+trim+offload"]["gpu_weights_gb"]
        < memory["paper"]["modes"]["bf16"]["gpu_weights_gb"]
    )
    (offload,) = [entry for entry in memory["measured"] if "offload" in entry["variant"]]
    runs = offload["runs"]
    assert runs["new_prompt"]["text_encoder_copies_in"] == 1
    assert runs["cached_prompt"]["text_encoder_copies_in"] == 0
    assert runs["another_new_prompt"]["text_encoder_copies_in"] == 1

    for batch in ("batch4", "batch1"):
        for endpoint in ("generations", "edits"):
            report = json.loads((folder / f"serving-{endpoint}-{batch}.json").read_text())
            assert [point["concurrency"] for point in report["points"]] == [1, 2]
            assert all(point["ok"] == point["requests"] == 2 for point in report["points"])
        assert summary["stages"]["serving"][batch]["exit_code"] == 0


def test_stages_out_of_budget_are_skipped_with_the_command_that_runs_them(tmp_path):
    done = run_kit(tmp_path, "--stages", "env,pipeline", "--budget-s", "0", "--no-pack", timeout=120)
    assert done.returncode == 1
    summary = json.loads((tmp_path / "cpu-dry-run" / "summary.json").read_text())
    for stage in ("env", "pipeline"):
        assert summary["stages"][stage]["status"] == "skipped"
        assert f"--stages {stage}" in summary["stages"][stage]["error"]


def test_unknown_stage_is_refused_in_one_line(tmp_path):
    done = run_kit(tmp_path, "--stages", "env,benchmarks", timeout=120)
    assert done.returncode == 2
    assert "unknown stage(s) benchmarks" in done.stderr and "Traceback" not in done.stderr


def test_prepare_carries_our_stack_at_the_tested_versions_and_leaves_torch_to_the_machine(capsys):
    from importlib import metadata

    assert gpu_kit.main(["prepare", "--list"]) == 0
    commands = capsys.readouterr().out.splitlines()
    pinned = {command.split()[-1] for command in commands}
    for name in ("diffusers", "transformers", "fastapi", "uvicorn", "pydantic", "torchao", "huggingface-hub"):
        assert f"{name}=={metadata.version(name)}" in pinned, name
    names = {pin.split("==")[0] for pin in pinned}
    assert not names & {"torch", "triton", "numpy", "pytest"}
    assert not any(name.startswith("nvidia-") for name in names)
    for command in commands:
        assert "--no-deps" in command and "--python-version 3.12" in command
        assert "--platform manylinux_2_28_x86_64" in command and "--only-binary=:all:" in command


def test_prepare_refuses_a_torchao_the_machine_torch_cannot_run(capsys):
    assert gpu_kit.main(["prepare", "--list", "--machine-torch", "2.9.1"]) == 1
    assert "needs torch >= 2.11; the machine has 2.9.1" in capsys.readouterr().err
