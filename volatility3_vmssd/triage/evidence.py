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

from ..sources import is_remote, open_binary

__all__ = ["CHUNK", "file_identity", "iso_time", "remote_identity"]

CHUNK = 4 << 20


def iso_time(seconds: float) -> str:
    """A POSIX time as ISO 8601 in UTC, to the microsecond (``2026-12-06T03:04:22.123456+00:00``)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat()


def remote_identity(url: str, *, digest: bool = True) -> dict[str, Any]:
    """The same for an object in a store: its size and modification time as the store states them, the
    SHA-256 of one sequential pass through our reader (every range pinned to the ETag seen at open, so an
    object replaced while hashed is refused, not mixed: docs/remote.md)."""
    h = hashlib.sha256()
    with open_binary(url) as fh:
        modified = getattr(getattr(fh, "remote", None), "modified", None)
        if digest:
            while chunk := fh.read(CHUNK):
                h.update(chunk)
        size = fh.seek(0, os.SEEK_END)
    when = iso_time(modified.timestamp()) if isinstance(modified, datetime.datetime) else None
    return {"size": size, "mtime": when, "sha256": h.hexdigest() if digest else None}


def file_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"size", "mtime", "sha256"}`` of ``path``; OSError propagates, a file that changes while read raises."""
    if is_remote(path):
        return remote_identity(os.fspath(path))
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        before = os.fstat(fh.fileno())
        while chunk := fh.read(CHUNK):
            h.update(chunk)
        after = os.fstat(fh.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise OSError(f"{os.fsdecode(path)} changed while it was hashed (size or modification time)")
    return {"size": after.st_size, "mtime": iso_time(after.st_mtime_ns / 1e9), "sha256": h.hexdigest()}
