"""Stored results for `response_format=url`: where they live, how long, and whether they can be stored now.

Owns the `ResultStore` interface and its two backends, chosen by `--storage`:

- `DirectoryStore` (`local`, the default): one file per result in `--storage-dir`. Its modification time is its
  creation time, so expiry survives a restart without an index.
- `BucketStore` (`s3`): one object per result under `--s3-prefix` in an S3-compatible bucket (boto3, the
  `stepimage[s3]` extra), so every replica on every host can serve every link. Its `LastModified` (set by the
  bucket's clock when it was written) is its creation time.

Names carry 192 random bits, so knowing one link tells nothing about another. A result older than `--url-ttl` is a
404 from the moment it expires, whether or not the periodic sweep has deleted it yet.

Links always point at this server (`/v1/images/files/{name}`), which streams the object from the bucket, rather than
being presigned bucket URLs. A presigned URL only works where the client can reach the bucket's endpoint (often an
in-cluster address), it exposes the endpoint, bucket and access key id, its lifetime is cut short when the signing
credentials are temporary (an instance role's session ends before a 2-hour link would), and its origin changes
with the storage backend. Streaming keeps one stable origin (`--public-url`), keeps expiry a decision this server
makes on every request, and works with any credentials; the price is that result bytes pass through the server
(a few MB per image, read in 1 MiB chunks, never whole in memory).

Storage faults are answered, never 500s: a write that fails for lack of space (ENOSPC, EDQUOT, EFBIG, a full
bucket) is 507 `insufficient_storage`, any other storage failure is 503 `storage_unavailable`, and neither message
names a path, a bucket or a credential. `health` is the last check's verdict (refreshed every
`--storage-check-interval` seconds and set at once by a failed write); while it is bad, url requests are refused
before any compute is spent and /ready says why. `open_store` checks the settings at start and raises
`StorageConfigError`, a one-line message naming the setting.
"""

from __future__ import annotations

import abc
import datetime
import errno
import functools
import logging
import math
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server import errors, images

if TYPE_CHECKING:
    from server.config import Settings
    from server.metrics import Metrics

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpg|webp)")
_INCOMING = ".incoming-"
CHUNK_BYTES = 1024 * 1024
MIB = 1024 * 1024


def new_name(extension: str) -> str:
    return f"{secrets.token_urlsafe(24)}.{extension}"


def is_result_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def setting(name: str) -> str:
    """How an operator sets a field: its flag and its environment variable."""
    return f"--{name.replace('_', '-')} (STEPIMAGE_{name.upper()})"


class StorageConfigError(Exception):
    """The storage settings cannot work; the message is one line that names the setting and the problem."""


@dataclass(frozen=True)
class StorageHealth:
    """A verdict on the storage. `reason` is shown to clients and in /ready: it never holds a path or a secret."""

    ok: bool
    reason: str | None = None
    # The problem is space (507) rather than reachability or permission (503).
    full: bool = False
    free_bytes: int | None = None


