"""A read-only file object over an object in a store (S3, GCS, Azure, HTTP range requests), via fsspec.

Why a reader of our own and not fsspec's file objects: the readers of this package make two kinds of
reads, and each wants a different shape of request (docs/remote.md):

* metadata (header copies, object and key tables, small values): scattered and small; each becomes one
  ranged GET of at least ``min_request`` bytes, so neighbouring small reads cost one request;
* RAM (RamBlock values, 1 MiB or less each, mostly stored one after the other): once reads run
  forward, the reader fetches ahead up to ``readahead`` bytes in ``part_size`` parts, ``concurrency`` at
  a time, in the background while the caller decodes.

Fetched ranges stay in a byte-bounded LRU.  Every fetch is retried on throttling, 5xx and broken
connections with exponential backoff; a fetch that still fails raises :class:`SourceError` naming the
object and the range.  Every fetch is pinned to the object's ETag (S3 ``IfMatch`` / HTTP
``If-Match``) or version, so an object replaced while we read it is refused, never mixed.  Nothing is
ever written to the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from . import ObjectChangedError, RemoteOptions, SourceError, redact

__all__ = ["RemoteFile", "RemoteObject", "list_remote", "list_remote_detail", "object_stats"]

log = logging.getLogger("volatility3_vmssd.sources")

#: HTTP statuses that will not get better by asking again (not found, denied, bad range)
_PERMANENT = frozenset({400, 401, 403, 404, 405, 410, 416})
_CHANGED = 412
PAGE = 4096
#: a read starting at most this far past the previous one's end continues a forward run
FORWARD_GAP = 64 << 10
#: read-ahead starts once a forward run has read this much (RAM: one RamBlock); metadata reads never do
READAHEAD_AFTER = 256 << 10


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise SourceError(
            "reading evidence from a URL needs fsspec and the store's implementation:"
            " pip install 'volatility3-vmssd[remote]' (S3 and HTTP; gcsfs for gs://, adlfs for az://)"
        ) from None
    return fsspec


def _storage_options(protocol: str) -> dict[str, Any]:
    """Per-service options: we retry, so the client's own retry loops are turned down to one attempt."""
    if protocol in ("s3", "s3a"):
        opts: dict[str, Any] = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # botocore reads it too; named here so that a client made for another endpoint is not reused
            opts["client_kwargs"] = {"endpoint_url": endpoint}
        return opts
    return {}


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL; credentials come from the service's usual sources."""
    fsspec = _fsspec()
    protocol = url.split("://", 1)[0].lower()
    try:
        fs_class = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as exc:
        raise SourceError(f"{redact(url)}: cannot read {protocol}:// URLs here ({exc})") from None
    fs = fs_class(**_storage_options(protocol))
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own loop: one attempt (ours retries, with the range in the message)
    path = fs._strip_protocol(url) if protocol not in ("http", "https") else url
    return fs, path


def status_of(exc: BaseException) -> int | None:
    """The HTTP status behind an exception from aiohttp, botocore or fsspec, if there is one."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        status = getattr(cur, "status", None) or getattr(cur, "code", None)
        if isinstance(status, int) and 100 <= status < 600:
            return status
        response = getattr(cur, "response", None)
        if isinstance(response, dict):
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
            err = response.get("Error", {}).get("Code")
            if err == "PreconditionFailed":
                return _CHANGED
        if isinstance(cur, FileNotFoundError):
            return 404
        if isinstance(cur, PermissionError):
            return 403
        text = str(cur)
        if "PreconditionFailed" in text or "Precondition Failed" in text:
            return _CHANGED
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>)]*")


def _transient(exc: BaseException, status: int | None) -> bool:
    """Worth asking again: throttling, a 5xx, a broken or timed-out connection; not a bug or a refusal."""
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    module = type(exc).__module__.split(".", 1)[0]
    return module in ("aiohttp", "botocore", "aiobotocore", "urllib3", "asyncio") or isinstance(exc, OSError)


def _reason(exc: BaseException) -> str:
    """An exception as one short line, with any URL in it redacted."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return _URL.sub(lambda m: redact(m.group(0)), text)[:200]


