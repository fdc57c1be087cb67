"""End to end: result storage with real `stepimage serve` processes.

- Two servers sharing one S3 bucket (a real SeaweedFS): a link made by either is served by both, expires after
  --url-ttl and is deleted by the sweep.
- Storage that cannot work is a one-line start-up error naming the setting, exit status 2, no traceback.
- A write that fails mid-request (the kernel refusing a file larger than RLIMIT_FSIZE) is a clean 507 envelope and
  the server keeps serving.
- Free space under --storage-min-free-mb turns /ready to 503 and stepimage_storage_ok to 0, and refuses url
  requests before compute while b64_json requests still work.

The servers are launched together when the module starts (a start is mostly torch import on one core), and each
test waits only for its own.
"""

from __future__ import annotations

import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.conftest import metric, wait_for
from tests.e2e.conftest import REPO_ROOT, ServerProcess, free_port, launch, serve_command, wait_ready

pytestmark = pytest.mark.e2e

MODEL = "step-image-edit-2"
BASE_FLAGS = ["--backend", "tiny", "--host", "127.0.0.1", "--no-warmup", "--extra-size", "64x64"]
SHARED_TTL = 4
# Big enough that no PNG of it fits under the file-size limit below; small enough to be quick on the tiny model.
BIG_SIZE = "256x256"
FILE_SIZE_LIMIT = 64 * 1024
STARTUP_TIMEOUT_S = 120


def flags(port: int, *more: str) -> list[str]:
    return [*BASE_FLAGS, "--port", str(port), *more]


@pytest.fixture(scope="module")
def storage_servers(s3_server, tmp_path_factory) -> Iterator[dict[str, object]]:
    """Every long-running server of this module, launched at once; all stopped at the end."""
    tmp = tmp_path_factory.mktemp("storage-e2e")
    bucket = s3_server.new_bucket("shared")
    shared = [*s3_server.flags(bucket), "--url-ttl", str(SHARED_TTL), "--sweep-interval", "1"]
    usage = os.statvfs(tmp)
    free_mb = usage.f_bavail * usage.f_frsize / 2**20
    servers = {
        "a": launch("shared-a", port := free_port(), flags(port, *shared), tmp, env_overrides=s3_server.env()),
        "b": launch("shared-b", port := free_port(), flags(port, *shared), tmp, env_overrides=s3_server.env()),
        "limited": launch(
            "limited",
            port := free_port(),
            flags(port, "--storage-dir", str(tmp / "limited"), "--extra-size", BIG_SIZE, "--storage-check-interval=1"),
            tmp,
        ),
        "low-space": launch(
            "low-space",
            port := free_port(),
            flags(port, "--storage-dir", str(tmp / "low"), "--storage-min-free-mb", str(int(free_mb * 4) + 1)),
            tmp,
        ),
    }
    try:
        yield {"bucket": bucket, **servers}
    finally:
        for server in servers.values():
            server.stop()


def sdk(server: ServerProcess) -> OpenAI:
    return OpenAI(api_key="unused", base_url=f"{server.base_url}/v1", max_retries=0, timeout=60.0)


def generate_url(server: ServerProcess, seed: int) -> str:
    with sdk(server) as client:
        result = client.images.generate(
            model=MODEL, prompt="a harbour", size="64x64", response_format="url", extra_body={"seed": seed, "steps": 1}
        )
    return result.data[0].url


def path_of(url: str) -> str:
    return "/v1/images/files/" + url.rsplit("/", 1)[1]


# -- one bucket, two servers -----------------------------------------------------------------------------------------


def test_two_servers_share_links_through_one_bucket_until_they_expire(storage_servers, s3_server):
    a, b, bucket = storage_servers["a"], storage_servers["b"], storage_servers["bucket"]
    wait_ready(a)
    wait_ready(b)
    from_a, from_b = generate_url(a, seed=1), generate_url(b, seed=2)
    assert from_a.startswith(a.base_url) and from_b.startswith(b.base_url)
    with httpx.Client(timeout=30) as http:
        for url in (from_a, from_b):
            bodies = [http.get(server.base_url + path_of(url)) for server in (a, b)]
            assert [body.status_code for body in bodies] == [200, 200]
            assert bodies[0].content == bodies[1].content and bodies[0].content.startswith(b"\x89PNG")
        assert len(s3_server.keys(bucket)) == 2
        # Nobody asks for the links again: only the servers' sweeps (every second, both at once) can delete them.
        wait_for(lambda: s3_server.keys(bucket) == [], timeout=SHARED_TTL + 15)
        for url in (from_a, from_b):
            for server in (a, b):
                gone = http.get(server.base_url + path_of(url))
                assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    for server in (a, b):
        assert "sweeping expired results failed" not in server.log_path.read_text()


# -- faults ----------------------------------------------------------------------------------------------------------


