"""Evidence identity: size, modification time and SHA-256 of a file, as a report names the exact bytes it ran on.

The hash is taken in one sequential pass (the file opened read-only) and the file's size and
modification time are compared before and after it, so a file that changed while it was read is said
to have changed instead of getting a hash of a mixture.  No Dask, no Volatility: ``vmssd info --hash``
uses it too.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any

__all__ = ["CHUNK", "file_identity", "iso_time"]

CHUNK = 4 << 20


def iso_time(seconds: float) -> str:
    """A POSIX time as ISO 8601 in UTC, to the microsecond (``2026-12-06T03:04:22.123456+00:00``)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size", "mtime", "sha256"}`` of ``path``; OSError propagates, a file that changes while read raises."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        while chunk := fh.read(CHUNK):
            h.update(chunk)
        after = os.fstat(fh.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise OSError(f"{os.fsdecode(path)} changed while it was hashed (size or modification time)")
    return {"size": after.st_size, "mtime": iso_time(after.st_mtime_ns / 1e9), "sha256": h.hexdigest()}
