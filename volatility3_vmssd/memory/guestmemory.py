"""Lazy, bounded reads of guest RAM: a :class:`~.rammap.RamMap` over a source of RamBlock values.

This is what the provider and the Volatility layer read through.  Opening costs nothing beyond
listing the block numbers: no value is read, indexed or decoded until a read touches it.  A read
decodes each 1 MiB block it touches in one pass (docs/format.md#ramblock-values: pages decode independently, but
Volatility's scanners read 16 MiB at a time and page walks hit the same blocks again and again) and
keeps decoded blocks in an LRU bounded by a block count, as the DLL's ``SetMemoryBlockCacheLimit``
does.  With the limit at 0 nothing is kept and only the pages a read needs are decoded.

Missing data has two causes, both reported when seen and both treated like holes by padded reads:
a RamBlock the map needs but the file lacks (docs/format.md#quirks, "sparse numbering"), and pages a damaged
record stream does not produce (:class:`~.ramblock.MissingPageError`).
"""

from __future__ import annotations

import os
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from ..codecs.xpress import decode_threads as usable_decode_threads
from ..codecs.xpress import decompress_many
from ..errors import Findings, FormatError, NotFoundError, UnmappedAddressError
from .geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from .pagedecode import decode_pages, uniform_pattern
from .ramblock import (
    ZERO_BLOCK,
    BlockIndex,
    BlockPlan,
    BlockStats,
    MissingPageError,
    index_block,
    plan_block,
    uniform_block,
)
from .rammap import RamMap

__all__ = ["DEFAULT_CACHE_LIMIT", "BlockSource", "GuestMemory", "InMemoryBlockSource"]

DEFAULT_CACHE_LIMIT = 256  # blocks, i.e. at most 256 MiB of decoded RAM
#: Blocks that reads larger than a block (scanner chunks) keep, at most: enough for two 16 MiB
#: chunks that overlap, not so many that a scan of the whole guest flushes the working set.
SCAN_RING = 32
_BLOCK_MASK = BLOCK_SIZE - 1
#: A RamBlock takes at least this many bytes of its file (one multi-fill record, no end marker):
#: a range declaring more pages than the file could encode this way is capped (with a finding).
MIN_STORED_BLOCK = 16
_ZERO_VIEW = memoryview(ZERO_BLOCK)
_ALL_PAGES = frozenset(range(PAGES_PER_BLOCK))
_NO_BLOCKS: Mapping[int, _Block] = MappingProxyType({})


@runtime_checkable
class BlockSource(Protocol):
    """Where RamBlock values come from: a legacy .bin, a .vmrs key tree, or memory (tests)."""

    path: str

    def block_numbers(self) -> Collection[int]:
        """Numbers of the RamBlocks present (``RamBlock<n>``), in any order."""
        ...

    def block_location(self, n: int) -> tuple[int, int] | None:
        """``(absolute file offset, size)`` of a value, for findings; None if stored inline."""
        ...

    def read_block_value(self, n: int) -> bytes | memoryview:
        """The stored value of RamBlock ``n``; raises :class:`NotFoundError` if absent."""
        ...


@runtime_checkable
class SpanSource(Protocol):
    """A :class:`BlockSource` that can also read file bytes by offset (what ``block_location`` names).

    Then a large read of raw 1 MiB RamBlocks stored back to back is one read of the file, handed
    out without a copy when it is the whole result.  Short at the end of the file.
    """

    def read_span(self, offset: int, size: int) -> bytes: ...


