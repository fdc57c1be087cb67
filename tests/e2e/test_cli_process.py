"""`stepimage serve` refusing bad options as a process: a one-line error naming the choices, status 2, no traceback,
and `--help` that shows defaults as an operator would type them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from server.cli import EXIT_USAGE
from tests.e2e.conftest import REPO_ROOT, serve_command
from weights.manifest import checkpoint_names

pytestmark = pytest.mark.e2e


def run_serve(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STEPIMAGE_")}
    return subprocess.run(
        serve_command() + list(args), capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**clean, **env}
    )


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--log-level", "verbose"], {}, ["debug", "info", "warning", "error"]),
        ([], {"STEPIMAGE_LOG_LEVEL": "verbose"}, ["debug", "info", "warning", "error"]),
        # Whatever the backend: tiny never reads the checkpoint, and a typo must still not pass silently.
        (["--backend", "tiny", "--checkpoint", "nope"], {}, checkpoint_names()),
        (["--backend", "tiny"], {"STEPIMAGE_CHECKPOINT": "nope"}, checkpoint_names()),
    ],
)
def test_invalid_options_are_one_clear_line_and_status_2(args, env, names):
    result = run_serve(*args, **env)
    assert result.returncode == EXIT_USAGE, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "nope" in last or "verbose" in last, last
    for name in names:
        assert name in last, last


def test_help_shows_human_defaults():
    result = run_serve("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for python_repr in ("PosixPath", "None", "[]", "True", "False", "60.0"):
        assert python_repr not in text, python_repr
    home = str(Path.home())
    assert "default ~/.cache/stepimage/files" in text and home not in text
    assert "STEPIMAGE_WARMUP; default on" in text and "STEPIMAGE_RANDOM_WEIGHTS; default off" in text
    assert "STEPIMAGE_DRAIN_TIMEOUT; default 60]" in text
    assert "--log-level {debug,info,warning,error}" in text
    assert "--checkpoint {" + ",".join(checkpoint_names()) + "}" in text
    for flag in ("--header-timeout", "--body-timeout", "--keep-alive-timeout", "--max-connections"):
        assert flag in text
