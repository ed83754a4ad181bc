"""RamBlock values: 1 MiB of saved guest RAM as raw bytes or as a page-record stream (spec §3.2).

A value of exactly 1,048,576 bytes is raw memory.  Anything else is a stream of records, each
starting with a u32 tag [V on the legacy .bin sample][4]:

* ``0xFFFFFFFF`` end of stream;
* ``0xFFFFFFFE`` + 8-byte pattern: one page filled with the pattern;
* ``0xFFFFFFFD`` + 8-byte pattern + u32 count: ``count`` pages of the pattern (pattern first [3]);
* ``0xFFFFFFFC`` + u32 uncompressed size + u32 compressed size + data: a variable-size run, raw if
  both sizes are equal, else XPRESS; the output advances by the uncompressed size [3, never seen
  in a real file];
* ``n`` in 1..4096 + ``n`` bytes: a raw page (``n == 4096``) or one XPRESS page expanding to 4096.

Reading is split in two so that opening a saved state costs nothing: :func:`index_block` walks the
record headers once (no decompression) into a compact :class:`BlockIndex`, and :func:`decode_page`
(one page), :func:`decode_block` (into a bytearray), :func:`decode_block_bytes` and
:func:`decode_block_pages` (the cache's forms) expand pages from it.  Writers use
:func:`encode_block`.

Decisions where the spec is silent (all [inf]):

* **Early end marker.**  The spec says the stream runs "until 1 MiB of output has been produced or
  an end marker appears" but not what the remaining pages hold.  Every real block ends with the
  marker after exactly 256 pages, and openvmm zero-pads the last block of every range, so a short
  stream is treated like a truncated one: the pages it does not produce are *missing* (reads raise
  :class:`MissingPageError`, padded reads zero-fill) and a ``truncated`` finding is recorded.
  Guessing zeros would hide damaged evidence.
* **Variable runs** may leave the output position off a page boundary.  Records written while
  the position is unaligned (runs, and page records that then straddle two pages) are not listed
  one by one: each page they touch keeps a *checkpoint* (the first such record touching it and its
  output offset), and decoding the page re-walks the already validated records from there.  So a
  :class:`BlockIndex` has a fixed size whatever the input (a hostile value of 80,000 one-byte
  runs costs no more than a real one).  A page only partly produced when the stream stops is
  missing.
* **Hostile records** (overrunning the value or the 1 MiB output, tags that are not one of the
  above, zero-sized runs, absurd counts) record a finding naming the absolute file offset of the
  record and leave the rest of the block missing; in strict mode they raise :class:`FormatError`.
"""

from __future__ import annotations

import dataclasses
import struct
from array import array
from collections.abc import Callable, Iterator

from ..codecs import xpress as _xpress
from ..errors import Findings, FormatError, TruncatedError, VmssdError

__all__ = [
    "BLOCK_SIZE",
    "PAGES_PER_BLOCK",
    "PAGE_SIZE",
    "ZERO_BLOCK",
    "BlockIndex",
    "BlockPlan",
    "BlockStats",
    "MissingPageError",
    "decode_block",
    "decode_block_bytes",
    "decode_block_pages",
    "decode_page",
    "decode_pages",
    "encode_block",
    "fill_page",
    "index_block",
    "plan_block",
    "uniform_block",
    "uniform_pattern",
]

PAGE_SIZE = 4096
PAGES_PER_BLOCK = 256
BLOCK_SIZE = PAGE_SIZE * PAGES_PER_BLOCK  # 1 MiB; a value of exactly this size is raw [V]

TAG_END = 0xFFFFFFFF
TAG_FILL = 0xFFFFFFFE
TAG_MULTI_FILL = 0xFFFFFFFD
TAG_VARIABLE_RUN = 0xFFFFFFFC
#: VMkatz's observed upper bound for one variable run [1?]; only the writer uses it.
VARIABLE_RUN_MAX = 0xFFF

RECORD_TAG = struct.Struct("<I")
SINGLE_FILL_RECORD = struct.Struct("<IQ")  # tag, pattern (kept as an integer)
MULTI_FILL_RECORD = struct.Struct("<IQI")  # tag, pattern, page count (pattern first [3])
VARIABLE_RUN_RECORD = struct.Struct("<III")  # tag, uncompressed size, compressed size
_PATTERN = struct.Struct("<Q")
_MULTI_FILL_TAIL = struct.Struct("<QI")
_VARIABLE_RUN_TAIL = struct.Struct("<II")

# Per-page kinds stored in BlockIndex.kinds.
KIND_MISSING = 0
KIND_FILL = 1
KIND_RAW = 2
KIND_XPRESS = 3
KIND_PIECES = 4  # touched by variable runs or unaligned records: decoded from a checkpoint

_ZERO_PAGE = bytes(PAGE_SIZE)
_FILL_CACHE_MAX = 256
# pattern -> 4 KiB page.  Bounded by clearing: fill pages are cheap to rebuild, and dict.clear()
# and item assignment are atomic under the GIL, so no lock is needed.
_FILL_PAGES: dict[int, bytes] = {0: _ZERO_PAGE}