class StorageFault(Exception):
    """A storage operation failed. `reason` is safe to show; `detail` (which may name a path) only goes to the log."""

    def __init__(self, reason: str, detail: str, *, full: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.full = full


@dataclass(frozen=True)
class StoredResult:
    """A stored result being read: its size, seconds left before it expires, and its bytes in chunks.

    `close()` releases the file or connection; the caller calls it once done, read to the end or not."""

    size: int
    seconds_left: float
    chunks: Iterator[bytes]
    close: Callable[[], None]


class ResultStore(abc.ABC):
    """Where url results are kept: `save` them, `fetch` them back until they expire, `sweep` the expired ones,
    and keep `health` current so that requests which cannot be stored are refused before they run."""

    # What /metrics says about free space when the backend cannot tell (a bucket).
    UNKNOWN_FREE = math.nan

    def __init__(self, ttl_seconds: int, *, retry_after: int = 10, metrics: Metrics | None = None) -> None:
        self.ttl = ttl_seconds
        self.retry_after = retry_after
        self.metrics = metrics
        self.health = StorageHealth(ok=True)

    # -- what the server calls -------------------------------------------------------------------

    def save(self, data: bytes, extension: str) -> str:
        """Store one result and return its name; a failure is a 507/503 `ApiError` and marks the storage unhealthy."""
        name = new_name(extension)
        try:
            self._put(name, data)
        except StorageFault as fault:
            logger.error("storing a result failed: %s", fault.detail)
            self._count_failure("write")
            self._set_health(
                StorageHealth(
                    ok=False,
                    reason=f"the last write failed: {fault.reason}",
                    full=fault.full,
                    free_bytes=self.health.free_bytes,
                )
            )
            raise self._refusal(fault.reason, fault.full) from None
        return name

    def fetch(self, name: str) -> StoredResult | None:
        """The result, or None when the name is malformed, unknown or expired. Blocking: call it off the event loop."""
        if not is_result_name(name):
            return None
        try:
            return self._get(name)
        except StorageFault as fault:
            logger.error("reading a stored result failed: %s", fault.detail)
            self._count_failure("read")
            raise errors.StorageUnavailable(
                f"The stored result cannot be read right now: {fault.reason}. Retry later.",
                retry_after=self.retry_after,
            ) from None

    def require_healthy(self) -> None:
        """Refuse a url request up front (507/503) while the storage is known to be unable to keep its result."""
        health = self.health
        if not health.ok:
            raise self._refusal(health.reason or "the storage is unavailable", health.full)

    def refresh_health(self) -> StorageHealth:
        """Check the storage now (cheap: a statvfs, or one HEAD request) and publish the verdict. Never raises."""
        try:
            health = self._check()
        except StorageFault as fault:
            logger.warning("storage check failed: %s", fault.detail)
            health = StorageHealth(ok=False, reason=fault.reason, full=fault.full)
        except Exception as exc:  # a health check must report, not crash the loop that runs it
            logger.warning("storage check failed: %r", exc)
            health = StorageHealth(ok=False, reason="the storage check failed")
        if health.ok != self.health.ok:
            if health.ok:
                logger.info("result storage is healthy again")
            else:
                logger.warning("result storage is unhealthy: %s", health.reason)
        self._set_health(health)
        return health

    def sweep(self) -> int:
        """Delete every expired result; return how many went. Never raises (a failure is logged)."""
        try:
            removed = self._sweep(time.time())
        except StorageFault as fault:
            logger.warning("sweeping expired results failed: %s", fault.detail)
            return 0
        if removed:
            logger.info("swept %d expired result(s)", removed)
        return removed

    # -- backends --------------------------------------------------------------------------------

    @abc.abstractmethod
    def verify(self) -> None:
        """Start-up check: raise StorageConfigError unless results can be written, read and deleted."""

    @abc.abstractmethod
    def _put(self, name: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _get(self, name: str) -> StoredResult | None: ...

    @abc.abstractmethod
    def _sweep(self, now: float) -> int: ...

    @abc.abstractmethod
    def _check(self) -> StorageHealth: ...

    # -- shared ----------------------------------------------------------------------------------

    def _seconds_left(self, created: float, now: float) -> float:
        return created + self.ttl - now

    def _refusal(self, reason: str, full: bool) -> errors.ApiError:
        kind = errors.InsufficientStorage if full else errors.StorageUnavailable
        message = f"The result cannot be stored: {reason}. Ask for response_format=b64_json, or retry later."
        return kind(message, retry_after=self.retry_after)

    def _set_health(self, health: StorageHealth) -> None:
        self.health = health
        if self.metrics is not None:
            self.metrics.storage_ok.set(1 if health.ok else 0)
            free = health.free_bytes
            self.metrics.storage_free_bytes.set(self.UNKNOWN_FREE if free is None else free)

    def _count_failure(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.storage_failures.labels(operation).inc()


# -- a local directory ------------------------------------------------------------------------------

# What a failed write means to a client, by errno; the first three are a lack of space (507).
_SPACE_ERRNOS = {
    errno.ENOSPC: "the storage is out of space",
    errno.EDQUOT: "the storage quota is used up",
    errno.EFBIG: "the result is larger than the storage accepts",
}
_OTHER_ERRNOS = {
    errno.EACCES: "the storage refused the write (permission denied)",
    errno.EPERM: "the storage refused the write (operation not permitted)",
    errno.EROFS: "the storage is read-only",
    errno.ENOENT: "the storage directory is missing",
    errno.EIO: "the storage had an I/O error",
}


def fault_from_os_error(exc: OSError) -> StorageFault:
    """A StorageFault whose reason names the kind of failure without the path the OSError carries."""
    if exc.errno in _SPACE_ERRNOS:
        return StorageFault(_SPACE_ERRNOS[exc.errno], str(exc), full=True)
    reason = _OTHER_ERRNOS.get(exc.errno or 0) or f"the storage failed ({os.strerror(exc.errno or 0).lower()})"
    return StorageFault(reason, str(exc))


class DirectoryStore(ResultStore):
    def __init__(
        self,
        directory: Path,
        ttl_seconds: int,
        *,
        min_free_bytes: int = 0,
        retry_after: int = 10,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(ttl_seconds, retry_after=retry_after, metrics=metrics)
        self.directory = Path(directory)
        self.min_free_bytes = min_free_bytes

    def verify(self) -> None:
        where = setting("storage_dir")
        if self.directory.exists() and not self.directory.is_dir():
            raise StorageConfigError(f"{where}: is a file, not a directory")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageConfigError(f"{where}: cannot be created ({_strerror(exc)})") from None
        try:
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=_INCOMING)
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            raise StorageConfigError(f"{where}: is not writable ({_strerror(exc)})") from None

    def _put(self, name: str, data: bytes) -> None:
        tmp = None
        try:
            # Write then rename, so a reader never sees half a file.
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_INCOMING)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / name)
        except OSError as exc:
            raise fault_from_os_error(exc) from None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _get(self, name: str) -> StoredResult | None:
        path = self.directory / name
        try:
            # Open first: once open, a sweep that deletes the file cannot pull it from under the reader.
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise fault_from_os_error(exc) from None
        stat = os.fstat(handle.fileno())
        seconds_left = self._seconds_left(stat.st_mtime, time.time())
        if seconds_left <= 0:
            handle.close()
            path.unlink(missing_ok=True)
            return None
        chunks = iter(functools.partial(handle.read, CHUNK_BYTES), b"")
        return StoredResult(size=stat.st_size, seconds_left=seconds_left, chunks=chunks, close=handle.close)

    def _sweep(self, now: float) -> int:
        removed = 0
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise fault_from_os_error(exc) from None
        for entry in entries:
            if not (is_result_name(entry.name) or entry.name.startswith(_INCOMING)):
                continue
            try:
                if entry.is_file() and self._seconds_left(entry.stat().st_mtime, now) <= 0:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another sweep or an expired read got there first
                pass
        return removed

    def _check(self) -> StorageHealth:
        try:
            # A cleaner that removed the (empty) directory must not break every later url request.
            self.directory.mkdir(parents=True, exist_ok=True)
            usage = os.statvfs(self.directory)
        except OSError as exc:
            raise fault_from_os_error(exc) from None
        free = usage.f_bavail * usage.f_frsize
        if not os.access(self.directory, os.W_OK | os.X_OK):
            return StorageHealth(ok=False, reason=_OTHER_ERRNOS[errno.EACCES], free_bytes=free)
        if free < self.min_free_bytes:
            reason = (
                f"result storage has {free / MIB:.0f} MiB free, under the {self.min_free_bytes / MIB:.0f} MiB "
                "threshold (--storage-min-free-mb)"
            )
            return StorageHealth(ok=False, reason=reason, full=True, free_bytes=free)
        return StorageHealth(ok=True, free_bytes=free)


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


# -- an S3-compatible bucket ------------------------------------------------------------------------

# S3 error codes that mean "no room" (507); everything else is "unavailable" (503).
_FULL_CODES = {"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "507"}
_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
_CREDENTIALS_HINT = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws or an instance role"


class BucketStore(ResultStore):
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        ttl_seconds: int,
        *,
        retry_after: int = 10,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(ttl_seconds, retry_after=retry_after, metrics=metrics)
        self.client = client
        self.bucket = bucket
        self.prefix = prefix

    def _key(self, name: str) -> str:
        return self.prefix + name

    def verify(self) -> None:
        """The bucket exists and these credentials may put, get and delete under the prefix."""
        probe = self._key(f"{_INCOMING}{secrets.token_urlsafe(12)}")
        steps = (
            ("reach the bucket", lambda: self.client.head_bucket(Bucket=self.bucket)),
            ("write to the bucket", lambda: self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"probe")),
            ("read from the bucket", lambda: self.client.get_object(Bucket=self.bucket, Key=probe)["Body"].close()),
            (
                "delete from the bucket (the sweep deletes expired results)",
                lambda: self.client.delete_object(Bucket=self.bucket, Key=probe),
            ),
        )
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                raise StorageConfigError(self._config_problem(what, exc)) from None

    def _config_problem(self, what: str, exc: Exception) -> str:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(exc, NoCredentialsError):
            return f"{setting('storage')}: s3 needs AWS credentials and none were found ({_CREDENTIALS_HINT})"
        if isinstance(exc, EndpointConnectionError):
            return f"{setting('s3_endpoint_url')}: cannot connect to the S3 endpoint {exc.kwargs.get('endpoint_url')}"
        if isinstance(exc, ClientError):
            code = _client_error_code(exc) or ""
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "404") or (status == 404 and what == "reach the bucket"):
                return f"{setting('s3_bucket')}: the bucket {self.bucket!r} does not exist"
            if code in _DENIED_CODES or status == 403:
                return (
                    f"{setting('s3_bucket')}: not allowed to {what} {self.bucket!r} ({code or status}); check the "
                    f"AWS credentials ({_CREDENTIALS_HINT}) and their permissions"
                )
            return f"{setting('s3_bucket')}: cannot {what} {self.bucket!r}: {code or status}"
        return f"{setting('storage')}: cannot {what} {self.bucket!r}: {_describe(exc)}"

    def _put(self, name: str, data: bytes) -> None:
        content_type = images.media_type_of_file(name)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type)
        except Exception as exc:
            raise self._fault(exc) from None

    def _get(self, name: str) -> StoredResult | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            if _client_error_code(exc) in _NOT_FOUND_CODES:
                return None
            raise self._fault(exc) from None
        body = response["Body"]
        seconds_left = self._seconds_left(_written(response["LastModified"]), time.time())
        if seconds_left <= 0:
            # Expired is gone, whether or not a sweep has run: delete it now (deleting twice is harmless).
            body.close()
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
            except Exception as exc:
                logger.warning("deleting an expired result failed: %s", _describe(exc))
            return None
        return StoredResult(
            size=int(response["ContentLength"]),
            seconds_left=seconds_left,
            chunks=body.iter_chunks(CHUNK_BYTES),
            close=body.close,
        )

    def _sweep(self, now: float) -> int:
        """List the prefix and delete what has expired. Several replicas may sweep at once: S3 deletes are
        idempotent, names are never reused, and only names this server makes are touched."""
        expired: list[dict[str, str]] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(self.prefix) :]
                    if not (is_result_name(name) or name.startswith(_INCOMING)):
                        continue
                    if self._seconds_left(_written(item["LastModified"]), now) <= 0:
                        expired.append({"Key": item["Key"]})
            removed = 0
            # DeleteObjects takes at most 1000 keys per call.
            for start in range(0, len(expired), 1000):
                batch = expired[start : start + 1000]
                answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                failed = answer.get("Errors", [])
                for problem in failed[:3]:
                    logger.warning("sweep: cannot delete %s: %s", problem.get("Key"), problem.get("Code"))
                removed += len(batch) - len(failed)
        except Exception as exc:
            raise self._fault(exc) from None
        return removed

    def _check(self) -> StorageHealth:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            fault = self._fault(exc)
            return StorageHealth(ok=False, reason=fault.reason, full=fault.full)
        return StorageHealth(ok=True)

    def _fault(self, exc: Exception) -> StorageFault:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
        )

        detail = f"bucket {self.bucket!r}: {_describe(exc)}"
        if isinstance(exc, ClientError):
            code = _client_error_code(exc)
            if code in _FULL_CODES:
                return StorageFault("the bucket is full or refuses an object this large", detail, full=True)
            if code in _DENIED_CODES:
                return StorageFault("the bucket refused access", detail)
            if code in ("NoSuchBucket",):
                return StorageFault("the bucket does not exist", detail)
            if code in ("SlowDown", "503", "ServiceUnavailable"):
                return StorageFault("the bucket is throttling requests", detail)
            return StorageFault(f"the bucket answered {code or 'an error'}", detail)
        if isinstance(exc, NoCredentialsError):
            return StorageFault("no storage credentials were found", detail)
        if isinstance(exc, (ConnectionError, HTTPClientError)):
            return StorageFault("the bucket cannot be reached", detail)
        return StorageFault("the storage client failed", detail)