def list_remote_detail(folder: str) -> dict[str, tuple[bool, int | None]]:
    """One listing of a remote folder (prefix): name -> (is an object, not a sub-prefix; its size)."""
    fs, path = filesystem(folder.rstrip("/") + "/")
    try:
        entries = fs.ls(path.rstrip("/"), detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exc:
        raise SourceError(f"{redact(folder)}: cannot list ({_reason(exc)})") from None
    out: dict[str, tuple[bool, int | None]] = {}
    for entry in entries:
        name = str(entry.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
        if not name or "?" in name or name in (".", ".."):  # an HTTP index page links with query strings
            continue
        size = entry.get("size")
        out[name] = (entry.get("type") == "file", size if isinstance(size, int) else None)
    return out


def list_remote(folder: str) -> dict[str, bool]:
    """One listing of a remote folder (prefix): names -> whether each is an object (not a sub-prefix)."""
    return {name: is_object for name, (is_object, _) in list_remote_detail(folder).items()}


@dataclasses.dataclass
class _Stream:
    """Where one reader's last read ended, and how long it has been reading forward (for read-ahead)."""

    last_end: int = -1
    run: int = 0


class RemoteObject:
    """One remote object: its size and ETag, the fetched ranges (LRU), the fetches in flight, the counters.

    Shared by every :class:`RemoteFile` open on the same URL in this process (Volatility opens the
    file layer and the saved state separately; both read the same bytes), so nothing is fetched twice
    while it is cached.
    """

    def __init__(self, url: str, opts: RemoteOptions) -> None:
        self.url = url
        self.name = redact(url)
        self.opts = opts
        self.fs, self.path = filesystem(url)
        self.protocol = url.split("://", 1)[0].lower()
        self.requests = 0
        self.bytes_fetched = 0
        self.retries_done = 0
        self.users = 0
        info = self._retry(lambda: self.fs.info(self.path), "metadata")
        if info.get("type", "file") != "file":
            raise SourceError(f"{self.name}: not an object (a folder or prefix)")
        size = info.get("size")
        if not isinstance(size, int) or size < 0:
            raise SourceError(f"{self.name}: the store did not say how large the object is")
        self.size = size
        self.etag = info.get("ETag") or info.get("etag")
        self.version = info.get("VersionId") or info.get("version_id")
        self.modified = info.get("LastModified") or info.get("last_modified")  # a datetime, when the store says
        self.requests = 1
        self._closed = False
        self._lock = threading.Lock()
        self._spans: OrderedDict[int, bytes] = OrderedDict()  # start -> bytes, LRU, bounded by opts.cache
        self._cached = 0
        self._pending: dict[int, tuple[int, Future[bytes]]] = {}  # start -> (end, fetch)
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._spans.clear()
            self._pending.clear()
            self._cached = 0

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{self.name}: an open remote object is not sent between processes; send the URL")

    # -- positional reads ----------------------------------------------------------------------------

    def pread(self, offset: int, size: int, stream: _Stream) -> bytes:
        """Bytes [offset, offset + size) of the object, short only at its end."""
        if self._closed:
            raise ValueError(f"{self.name}: read of a closed object")
        end = min(offset + max(size, 0), self.size)
        if offset < 0 or end <= offset:
            return b""
        forward = stream.last_end >= 0 and 0 <= offset - stream.last_end <= FORWARD_GAP
        stream.run = stream.run + (end - offset) if forward else 0
        stream.last_end = end
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            piece = self._cached_at(pos, end)
            if piece is None:
                piece = self._wait_pending(pos, end)
            if piece is None:
                # at least min_request, ending on a page boundary: the container allocates whole pages,
                # so a rounded read stays inside the structure it reads (no RAM fetched with metadata)
                stop = -(-max(end, pos + self.opts.min_request) // PAGE) * PAGE
                self._schedule(pos, stop, background=False)
                continue
            parts.append(piece)
            pos += len(piece)
        if stream.run >= READAHEAD_AFTER and self.opts.readahead:
            self._read_ahead(end, stream.run)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _cached_at(self, pos: int, end: int) -> bytes | None:
        with self._lock:
            for start, data in self._spans.items():
                if start <= pos < start + len(data):
                    self._spans.move_to_end(start)
                    return data[pos - start : end - start] if (pos, end) != (start, start + len(data)) else data
        return None

    def _wait_pending(self, pos: int, end: int) -> bytes | None:
        with self._lock:
            hit = next(((s, e, f) for s, (e, f) in self._pending.items() if s <= pos < e), None)
        if hit is None:
            return None
        start, stop, fut = hit
        data = fut.result()  # a failure raises here, in the reader's thread
        return data[pos - start : min(end, stop) - start]

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """Fetch ``(offset, size)`` spans a reader is about to parse (key tables), in as few requests as
        gaps of less than ``FORWARD_GAP`` allow; what is cached already is not fetched again."""
        wanted = sorted((o, min(o + n, self.size)) for o, n in spans if n > 0 and 0 <= o < self.size)
        merged: list[list[int]] = []
        for a, b in wanted:
            if merged and a - merged[-1][1] < FORWARD_GAP:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        budget = self.opts.cache // 2
        for a, b in merged:
            a = self._covered_until(a)
            if a >= b or b - a > budget:
                continue
            budget -= b - a
            self._schedule(a, -(-b // PAGE) * PAGE, background=False)

    def _covered_until(self, pos: int) -> int:
        """How far from ``pos`` the cache and the fetches in flight reach without a gap."""
        with self._lock:
            spans = [(s, s + len(d)) for s, d in self._spans.items()]
            spans += [(s, e) for s, (e, _) in self._pending.items()]
        spans.sort()
        for s, e in spans:
            if s <= pos < e:
                pos = e
        return pos

    def _read_ahead(self, end: int, run: int) -> None:
        """Keep a window (growing with the forward run, at most ``readahead``) fetched or in flight past ``end``.

        A new window is asked for only when less than half of one is left, so requests stay large.
        """
        window = min(self.opts.readahead, max(self.opts.part_size, run))
        ahead = self._covered_until(end)
        if ahead >= self.size or ahead - end >= window // 2:
            return
        self._schedule(ahead, min(self.size, ahead + window), background=True)

    def _schedule(self, start: int, end: int, *, background: bool) -> None:
        """Fetch [start, end) in parts; wait for them unless ``background``."""
        end = min(end, self.size)
        step = self.opts.part_size
        cuts = list(range(start, end, step))
        futures: list[tuple[int, int, Future[bytes]]] = []
        if len(cuts) == 1 and not background:
            data = self._fetch(start, end)
            self._store(start, data)
            return
        pool = self._executor()
        with self._lock:
            for a in cuts:
                b = min(a + step, end)
                if any(s <= a < e for s, (e, _) in self._pending.items()):
                    continue
                fut = pool.submit(self._fetch, a, b)
                self._pending[a] = (b, fut)
                futures.append((a, b, fut))
        for a, _, fut in futures:
            fut.add_done_callback(lambda f, a=a: self._landed(a, f))
        if not background:
            for _, _, fut in futures:
                fut.result()

    def _landed(self, start: int, fut: Future[bytes]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return  # stays pending: the reader that needs it gets the exception from result()
        with self._lock:
            self._pending.pop(start, None)
        self._store(start, fut.result())

    def _store(self, start: int, data: bytes) -> None:
        with self._lock:
            if self._closed or not data or start in self._spans:
                return
            self._spans[start] = data
            self._cached += len(data)
            while self._cached > self.opts.cache and len(self._spans) > 1:
                _, old = self._spans.popitem(last=False)
                self._cached -= len(old)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.opts.concurrency, thread_name_prefix="vmssd-fetch")
            return self._pool

    # -- requests ------------------------------------------------------------------------------------

    def _fetch(self, start: int, end: int) -> bytes:
        data = self._retry(lambda: self._get(start, end), f"bytes {start}-{end - 1}")
        if len(data) != end - start:
            raise SourceError(
                f"{self.name}: bytes {start}-{end - 1}: the store returned {len(data)} bytes, expected {end - start}"
            )
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        return data

    def _get(self, start: int, end: int) -> bytes:
        if self.protocol in ("s3", "s3a"):
            return self._get_s3(start, end)
        if self.protocol in ("http", "https"):
            headers = {"If-Match": self.etag} if self.etag else {}
            return self.fs.cat_file(self.path, start=start, end=end, headers=headers)
        return self.fs.cat_file(self.path, start=start, end=end)

    def _get_s3(self, start: int, end: int) -> bytes:
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)
        pin = {"VersionId": self.version} if self.version else {"IfMatch": self.etag} if self.etag else {}

        async def get() -> bytes:
            resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **pin)
            try:
                return await resp["Body"].read()
            finally:
                resp["Body"].close()

        return sync(self.fs.loop, get)

    def _retry(self, call: Any, what: str) -> Any:
        attempts = self.opts.retries + 1
        for attempt in range(attempts):
            try:
                return call()
            except Exception as exc:
                status = status_of(exc)
                if status == _CHANGED:
                    raise ObjectChangedError(
                        f"{self.name}: {what}: the object changed while it was read (ETag {self.etag or '?'} no"
                        " longer matches); refusing to mix two versions"
                    ) from None
                if status in _PERMANENT or not _transient(exc, status) or attempt + 1 == attempts:
                    tried = f" after {attempts} attempts" if attempt else ""
                    code = f"HTTP {status}: " if status else ""
                    raise SourceError(f"{self.name}: {what}: could not be read{tried} ({code}{_reason(exc)})") from None
                delay = self.opts.backoff * (2**attempt) * (0.5 + random.random() / 2)
                self.retries_done += 1
                log.info(
                    "retrying %s %s in %.2f s (attempt %d of %d: %s)",
                    self.name,
                    what,
                    delay,
                    attempt + 2,
                    attempts,
                    f"HTTP {status}" if status else _reason(exc),
                )
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


#: open objects by (URL, options); a closed one stays while it is among the last few used
_OBJECTS: OrderedDict[tuple[str, RemoteOptions], RemoteObject] = OrderedDict()
_OBJECTS_LOCK = threading.Lock()
_IDLE_KEPT = 2


def _acquire(url: str, opts: RemoteOptions) -> RemoteObject:
    key = (url, opts)
    with _OBJECTS_LOCK:
        obj = _OBJECTS.get(key)
        if obj is not None and not obj._closed:
            idle = obj.users <= 0
            obj.users += 1
            _OBJECTS.move_to_end(key)
        else:
            obj = None
    if obj is not None:
        # An object kept idle since an earlier open may have changed in the store: its cached bytes are
        # reused only when the store still names the same version (one metadata request).
        if not idle or _unchanged(obj):
            return obj
        _release(obj)
    obj = RemoteObject(url, opts)
    with _OBJECTS_LOCK:
        obj.users += 1
        _OBJECTS[key] = obj
        _OBJECTS.move_to_end(key)
    return obj


def _unchanged(obj: RemoteObject) -> bool:
    """Whether the store still holds the version ``obj`` cached (size, ETag, version id)."""
    try:
        obj.fs.invalidate_cache(obj.path)  # the client's own listing cache would answer with the old size/ETag
        info = obj._retry(lambda: obj.fs.info(obj.path), "metadata")
    except (OSError, SourceError):
        return False
    etag = info.get("ETag") or info.get("etag")
    version = info.get("VersionId") or info.get("version_id")
    return info.get("size") == obj.size and etag == obj.etag and version == obj.version


def _release(obj: RemoteObject) -> None:
    """One user fewer; idle objects beyond the last few are closed (their cache freed)."""
    with _OBJECTS_LOCK:
        obj.users -= 1
        idle = [k for k, o in _OBJECTS.items() if o.users <= 0]
        doomed = [_OBJECTS.pop(k) for k in idle[: max(0, len(idle) - _IDLE_KEPT)]]
    for old in doomed:
        old.close()


def object_stats() -> dict[str, tuple[int, int, int]]:
    """(requests, bytes fetched, retries) per redacted URL opened in this process (benchmarks, -vv)."""
    with _OBJECTS_LOCK:
        return {o.name: (o.requests, o.bytes_fetched, o.retries_done) for o in _OBJECTS.values()}


class RemoteFile:
    """A seekable, read-only binary file over one remote object (see the module docstring)."""

    mode = "rb"

    def __init__(self, url: str, opts: RemoteOptions) -> None:
        self._obj = _acquire(url, opts)
        self.name = self._obj.name
        self.size = self._obj.size
        self._stream = _Stream()
        self._pos = 0
        self._closed = False

    @property
    def remote(self) -> RemoteObject:
        return self._obj

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def pread(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size), short only at the end of the object."""
        if self._closed:
            raise ValueError(f"{self.name}: read of a closed file")
        return self._obj.pread(offset, size, self._stream)

    def prefetch(self, spans: list[tuple[int, int]]) -> None:
        """See :meth:`RemoteObject.prefetch`."""
        if not self._closed:
            self._obj.prefetch(spans)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._pos)
        data = self.pread(self._pos, size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def fileno(self) -> int:
        raise OSError(f"{self.name} is remote: it has no file descriptor")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release(self._obj)

    def __enter__(self) -> RemoteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteFile({self.name!r}, {self.size} bytes)"

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(f"{self.name}: an open remote object is not sent between processes; send the URL")


def forget() -> None:
    """Drop the objects no reader holds (their caches) so the next open asks the store again."""
    with _OBJECTS_LOCK:
        idle = [k for k, o in _OBJECTS.items() if o.users <= 0]
        doomed = [_OBJECTS.pop(k) for k in idle]
    for old in doomed:
        old.close()