def _cache_put(cache: dict[int, bytes], limit: int, pattern: int, value: bytes, zero: bytes) -> bytes:
    """Add to a pattern cache bounded by clearing (values are cheap to rebuild); the ``zero`` entry,
    which readers compare by identity, is always put back.  No lock: each step is atomic under the GIL."""
    if len(cache) >= limit:
        cache.clear()
        cache[0] = zero
    cache[pattern] = value
    return value


def fill_page(pattern: int) -> bytes:
    """Return the 4 KiB page made of the little-endian 8-byte ``pattern``, from a small cache."""
    page = _FILL_PAGES.get(pattern)
    if page is None:
        page = _cache_put(_FILL_PAGES, _FILL_CACHE_MAX, pattern, _PATTERN.pack(pattern) * (PAGE_SIZE // 8), _ZERO_PAGE)
    return page


def _fill_bytes(pattern: int, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of an endless repetition of the 8-byte pattern (for unaligned pieces)."""
    raw = _PATTERN.pack(pattern)
    phase = start & 7
    rotated = raw[phase:] + raw[:phase]
    n = stop - start
    return (rotated * ((n + 7) >> 3))[:n]


class MissingPageError(VmssdError):
    """A page that the record stream does not produce (truncated or cut short by a bad record)."""

    def __init__(self, message: str, page: int, address: int | None = None) -> None:
        self.page = page
        self.address = address
        super().__init__(message)


@dataclasses.dataclass
class BlockStats:
    """Record counts of one or more blocks, to compare with what a writer is known to produce."""

    blocks: int = 0
    raw_blocks: int = 0  # values of exactly 1 MiB (no records)
    fill_records: int = 0  # 0xFFFFFFFE
    multi_fill_records: int = 0  # 0xFFFFFFFD
    multi_fill_pages: int = 0
    xpress_pages: int = 0  # n < 4096
    raw_pages: int = 0  # n == 4096
    variable_runs: int = 0  # 0xFFFFFFFC
    end_markers: int = 0
    missing_pages: int = 0

    def __add__(self, other: BlockStats) -> BlockStats:
        return BlockStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))


# A record re-walked from a checkpoint: (output start, output length, kind, pattern or value
# offset of the data, stored length, value offset of the record).
Piece = tuple[int, int, int, int, int, int]

_RAW_KINDS = bytes([KIND_RAW]) * PAGES_PER_BLOCK
_RAW_ARGS = array("Q", range(0, BLOCK_SIZE, PAGE_SIZE))
_RAW_LENGTHS = array("H", [PAGE_SIZE]) * PAGES_PER_BLOCK
_ZERO_ARGS = array("Q", bytes(8 * PAGES_PER_BLOCK))
_ZERO_LENGTHS = array("H", bytes(2 * PAGES_PER_BLOCK))
_ZERO_OUT = array("I", bytes(4 * PAGES_PER_BLOCK))
_ALL_FILL_KINDS = bytes([KIND_FILL]) * PAGES_PER_BLOCK


class BlockIndex:
    """Where each of the 256 pages of one RamBlock value comes from, without its data.

    ``kinds[p]`` is a ``KIND_*`` constant; ``args[p]`` is the fill pattern (as a little-endian
    integer), the offset of the page's record data in the value, or for ``KIND_PIECES`` the offset
    of the checkpoint record, whose output offset is ``piece_out[p]``; ``lengths[p]`` is the stored
    length.  About 3-4 KiB per block (arrays, no per-page objects) whatever the input, so thousands
    can be built during a scan.
    """

    __slots__ = (
        "args",
        "covered",
        "file_offset",
        "kinds",
        "lengths",
        "path",
        "piece_out",
        "raw",
        "stats",
    )

    def __init__(
        self,
        kinds: bytes,
        args: array[int],
        lengths: array[int],
        *,
        path: str,
        file_offset: int | None,
        stats: BlockStats,
        covered: int,
        piece_out: array[int] | None = None,
        raw: bool = False,
    ) -> None:
        self.kinds = kinds
        self.args = args
        self.lengths = lengths
        self.path = path
        self.file_offset = file_offset
        self.stats = stats
        self.covered = covered  # bytes of output the stream produced (BLOCK_SIZE when complete)
        self.piece_out = piece_out  # None unless some page is KIND_PIECES
        self.raw = raw

    @property
    def missing_pages(self) -> list[int]:
        """Page numbers the stream does not produce."""
        if self.covered >= BLOCK_SIZE:
            return []
        kinds = self.kinds
        return [p for p in range(PAGES_PER_BLOCK) if kinds[p] == KIND_MISSING]

    @property
    def complete(self) -> bool:
        return self.covered >= BLOCK_SIZE

    def record_offset(self, page: int) -> int | None:
        """Absolute file offset of the record a page comes from (for messages), when known."""
        if self.file_offset is None:
            return None
        kind = self.kinds[page]
        if kind in (KIND_RAW, KIND_XPRESS):
            return self.file_offset + self.args[page] - RECORD_TAG.size
        if kind == KIND_PIECES:
            return self.file_offset + self.args[page]
        return self.file_offset


def _checkpoint(
    kinds: bytearray, args: array[int], piece_out: array[int] | None, out: int, length: int, rec: int
) -> array[int]:
    """Mark the pages that output [out, out + length) touches as KIND_PIECES, keeping the first checkpoint."""
    if piece_out is None:
        piece_out = _ZERO_OUT[:]
    for page in range(out >> 12, ((out + length - 1) >> 12) + 1):
        if kinds[page] != KIND_PIECES:
            kinds[page] = KIND_PIECES
            args[page] = rec
            piece_out[page] = out
    return piece_out


def _walk(value: bytes | bytearray | memoryview, pos: int, out: int, stop: int) -> Iterator[Piece]:
    """Re-walk records from a checkpoint until output offset ``stop``.

    Only called for pages below ``BlockIndex.covered``, whose records :func:`index_block` has
    already validated, so no bounds are rechecked beyond a guard against a mis-used index.
    """
    unpack_tag = RECORD_TAG.unpack_from
    while out < stop and pos + 4 <= len(value):
        tag = unpack_tag(value, pos)[0]
        if tag == TAG_FILL:
            yield out, PAGE_SIZE, KIND_FILL, _PATTERN.unpack_from(value, pos + 4)[0], 8, pos
            pos += 12
            out += PAGE_SIZE
        elif 0 < tag <= PAGE_SIZE:
            yield out, PAGE_SIZE, KIND_RAW if tag == PAGE_SIZE else KIND_XPRESS, pos + 4, tag, pos
            pos += 4 + tag
            out += PAGE_SIZE
        elif tag == TAG_MULTI_FILL:
            pattern, count = _MULTI_FILL_TAIL.unpack_from(value, pos + 4)
            yield out, count * PAGE_SIZE, KIND_FILL, pattern, 8, pos
            pos += 16
            out += count * PAGE_SIZE
        elif tag == TAG_VARIABLE_RUN:
            usize, csize = _VARIABLE_RUN_TAIL.unpack_from(value, pos + 4)
            yield out, usize, KIND_RAW if usize == csize else KIND_XPRESS, pos + 12, csize, pos
            pos += 12 + csize
            out += usize
        else:
            return


def _same_records(value: bytes | bytearray | memoryview, pos: int, size: int, limit: int) -> int:
    """How many copies (1..limit) of the ``size``-byte record at ``pos`` follow back to back.

    Gallops with slice comparisons, so a run of n records costs O(log² n) Python steps, not n.
    """
    if limit <= 1:
        return max(limit, 1)
    record = bytes(value[pos : pos + size])
    if value[pos + size : pos + 2 * size] != record:
        return 1
    count, step = 2, 2
    while count < limit:
        step = min(step, limit - count)
        start = pos + count * size
        if value[start : start + step * size] == record * step:
            count += step
            step *= 2
        elif step == 1:
            break
        else:
            step //= 2
    return count


def _raw_index(path: str, file_offset: int | None) -> BlockIndex:
    return BlockIndex(
        _RAW_KINDS,
        _RAW_ARGS,
        _RAW_LENGTHS,
        path=path,
        file_offset=file_offset,
        stats=BlockStats(blocks=1, raw_blocks=1),
        covered=BLOCK_SIZE,
        raw=True,
    )


def index_block(
    value: bytes | bytearray | memoryview,
    *,
    path: str,
    file_offset: int | None,
    findings: Findings,
) -> BlockIndex:
    """Parse the record headers of one RamBlock value once, in O(len(value)), decoding nothing.

    ``file_offset`` is the absolute offset of the value in ``path`` (None for a value stored inline
    in a key table); findings name ``file_offset + offset of the record``.  Bad input never raises
    anything but :class:`FormatError` (strict mode); otherwise it becomes a finding and missing pages.
    """
    size = len(value)
    if size == BLOCK_SIZE:
        return _raw_index(path, file_offset)

    kinds = bytearray(PAGES_PER_BLOCK)  # KIND_MISSING == 0
    args = _ZERO_ARGS[:]
    lengths = _ZERO_LENGTHS[:]
    piece_out: array[int] | None = None
    stats = BlockStats(blocks=1)
    unpack_tag = RECORD_TAG.unpack_from
    unpack_pattern = _PATTERN.unpack_from
    pos = 0  # offset in the value
    out = 0  # bytes of output produced so far
    problem: tuple[int, str, str, type[FormatError]] | None = None  # (record offset, kind, message, error)

    while out < BLOCK_SIZE:
        rec = pos
        if size - pos < 4:
            if pos < size:
                problem = (
                    rec,
                    "truncated",
                    f"{size - pos} stray byte(s) where a record tag was expected",
                    TruncatedError,
                )
            else:
                problem = (
                    rec,
                    "truncated",
                    "value ends before 1 MiB of output and without an end marker",
                    TruncatedError,
                )
            break
        tag = unpack_tag(value, pos)[0]
        if tag == TAG_FILL:
            if size - pos < 12:
                problem = (rec, "truncated", "single-fill record cut off", TruncatedError)
                break
            pattern = unpack_pattern(value, pos + 4)[0]
            if out & 0xFFF == 0:
                # Hyper-V writes one single-fill record per empty page (64,321 of them in the real
                # .bin), so take a whole run of identical records with C-level slice compares.
                page = out >> 12
                run = _same_records(value, pos, 12, min(PAGES_PER_BLOCK - page, (size - pos) // 12))
                if run == 1:
                    kinds[page] = KIND_FILL
                    args[page] = pattern
                else:
                    kinds[page : page + run] = bytes([KIND_FILL]) * run
                    args[page : page + run] = array("Q", [pattern]) * run
                stats.fill_records += run
                pos += 12 * run
                out += PAGE_SIZE * run
                continue
            pos += 12
            stats.fill_records += 1
            if out + PAGE_SIZE > BLOCK_SIZE:
                problem = (rec, "bad-record", "fill record overruns the 1 MiB block", FormatError)
                break
            else:
                piece_out = _checkpoint(kinds, args, piece_out, out, PAGE_SIZE, rec)
            out += PAGE_SIZE
        elif 0 < tag <= PAGE_SIZE:
            if size - pos - 4 < tag:
                problem = (
                    rec,
                    "truncated",
                    f"page record of {tag} bytes cut off by the end of the value",
                    TruncatedError,
                )
                break
            kind = KIND_RAW if tag == PAGE_SIZE else KIND_XPRESS
            if kind == KIND_RAW:
                stats.raw_pages += 1
            else:
                stats.xpress_pages += 1
            if out & 0xFFF == 0:
                page = out >> 12
                kinds[page] = kind
                args[page] = pos + 4
                lengths[page] = tag
            elif out + PAGE_SIZE > BLOCK_SIZE:
                problem = (rec, "bad-record", "page record overruns the 1 MiB block", FormatError)
                break
            else:
                piece_out = _checkpoint(kinds, args, piece_out, out, PAGE_SIZE, rec)
            pos += 4 + tag
            out += PAGE_SIZE
        elif tag == TAG_MULTI_FILL:
            if size - pos < 16:
                problem = (rec, "truncated", "multi-fill record cut off", TruncatedError)
                break
            pattern, count = _MULTI_FILL_TAIL.unpack_from(value, pos + 4)
            if count == 0 or count * PAGE_SIZE > BLOCK_SIZE - out:
                problem = (
                    rec,
                    "bad-record",
                    f"multi-fill count {count} does not fit the {(BLOCK_SIZE - out) / PAGE_SIZE:g} pages left",
                    FormatError,
                )
                break
            pos += 16
            stats.multi_fill_records += 1
            stats.multi_fill_pages += count
            if out & 0xFFF == 0:
                page = out >> 12
                kinds[page : page + count] = bytes([KIND_FILL]) * count
                args[page : page + count] = array("Q", [pattern]) * count
            else:
                piece_out = _checkpoint(kinds, args, piece_out, out, count * PAGE_SIZE, rec)
            out += count * PAGE_SIZE
        elif tag == TAG_VARIABLE_RUN:
            if size - pos < 12:
                problem = (rec, "truncated", "variable-run header cut off", TruncatedError)
                break
            usize, csize = _VARIABLE_RUN_TAIL.unpack_from(value, pos + 4)
            if usize == 0 or usize > BLOCK_SIZE - out:
                problem = (
                    rec,
                    "bad-record",
                    f"variable run of {usize} bytes does not fit the {BLOCK_SIZE - out} bytes left",
                    FormatError,
                )
                break
            if csize == 0 or csize > size - pos - 12:
                problem = (rec, "truncated", f"variable run data ({csize} bytes) cut off", TruncatedError)
                break
            stats.variable_runs += 1
            piece_out = _checkpoint(kinds, args, piece_out, out, usize, rec)
            pos += 12 + csize
            out += usize
        elif tag == TAG_END:
            pos += 4
            stats.end_markers += 1
            problem = (
                rec,
                "truncated",
                f"end marker after {out:#x} bytes of output; pages {out >> 12}..255 treated as missing",
                TruncatedError,
            )
            break
        else:
            problem = (rec, "bad-record", f"unknown page-record tag {tag:#010x}", FormatError)
            break
    else:
        # Complete: the real .bin closes every block with an end marker; anything else left over is
        # reported but harmless, because all 256 pages are known.
        if size - pos >= 4 and unpack_tag(value, pos)[0] == TAG_END:
            stats.end_markers += 1
            pos += 4
        if pos < size:
            at = file_offset + pos if file_offset is not None else None
            findings.add(path, at, "trailing-data", f"{size - pos} byte(s) after a complete 1 MiB RamBlock")

    if out < BLOCK_SIZE:
        # Keep only whole pages: a page partly produced by the stream is missing.
        if out & 0xFFF:
            kinds[out >> 12] = KIND_MISSING
        stats.missing_pages = PAGES_PER_BLOCK - (out >> 12)
        if problem is not None:
            rec, kind, message, error = problem
            at = file_offset + rec if file_offset is not None else None
            where = "" if file_offset is not None else f" (record at value offset {rec:#x})"
            findings.add(path, at, kind, f"RamBlock record stream: {message}{where}", error=error)
        out -= out & 0xFFF

    return BlockIndex(
        bytes(kinds),
        args,
        lengths,
        path=path,
        file_offset=file_offset,
        stats=stats,
        covered=out,
        piece_out=piece_out,
    )


class BlockPlan:
    """A well-formed compressed block after one walk: its 256 pages, the XPRESS ones still to decode.

    ``pages[p]`` is the page (fill pages are the shared cached pattern page) or None for the XPRESS
    page whose stream is ``streams[i]`` where ``slots[i] == p``.  ``uniform`` is the fill pattern
    when the whole block is one pattern (free RAM), so a reader can share one 1 MiB object.
    """

    __slots__ = ("pages", "slots", "streams", "uniform")

    def __init__(self, pages: list[bytes | None], slots: list[int], streams: list[bytes], uniform: int | None) -> None:
        self.pages = pages
        self.slots = slots
        self.streams = streams
        self.uniform = uniform

    def finish(self, decoded: list[bytes]) -> list[bytes]:
        """The 256 pages, with ``decoded[i]`` (the expansion of ``streams[i]``) in place."""
        pages = self.pages
        for slot, page in zip(self.slots, decoded, strict=True):
            pages[slot] = page
        return pages  # type: ignore[return-value]  # every None slot is filled now


def plan_block(value: bytes) -> BlockPlan | None:
    """Walk a *well-formed* record stream once, for whole-block reads: the fast path of a scan.

    Well formed means what Hyper-V writes: exactly 256 pages of single-fill, multi-fill, raw and
    XPRESS page records, then the end marker, then nothing.  Anything else (variable runs, early end
    markers, truncation, unknown tags, trailing bytes) returns None, and the caller takes
    :func:`index_block`, which records findings for it; so this walk checks only what it needs to
    stay in bounds.  Profiles showed the two-pass form (index, then decode from the index) spending
    as long in Python bookkeeping as pyfwnt spent decoding.
    """
    size = len(value)
    if size == BLOCK_SIZE or not isinstance(value, bytes):
        return None
    # Hot loop (one turn per record, 131k turns for 512 MiB): locals only, the common cases first.
    pages: list[bytes | None] = []
    append = pages.append
    slots: list[int] = []
    add_slot = slots.append
    streams: list[bytes] = []
    add_stream = streams.append
    head = SINGLE_FILL_RECORD.unpack_from  # tag and the next 8 bytes, the pattern of a fill record
    fills = _FILL_PAGES
    raw_pages = 0
    pos = 0
    n = 0
    try:
        while n < PAGES_PER_BLOCK:
            tag, pattern = head(value, pos)
            if tag < PAGE_SIZE:
                if not tag:
                    return None
                end = pos + 4 + tag
                if end > size:
                    return None
                add_slot(n)
                add_stream(value[pos + 4 : end])
                append(None)
                pos = end
                n += 1
            elif tag == TAG_FILL:
                page = fills.get(pattern) or fill_page(pattern)
                nxt = pos + 12
                if value[nxt : nxt + 12] != value[pos:nxt]:
                    append(page)
                    pos = nxt
                    n += 1
                else:  # Hyper-V writes one single-fill record per empty page: take the run at once
                    run = _same_records(value, pos, 12, min(PAGES_PER_BLOCK - n, (size - pos) // 12))
                    pages += [page] * run
                    pos += 12 * run
                    n += run
            elif tag == PAGE_SIZE:
                end = pos + 4 + PAGE_SIZE
                if end > size:
                    return None
                append(value[pos + 4 : end])
                raw_pages += 1
                pos = end
                n += 1
            elif tag == TAG_MULTI_FILL:
                count = _MULTI_FILL_TAIL.unpack_from(value, pos + 4)[1]
                if not 0 < count <= PAGES_PER_BLOCK - n:
                    return None
                pages += [fills.get(pattern) or fill_page(pattern)] * count
                pos += 16
                n += count
            else:
                return None
        if pos + 4 != size or RECORD_TAG.unpack_from(value, pos)[0] != TAG_END:
            return None
    except struct.error:  # a record cut off by the end of the value
        return None
    first = pages[0]
    uniform = None
    if not slots and not raw_pages and pages.count(first) == PAGES_PER_BLOCK:
        assert first is not None
        uniform = _PATTERN.unpack_from(first)[0]
    return BlockPlan(pages, slots, streams, uniform)


def detach_error(exc: FormatError) -> FormatError:
    """``exc`` and its causes without tracebacks, before it is kept in an ``errors`` list.

    Hostile-input fix: a kept traceback ties the decoder's frames (holding the list itself and 1 MiB
    buffers) into a reference cycle that only the cyclic GC frees, so decoding damaged blocks one
    after another held hundreds of MiB (225 MB RSS after 12,000 fuzz inputs; 100 MB without).
    """
    link: BaseException | None = exc
    while link is not None:
        link.__traceback__ = None
        link = link.__cause__
    return exc


def _bad_page(index: BlockIndex, page: int, detail: str, offset: int | None = None) -> FormatError:
    if offset is None:
        offset = index.record_offset(page)
    return FormatError(index.path, offset, f"RamBlock page {page}: {detail}")


def _expand_xpress(
    data: bytes | memoryview,
    size: int,
    index: BlockIndex,
    page: int,
    at: int | None,
    on_fallback: Callable[..., object] | None,
) -> bytes:
    try:
        out = _xpress.decompress(data, size, on_fallback=on_fallback)
    except FormatError as exc:
        raise _bad_page(index, page, f"XPRESS data does not decode ({exc.expected})", at) from exc
    if len(out) != size:
        raise _bad_page(index, page, f"XPRESS data expands to {len(out)} bytes, expected {size}", at)
    return out


def _piece_offset(index: BlockIndex, piece: Piece) -> int | None:
    return None if index.file_offset is None else index.file_offset + piece[5]


def _piece_bytes(
    view: memoryview,
    index: BlockIndex,
    piece: Piece,
    start: int,
    stop: int,
    on_fallback: Callable[..., object] | None,
) -> bytes | memoryview:
    """Output bytes ``start:stop`` (relative to the piece) of one piece."""
    out_start, length, kind, arg, stored, _ = piece
    if kind == KIND_FILL:
        # The pattern's phase is relative to the record's first output byte, wherever that lands.
        if start == 0 and stop == PAGE_SIZE:
            return fill_page(arg)
        return _fill_bytes(arg, start, stop)
    if kind == KIND_RAW:
        return view[arg + start : arg + stop]
    data = _expand_xpress(
        view[arg : arg + stored], length, index, out_start >> 12, _piece_offset(index, piece), on_fallback
    )
    return data[start:stop] if (start, stop) != (0, length) else data


def decode_page(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    page_no: int,
    *,
    on_fallback: Callable[..., object] | None = None,
) -> bytes:
    """Decode one 4 KiB page; raises :class:`MissingPageError` or :class:`FormatError` (bad XPRESS)."""
    if not 0 <= page_no < PAGES_PER_BLOCK:
        raise ValueError(f"page number {page_no} outside 0..255")
    kind = index.kinds[page_no]
    if kind == KIND_FILL:
        return fill_page(index.args[page_no])
    if kind == KIND_RAW:
        offset = index.args[page_no]
        return bytes(value[offset : offset + PAGE_SIZE])
    if kind == KIND_XPRESS:
        offset = index.args[page_no]
        return _expand_xpress(
            memoryview(value)[offset : offset + index.lengths[page_no]],
            PAGE_SIZE,
            index,
            page_no,
            index.record_offset(page_no),
            on_fallback,
        )
    if kind == KIND_PIECES and index.piece_out is not None and page_no < index.covered >> 12:
        view = memoryview(value)
        lo, hi = page_no << 12, (page_no + 1) << 12
        parts: list[bytes | memoryview] = []
        for piece in _walk(view, index.args[page_no], index.piece_out[page_no], hi):
            start, stop = max(lo, piece[0]) - piece[0], min(hi, piece[0] + piece[1]) - piece[0]
            if stop > start:
                parts.append(_piece_bytes(view, index, piece, start, stop, on_fallback))
        return b"".join(parts)
    where = f" (absolute offset {index.file_offset:#x})" if index.file_offset is not None else ""
    raise MissingPageError(
        f"{index.path}: page {page_no} of the RamBlock value{where} is not produced by its record stream",
        page_no,
    )


def _decode_pieces(
    view: memoryview,
    index: BlockIndex,
    out: bytearray,
    on_fallback: Callable[..., object] | None,
    errors: list[tuple[int, FormatError]] | None,
    first_page: int = 0,
    end_page: int = PAGES_PER_BLOCK,
) -> None:
    """Write every run of KIND_PIECES pages (of ``first_page``..``end_page - 1``) into ``out``, walking
    each run's records once; ``out`` starts at page ``first_page``."""
    kinds, piece_out = index.kinds, index.piece_out
    assert piece_out is not None
    base = first_page << 12
    last_page = min(index.covered >> 12, end_page)  # pages from covered on are missing
    page = first_page
    while page < last_page:
        if kinds[page] != KIND_PIECES:
            page += 1
            continue
        stop_page = page
        while stop_page < last_page and kinds[stop_page] == KIND_PIECES:
            stop_page += 1
        lo, hi = page << 12, stop_page << 12
        for piece in _walk(view, index.args[page], piece_out[page], hi):
            start, stop = max(lo, piece[0]) - piece[0], min(hi, piece[0] + piece[1]) - piece[0]
            if stop <= start:
                continue
            at = piece[0] + start
            try:
                out[at - base : at - base + stop - start] = _piece_bytes(view, index, piece, start, stop, on_fallback)
            except FormatError as exc:
                if errors is None:
                    raise
                detach_error(exc)
                for bad in range(at >> 12, ((at + stop - start - 1) >> 12) + 1):
                    errors.append((bad, exc))
                    out[(bad << 12) - base : ((bad + 1) << 12) - base] = _ZERO_PAGE
        page = stop_page


def decode_pages(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    first: int,
    stop: int,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> bytes:
    """Pages ``first``..``stop - 1`` as one ``bytes``; missing pages are zeros; errors as in :func:`decode_block`.

    Hostile-input fix: pages inside one variable run share its data (up to 1 MiB), and
    :func:`decode_page` re-expands the whole run for each of them, so reading a block page by page
    cost 256 expansions (minutes in pure Python).  Here each run of such pages is walked once.
    """
    if not 0 <= first <= stop <= PAGES_PER_BLOCK:
        raise ValueError(f"page range {first}..{stop} outside 0..{PAGES_PER_BLOCK}")
    out = bytearray((stop - first) << 12)
    kinds = index.kinds
    for page in range(first, stop):
        kind = kinds[page]
        if kind in (KIND_MISSING, KIND_PIECES):
            continue  # missing pages stay zero; pieces are decoded below, one walk per run
        lo = (page - first) << 12
        try:
            out[lo : lo + PAGE_SIZE] = decode_page(value, index, page, on_fallback=on_fallback)
        except FormatError as exc:
            if errors is None:
                raise
            errors.append((page, detach_error(exc)))
    if index.piece_out is not None:
        _decode_pieces(memoryview(value), index, out, on_fallback, errors, first, stop)
    return bytes(out)


def decode_block(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    out: bytearray | None = None,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> bytearray:
    """Decode all 256 pages in one pass into ``out`` (a new 1 MiB bytearray by default).

    Missing pages (``index.missing_pages``) are zero-filled.  A page whose XPRESS data does not
    decode raises :class:`FormatError`, unless ``errors`` is given: then it is zero-filled and
    ``(page, error)`` is appended, so one bad page does not cost the other 255.
    """
    fresh = out is None
    if out is None:
        out = bytearray(BLOCK_SIZE)
    elif len(out) != BLOCK_SIZE:
        raise ValueError(f"output buffer must be {BLOCK_SIZE} bytes, not {len(out)}")
    view = memoryview(value)
    if index.raw:
        out[:] = view
        return out
    kinds, args, lengths = index.kinds, index.args, index.lengths
    decompress = _xpress.decompress
    for page in range(PAGES_PER_BLOCK):
        kind = kinds[page]
        lo = page << 12
        if kind == KIND_FILL:
            pattern = args[page]
            if pattern or not fresh:  # a new bytearray is already zero
                out[lo : lo + PAGE_SIZE] = fill_page(pattern)
        elif kind == KIND_XPRESS:
            offset = args[page]
            try:
                data = decompress(view[offset : offset + lengths[page]], PAGE_SIZE, on_fallback=on_fallback)
            except FormatError as exc:
                err = _bad_page(index, page, f"XPRESS data does not decode ({exc.expected})")
                err.__cause__ = exc
            else:
                if len(data) == PAGE_SIZE:
                    out[lo : lo + PAGE_SIZE] = data
                    continue
                err = _bad_page(index, page, f"XPRESS data expands to {len(data)} bytes, expected 4096")
            if errors is None:
                raise err
            errors.append((page, detach_error(err)))
            if not fresh:
                out[lo : lo + PAGE_SIZE] = _ZERO_PAGE
        elif kind == KIND_RAW:
            offset = args[page]
            out[lo : lo + PAGE_SIZE] = view[offset : offset + PAGE_SIZE]
        elif kind == KIND_MISSING and not fresh:
            out[lo : lo + PAGE_SIZE] = _ZERO_PAGE
    if index.piece_out is not None:
        _decode_pieces(view, index, out, on_fallback, errors)
    return out


_UNIFORM_CACHE_MAX = 8
# pattern -> 1 MiB block, for blocks that are one fill pattern throughout (free RAM is all zero).
#: The all-zero block, shared: free guest RAM is all zero, and readers recognise it by identity.
ZERO_BLOCK = bytes(BLOCK_SIZE)
_UNIFORM_BLOCKS: dict[int, bytes] = {0: ZERO_BLOCK}


def uniform_pattern(index: BlockIndex) -> int | None:
    """The fill pattern if every page of the block is the same fill, else None (cheap: C-level scans)."""
    if index.raw or index.kinds != _ALL_FILL_KINDS:
        return None
    args = index.args
    pattern = args[0]
    return pattern if args.count(pattern) == PAGES_PER_BLOCK else None


def decode_block_pages(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> list[bytes]:
    """Decode all 256 pages as separate ``bytes`` objects (the form :class:`GuestMemory` caches).

    Fill pages are the shared cached pattern page and missing pages a shared zero page, so a
    mostly-empty block costs a 2 KiB list instead of a fresh 1 MiB buffer that the kernel must
    fault in; reads then copy each byte once, straight into their result.  Error handling is as
    in :func:`decode_block`.
    """
    if index.raw or index.piece_out is not None:  # rare in compressed form: take the general path
        block = bytes(decode_block(value, index, on_fallback=on_fallback, errors=errors))
        return [block[lo : lo + PAGE_SIZE] for lo in range(0, BLOCK_SIZE, PAGE_SIZE)]
    view = memoryview(value)
    src = value if isinstance(value, bytes) else bytes(value)
    kinds, args, lengths = index.kinds, index.args, index.lengths
    decompress = _xpress.decompress
    fast = _xpress.fast_decoder()  # the hot path: straight to pyfwnt, verdicts from decompress()
    pages: list[bytes] = []
    append = pages.append
    for page in range(PAGES_PER_BLOCK):
        kind = kinds[page]
        if kind == KIND_FILL:
            append(fill_page(args[page]))
        elif kind == KIND_XPRESS:
            offset = args[page]
            if fast is not None:
                try:
                    data = fast(src[offset : offset + lengths[page]], PAGE_SIZE)
                except Exception:  # any native complaint: decompress() below decides
                    data = b""
                if len(data) == PAGE_SIZE:
                    append(data)
                    continue
            try:
                data = decompress(view[offset : offset + lengths[page]], PAGE_SIZE, on_fallback=on_fallback)
            except FormatError as exc:
                err = _bad_page(index, page, f"XPRESS data does not decode ({exc.expected})")
                err.__cause__ = exc
            else:
                if len(data) == PAGE_SIZE:
                    append(data)
                    continue
                err = _bad_page(index, page, f"XPRESS data expands to {len(data)} bytes, expected 4096")
            if errors is None:
                raise err
            errors.append((page, detach_error(err)))
            append(_ZERO_PAGE)
        elif kind == KIND_RAW:
            offset = args[page]
            append(bytes(view[offset : offset + PAGE_SIZE]))
        else:
            append(_ZERO_PAGE)
    return pages


def uniform_block(pattern: int) -> bytes:
    """The 1 MiB block made of one fill pattern, shared from a small cache (free RAM is all zero)."""
    block = _UNIFORM_BLOCKS.get(pattern)
    if block is None:
        block = _cache_put(
            _UNIFORM_BLOCKS, _UNIFORM_CACHE_MAX, pattern, fill_page(pattern) * PAGES_PER_BLOCK, ZERO_BLOCK
        )
    return block


def decode_block_bytes(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> bytes:
    """Like :func:`decode_block` but immutable ``bytes``, built with one copy.

    A block that is one fill pattern throughout is the shared :func:`uniform_block`.
    """
    if index.raw:
        return value if isinstance(value, bytes) else bytes(value)
    pattern = uniform_pattern(index)
    if pattern is not None:
        return uniform_block(pattern)
    if index.piece_out is not None:
        return bytes(decode_block(value, index, on_fallback=on_fallback, errors=errors))
    return b"".join(decode_block_pages(value, index, on_fallback=on_fallback, errors=errors))


def encode_block(
    data: bytes | bytearray | memoryview,
    *,
    compress: bool = True,
    use_variable_runs: bool = False,
    end_marker: bool = True,
) -> bytes:
    """Encode 1 MiB of RAM the way Hyper-V does: fills, XPRESS pages, raw pages, end marker.

    Runs of pages made of one repeated 8-byte pattern become one single- or multi-fill record;
    other pages are XPRESS records when that is shorter than 4096 bytes, else raw records.
    ``use_variable_runs`` writes runs of non-fill pages as 0xFFFFFFFC records of at most 0xFFF
    bytes instead (never seen in a real file; for tests).  When the records would not be shorter
    than 1 MiB, the raw 1 MiB is returned, because a value of exactly 1 MiB *means* raw (§3.2).
    """
    buf = bytes(data)
    if len(buf) != BLOCK_SIZE:
        raise ValueError(f"a RamBlock holds exactly {BLOCK_SIZE} bytes, not {len(buf)}")
    parts: list[bytes] = []
    compressor = _xpress.compress if compress else None
    fill_pages: dict[bytes, bytes] = {}

    def fill_of(page_start: int) -> bytes | None:
        head = buf[page_start : page_start + 8]
        # Cheap probes first: most non-fill pages differ at the end or the middle.
        if buf[page_start + PAGE_SIZE - 8 : page_start + PAGE_SIZE] != head:
            return None
        if buf[page_start + 2048 : page_start + 2056] != head:
            return None
        full = fill_pages.get(head)
        if full is None:
            full = fill_pages[head] = head * (PAGE_SIZE // 8)
        return head if buf[page_start : page_start + PAGE_SIZE] == full else None

    def emit_span(first: int, stop: int) -> None:
        if use_variable_runs:
            span = buf[first << 12 : stop << 12]
            for at in range(0, len(span), VARIABLE_RUN_MAX):
                chunk = span[at : at + VARIABLE_RUN_MAX]
                packed = compressor(chunk) if compressor is not None else chunk
                if len(packed) >= len(chunk):
                    packed = chunk
                parts.append(VARIABLE_RUN_RECORD.pack(TAG_VARIABLE_RUN, len(chunk), len(packed)))
                parts.append(packed)
            return
        for page in range(first, stop):
            raw = buf[page << 12 : (page + 1) << 12]
            packed = compressor(raw) if compressor is not None else raw
            if 0 < len(packed) < PAGE_SIZE:
                parts.append(RECORD_TAG.pack(len(packed)))
                parts.append(packed)
            else:
                parts.append(RECORD_TAG.pack(PAGE_SIZE))
                parts.append(raw)

    page = 0
    span_start = 0
    while page < PAGES_PER_BLOCK:
        head = fill_of(page << 12)
        if head is None:
            page += 1
            continue
        if span_start < page:
            emit_span(span_start, page)
        full = fill_pages[head]
        stop = page + 1
        while stop < PAGES_PER_BLOCK and buf[stop << 12 : (stop + 1) << 12] == full:
            stop += 1
        pattern = _PATTERN.unpack(head)[0]
        if stop - page == 1:
            parts.append(SINGLE_FILL_RECORD.pack(TAG_FILL, pattern))
        else:
            parts.append(MULTI_FILL_RECORD.pack(TAG_MULTI_FILL, pattern, stop - page))
        page = span_start = stop
    if span_start < PAGES_PER_BLOCK:
        emit_span(span_start, PAGES_PER_BLOCK)
    if end_marker:
        parts.append(RECORD_TAG.pack(TAG_END))
    encoded = b"".join(parts)
    return buf if len(encoded) >= BLOCK_SIZE else encoded
