"""Stored results for `response_format=url`: unguessable names, expiry, and sweeping.

A result is one file in the storage directory. Its name carries 192 random bits, so knowing one URL
tells nothing about another; its modification time is its creation time, so expiry survives a
restart without an index. An expired file is deleted when it is asked for and by the periodic sweep.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpg|webp)$")


class ResultStore:
    def __init__(self, directory: Path, ttl_seconds: int) -> None:
        self.directory = Path(directory)
        self.ttl = ttl_seconds
        self.directory.mkdir(parents=True, exist_ok=True)

    def save(self, data: bytes, extension: str) -> str:
        """Write a result atomically and return its name."""
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        # Write then rename, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, self.directory / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return name

    def _expired(self, stat: os.stat_result, now: float) -> bool:
        return stat.st_mtime + self.ttl <= now

    def lookup(self, name: str) -> tuple[Path, float] | None:
        """The file and its seconds left, or None when unknown or expired (an expired file is deleted)."""
        if not _NAME.match(name):
            return None
        path = self.directory / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        now = time.time()
        if self._expired(stat, now):
            path.unlink(missing_ok=True)
            return None
        return path, stat.st_mtime + self.ttl - now

    def sweep(self) -> int:
        """Delete every expired result (and stale partial writes); return how many went."""
        now = time.time()
        removed = 0
        for entry in os.scandir(self.directory):
            if not entry.is_file():
                continue
            if _NAME.match(entry.name) or entry.name.startswith(".incoming-"):
                try:
                    if self._expired(entry.stat(), now):
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            logger.info("swept %d expired result(s)", removed)
        return removed
