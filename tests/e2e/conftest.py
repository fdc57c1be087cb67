"""Fixtures that run `stepimage serve` as a real subprocess on a free localhost port.

Two servers are launched together at the start of the session: the main one, configured by flags, and a second one
configured only by STEPIMAGE_* environment variables. Starting a server means importing torch and building the tiny
pipeline (several seconds of mostly single-threaded work), so launching both at once and waiting for each only when
a test first needs it keeps the suite's wall time close to a single start on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MAIN_KEYS = ("test-key-1", "test-key-2")
ENV_KEYS = ("k1", "k2")
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    # Port 0 makes the kernel pick an unused port; the tiny window between closing this socket and the server
    # binding it is an accepted risk for a test suite on a private machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command() -> list[str]:
    # Prefer the installed console script: it is what an operator runs, so it also checks the entry point.
    script = Path(sys.executable).parent / "stepimage"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "server", "serve"]


@dataclass
class ServerProcess:
    name: str
    port: int
    log_path: Path
    proc: subprocess.Popen
    ready: bool = False

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait for the graceful drain, then kill if it hung. Returns the exit status seen after
        SIGTERM, or None when it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def assert_stops_cleanly(self) -> None:
        """Stop it and require exit status 0: accepted work drained, nothing died by signal."""
        code = self.stop()
        if code == 0:
            return
        if code is None:
            how = f"did not exit within {STOP_TIMEOUT_S:.0f} s of SIGTERM and was killed"
        elif code < 0:
            how = f"was killed by signal {signal.Signals(-code).name} instead of exiting 0"
        else:
            how = f"exited with status {code}"
        pytest.fail(f"after SIGTERM the {self.name} server {how}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def launch(
    name: str, port: int, args: list[str], tmp: Path, *, env_overrides: dict[str, str] | None = None
) -> ServerProcess:
    # The parent's own STEPIMAGE_* settings must not leak into a server whose configuration a test controls.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEPIMAGE_")}
    env.update(env_overrides or {})
    # Unbuffered so that the log tail shown on failure is complete.
    env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp / f"{name}.log"
    # The child inherits its own copy of the descriptor, so ours can be closed as soon as it is started.
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            serve_command() + args,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        log.close()
    return ServerProcess(name=name, port=port, log_path=log_path, proc=proc)


def wait_ready(server: ServerProcess, timeout: float = READY_TIMEOUT_S) -> None:
    if server.ready:
        return
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=server.base_url, timeout=5.0) as http:
        while time.monotonic() < deadline:
            code = server.proc.poll()
            if code is not None:
                pytest.fail(f"server {server.name} exited with {code} before it was ready:\n{server.log_tail()}")
            try:
                ready = http.get("/ready")
            except httpx.TransportError:
                # Not listening yet (torch is still importing).
                time.sleep(0.1)
                continue
            if ready.status_code == 200:
                assert ready.json() == {"status": "ready"}
                server.ready = True
                return
            # Not ready yet: that must be a proper 503 envelope.
            assert ready.status_code == 503, ready.text
            assert ready.json()["error"]["code"] == "not_ready"
            assert ready.headers.get("retry-after"), ready.headers
            # Whether this branch runs at all depends on timing; when it does, liveness must already answer.
            health = http.get("/health")
            assert health.status_code == 200, health.text
            time.sleep(0.1)
    pytest.fail(f"server {server.name} not ready after {timeout:.0f} s:\n{server.log_tail()}")


@pytest.fixture(scope="session")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Both server processes, launched but not yet waited for. Whatever is still running at the end is stopped."""
    tmp = tmp_path_factory.mktemp("e2e")
    main_port = free_port()
    env_port = free_port()
    while env_port == main_port:
        env_port = free_port()
    main_args = [
        "--backend", "tiny",
        "--host", "127.0.0.1",
        "--port", str(main_port),
        "--api-key", MAIN_KEYS[0],
        "--api-key", MAIN_KEYS[1],
        "--storage-dir", str(tmp / "main-files"),
        "--extra-size", "64x64",
        "--no-warmup",
        "--url-ttl", "3600",
        "--max-body-mb", "8",
    ]  # fmt: skip
    env_config = {
        "STEPIMAGE_API_KEYS": ",".join(ENV_KEYS),
        "STEPIMAGE_HOST": "127.0.0.1",
        "STEPIMAGE_PORT": str(env_port),
        "STEPIMAGE_BACKEND": "tiny",
        "STEPIMAGE_WARMUP": "false",
        "STEPIMAGE_EXTRA_SIZES": "64x64",
        "STEPIMAGE_STORAGE_DIR": str(tmp / "env-files"),
    }
    servers = {
        "main": launch("main", main_port, main_args, tmp),
        "env": launch("env", env_port, [], tmp, env_overrides=env_config),
    }
    try:
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def server(launched: dict[str, ServerProcess]) -> Iterator[ServerProcess]:
    """The flag-configured server, ready. Its teardown checks that SIGTERM drains and exits cleanly."""
    main = launched["main"]
    wait_ready(main)
    yield main
    main.assert_stops_cleanly()


@pytest.fixture(scope="session")
def env_server(launched: dict[str, ServerProcess]) -> ServerProcess:
    """The environment-configured server, ready (stopped by the test that uses it)."""
    other = launched["env"]
    wait_ready(other)
    return other


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    """A plain HTTP client with the first key; tests that must send no key pass headers explicitly."""
    with httpx.Client(
        base_url=server.base_url, timeout=60.0, headers={"Authorization": f"Bearer {MAIN_KEYS[0]}"}
    ) as client:
        yield client


@pytest.fixture(scope="session")
def client(server: ServerProcess):
    from openai import OpenAI

    with OpenAI(api_key=MAIN_KEYS[0], base_url=f"{server.base_url}/v1", max_retries=0, timeout=60.0) as sdk:
        yield sdk