def _written(last_modified: datetime.datetime) -> float:
    """When an object was written, as late as its LastModified allows: the header has whole seconds (listings may
    have milliseconds), so counting from the end of that second means a link never expires before its TTL and
    every replica, whichever call it read the time from, agrees on the moment it does."""
    return math.floor(last_modified.timestamp()) + 1.0


def _client_error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    return str(response.get("Error", {}).get("Code", "")) or None


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def bucket_client(settings: Settings) -> Any:
    """A boto3 S3 client with credentials from the usual AWS places (never from a request)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageConfigError(
            f"{setting('storage')}: s3 needs boto3; install it with pip install 'stepimage[s3]'"
        ) from None
    config = Config(
        # A stuck endpoint must not hold a url request (or the start-up check) for boto's default minute.
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
        # Only checksums S3 requires: several S3-compatible servers reject the newer default ones.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        return boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=config
        )
    except ValueError as exc:
        raise StorageConfigError(f"{setting('s3_endpoint_url')}: {exc}") from None


def open_store(settings: Settings, metrics: Metrics | None = None) -> ResultStore:
    """The configured store, checked: raises StorageConfigError when it cannot hold results."""
    retry_after = max(1, math.ceil(settings.storage_check_interval))
    store: ResultStore
    if settings.storage == "s3":
        assert settings.s3_bucket is not None  # the settings refuse s3 without a bucket
        store = BucketStore(
            bucket_client(settings),
            settings.s3_bucket,
            settings.s3_prefix,
            settings.url_ttl,
            retry_after=retry_after,
            metrics=metrics,
        )
    else:
        store = DirectoryStore(
            settings.storage_dir,
            settings.url_ttl,
            min_free_bytes=int(settings.storage_min_free_mb * MIB),
            retry_after=retry_after,
            metrics=metrics,
        )
    store.verify()
    health = store.refresh_health()
    if not health.ok:
        logger.warning("result storage: %s; url requests get an error until that changes", health.reason)
    return store