class InMemoryBlockSource:
    """A :class:`BlockSource` over a dict of values (tests, and values already in memory)."""

    def __init__(
        self,
        blocks: Mapping[int, bytes] | Iterable[tuple[int, bytes]],
        *,
        path: str = "<memory>",
        locations: Mapping[int, int] | None = None,
    ) -> None:
        self.path = path
        self._blocks = dict(blocks)
        self._locations = dict(locations or {})

    def block_numbers(self) -> Collection[int]:
        return self._blocks.keys()

    def block_location(self, n: int) -> tuple[int, int] | None:
        offset = self._locations.get(n)
        return None if offset is None else (offset, len(self._blocks[n]))

    def read_block_value(self, n: int) -> bytes:
        try:
            value = self._blocks[n]
        except KeyError:
            raise NotFoundError(f"{self.path}: RamBlock {n} is not present") from None
        return value


class _Block:
    """One decoded block (missing and undecodable pages read as zeros) and which pages those are.

    Two forms: ``data``, one contiguous 1 MiB (raw values, blocks of one fill pattern — shared —
    and the rare variable-run blocks), or ``pages``, 256 page objects in which fill pages are the
    shared cached pattern page.  The page form avoids materialising (and page-faulting) a fresh
    1 MiB per block, which measured as costly as the XPRESS decoding itself.
    """

    __slots__ = ("absent", "bad", "data", "pages")

    def __init__(
        self,
        data: bytes | None,
        pages: list[bytes] | None,
        bad: frozenset[int] | None,
        absent: bool = False,
    ) -> None:
        self.data = data
        self.pages = pages
        self.bad = bad  # None when every page is good: the hot path tests only this
        self.absent = absent


def _zeros(n: int) -> memoryview:
    return _ZERO_VIEW[:n]


def _zero_parts(n: int) -> list[memoryview]:
    """Zeros for a padded hole as views of one shared block: the final join is the only copy."""
    whole, rest = divmod(n, BLOCK_SIZE)
    return [_ZERO_VIEW] * whole + ([_ZERO_VIEW[:rest]] if rest else [])


#: All-zero results of large reads, shared by size (bytes are immutable): a scan of a mostly free
#: 16 GiB guest then costs no copying at all for its empty 16 MiB chunks.  At most this many sizes,
#: each at most _ZERO_RESULT_MAX bytes, are kept.
_ZERO_RESULTS: dict[int, bytes] = {}
_ZERO_RESULT_SIZES = 2
_ZERO_RESULT_MAX = 64 << 20
#: Reads assembled from more parts than this are not checked for being all zero (page-form blocks
#: are never all zero: whole zero blocks are one part).
_ZERO_CHECK_PARTS = 256


def _is_zero_part(part: bytes | memoryview) -> bool:
    return part is ZERO_BLOCK or (type(part) is memoryview and part.obj is ZERO_BLOCK)


def _assemble(parts: list[bytes | memoryview]) -> bytes:
    """``b"".join(parts)``, except that a large result made only of the shared zero block is shared too."""
    if 1 < len(parts) <= _ZERO_CHECK_PARTS and all(map(_is_zero_part, parts)):
        size = sum(map(len, parts))
        zeros = _ZERO_RESULTS.get(size)
        if zeros is None:
            zeros = bytes(size)
            if size <= _ZERO_RESULT_MAX:
                if len(_ZERO_RESULTS) >= _ZERO_RESULT_SIZES:
                    _ZERO_RESULTS.clear()
                _ZERO_RESULTS[size] = zeros
        return zeros
    return b"".join(parts)


def _ranges_text(numbers: list[int], limit: int = 8) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"`` (sorted input), cut after ``limit`` spans."""
    spans: list[tuple[int, int]] = []
    for n in numbers:
        if spans and spans[-1][1] + 1 == n:
            spans[-1] = (spans[-1][0], n)
        else:
            spans.append((n, n))
    return _spans_text(spans, limit)


def _spans_text(spans: list[tuple[int, int]], limit: int = 8) -> str:
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (f", … ({len(spans) - limit} more spans)" if len(spans) > limit else "")


