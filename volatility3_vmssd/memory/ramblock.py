"""RamBlock values: 1 MiB of saved guest RAM as raw bytes or as a page-record stream (docs/format.md#ramblock-values).

A value of exactly 1,048,576 bytes is raw memory.  Anything else is a stream of records, each
starting with a u32 tag [V on the legacy .bin sample][4]:

* ``0xFFFFFFFF`` end of stream;
* ``0xFFFFFFFE`` + 8-byte pattern: one page filled with the pattern;
* ``0xFFFFFFFD`` + 8-byte pattern + u32 count: ``count`` pages of the pattern (pattern first [3]);
* ``0xFFFFFFFC`` + u32 uncompressed size + u32 compressed size + data: a variable-size run, raw if
  both sizes are equal, else XPRESS; the output advances by the uncompressed size [3, never seen
  in a real file];
* ``n`` in 1..4096 + ``n`` bytes: a raw page (``n == 4096``) or one XPRESS page expanding to 4096.

The records are read in one place, :func:`~.records.tokens`, which validates each one and says
where the stream is damaged.  Reading has two paths over its tokens.  The fast one,
:func:`plan_block`, turns a sound stream into its output parts and the XPRESS streams to expand
in one batch (every read that loads a whole block).  The careful one, :func:`index_block`, turns
the tokens into a compact :class:`BlockIndex` and records findings for whatever is damaged;
:func:`~.pagedecode.decode_pages` expands pages from it (and serves reads that decode only some
pages).  ``vmssd create`` writes with :func:`encode_block`.

Decisions where the format is silent (all inferred, docs/format.md#ramblock-values):

* **Early end marker.**  The spec says the stream runs "until 1 MiB of output has been produced or
  an end marker appears" but not what the remaining pages hold.  The pages it does not produce are
  *missing* (reads raise :class:`MissingPageError`, padded reads zero-fill): guessing zeros would
  hide damaged evidence.  A writer may close a range that is not a whole number of blocks this way
  (openvmm zero-pads instead), so an end marker after every page the RAM map uses is legitimate;
  one before a page the map uses is recorded as a ``truncated`` finding.
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
from collections.abc import Iterator

from ..codecs import xpress as _xpress
from ..errors import Findings, TruncatedError, VmssdError
from .geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from .records import (
    MULTI_FILL_RECORD,
    RECORD_TAG,
    SINGLE_FILL_RECORD,
    TAG_END,
    TAG_FILL,
    TAG_MULTI_FILL,
    TAG_VARIABLE_RUN,
    RecordDamage,
    tokens,
)

__all__ = [
    "ZERO_BLOCK",
    "BlockIndex",
    "BlockPlan",
    "BlockStats",
    "MissingPageError",
    "encode_block",
    "fill_page",
    "fill_spans",
    "index_block",
    "page_records",
    "plan_block",
    "uniform_block",
    "whole_block",
]


_PATTERN = struct.Struct("<Q")
_END_RECORD = RECORD_TAG.pack(TAG_END)

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
_UNIFORM_CACHE_MAX = 8
#: The all-zero block, shared: free guest RAM is all zero, and readers recognise it by identity.
ZERO_BLOCK = bytes(BLOCK_SIZE)
# pattern -> 1 MiB block, for blocks that are one fill pattern throughout (free RAM is all zero).
_UNIFORM_BLOCKS: dict[int, bytes] = {0: ZERO_BLOCK}


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


@dataclasses.dataclass(slots=True, eq=False)
class BlockIndex:
    """Where each of the 256 pages of one RamBlock value comes from, without its data.

    ``kinds[p]`` is a ``KIND_*`` constant; ``args[p]`` is the fill pattern (as a little-endian
    integer), the offset of the page's record data in the value, or for ``KIND_PIECES`` the offset
    of the checkpoint record, whose output offset is ``piece_out[p]``; ``lengths[p]`` is the stored
    length.  About 3-4 KiB per block (arrays, no per-page objects) whatever the input, so thousands
    can be built during a scan.
    """

    kinds: bytes
    args: array[int]
    lengths: array[int]
    _: dataclasses.KW_ONLY
    path: str
    file_offset: int | None
    stats: BlockStats
    covered: int  # bytes of output the stream produced (BLOCK_SIZE when complete)
    piece_out: array[int] | None = None  # None unless some page is KIND_PIECES
    raw: bool = False

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
    needed: int = PAGES_PER_BLOCK,
) -> BlockIndex:
    """Parse the record headers of one RamBlock value once, in O(len(value)), decoding nothing.

    ``file_offset`` is the absolute offset of the value in ``path`` (None for a value stored inline
    in a key table); findings name ``file_offset + offset of the record``.  Bad input never raises
    anything but :class:`FormatError` (strict mode); otherwise it becomes a finding and missing pages.
    ``needed`` is how many leading pages of the block the RAM map uses: an end marker after them is
    how a writer closes a range that is not a whole number of blocks, so it is not reported.
    """
    if len(value) == BLOCK_SIZE:
        return _raw_index(path, file_offset)

    kinds = bytearray(PAGES_PER_BLOCK)  # KIND_MISSING == 0
    args = _ZERO_ARGS[:]
    lengths = _ZERO_LENGTHS[:]
    piece_out: array[int] | None = None
    stats = BlockStats(blocks=1)
    covered = BLOCK_SIZE  # bytes of output produced, less when the stream stops early
    problem: RecordDamage | None = None
    try:
        for tag, rec, out, arg, count in tokens(value):
            if 0 < tag <= PAGE_SIZE:
                if tag == PAGE_SIZE:
                    stats.raw_pages += 1
                else:
                    stats.xpress_pages += 1
                if out & 0xFFF:
                    piece_out = _checkpoint(kinds, args, piece_out, out, PAGE_SIZE, rec)
                else:
                    page = out >> 12
                    kinds[page] = KIND_RAW if tag == PAGE_SIZE else KIND_XPRESS
                    args[page] = arg
                    lengths[page] = tag
            elif tag in (TAG_FILL, TAG_MULTI_FILL):
                if tag == TAG_FILL:
                    stats.fill_records += count
                else:
                    stats.multi_fill_records += 1
                    stats.multi_fill_pages += count
                if out & 0xFFF:
                    piece_out = _checkpoint(kinds, args, piece_out, out, count * PAGE_SIZE, rec)
                elif count == 1:
                    kinds[out >> 12] = KIND_FILL
                    args[out >> 12] = arg
                else:
                    page = out >> 12
                    kinds[page : page + count] = bytes([KIND_FILL]) * count
                    args[page : page + count] = array("Q", [arg]) * count
            elif tag == TAG_VARIABLE_RUN:
                stats.variable_runs += 1
                piece_out = _checkpoint(kinds, args, piece_out, out, arg, rec)
            elif tag == TAG_END:
                stats.end_markers += 1
                if out < BLOCK_SIZE:
                    covered = out
                    if out >> 12 < needed:
                        problem = RecordDamage(
                            rec,
                            out,
                            "truncated",
                            f"end marker after {out:#x} bytes of output; pages {out >> 12}..255 treated as missing",
                            TruncatedError,
                        )
            else:  # TRAILING: reported but harmless, all 256 pages are known
                at = file_offset + rec if file_offset is not None else None
                findings.add(path, at, "trailing-data", f"{arg} byte(s) after a complete 1 MiB RamBlock")
    except RecordDamage as damage:
        problem = damage
        covered = damage.out
        if damage.counted == TAG_FILL:
            stats.fill_records += 1
        elif damage.counted == PAGE_SIZE:
            stats.raw_pages += 1
        elif damage.counted:
            stats.xpress_pages += 1

    if covered < BLOCK_SIZE:
        # Keep only whole pages: a page partly produced by the stream is missing.
        if covered & 0xFFF:
            kinds[covered >> 12] = KIND_MISSING
        stats.missing_pages = PAGES_PER_BLOCK - (covered >> 12)
        if problem is not None:
            rec = problem.rec
            at = file_offset + rec if file_offset is not None else None
            where = "" if file_offset is not None else f" (record at value offset {rec:#x})"
            findings.add(
                path, at, problem.kind, f"RamBlock record stream: {problem.message}{where}", error=problem.error
            )
        covered -= covered & 0xFFF

    return BlockIndex(
        bytes(kinds),
        args,
        lengths,
        path=path,
        file_offset=file_offset,
        stats=stats,
        covered=covered,
        piece_out=piece_out,
    )


@dataclasses.dataclass(slots=True, eq=False)
class BlockPlan:
    """A record stream after one fast walk: its output in order, the XPRESS parts still to decode.

    ``parts`` are the output pieces in order (fill pages are the shared cached pattern page, raw
    data are slices of the value); ``parts[slots[i]]`` is None until ``streams[i]`` is expanded to
    ``sizes[i]`` bytes (4096 for a page record, the uncompressed size for a variable run).
    ``paged`` says every part is one whole page (no variable run), so :meth:`finish` can hand out
    the 256 pages without building 1 MiB.  ``covered`` is the output in whole pages (less than 1 MiB
    after an early end marker; the pages from there on are missing).  ``uniform`` is the fill
    pattern when the whole block is one pattern (free RAM), so a reader can share one object.
    """

    parts: list[bytes | None]
    slots: list[int]
    streams: list[bytes]
    sizes: list[int]
    _: dataclasses.KW_ONLY
    covered: int
    paged: bool
    uniform: int | None

    @property
    def missing_pages(self) -> range:
        """Pages the stream does not produce (after an early end marker)."""
        return range(self.covered >> 12, PAGES_PER_BLOCK)

    def finish(self, decoded: list[bytes]) -> list[bytes]:
        """The block with ``decoded[i]`` (the expansion of ``streams[i]``) in place: 256 pages when
        ``paged``, else one 1 MiB ``bytes``.  Missing pages are zeros."""
        parts = self.parts
        for slot, data in zip(self.slots, decoded, strict=True):
            parts[slot] = data
        if self.paged:
            if len(parts) < PAGES_PER_BLOCK:
                parts.extend([_ZERO_PAGE] * (PAGES_PER_BLOCK - len(parts)))
            return parts  # type: ignore[return-value]  # every None slot is filled now
        data = b"".join(parts)  # type: ignore[arg-type]
        if len(data) != BLOCK_SIZE:  # an early end: the partly produced page is missing too
            data = data[: self.covered] + bytes(BLOCK_SIZE - self.covered)
        return [data]


def plan_block(value: bytes) -> BlockPlan | None:
    """Walk a record stream once, for whole-block reads: the fast path of every read that loads a block.

    Takes every form the format allows: single- and multi-fill, raw and XPRESS page records,
    variable runs (raw or XPRESS, on or off page boundaries), an end marker after 256 pages, none
    at all, or an early one (the caller decides whether the pages it leaves out are needed).
    Anything damaged (what :func:`~.records.tokens` refuses, and bytes after the stream) returns
    None, and the caller takes :func:`index_block`, which records findings for it.  Profiles showed
    the two-pass form (index, then decode from the index) spending as long in Python bookkeeping
    as pyfwnt spent decoding.
    """
    size = len(value)
    if size == BLOCK_SIZE or type(value) is not bytes:
        return None
    # Hot loop (one turn per record, 131k turns for 512 MiB): locals only, the common cases first.
    parts: list[bytes | None] = []
    append = parts.append
    slots: list[int] = []
    add_slot = slots.append
    streams: list[bytes] = []
    add_stream = streams.append
    runs: list[tuple[int, int]] = []  # (stream index, uncompressed size) of XPRESS variable runs
    fills = _FILL_PAGES
    raw_parts = 0
    paged = True
    covered = BLOCK_SIZE
    try:
        for tag, rec, out, arg, count in tokens(value):
            if tag < PAGE_SIZE:
                add_slot(len(parts))
                add_stream(value[arg:count])
                append(None)
            elif tag == TAG_FILL:
                page = fills.get(arg) or fill_page(arg)
                if count == 1:
                    append(page)
                else:
                    parts += [page] * count
            elif tag == PAGE_SIZE:
                append(value[arg:count])
                raw_parts += 1
            elif tag == TAG_MULTI_FILL:
                parts += [fills.get(arg) or fill_page(arg)] * count
            elif tag == TAG_VARIABLE_RUN:
                data = value[rec + 12 : rec + 12 + count]
                if arg == count:
                    append(data)
                    raw_parts += 1
                else:
                    runs.append((len(streams), arg))
                    add_slot(len(parts))
                    add_stream(data)
                    append(None)
                paged = False
            elif tag == TAG_END and rec + 4 == size:
                covered = out & ~0xFFF
            else:
                return None  # bytes after the stream: the careful path reports them
    except RecordDamage:
        return None
    sizes = [PAGE_SIZE] * len(streams)
    for i, usize in runs:
        sizes[i] = usize
    uniform = None
    if paged and not slots and not raw_parts and covered == BLOCK_SIZE and parts.count(parts[0]) == PAGES_PER_BLOCK:
        uniform = _PATTERN.unpack_from(parts[0])[0]  # type: ignore[arg-type]
    return BlockPlan(parts, slots, streams, sizes, covered=covered, paged=paged, uniform=uniform)


def uniform_block(pattern: int) -> bytes:
    """The 1 MiB block made of one fill pattern, shared from a small cache (free RAM is all zero)."""
    block = _UNIFORM_BLOCKS.get(pattern)
    if block is None:
        block = _cache_put(
            _UNIFORM_BLOCKS, _UNIFORM_CACHE_MAX, pattern, fill_page(pattern) * PAGES_PER_BLOCK, ZERO_BLOCK
        )
    return block


def fill_spans(buf: bytes, pages: int = PAGES_PER_BLOCK) -> Iterator[tuple[int, int, int | None]]:
    """The first ``pages`` pages of the 1 MiB ``buf`` cut into spans ``(first, stop, pattern)``, in
    order: a run of pages made of one repeated 8-byte ``pattern`` (a little-endian integer), or
    ``None`` for a run of other pages.  What an encoder writes as fill records, and what not."""
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

    page = 0
    span_start = 0
    while page < pages:
        head = fill_of(page << 12)
        if head is None:
            page += 1
            continue
        if span_start < page:
            yield span_start, page, None
        full = fill_pages[head]
        stop = page + 1
        while stop < pages and buf[stop << 12 : (stop + 1) << 12] == full:
            stop += 1
        yield page, stop, _PATTERN.unpack(head)[0]
        page = span_start = stop
    if span_start < pages:
        yield span_start, pages, None


def page_records(buf: bytes, first: int, stop: int, compress: bool = True) -> list[bytes]:
    """Pages ``first``..``stop - 1`` of ``buf`` as page records: XPRESS when shorter than a page, else raw."""
    parts: list[bytes] = []
    for page in range(first, stop):
        raw = buf[page << 12 : (page + 1) << 12]
        packed = _xpress.compress(raw) if compress else raw
        if 0 < len(packed) < PAGE_SIZE:
            parts.append(RECORD_TAG.pack(len(packed)))
            parts.append(packed)
        else:
            parts.append(RECORD_TAG.pack(PAGE_SIZE))
            parts.append(raw)
    return parts


def whole_block(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as bytes, checked to be exactly one RamBlock's worth."""
    buf = bytes(data)
    if len(buf) != BLOCK_SIZE:
        raise ValueError(f"a RamBlock holds exactly {BLOCK_SIZE} bytes, not {len(buf)}")
    return buf


def encode_block(data: bytes | bytearray | memoryview, *, compress: bool = True) -> bytes:
    """Encode 1 MiB of RAM the way Hyper-V does: fills, XPRESS pages, raw pages, end marker.

    Runs of pages made of one repeated 8-byte pattern become one single- or multi-fill record;
    other pages are XPRESS records when that is shorter than 4096 bytes (and ``compress``), else
    raw records.  When the records would not be shorter than 1 MiB, the raw 1 MiB is returned,
    because a value of exactly 1 MiB *means* raw (docs/format.md#ramblock-values).  The other
    legitimate forms, which only tests write, are built in ``tests/blockforms.py`` from the same
    spans.
    """
    buf = whole_block(data)
    parts: list[bytes] = []
    for first, stop, pattern in fill_spans(buf):
        if pattern is None:
            parts += page_records(buf, first, stop, compress)
        elif stop - first == 1:
            parts.append(SINGLE_FILL_RECORD.pack(TAG_FILL, pattern))
        else:
            parts.append(MULTI_FILL_RECORD.pack(TAG_MULTI_FILL, pattern, stop - first))
    parts.append(_END_RECORD)
    encoded = b"".join(parts)
    return buf if len(encoded) >= BLOCK_SIZE else encoded