def start_up_cases(tmp: Path, s3_server) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name: (flags, environment, what the one error line must say)."""
    (tmp / "a-file").write_text("not a directory")
    missing = [*s3_server.flags("no-such-bucket")]
    unreachable = [*s3_server.flags("any-bucket")]
    unreachable[unreachable.index("--s3-endpoint-url") + 1] = f"http://127.0.0.1:{free_port()}"
    return {
        "file": (["--storage-dir", str(tmp / "a-file")], {}, "--storage-dir (STEPIMAGE_STORAGE_DIR): is a file"),
        # sysfs: a directory in which the kernel lets nobody, root included, create a file.
        "unwritable": (["--storage-dir", "/sys"], {}, "--storage-dir (STEPIMAGE_STORAGE_DIR): is not writable"),
        "no-bucket-given": (["--storage", "s3"], {}, "--s3-bucket: a bucket is required with --storage"),
        "missing-bucket": (missing, s3_server.env(), "the bucket 'no-such-bucket' does not exist"),
        "unreachable": (unreachable, s3_server.env(), "--s3-endpoint-url (STEPIMAGE_S3_ENDPOINT_URL): cannot connect"),
    }


def test_storage_that_cannot_work_is_a_one_line_start_up_error(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STEPIMAGE_", "AWS_"))}
    running = {}
    for name, (more, extra_env, expected) in start_up_cases(tmp_path, s3_server).items():
        proc = subprocess.Popen(
            [*serve_command(), *flags(free_port(), *more)],
            cwd=REPO_ROOT,
            env={**env, **extra_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        running[name] = (proc, expected)
    for name, (proc, expected) in running.items():
        try:
            out, err = proc.communicate(timeout=STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"{name}: the server started instead of refusing its storage")
        assert proc.returncode == 2, (name, out, err)
        assert "Traceback" not in out + err, (name, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("stepimage serve: ") and expected in last, (name, err)
        assert s3_server.secret_key not in out + err


def test_a_write_failure_mid_request_is_a_clean_507_and_the_server_keeps_serving(storage_servers):
    server = storage_servers["limited"]
    wait_ready(server)
    http = httpx.Client(base_url=server.base_url, timeout=60)
    body = {"model": MODEL, "prompt": "a harbour", "size": BIG_SIZE, "steps": 1, "seed": 3}
    earlier = http.post("/v1/images/generations", json=body).json()["data"][0]["url"]

    # The kernel now refuses to let this process grow any file past 64 KiB: every write of a result (a 256x256 PNG
    # of noise is ~200 KB) fails with EFBIG, as a full disk would fail with ENOSPC. Python ignores SIGXFSZ, so the
    # process is not killed; its log file stays far below the limit. Only the soft limit moves, so it can go back.
    soft, hard = resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, hard))
    try:
        failed = http.post("/v1/images/generations", json=body)
        assert failed.status_code == 507, failed.text
        error = failed.json()["error"]
        assert error["code"] == "insufficient_storage" and error["type"] == "server_error"
        assert "larger than the storage accepts" in error["message"] and "b64_json" in error["message"]
        assert "/" not in error["message"].replace("response_format", "")
        assert failed.headers["retry-after"]
        # The server keeps serving: inline results, earlier links, health.
        inline = http.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
        assert inline.status_code == 200 and inline.json()["data"][0]["b64_json"]
        assert http.get(path_of(earlier)).status_code == 200
        assert http.get("/health").status_code == 200
        assert metric(http, 'stepimage_storage_failures_total{operation="write"}') >= 1
        assert server.proc.poll() is None
    finally:
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
    # The next health check (every second here) clears the failed write; url results work again.
    wait_for(lambda: http.get("/ready").status_code == 200, timeout=30)
    assert http.get(path_of(http.post("/v1/images/generations", json=body).json()["data"][0]["url"])).status_code == 200
    assert "Traceback" not in server.log_path.read_text()
    http.close()


def test_low_free_space_turns_ready_and_the_metric_and_refuses_url_requests(storage_servers):
    server = storage_servers["low-space"]
    http = httpx.Client(base_url=server.base_url, timeout=60)

    def storage_named() -> bool:
        try:
            ready = http.get("/ready")
        except httpx.TransportError:
            return False
        assert server.proc.poll() is None, server.log_tail()
        return ready.status_code == 503 and "MiB free" in ready.json()["error"]["message"]

    wait_for(storage_named, timeout=STARTUP_TIMEOUT_S)
    ready = http.get("/ready")
    assert ready.json()["error"]["code"] == "not_ready" and ready.headers["retry-after"]
    assert "--storage-min-free-mb" in ready.json()["error"]["message"]
    assert metric(http, "stepimage_storage_ok") == 0
    assert metric(http, "stepimage_storage_free_bytes") > 0

    body = {"model": MODEL, "prompt": "a harbour", "size": "64x64", "steps": 1}
    refused = http.post("/v1/images/generations", json=body)
    assert refused.status_code == 507 and refused.json()["error"]["code"] == "insufficient_storage"
    # Refused before the engine: no image was made for it.
    assert metric(http, 'stepimage_images_generated_total{kind="generation"}') == 0
    inline = http.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
    assert inline.status_code == 200
    assert metric(http, 'stepimage_images_generated_total{kind="generation"}') == 1
    http.close()
