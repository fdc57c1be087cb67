"""The local result store on a real directory, storage settings, and what storage faults say (never a path)."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from server import errors
from server.config import Settings
from server.metrics import Metrics
from server.storage import (
    DirectoryStore,
    StorageConfigError,
    fault_from_os_error,
    is_result_name,
    open_store,
)

pytestmark = pytest.mark.unit

# A real directory in which the kernel refuses to create files, even for root (sysfs).
UNWRITABLE_DIR = Path("/sys")


def read(store, name: str) -> bytes:
    found = store.fetch(name)
    assert found is not None
    try:
        return b"".join(found.chunks)
    finally:
        found.close()


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_names_are_unguessable_and_results_round_trip(tmp_path):
    store = DirectoryStore(tmp_path, ttl_seconds=100)
    names = {store.save(b"png-bytes" * 1000, "png") for _ in range(50)}
    assert len(names) == 50 and all(is_result_name(name) for name in names)
    # 32 url-safe characters: 192 random bits.
    assert {len(name.split(".")[0]) for name in names} == {32}
    name = sorted(names)[0]
    found = store.fetch(name)
    assert found.size == 9000 and 99 < found.seconds_left <= 100
    found.close()
    assert read(store, name) == b"png-bytes" * 1000
    for hostile in ("../" + name, name.replace(".png", ".exe"), "x.png", ""):
        assert store.fetch(hostile) is None


def test_expired_results_are_gone_before_and_after_the_sweep(tmp_path):
    store = DirectoryStore(tmp_path, ttl_seconds=100)
    names = sorted(store.save(b"x", "jpg") for _ in range(12))
    for name in names[:10]:
        age(tmp_path / name, 101)
    # Expired is a 404 at once, and reading it deletes it.
    assert store.fetch(names[0]) is None
    assert not (tmp_path / names[0]).exists()
    # A partial write left behind by a crash is swept too; files that are not results are left alone.
    (tmp_path / ".incoming-crashed").write_bytes(b"half")
    age(tmp_path / ".incoming-crashed", 101)
    (tmp_path / "operator-notes.txt").write_text("keep")
    age(tmp_path / "operator-notes.txt", 101)
    assert store.sweep() == 10
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*names[10:], "operator-notes.txt"])
    assert read(store, names[11]) == b"x"


def test_a_result_being_read_survives_the_sweep(tmp_path):
    store = DirectoryStore(tmp_path, ttl_seconds=100)
    name = store.save(b"a" * 3_000_000, "png")
    found = store.fetch(name)
    age(tmp_path / name, 101)
    assert store.sweep() == 1
    assert b"".join(found.chunks) == b"a" * 3_000_000
    found.close()


@pytest.mark.parametrize(
    ("code", "full", "reason"),
    [
        (errno.ENOSPC, True, "out of space"),
        (errno.EDQUOT, True, "quota"),
        (errno.EFBIG, True, "larger than the storage accepts"),
        (errno.EACCES, False, "permission denied"),
        (errno.EROFS, False, "read-only"),
        (errno.EMFILE, False, "too many open files"),
    ],
)
def test_os_errors_become_reasons_without_the_path(code, full, reason):
    fault = fault_from_os_error(OSError(code, os.strerror(code), "/srv/secret/results/.incoming-x"))
    assert fault.full is full
    assert reason in fault.reason
    assert "/srv" not in fault.reason and "/srv/secret" in fault.detail


def test_a_failed_write_is_a_clean_503_and_marks_the_storage_unhealthy(tmp_path):
    metrics = Metrics()
    store = DirectoryStore(UNWRITABLE_DIR, ttl_seconds=100, metrics=metrics)
    with pytest.raises(errors.StorageUnavailable) as caught:
        store.save(b"x", "png")
    assert caught.value.status == 503 and caught.value.retry_after
    assert "/sys" not in caught.value.message and "b64_json" in caught.value.message
    assert not store.health.ok and "the last write failed" in store.health.reason
    # From now on url requests are refused before any work.
    with pytest.raises(errors.StorageUnavailable):
        store.require_healthy()
    assert metrics.storage_failures.labels("write")._value.get() == 1
    assert metrics.storage_ok._value.get() == 0


def test_free_space_threshold_makes_the_storage_unhealthy_until_space_returns(tmp_path):
    metrics = Metrics()
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    store = DirectoryStore(tmp_path, ttl_seconds=100, min_free_bytes=free * 2, metrics=metrics)
    health = store.refresh_health()
    assert not health.ok and health.full
    assert (
        "MiB free" in health.reason and "--storage-min-free-mb" in health.reason and str(tmp_path) not in health.reason
    )
    assert metrics.storage_ok._value.get() == 0
    assert metrics.storage_free_bytes._value.get() > 0
    with pytest.raises(errors.InsufficientStorage) as caught:
        store.require_healthy()
    assert caught.value.status == 507
    store.min_free_bytes = 0
    assert store.refresh_health().ok
    assert metrics.storage_ok._value.get() == 1
    store.require_healthy()


def test_the_check_recreates_a_removed_directory(tmp_path):
    store = DirectoryStore(tmp_path / "files", ttl_seconds=100)
    store.verify()
    (tmp_path / "files").rmdir()
    assert store.refresh_health().ok
    assert read(store, store.save(b"x", "png")) == b"x"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: tmp.joinpath("a-file").write_text("x") and tmp / "a-file", "is a file, not a directory"),
        (lambda tmp: tmp.joinpath("a-file").write_text("x") and tmp / "a-file" / "files", "cannot be created"),
        (lambda tmp: UNWRITABLE_DIR, "is not writable"),
    ],
    ids=["file", "under-a-file", "unwritable"],
)
def test_start_up_check_names_the_setting_and_the_problem(tmp_path, make, problem):
    directory = make(tmp_path)
    with pytest.raises(StorageConfigError) as caught:
        open_store(Settings(storage_dir=directory))
    message = str(caught.value)
    assert message.startswith("--storage-dir (STEPIMAGE_STORAGE_DIR): ")
    assert problem in message and "\n" not in message


def test_start_up_check_creates_the_directory(tmp_path):
    store = open_store(Settings(storage_dir=tmp_path / "a" / "b", storage_min_free_mb=0))
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []
    assert store.health.ok


def test_s3_settings():
    with pytest.raises(ValueError, match="a bucket is required with --storage s3"):
        Settings(storage="s3")
    with pytest.raises(ValueError, match="http:// or https://"):
        Settings(storage="s3", s3_bucket="b", s3_endpoint_url="minio:9000")
    assert Settings(storage="s3", s3_bucket="b", s3_prefix="/images").s3_prefix == "images/"
    assert Settings(storage="s3", s3_bucket="b", s3_prefix="").s3_prefix == ""
    assert Settings(s3_bucket=None).storage == "local"


def test_s3_settings_come_from_flags_and_environment(monkeypatch):
    from server.cli import build_parser, settings_from_args

    monkeypatch.setenv("STEPIMAGE_S3_BUCKET", "from-env")
    monkeypatch.setenv("STEPIMAGE_S3_REGION", "eu-west-1")
    args = build_parser().parse_args(
        ["serve", "--storage", "s3", "--s3-prefix", "p/", "--s3-endpoint-url", "http://127.0.0.1:9000"]
    )
    settings = settings_from_args(args)
    assert (settings.storage, settings.s3_bucket, settings.s3_region) == ("s3", "from-env", "eu-west-1")
    assert (settings.s3_prefix, settings.s3_endpoint_url) == ("p/", "http://127.0.0.1:9000")
