"""Where evidence bytes come from: a local file (read directly, as always) or an object behind a URL.

Every reader of the package takes a *location*: a local path, or a URL such as ``s3://bucket/key``,
``gs://``, ``az://``/``abfs://`` or ``http(s)://``.  This room turns a location into a read-only
binary file object, lists the "folder" a location sits in (partner files are found by listing), and
redacts URLs before they are shown.  Local paths get a plain ``open(path, "rb")``: nothing changes for
them and nothing is imported for remote access.  URLs go through fsspec (the optional ``[remote]``
extra); see docs/remote.md for what an open costs in requests and bytes.

Nothing here imports Volatility or any other room of the package.
"""

from __future__ import annotations

import os
import posixpath
import sys
import threading
from dataclasses import dataclass, field, fields, replace
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "REMOTE_SCHEMES",
    "ObjectChangedError",
    "RemoteOptions",
    "SourceError",
    "base_name",
    "configure",
    "folder_of",
    "forget",
    "hint_reads",
    "is_file",
    "is_remote",
    "is_remote_file",
    "join",
    "list_folder",
    "object_identity",
    "open_binary",
    "options",
    "quiet_client_logs",
    "redact",
    "suffix",
]

#: URL schemes read through fsspec (anything else with ``://`` is refused; a bare path is local).
REMOTE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "http", "https"})

MIB = 1 << 20


class SourceError(OSError):
    """A remote read that failed for good (after retries): names the object and the byte range.

    An :class:`OSError`, not a ``VmssdError``: the readers and exporters treat ``VmssdError`` on a
    read as damaged or missing data (padded, zero-filled, reported as a finding); a fetch that failed
    is neither, and must end the command instead.
    """


class ObjectChangedError(SourceError):
    """The object was replaced while we read it (its ETag or version no longer matches): never mixed."""


def _env_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        raise ValueError(f"${name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ValueError(f"${name}={value} is outside {lo}..{hi}")
    return value


@dataclass(frozen=True)
class RemoteOptions:
    """How remote reads are shaped; every value is bounded (see :func:`configure`).

    ``min_request``: the smallest range fetched for a small read (metadata: key tables, headers).
    ``part_size``: large reads and read-ahead are split into parts of this size, fetched in parallel.
    ``readahead``: how far past a sequential read (RAM, ``convert``) is fetched ahead, at most.
    ``concurrency``: parts in flight at once, per open object.
    ``cache``: bytes of fetched ranges kept per open object (LRU).
    ``retries``/``backoff``: attempts after the first for throttling, 5xx and resets; first delay in s.
    """

    min_request: int = 4 << 10
    part_size: int = 16 * MIB
    readahead: int = 64 * MIB
    concurrency: int = 4
    cache: int = 160 * MIB
    retries: int = 4
    backoff: float = 0.2

    def checked(self) -> RemoteOptions:
        bounds = {
            "min_request": (1, 64 * MIB),
            "part_size": (64 << 10, 256 * MIB),
            "readahead": (0, 1024 * MIB),
            "concurrency": (1, 64),
            "cache": (0, 4096 * MIB),
            "retries": (0, 20),
        }
        for name, (lo, hi) in bounds.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"remote option {name}={value} is outside {lo}..{hi}")
        if not 0 <= self.backoff <= 60:
            raise ValueError(f"remote option backoff={self.backoff} is outside 0..60 s")
        if self.cache < self.readahead + self.part_size:
            # read-ahead lands in the cache: a smaller cache would evict what it fetched ahead
            return replace(self, cache=self.readahead + self.part_size)
        return self

    @classmethod
    def from_env(cls) -> RemoteOptions:
        """Defaults overridden by ``VMSSD_REMOTE_<NAME>`` variables (sizes in bytes)."""
        d = cls()
        return cls(
            min_request=_env_int("VMSSD_REMOTE_MIN_REQUEST", d.min_request, 1, 64 * MIB),
            part_size=_env_int("VMSSD_REMOTE_PART_SIZE", d.part_size, 64 << 10, 256 * MIB),
            readahead=_env_int("VMSSD_REMOTE_READAHEAD", d.readahead, 0, 1024 * MIB),
            concurrency=_env_int("VMSSD_REMOTE_CONCURRENCY", d.concurrency, 1, 64),
            cache=_env_int("VMSSD_REMOTE_CACHE", d.cache, 0, 4096 * MIB),
            retries=_env_int("VMSSD_REMOTE_RETRIES", d.retries, 0, 20),
            backoff=float(os.environ.get("VMSSD_REMOTE_BACKOFF") or d.backoff),
        ).checked()


