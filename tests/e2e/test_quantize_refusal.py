"""`stepimage serve --quantize fp8` where fp8 cannot run: one clear line, a failed exit, no traceback."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.e2e.conftest import REPO_ROOT, free_port, serve_command

pytestmark = pytest.mark.e2e


def test_serve_refuses_fp8_on_a_cpu_in_one_line(tmp_path):
    command = [*serve_command(), "--port", str(free_port()), "--backend", "tiny", "--device", "cpu",
               "--quantize", "fp8", "--storage-dir", str(tmp_path), "--no-warmup"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    refusal = [line for line in done.stderr.splitlines() if "--quantize fp8 needs" in line]
    assert len(refusal) == 1, done.stderr[-2000:]
    assert "compute capability 8.9" in refusal[0] and "the device is cpu" in refusal[0]
    assert "Traceback" not in done.stderr