class GuestMemory:
    """Guest-physical and raw saved-memory reads with a thread-safe LRU of decoded blocks.

    Counters ``blocks_indexed``, ``blocks_decoded`` and ``pages_decoded`` let tests and benchmarks
    prove what a read (or an open) cost.  ``findings`` collects what was worked around.
    """

    def __init__(
        self,
        ram_map: RamMap,
        source: BlockSource,
        *,
        findings: Findings | None = None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        on_fallback: Callable[..., object] | None = None,
        decode_threads: int | None = None,
    ) -> None:
        #: Threads a batch of XPRESS pages may be decoded on (default: the usable CPUs, at most 4).
        self.decode_threads = decode_threads if decode_threads is not None else usable_decode_threads()
        self.source = source
        self.path = source.path
        self.findings = findings if findings is not None else Findings()
        self.on_fallback = on_fallback
        self._present = frozenset(source.block_numbers())
        #: The map cut down to the RamBlocks present (``ram_map.declared`` keeps what the file says).
        present = sorted(self._present)  # sorted once for both open-time checks
        self.ram_map, absent = ram_map.backed_by(present)
        self._span_source = isinstance(source, SpanSource)
        self._cache: OrderedDict[int, _Block] = OrderedDict()  # blocks small reads use: plain LRU
        self._scan: OrderedDict[int, _Block] = OrderedDict()  # blocks only large reads used: a ring
        self._lock = threading.Lock()
        self._limit = 0
        self.set_cache_limit(cache_limit)
        self._seen: set[int] = set()  # blocks whose index findings were already recorded
        self._seen_bad: set[int] = set()  # blocks whose undecodable pages were already reported
        self.blocks_indexed = 0
        self.blocks_decoded = 0
        self.pages_decoded = 0
        #: Blocks that took the careful path (index, then page by page): damaged ones only.
        self.blocks_careful = 0
        self._report_absent(absent)
        self._check_blocks(present)

    def __repr__(self) -> str:
        cached = len(self._cache) + len(self._scan)
        return f"GuestMemory({self.path!r}, {self.ram_map!r}, cache {cached}/{self._limit})"

    # -- open-time checks (index only) -------------------------------------------------------------

    def _report_absent(self, absent: list[tuple[str, int, int]]) -> None:
        """Say which declared ranges no RamBlock backs (they read as holes), and which counts are absurd."""
        if not absent:
            return
        total = sum(size for _, _, size in absent)
        text = ", ".join(f"{gpa:#x}-{gpa + size - 1:#x}" for _, gpa, size in absent[:8])
        if len(absent) > 8:
            text += f", … ({len(absent) - 8} more ranges)"
        message = f"{total:#x} bytes of declared RAM have no RamBlock in the file: GPA {text}; treated as holes"
        try:
            file_size: int | None = os.stat(self.path).st_size
        except (OSError, ValueError):
            file_size = None  # not a file (memory, tests): no bound to compare with
        if file_size is not None:
            most = (file_size // MIN_STORED_BLOCK + 1) * PAGES_PER_BLOCK
            capped = [r for r in self.ram_map.declared if r.page_count_total > most]
            if capped:
                names = ", ".join(f"{r.key or 'a RamMemoryBlock'} ({r.page_count_total:#x} pages)" for r in capped[:4])
                message += (
                    f"; {names} declare more pages than a file of {file_size} bytes could encode (at least"
                    f" {MIN_STORED_BLOCK} bytes per 1 MiB RamBlock), capped to what their RamBlocks hold"
                )
        self.findings.add(self.path, None, "missing-block", message, error=FormatError)

    def _check_blocks(self, present: list[int]) -> None:
        """Report RamBlocks (``present``, sorted) that no range of the map uses, in O(present + ranges)."""
        spans = self.ram_map.declared_block_ranges()
        if sum(bisect_right(present, a + c - 1) - bisect_left(present, a) for a, c in spans) == len(present):
            return  # every present block lies in a span (the usual case): O(spans log blocks)
        extra = []
        i = 0
        for n in present:
            while i < len(spans) and spans[i][0] + spans[i][1] <= n:
                i += 1
            if i == len(spans) or n < spans[i][0]:
                extra.append(n)
        if extra:
            self.findings.add(
                self.path,
                None,
                "unreferenced-block",
                f"{len(extra)} RamBlock(s) are not covered by the RAM map and cannot be read by GPA: "
                f"{_ranges_text(extra)}",
            )

    # -- cache -------------------------------------------------------------------------------------

    @property
    def cache_limit(self) -> int:
        return self._limit

    def set_cache_limit(self, blocks: int) -> None:
        """Keep at most ``blocks`` decoded blocks (1 MiB each); 0 keeps none between reads.

        The limit covers everything kept.  Within it, blocks that only reads larger than a block
        touched (scans) are kept in a ring of at most :data:`SCAN_RING` and evicted first, so that a
        yarascan over 16 GiB neither flushes the page tables a plugin walks nor fills the whole
        limit with memory it will not read again.  A small read of a ring block moves it to the LRU.
        """
        if blocks < 0:
            raise ValueError("cache limit must be >= 0")
        with self._lock:
            self._limit = blocks
            self._trim()

    def _trim(self) -> None:
        """Enforce the limits (lock held): the ring first, and the oldest first."""
        ring = min(SCAN_RING, self._limit)
        while len(self._scan) > ring:
            self._scan.popitem(last=False)
        while len(self._cache) + len(self._scan) > self._limit:
            (self._scan if self._scan else self._cache).popitem(last=False)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._scan.clear()

    @property
    def cached_blocks(self) -> list[int]:
        """Block numbers in the cache, in eviction order: the scan ring, then the LRU, oldest first."""
        with self._lock:
            return list(self._scan) + list(self._cache)

    # -- block loading -----------------------------------------------------------------------------

    def _value(self, n: int) -> bytes | memoryview | None:
        if n not in self._present:
            return None
        try:
            return self.source.read_block_value(n)
        except NotFoundError:
            return None

    def _index(self, n: int, value: bytes | memoryview) -> BlockIndex:
        location = self.source.block_location(n)
        with self._lock:
            first = n not in self._seen
            self._seen.add(n)
            self.blocks_indexed += 1
        # Re-indexing after an eviction must not repeat the findings of the first time.
        findings = self.findings if first else Findings(strict=self.findings.strict)
        return index_block(
            value,
            path=self.path,
            file_offset=location[0] if location else None,
            findings=findings,
            needed=self.ram_map.block_extent(n),
        )

    def _report_bad_pages(self, n: int, errors: list[tuple[int, FormatError]]) -> None:
        pages = sorted({page for page, _ in errors})
        first = errors[0][1]
        self.findings.add(
            self.path,
            first.offset,
            "bad-page",
            f"RamBlock {n}: page(s) {_ranges_text(pages)} do not decode and read as missing ({first.expected})",
            error=FormatError,
        )

    def _load(self, n: int) -> _Block:
        return self._load_many([n])[n]

    def _load_many(self, ns: Iterable[int]) -> dict[int, _Block]:
        """Load blocks; the XPRESS parts of all the sound ones are decoded in one batch.

        One batch per read lets :func:`~..codecs.xpress.decompress_many` spread the pages of a
        16 MiB scanner read over both cores (the native decoders release the GIL).  Every record
        form takes :func:`~.ramblock.plan_block`; only blocks it finds damaged, or that end before a
        page the map uses, or whose XPRESS data does not decode, go through the careful path, which
        reports what is wrong with them.
        """
        entries: dict[int, _Block] = {}
        planned: list[tuple[int, bytes, BlockPlan]] = []
        walked = loaded = 0
        for n in ns:
            value = self._value(n)
            if value is None:
                entries[n] = _Block(ZERO_BLOCK, None, _ALL_PAGES, absent=True)
                continue
            loaded += 1
            if len(value) == BLOCK_SIZE:  # raw block: nothing to index or decode
                entries[n] = _Block(value if isinstance(value, bytes) else bytes(value), None, None)
                continue
            plan = plan_block(value) if isinstance(value, bytes) else None
            if plan is None or plan.covered >> 12 < self.ram_map.block_extent(n):
                entries[n] = self._load_careful(n, value)
                continue
            walked += 1
            if plan.uniform is not None:
                entries[n] = _Block(uniform_block(plan.uniform), None, None)
            else:
                planned.append((n, value, plan))
        with self._lock:
            self.blocks_indexed += walked
            self.blocks_decoded += loaded
        if not planned:
            return entries
        streams = [stream for _, _, plan in planned for stream in plan.streams]
        sizes = [size for _, _, plan in planned for size in plan.sizes]
        fallbacks: dict[int, list[str]] = {}
        decoded = (
            decompress_many(
                streams,
                sizes,
                threads=self.decode_threads,
                on_fallback=lambda i, note: fallbacks.setdefault(i, []).append(note),
            )
            if streams
            else []
        )
        at = 0
        for n, value, plan in planned:
            count = len(plan.streams)
            mine = decoded[at : at + count]
            notes = [note for i in range(at, at + count) for note in fallbacks.get(i, ())] if fallbacks else []
            at += count
            if not all(isinstance(d, bytes) for d in mine):  # damaged XPRESS data: the careful path says where
                entries[n] = self._load_careful(n, value)
                continue
            if notes:
                self._after_decode(n, [], notes)
            done = plan.finish(mine)  # type: ignore[arg-type]  # no errors left in mine
            bad = frozenset(plan.missing_pages) if plan.covered < BLOCK_SIZE else None
            entries[n] = _Block(None, done, bad) if plan.paged else _Block(done[0], None, bad)
        return entries

    def _load_careful(self, n: int, value: bytes | memoryview) -> _Block:
        """Index, then decode page by page: findings for damaged streams, missing and bad pages."""
        with self._lock:
            self.blocks_careful += 1
        index = self._index(n, value)
        pattern = uniform_pattern(index)
        if pattern is not None:
            return _Block(uniform_block(pattern), None, None)
        pages, bad = self._decode(n, value, index, 0, PAGES_PER_BLOCK)
        return _Block(None, pages, bad)

    def _decode(
        self, n: int, value: bytes | memoryview, index: BlockIndex, first: int, stop: int
    ) -> tuple[list[bytes], frozenset[int] | None]:
        """Pages ``first``..``stop - 1`` of block ``n`` by the careful path, and the pages that are
        missing or do not decode (None when none): what whole-block and partial loads share."""
        errors: list[tuple[int, FormatError]] = []
        notes: list[str] = []
        pages = decode_pages(value, index, first, stop, on_fallback=notes.append, errors=errors)
        self._after_decode(n, errors, notes)
        bad = set(index.missing_pages)
        bad.update(page for page, _ in errors)
        return pages, frozenset(bad) if bad else None

    def _after_decode(self, n: int, errors: list[tuple[int, FormatError]], notes: list[str]) -> None:
        """Report undecodable pages and decoder fallbacks once per block; pass fallbacks on."""
        if notes and self.on_fallback is not None:
            for note in notes:
                self.on_fallback(note)
        if not errors and not notes:
            return
        with self._lock:
            first = n not in self._seen_bad
            self._seen_bad.add(n)
        if not first:
            return
        if notes:
            location = self.source.block_location(n)
            self.findings.add(
                self.path,
                location[0] if location else None,
                "xpress-fallback",
                f"RamBlock {n}: {len(notes)} XPRESS stream(s) needed the pure-Python decoder ({notes[0]})",
            )
        if errors:
            self._report_bad_pages(n, errors)

    def _block(self, n: int, scan: bool = False) -> _Block:
        """Block ``n`` from the cache or loaded; ``scan`` when a read larger than a block wants it."""
        with self._lock:
            entry = self._cache.get(n)
            if entry is not None:
                self._cache.move_to_end(n)
                return entry
            entry = self._scan.get(n)
            if entry is not None:
                if scan:
                    self._scan.move_to_end(n)
                else:  # a small read wants it after all: into the LRU
                    del self._scan[n]
                    self._cache[n] = entry
                return entry
        entry = self._load(n)
        self._keep({n: entry}, scan)
        return entry

    def _keep(self, entries: Mapping[int, _Block], scan: bool) -> None:
        with self._lock:
            if self._limit:
                kept = self._scan if scan else self._cache
                for n, entry in entries.items():
                    kept[n] = entry
                    kept.move_to_end(n)
                self._trim()

    def _prefetch(self, spans: Iterable[tuple[int, int]]) -> Mapping[int, _Block]:
        """Load, in one batch, the uncached blocks that a read of raw ``(offset, length)`` spans decodes whole.

        With the cache off, blocks the read only touches in part are left to :meth:`_partial`.
        """
        wanted: dict[int, None] = {}  # ordered, without repeats
        with self._lock:
            cached, ring, whole_only = self._cache, self._scan, not self._limit
            for raw, length in spans:
                if length <= 0:
                    continue
                end = raw + length
                lo = (raw >> 20) + (1 if whole_only and raw & _BLOCK_MASK else 0)
                hi = ((end - 1) >> 20) + (0 if whole_only and end & _BLOCK_MASK else 1)
                for n in range(lo, hi):
                    if n not in cached and n not in ring:
                        wanted[n] = None
        # Raw 1 MiB values need no decoding, so nothing is gained by batching them (and _collect
        # reads runs of them in one file read).
        locate = self.source.block_location
        for n in list(wanted):
            location = locate(n) if n in self._present else None
            if location is not None and location[1] == BLOCK_SIZE:
                del wanted[n]
        if len(wanted) < 2:
            return _NO_BLOCKS
        entries = self._load_many(wanted)
        self._keep(entries, True)
        return entries

    def _partial(self, n: int, offset: int, size: int) -> tuple[bytes | memoryview, int]:
        """Pages of one block for a read when nothing is cached: decode only what is asked."""
        value = self._value(n)
        if value is None:
            return _zeros(size), 0
        if len(value) == BLOCK_SIZE:
            return memoryview(value)[offset : offset + size], size
        index = self._index(n, value)
        first, last = offset >> 12, (offset + size - 1) >> 12
        pages, bad = self._decode(n, value, index, first, last + 1)
        with self._lock:
            self.pages_decoded += last + 1 - first
        valid = size
        if bad is not None:
            for page in range(first, last + 1):
                if page in bad:
                    valid = max((page << 12) - offset, 0)
                    break
        skip = offset - (first << 12)
        data = pages[0] if first == last else b"".join(pages)
        return memoryview(data)[skip : skip + size], valid

    def _append(
        self,
        n: int,
        offset: int,
        size: int,
        parts: list[bytes | memoryview],
        pad: bool,
        loaded: Mapping[int, _Block],
        scan: bool,
    ) -> int:
        """Append bytes [offset, offset + size) of block ``n`` to ``parts``; returns how many.

        Padded reads take everything (missing pages read as zeros); others stop before the first
        missing page.
        """
        entry = loaded.get(n)
        if entry is None and not self._limit and size < BLOCK_SIZE:
            data, valid = self._partial(n, offset, size)
            if pad or valid == size:
                parts.append(data)
                return size
            if valid:
                parts.append(data[:valid])
            return valid
        if entry is None:
            entry = self._block(n, scan)
        valid = size
        if entry.bad is not None and not pad:
            bad = entry.bad
            for page in range(offset >> 12, ((offset + size - 1) >> 12) + 1):
                if page in bad:
                    valid = max((page << 12) - offset, 0)
                    break
            if not valid:
                return 0
        end = offset + valid
        if entry.pages is None:
            data = entry.data
            assert data is not None
            parts.append(data if valid == BLOCK_SIZE else memoryview(data)[offset:end])
            return valid
        pages = entry.pages
        first, last = offset >> 12, (end - 1) >> 12
        head = offset & 0xFFF
        if first == last:
            parts.append(memoryview(pages[first])[head : head + valid])
            return valid
        parts.append(memoryview(pages[first])[head:] if head else pages[first])
        parts.extend(pages[first + 1 : last])
        tail = end - (last << 12)
        parts.append(pages[last] if tail == PAGE_SIZE else memoryview(pages[last])[:tail])
        return valid

    def _missing(self, raw: int, gpa: int | None) -> MissingPageError:
        n = raw >> 20
        where = f"GPA {gpa:#x} (raw offset {raw:#x})" if gpa is not None else f"raw offset {raw:#x}"
        if n not in self._present:
            why = f"RamBlock {n} is absent from the file"
        else:
            location = self.source.block_location(n)
            at = f" (value at file offset {location[0]:#x})" if location else ""
            why = f"page {(raw >> 12) & 0xFF} of RamBlock {n}{at} is missing or does not decode"
        return MissingPageError(f"{self.path}: {where}: {why}", (raw >> 12) & 0xFF, gpa)

    def _collect(
        self,
        raw: int,
        length: int,
        parts: list[bytes | memoryview],
        pad: bool,
        loaded: Mapping[int, _Block],
        scan: bool,
    ) -> tuple[int, int | None]:
        """Append raw bytes [raw, raw + length); returns (bytes appended, raw offset of missing data).

        ``loaded`` holds the blocks :meth:`_prefetch` loaded for this read; ``scan`` says that the
        read is larger than a block (its blocks go to the scan ring).
        """
        if scan and length >= BLOCK_SIZE:
            span = self._raw_span(raw, length)
            if span is not None:
                parts.append(span)
                return length, None
        got = 0
        while got < length:
            offset = raw & _BLOCK_MASK
            take = min(length - got, BLOCK_SIZE - offset)
            valid = self._append(raw >> 20, offset, take, parts, pad, loaded, scan)
            if valid < take:
                return got + valid, raw + valid
            got += take
            raw += take
        return got, None

    def _raw_span(self, raw: int, length: int) -> bytes | None:
        """Raw bytes [raw, raw + length) in one file read, when every block they touch is a raw 1 MiB
        value stored right after the one before (openvmm writes nothing else); else None.

        No decoding and no copy beyond the read itself: the result is handed out as it is when it
        is the whole read.  Not cached: the next read of it is one more file read, and the cache is
        kept for blocks that cost decoding.
        """
        if not self._span_source:
            return None
        first, last = raw >> 20, (raw + length - 1) >> 20
        locate, present = self.source.block_location, self._present
        start = -1
        for n in range(first, last + 1):
            location = locate(n) if n in present else None
            if location is None or location[1] != BLOCK_SIZE:
                return None
            if n == first:
                start = location[0]
            elif location[0] != start + ((n - first) << 20):
                return None
        data = self.source.read_span(start + (raw & _BLOCK_MASK), length)  # type: ignore[attr-defined]
        return data if len(data) == length else None  # cut short by the end of the file: the careful path

    # -- public reads ------------------------------------------------------------------------------

    @property
    def raw_size(self) -> int:
        return self.ram_map.raw_size

    @property
    def maximum_gpa(self) -> int:
        return self.ram_map.maximum_gpa

    def is_backed(self, gpa: int) -> bool:
        """Whether the map backs ``gpa`` and its RamBlock is present (no value is read)."""
        raw = self.ram_map.raw_offset(gpa)
        return raw is not None and (raw >> 20) in self._present

    def read_raw(self, offset: int, size: int) -> bytes:
        """Raw saved memory (ReadGuestRawSavedMemory): short at ``raw_size``, raises on missing data."""
        if offset < 0 or size < 0:
            raise ValueError("offset and size must be non-negative")
        end = min(offset + size, self.ram_map.raw_size)
        if end <= offset:
            return b""
        parts: list[bytes | memoryview] = []
        scan = end - offset > BLOCK_SIZE
        loaded = self._prefetch([(offset, end - offset)]) if scan else _NO_BLOCKS
        _, missing = self._collect(offset, end - offset, parts, False, loaded, scan)
        if missing is not None:
            raise self._missing(missing, None)
        return _assemble(parts)

    def read_gpa(self, gpa: int, size: int) -> bytes:
        """Guest-physical read; stops short at a hole or missing data, raises if ``gpa`` itself is one.

        A read starting in a hole raises :class:`UnmappedAddressError`; one starting on missing data
        raises :class:`MissingPageError`.
        """
        small = self._small_read(gpa, size, False)
        return small if small is not None else self._read(gpa, size, False)

    def read_gpa_padded(self, gpa: int, size: int) -> bytes:
        """Exactly ``size`` bytes; holes and missing data read as zeros (Volatility's ``pad=True``)."""
        small = self._small_read(gpa, size, True)
        return small if small is not None else self._read(gpa, size, True)

    def _small_read(self, gpa: int, size: int, pad: bool) -> bytes | None:
        """The page-walk fast path: a read inside one cached page (or one contiguous block) is a
        single slice; None sends everything else, and reads of damaged blocks unless padded, to
        :meth:`_read`."""
        if not self._limit or size <= 0:
            return None
        located = self.ram_map.locate(gpa)
        if located is None or size > located[1]:
            return None
        raw = located[0]
        offset = raw & _BLOCK_MASK
        if offset + size > BLOCK_SIZE:
            return None
        entry = self._block(raw >> 20)
        if entry.bad is not None and not pad:
            return None
        pages = entry.pages
        if pages is None:
            return entry.data[offset : offset + size]  # type: ignore[index]
        head = offset & 0xFFF
        return pages[offset >> 12][head : head + size] if head + size <= PAGE_SIZE else None

    def _read(self, gpa: int, size: int, pad: bool) -> bytes:
        if size < 0:
            raise ValueError("size must be non-negative")
        if size == 0:
            return b""
        parts: list[bytes | memoryview] = []
        pos, end = gpa, gpa + size
        missing: int | None = None
        runs = list(self.ram_map.runs(gpa, size))
        scan = size > BLOCK_SIZE
        # One batch for all the blocks of a large read, whatever RAM ranges it crosses.
        loaded = self._prefetch((raw, length) for _, raw, length in runs) if scan else _NO_BLOCKS
        for run_gpa, raw, length in runs:
            if run_gpa > pos:
                if not pad:
                    break
                parts.extend(_zero_parts(run_gpa - pos))
                pos = run_gpa
            got, missing = self._collect(raw, length, parts, pad, loaded, scan)
            pos += got
            if missing is not None:
                break
        if pad:
            if pos < end:
                parts.extend(_zero_parts(end - pos))
        elif pos == gpa:
            if missing is not None:
                raise self._missing(missing, gpa)
            raise UnmappedAddressError(f"{self.path}: GPA {gpa:#x} is not backed by saved RAM", gpa)
        return _assemble(parts)

    # -- statistics --------------------------------------------------------------------------------

    def record_stats(self) -> BlockStats:
        """Index every present block (reads each value, decodes nothing) and sum the record counts."""
        total = BlockStats()
        for n in sorted(self._present):
            value = self._value(n)
            if value is None:
                continue
            if len(value) == BLOCK_SIZE:
                total = total + BlockStats(blocks=1, raw_blocks=1)
            else:
                total = total + self._index(n, value).stats
        return total
