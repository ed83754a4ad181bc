"""XPRESS ([MS-XCA] plain LZ77, ``COMPRESSION_FORMAT_XPRESS`` = 3): the page codec of Hyper-V RamBlocks.

Not LZNT1 (format 2) and not XPRESS Huffman (format 4): the format was verified on every compressed
page of a real ``.bin`` (docs/format.md#ramblock-values).  :func:`decompress` uses the fastest decoder this host has:

* ``pyfwnt`` (libfwnt-python), about 20-30x faster than pure Python;
* ``ntdll`` (``RtlDecompressBufferEx`` through ctypes), on Windows without pyfwnt;
* ``python``, our own decoder in :mod:`._xpress_python`, which is also the reference.

A native decoder that fails, or that returns a size other than the one the container declares, is
not the last word: libfwnt rejects the valid 32-bit extended-length form (and returns short output,
without an error, for 16-bit lengths above 0x8000), so the pure-Python decoder retries and the
caller is told through ``on_fallback`` (it records a finding).  Round trip::

    >>> from volatility3_vmssd.codecs import xpress
    >>> page = bytes(range(256)) * 16
    >>> xpress.decompress(xpress.compress(page), len(page)) == page
    True
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from itertools import repeat

from ..host import usable_cores
from . import _xpress_python
from ._xpress_python import XpressError

__all__ = [
    "XpressError",
    "active_decoder",
    "compress",
    "decode_threads",
    "decompress",
    "decompress_many",
    "decompress_python",
    "force_decoder",
]

_NativeDecoder = Callable[[bytes, int], bytes]
#: Many streams, one size for all or one per stream: no checks, the caller verifies lengths.
_Batch = Callable[[Sequence[bytes], "int | Sequence[int]"], list[bytes]]

#: ``RtlDecompressBufferEx`` format code; the same number as the saved-state page format.
COMPRESSION_FORMAT_XPRESS = 3
_NAMES = ("pyfwnt", "ntdll", "python")

_forced: str | None = None


def decompress(
    data: bytes | bytearray | memoryview,
    out_size: int,
    *,
    on_fallback: Callable[[str], None] | None = None,
) -> bytes:
    """Decode exactly ``out_size`` bytes, or raise :class:`XpressError`.

    Output shorter or longer than ``out_size`` is an error, never padded or cut: a page that does
    not expand to its declared size is corrupt evidence and the caller must say so.
    """
    if out_size < 0:
        raise ValueError(f"out_size must be >= 0, not {out_size}")
    src = bytes(data)  # pyfwnt rejects bytearray input, and ctypes needs a stable buffer
    name = active_decoder()
    if name == "python":
        return _xpress_python.decompress(src, out_size)
    native = _native(name)
    assert native is not None  # active_decoder() only names available decoders
    try:
        out = native(src, out_size)
    except Exception as exc:  # native wrappers raise OSError, ValueError, MemoryError, ...
        why = f"{name} failed ({exc})"
    else:
        if len(out) == out_size:
            return out
        why = f"{name} produced {len(out)} bytes instead of {out_size}"
    out = _xpress_python.decompress(src, out_size)  # the reference: its XpressError is the verdict
    if on_fallback is not None:
        on_fallback(f"XPRESS stream decoded by the pure-Python decoder after {why}")
    return out


#: Below this many streams per thread, starting a thread (about 0.1 ms) costs more than it saves.
MIN_STREAMS_PER_THREAD = 48
_MAX_THREADS = 4


def decode_threads() -> int:
    """How many threads :func:`decompress_many` may use: ``VMSSD_DECODE_THREADS``, else the usable CPUs (at most 4)."""
    wanted = os.environ.get("VMSSD_DECODE_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) >= 1:
        return int(wanted)
    return max(1, min(usable_cores(), _MAX_THREADS))


def decompress_many(
    streams: Sequence[bytes],
    sizes: int | Sequence[int],
    *,
    threads: int = 1,
    on_fallback: Callable[[int, str], None] | None = None,
) -> list[bytes | XpressError]:
    """Decode many streams, each to exactly its size (``sizes``: one for all, or one per stream).

    The hot path of whole-block reads: one C-level ``map`` over the native decoder per thread, and
    up to ``threads`` threads, because libfwnt and ctypes release the GIL while they decode.  Each
    call still retakes the GIL, and on the 2-core benchmark VM handing it over costs about as much as
    decoding a small page: two threads made whole reads of the synthetic image (3 KB pages on
    average) about 1.25x faster, and of the real Linux guest (1.7 KB) anywhere from 1.1x faster to
    1.1x slower.

    Every stream gets the verdict of :func:`decompress`: a stream the native decoder does not expand
    to its size is decoded again by it (so the pure-Python fallback and its ``on_fallback(i,
    message)`` note apply here too), and a stream that does not decode at all is returned as its
    :class:`XpressError` in place of the bytes.  This is the only place a batch chooses a decoder.
    """
    count = len(streams)
    uniform = isinstance(sizes, int)
    wanted: Sequence[int] = [sizes] * count if isinstance(sizes, int) else sizes
    if len(wanted) != count:
        raise ValueError(f"{count} streams but {len(wanted)} sizes")
    out: list[bytes | XpressError] = []
    name = active_decoder()
    if name != "python" and count:
        batch = _native_batch(name)
        assert batch is not None
        shares = max(1, min(threads, count // MIN_STREAMS_PER_THREAD))
        try:
            out = list(batch(streams, sizes) if shares == 1 else _decode_shared(batch, streams, sizes, shares))
        except Exception:  # native wrappers raise OSError, ValueError, MemoryError, ...: decide per stream
            out = []
        if out:
            lengths = list(map(len, out))
            if (min(lengths) == max(lengths) == sizes) if uniform else lengths == list(wanted):
                return out
    if not out:
        out = [b""] * count
    for i, (stream, size) in enumerate(zip(streams, wanted, strict=True)):
        if type(out[i]) is bytes and len(out[i]) == size:
            continue
        note = None if on_fallback is None else functools.partial(on_fallback, i)
        try:
            out[i] = decompress(stream, size, on_fallback=note)
        except XpressError as exc:
            exc.__traceback__ = None  # kept in a list: no frames tied to it
            out[i] = exc
    return out


#: Streams per unit of work in a shared decode: small enough to balance two threads, large enough
#: that the shared counter is touched rarely.
_CHUNK = 32


def _decode_shared(batch: _Batch, streams: Sequence[bytes], sizes: int | Sequence[int], shares: int) -> list[bytes]:
    """``batch`` over ``streams`` in chunks that ``shares`` threads (this one included) take in turn.

    Chunks are handed out dynamically, not split in fixed halves: a helper starts about 0.1 ms late
    and the GIL hands over unevenly, so fixed halves left one thread idle at the end.
    """
    out: list[bytes] = [b""] * len(streams)
    chunks = iter(range(0, len(streams), _CHUNK))  # next() on a range iterator is atomic under the GIL
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for at in chunks:
                part = sizes if isinstance(sizes, int) else sizes[at : at + _CHUNK]
                out[at : at + _CHUNK] = batch(streams[at : at + _CHUNK], part)
        except BaseException as exc:  # re-raised in the calling thread
            failures.append(exc)

    helpers = [threading.Thread(target=work, name=f"vmssd-xpress-{k}", daemon=True) for k in range(1, shares)]
    for helper in helpers:
        helper.start()
    work()
    for helper in helpers:
        helper.join()
    if failures:
        raise failures[0]
    return out


def decompress_python(data: bytes | bytearray | memoryview, out_size: int) -> bytes:
    """The pure-Python decoder alone (the reference the native decoders are checked against)."""
    return _xpress_python.decompress(data, out_size)


def compress(data: bytes | bytearray | memoryview) -> bytes:
    """Our own encoder (see :func:`._xpress_python.compress`): the MS-XCA stream format, read by libfwnt.

    Zero and constant pages are the caller's business (fill records); this is for mixed pages.
    """
    return _xpress_python.compress(data)


def active_decoder() -> str:
    """Which decoder :func:`decompress` tries first on this host: "pyfwnt", "ntdll" or "python"."""
    if _forced is not None:
        return _forced
    for name in _NAMES[:-1]:
        if _native(name) is not None:
            return name
    return "python"


def force_decoder(name: str | None) -> None:
    """Test and benchmark hook: pin :func:`decompress` to one decoder, or ``None`` for automatic."""
    global _forced
    if name is not None and name not in _NAMES:
        raise ValueError(f"unknown XPRESS decoder {name!r}; expected one of {', '.join(_NAMES)}")
    if name is not None and name != "python" and _native(name) is None:
        raise ValueError(f"XPRESS decoder {name!r} is not available on this host")
    _forced = name


@functools.cache
def _native(name: str) -> _NativeDecoder | None:
    """Load a native decoder once; ``None`` when this host does not have it."""
    if name == "pyfwnt":
        return _load_pyfwnt()
    if name == "ntdll":
        return _load_ntdll()
    return None


@functools.cache
def _native_batch(name: str) -> _Batch | None:
    """Many streams through one native decoder, in a C-level loop where the decoder allows it."""
    if name == "pyfwnt":
        try:
            import pyfwnt
        except ImportError:
            return None
        lzxpress_decompress = pyfwnt.lzxpress_decompress

        def batch(streams: Sequence[bytes], sizes: int | Sequence[int]) -> list[bytes]:
            # One spare byte, as in _load_pyfwnt: a stream that is too long must not look complete.
            spare = repeat(sizes + 1) if isinstance(sizes, int) else map((1).__add__, sizes)
            return list(map(lzxpress_decompress, streams, spare))

        return batch
    native = _native(name)
    if native is None:
        return None

    def each(streams: Sequence[bytes], sizes: int | Sequence[int]) -> list[bytes]:
        wanted = repeat(sizes) if isinstance(sizes, int) else sizes
        return [native(s, n) for s, n in zip(streams, wanted, strict=False)]

    return each


def _load_pyfwnt() -> _NativeDecoder | None:
    try:
        import pyfwnt
    except ImportError:
        return None
    lzxpress_decompress = getattr(pyfwnt, "lzxpress_decompress", None)
    if lzxpress_decompress is None:
        return None

    def decode(data: bytes, out_size: int) -> bytes:
        # libfwnt stops quietly when its buffer is full, so a stream that is too long only shows
        # as one byte more than asked for.
        return lzxpress_decompress(data, out_size + 1)

    return decode


def _load_ntdll() -> _NativeDecoder | None:
    if sys.platform != "win32":
        return None
    import ctypes  # only here: the module must import on any OS
    from ctypes import wintypes

    try:
        ntdll = ctypes.WinDLL("ntdll")
        workspace_size = ntdll.RtlGetCompressionWorkSpaceSize
        rtl_decompress = ntdll.RtlDecompressBufferEx  # Windows 8 and later
    except (OSError, AttributeError):
        return None
    ulong_p = ctypes.POINTER(wintypes.ULONG)
    workspace_size.argtypes = [wintypes.USHORT, ulong_p, ulong_p]
    workspace_size.restype = ctypes.c_long
    rtl_decompress.argtypes = [
        wintypes.USHORT,
        ctypes.c_void_p,
        wintypes.ULONG,
        ctypes.c_void_p,
        wintypes.ULONG,
        ulong_p,
        ctypes.c_void_p,
    ]
    rtl_decompress.restype = ctypes.c_long  # NTSTATUS: negative is an error
    compress_ws = wintypes.ULONG()
    fragment_ws = wintypes.ULONG()
    if workspace_size(COMPRESSION_FORMAT_XPRESS, ctypes.byref(compress_ws), ctypes.byref(fragment_ws)) < 0:
        return None
    ws_bytes = max(compress_ws.value, fragment_ws.value, 1)
    local = threading.local()  # the work space is scratch memory: one per thread

    def decode(data: bytes, out_size: int) -> bytes:
        if out_size + 1 > 0xFFFFFFFF or len(data) > 0xFFFFFFFF:
            raise ValueError("buffer too large for RtlDecompressBufferEx")
        workspace = getattr(local, "workspace", None)
        if workspace is None:
            workspace = local.workspace = ctypes.create_string_buffer(ws_bytes)
        # One spare byte, as for pyfwnt: a stream longer than out_size must not look complete.
        out = ctypes.create_string_buffer(out_size + 1)
        final = wintypes.ULONG()
        status = rtl_decompress(
            COMPRESSION_FORMAT_XPRESS, out, out_size + 1, data, len(data), ctypes.byref(final), workspace
        )
        if status < 0:
            raise OSError(f"RtlDecompressBufferEx returned NTSTATUS {status & 0xFFFFFFFF:#010x}")
        return out.raw[: final.value]

    return decode


def _decoder_from_environment() -> None:
    """``VMSSD_XPRESS_DECODER=python`` pins the fallback in processes we do not control (``vol``)."""
    wanted = os.environ.get("VMSSD_XPRESS_DECODER", "").strip().lower()
    if wanted in ("", "auto"):
        return
    try:
        force_decoder(wanted)
    except ValueError as exc:
        warnings.warn(f"VMSSD_XPRESS_DECODER ignored: {exc}", RuntimeWarning, stacklevel=2)


_decoder_from_environment()