@dataclass
class _Settings:
    options: RemoteOptions | None = None
    storage_options: dict[str, dict[str, object]] = field(default_factory=dict)


_SETTINGS = _Settings()
#: remote folder listings already made in this process (partner search lists a folder once)
_LISTINGS: dict[str, dict[str, bool]] = {}
_LISTINGS_KEPT = 256
_LISTINGS_LOCK = threading.Lock()


def options() -> RemoteOptions:
    """The options remote opens use: :func:`configure`'s, else the environment's, else the defaults."""
    if _SETTINGS.options is None:
        _SETTINGS.options = RemoteOptions.from_env()
    return _SETTINGS.options


def configure(**changes: int | float | None) -> RemoteOptions:
    """Change remote read options for this process (``None`` keeps a value); returns the options in force."""
    known = {f.name for f in fields(RemoteOptions)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown remote option(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in changes.items() if v is not None}
    _SETTINGS.options = replace(options(), **given).checked()  # type: ignore[arg-type]
    return _SETTINGS.options


def scheme_of(location: str | os.PathLike[str]) -> str:
    """The URL scheme of a remote location (lower case), or "" for a local path."""
    if not isinstance(location, str):
        return ""
    head, sep, _ = location.partition("://")
    if not sep or not head.replace("+", "").replace("-", "").replace(".", "").isalnum() or len(head) < 2:
        return ""  # a path (C:\..., a/b) or a single-letter drive
    return head.lower()


def is_remote(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL read through fsspec; raises for a scheme we do not read."""
    scheme = scheme_of(location)
    if not scheme or scheme == "file":
        return False
    if scheme not in REMOTE_SCHEMES:
        raise SourceError(
            f"{redact(str(location))}: the {scheme}:// scheme is not read (use a local path or one of"
            f" {', '.join(sorted(REMOTE_SCHEMES))})"
        )
    return True


def redact(location: str | os.PathLike[str]) -> str:
    """A location fit to show: no user name, password, query string (presigned signatures) or fragment."""
    text = os.fspath(location)
    if not scheme_of(text):
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return text.split("?", 1)[0].split("#", 1)[0]
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    if "@" in parts.netloc and not host:
        host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _local_path(location: str | os.PathLike[str]) -> str:
    text = os.fspath(location)
    if scheme_of(text) == "file":
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(text).path)
    return text


def open_binary(location: str | os.PathLike[str], opts: RemoteOptions | None = None) -> BinaryIO:
    """A read-only binary file object: ``open(path, "rb")`` for a local path, a remote reader for a URL.

    The remote reader has ``pread(offset, size)``, ``size`` and ``name`` (the redacted URL) besides
    ``read``/``seek``/``tell``; callers that want positional reads test for ``pread``.
    """
    if not is_remote(location):
        return open(_local_path(location), "rb")
    from .remote import RemoteFile

    return RemoteFile(os.fspath(location), opts or options())  # type: ignore[return-value]


def is_remote_file(fh: object) -> bool:
    """Whether an open file is a remote reader (:func:`open_binary` of a URL), which takes read hints."""
    return hasattr(fh, "prefetch")


def hint_reads(fh: object, spans: list[tuple[int, int]]) -> None:
    """Tell a remote reader the ``(offset, size)`` spans about to be parsed, so that they come in few ranged
    requests (docs/remote.md); a local file is read as parsed and ignores the hint."""
    if is_remote_file(fh):
        fh.prefetch(spans)  # type: ignore[attr-defined]


def _split(location: str) -> tuple[str, str]:
    """(everything up to the path, the path) of a URL; the query string stays with nothing."""
    parts = urlsplit(location)
    return urlunsplit((parts.scheme, parts.netloc, "", "", "")), parts.path


def folder_of(location: str | os.PathLike[str]) -> str:
    """The folder (prefix) a location is in, as a location of the same kind."""
    if not is_remote(location):
        return os.path.dirname(os.path.abspath(_local_path(location)))
    base, path = _split(os.fspath(location))
    return base + posixpath.dirname(path.rstrip("/") or "/")


def base_name(location: str | os.PathLike[str]) -> str:
    """The last part of a location's path (the file name)."""
    if not is_remote(location):
        return os.path.basename(_local_path(location))
    return posixpath.basename(_split(os.fspath(location))[1].rstrip("/"))


def suffix(location: str | os.PathLike[str]) -> str:
    """The extension of a location's file name, with its dot, as written (``.VMRS``)."""
    return os.path.splitext(base_name(location))[1]


def join(folder: str | os.PathLike[str], name: str) -> str:
    """``folder`` + ``/name`` for a remote folder, ``os.path.join`` for a local one."""
    if not is_remote(folder):
        return os.path.join(_local_path(folder), name)
    base, path = _split(os.fspath(folder))
    return base + posixpath.join(path or "/", name)


def list_folder(folder: str | os.PathLike[str]) -> dict[str, bool]:
    """Names in a folder -> whether each is a regular file; ``{}`` when it cannot be listed.

    One listing per call (one ``os.scandir`` or one list request), so partner rules over it cost no
    further request.
    """
    if not is_remote(folder):
        try:
            with os.scandir(_local_path(folder)) as it:
                return {e.name: e.is_file() for e in it}
        except OSError:
            return {}
    key = os.fspath(folder).rstrip("/")
    with _LISTINGS_LOCK:
        hit = _LISTINGS.get(key)
    if hit is None:
        from .remote import list_remote

        hit = list_remote(key)
        with _LISTINGS_LOCK:
            _LISTINGS[key] = hit
            while len(_LISTINGS) > _LISTINGS_KEPT:
                _LISTINGS.pop(next(iter(_LISTINGS)))
    return dict(hit)


def object_identity(location: str) -> tuple[int, str]:
    """(size, ETag or version) of a remote object: what names its exact bytes, as (size, mtime) does a file's."""
    from .remote import RemoteFile

    with RemoteFile(location, options()) as fh:
        obj = fh.remote
        return obj.size, str(obj.version or obj.etag or obj.modified or "")


#: the store clients' own loggers: at DEBUG they print request URLs whole (presigned query strings) and headers
CLIENT_LOGGERS = ("fsspec", "s3fs", "gcsfs", "adlfs", "aiohttp", "botocore", "aiobotocore", "urllib3", "azure")


def quiet_client_logs() -> None:
    """Keep the store clients' loggers at WARNING whatever ``-v`` asks: only our redacted lines are shown."""
    import logging

    for name in CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def forget() -> None:
    """Forget remote listings and idle objects (a long-lived process between jobs; tests between stores)."""
    with _LISTINGS_LOCK:
        _LISTINGS.clear()
    if "volatility3_vmssd.sources.remote" in sys.modules:
        sys.modules["volatility3_vmssd.sources.remote"].forget()


def is_file(location: str | os.PathLike[str]) -> bool:
    """Whether a location names a regular file (an object, remotely)."""
    if not is_remote(location):
        return os.path.isfile(_local_path(location))
    return list_folder(folder_of(location)).get(base_name(location), False)
