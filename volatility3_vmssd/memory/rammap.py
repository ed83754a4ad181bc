"""Guest-physical → raw-saved-memory mapping from RamMemoryBlock records (docs/format.md#ram-map).

Each RamMemoryBlock record says: the ``PageCountTotal`` pages starting at GPA page
``GpaIndexStart`` are stored from raw page ``MbpIndexStart`` on, where raw saved memory is the
concatenation of the 1 MiB RamBlocks (raw page r lives in ``RamBlock{r >> 8}``, page ``r & 0xFF``).
Any other GPA is unbacked (an MMIO hole).  The mapping always uses ``MbpIndexStart``, never a
running total: openvmm starts every range on a fresh 1 MiB block [1 + inf], so cumulative page
counts would be wrong for any range that is not a multiple of 1 MiB.

Field semantics were never seen in a real .vmrs (openvmm's writer, and our inference, consistent with the DLL
API); a legacy .bin has no metadata here and is mapped with :meth:`RamMap.identity`, which
reproduces the DLL's bytes at GPA 0xC0FFE on the real sample (seen on the real sample).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from bisect import bisect_left, bisect_right, insort
from collections.abc import Collection, Iterable, Iterator
from operator import add, attrgetter

from ..errors import Findings, FormatError, TruncatedError, UnsupportedError
from .geometry import BLOCK_SIZE, PAGE_SHIFT, PAGE_SIZE, PAGES_PER_BLOCK

__all__ = [
    "RAM_MEMORY_BLOCK_V3",
    "RamMap",
    "RamMemoryBlockRecord",
    "build_layout",
    "flag_names",
    "layout_ram",
]


#: SavedStateVersion, Flags, PageCountTotal, MbpIndexStart, GpaIndexStart, VirtualNode, padding,
#: KsrBlockId — the 48-byte version-3 record [3].
RAM_MEMORY_BLOCK_V3 = struct.Struct("<IIQQQIIQ")
RAM_MEMORY_BLOCK_VERSION = 3
_VERSION = struct.Struct("<I")
_VERSION_3 = _VERSION.pack(RAM_MEMORY_BLOCK_VERSION)

FLAG_HOT_ADDED = 0x1
FLAG_SGX = 0x2
FLAG_VTL2_MB = 0x4
FLAG_SPECIFIC_PURPOSE = 0x8
#: The flag names of docs/format.md#ram-map, lowest bit first.
FLAG_NAMES = (
    (FLAG_HOT_ADDED, "IsHotAdded"),
    (FLAG_SGX, "IsSgx"),
    (FLAG_VTL2_MB, "IsVtl2Mb"),
    (FLAG_SPECIFIC_PURPOSE, "IsSpecificPurpose"),
)


def flag_names(flags: int) -> list[str]:
    """``["IsHotAdded", ...]`` for a RamMemoryBlock's Flags; unknown bits as ``"0x..."``."""
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    rest = flags & ~sum(bit for bit, _ in FLAG_NAMES)
    return [*names, f"{rest:#x}"] if rest else names


_new_instance = object.__new__
_GPA = attrgetter("gpa_index_start")
_MBP = attrgetter("mbp_index_start")
_COUNT = attrgetter("page_count_total")
_KEY = attrgetter("key")

# A GPA page number must fit a 64-bit address; anything above is corrupt.
_MAX_PAGE = 1 << (64 - PAGE_SHIFT)


@dataclasses.dataclass(frozen=True)
class RamMemoryBlockRecord:
    """One ``RamMemoryBlock%d`` value (version 3, 48 bytes).  ``key`` only names it in findings."""

    page_count_total: int
    mbp_index_start: int
    gpa_index_start: int
    flags: int = 0
    virtual_node: int = 0
    ksr_block_id: int = 0
    saved_state_version: int = RAM_MEMORY_BLOCK_VERSION
    padding: int = 0
    key: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def parse(
        cls,
        data: bytes | bytearray | memoryview,
        *,
        path: str | os.PathLike[str] | None = None,
        offset: int | None = None,
        key: str | None = None,
    ) -> RamMemoryBlockRecord:
        """Parse one record; an unknown SavedStateVersion raises :class:`UnsupportedError`.

        Legacy (VM version ≤ 5.0) records have another, undocumented size (one source, openvmm), so the caller can
        catch UnsupportedError and fall back (for example to an identity map).  Trailing bytes
        after the 48 are ignored.
        """
        if len(data) < _VERSION.size:
            raise TruncatedError(path, offset, f"RamMemoryBlock record of {len(data)} bytes has no version")
        version = _VERSION.unpack_from(data)[0]
        if version != RAM_MEMORY_BLOCK_VERSION:
            where = os.fspath(path) if path is not None else "<memory>"
            raise UnsupportedError(
                f"{where}: RamMemoryBlock {key or ''} has SavedStateVersion {version}; only version 3 is known"
            )
        if len(data) < RAM_MEMORY_BLOCK_V3.size:
            raise TruncatedError(path, offset, f"RamMemoryBlock v3 record needs 48 bytes, got {len(data)}")
        record = cls.parse_sound(data, key)
        assert record is not None
        return record

    @classmethod
    def parse_sound(cls, data: bytes | bytearray | memoryview, key: str | None = None) -> RamMemoryBlockRecord | None:
        """The record if ``data`` is one :meth:`parse` accepts, else None (then :meth:`parse` says why).

        No error context is needed to call it: the RAM map of 100,000 records takes this path.
        """
        if len(data) < RAM_MEMORY_BLOCK_V3.size or data[:4] != _VERSION_3:
            return None
        version, flags, count, mbp, gpa, node, pad, ksr = RAM_MEMORY_BLOCK_V3.unpack_from(data)
        # The instance's dict filled in one call: a frozen dataclass's __init__ sets each of the nine
        # fields through object.__setattr__, 2.5x the cost on a map of 100,000 records.
        record = _new_instance(cls)
        record.__dict__.update(
            page_count_total=count,
            mbp_index_start=mbp,
            gpa_index_start=gpa,
            flags=flags,
            virtual_node=node,
            ksr_block_id=ksr,
            saved_state_version=version,
            padding=pad,
            key=key,
        )
        return record

    def build(self) -> bytes:
        return RAM_MEMORY_BLOCK_V3.pack(
            self.saved_state_version,
            self.flags,
            self.page_count_total,
            self.mbp_index_start,
            self.gpa_index_start,
            self.virtual_node,
            self.padding,
            self.ksr_block_id,
        )

    @property
    def is_hot_added(self) -> bool:
        return bool(self.flags & FLAG_HOT_ADDED)

    @property
    def is_sgx(self) -> bool:
        return bool(self.flags & FLAG_SGX)

    @property
    def is_vtl2_mb(self) -> bool:
        return bool(self.flags & FLAG_VTL2_MB)

    @property
    def is_specific_purpose(self) -> bool:
        return bool(self.flags & FLAG_SPECIFIC_PURPOSE)


def _disjoint(starts: list[int], counts: list[int]) -> bool:
    """Whether the spans ``starts[i] + counts[i]`` overlap nowhere (one sort, then neighbours).

    Parallel lists of ints, not a tuple per span: a map of 100,000 records would otherwise make
    the garbage collector walk 100,000 more objects at open."""
    end = -1
    for i in sorted(range(len(starts)), key=starts.__getitem__):
        if starts[i] < end:
            return False
        end = starts[i] + counts[i]
    return True


class _Intervals:
    """Disjoint ``[start, end)`` intervals in sorted chunks of bounded length.

    Testing and adding cost O(log n + chunk), so building a map of 100,000 records costs no
    quadratic list insertion whatever their order (one sorted list took seconds in reverse order).
    """

    _CHUNK = 256

    def __init__(self) -> None:
        self._firsts: list[int] = []  # first start of each chunk
        self._chunks: list[list[tuple[int, int]]] = []

    def overlaps(self, start: int, end: int) -> bool:
        """Whether [start, end) meets any interval held."""
        chunks = self._chunks
        if not chunks:
            return False
        i = bisect_right(self._firsts, start) - 1
        if i < 0:
            return self._firsts[0] < end
        chunk = chunks[i]
        j = bisect_right(chunk, (start, _MAX_PAGE + 1)) - 1  # the last interval starting at or before start
        if chunk[j][1] > start:
            return True
        if j + 1 < len(chunk):
            return chunk[j + 1][0] < end
        return i + 1 < len(chunks) and self._firsts[i + 1] < end

    def add(self, start: int, end: int) -> None:
        """Hold [start, end), which overlaps nothing held."""
        if not self._chunks:
            self._chunks.append([(start, end)])
            self._firsts.append(start)
            return
        i = max(bisect_right(self._firsts, start) - 1, 0)
        chunk = self._chunks[i]
        insort(chunk, (start, end))
        self._firsts[i] = chunk[0][0]
        if len(chunk) > 2 * self._CHUNK:
            half = len(chunk) // 2
            self._chunks[i : i + 1] = [chunk[:half], chunk[half:]]
            self._firsts[i : i + 1] = [chunk[0][0], chunk[half][0]]


class RamMap:
    """GPA ↔ raw saved-memory offsets for a set of RamMemoryBlock records.

    Lookups bisect over ranges sorted by GPA; ranges adjacent both in GPA and in raw memory are
    coalesced into one *segment* so that reads and Volatility's ``mapping()`` see as few pieces
    as possible.  Overlapping records (in GPA or in raw memory) are corrupt: the first one in
    record order wins and the later one is dropped with a finding.
    """

    def __init__(
        self,
        records: Iterable[RamMemoryBlockRecord],
        *,
        findings: Findings | None = None,
        path: str | os.PathLike[str] = "<memory>",
    ) -> None:
        self.findings = findings if findings is not None else Findings()
        self.path = os.fspath(path)
        records = list(records)
        counts = list(map(_COUNT, records))
        gpas = list(map(_GPA, records))
        mbps = list(map(_MBP, records))
        # Checked at C speed first (a map of 100,000 records): every record named, covering pages,
        # inside the 64-bit space; only a map that fails goes through the record-by-record loop.
        if not (
            all(map(_KEY, records))
            and min(counts, default=1) > 0
            and max(map(add, gpas, counts), default=0) <= _MAX_PAGE
            and max(map(add, mbps, counts), default=0) <= _MAX_PAGE
        ):
            records = self._sound(records)
            counts, gpas, mbps = list(map(_COUNT, records)), list(map(_GPA, records)), list(map(_MBP, records))
        # The usual case, checked with two sorts: no range overlaps another, so all are kept.
        if not (_disjoint(gpas, counts) and _disjoint(mbps, counts)):
            records = self._first_wins(records)
        records.sort(key=_GPA)
        self.records: tuple[RamMemoryBlockRecord, ...] = tuple(records)
        #: The ranges the file declares (before :meth:`backed_by` keeps only what its RamBlocks hold).
        self.declared: tuple[RamMemoryBlockRecord, ...] = self.records
        self._starts = list(map(_GPA, records))  # GPA page of each range, in GPA order
        self._counts = list(map(_COUNT, records))

        # Coalesced segments, in bytes, sorted by GPA.
        seg_gpa: list[int] = []
        seg_raw: list[int] = []
        seg_len: list[int] = []
        for gpa, raw, length in zip(self._starts, map(_MBP, records), self._counts, strict=True):
            gpa, raw, length = gpa << PAGE_SHIFT, raw << PAGE_SHIFT, length << PAGE_SHIFT
            if seg_gpa and seg_gpa[-1] + seg_len[-1] == gpa and seg_raw[-1] + seg_len[-1] == raw:
                seg_len[-1] += length
            else:
                seg_gpa.append(gpa)
                seg_raw.append(raw)
                seg_len.append(length)
        self._seg_gpa = seg_gpa
        self._seg_raw = seg_raw
        self._seg_len = seg_len
        self._seg_end = list(map(add, seg_gpa, seg_len))
        by_raw = sorted(records, key=_MBP)
        self._raw_starts = list(map(_MBP, by_raw))  # raw page ranges, sorted by start
        self._raw_ends = list(map(add, self._raw_starts, map(_COUNT, by_raw)))
        raw_pages = max(self._raw_ends, default=0)
        #: Raw saved memory in whole 1 MiB blocks: raw memory *is* the concatenation of RamBlocks,
        #: and writers pad the last block of a range (inferred).  Equal to the pages-only size whenever
        #: ranges end on block boundaries, as on the real .bin (64,512 pages = 252 MiB) (seen on the real sample).
        self.raw_block_count = -(-raw_pages // PAGES_PER_BLOCK)
        self.raw_size = self.raw_block_count * BLOCK_SIZE
        self._block_spans: list[tuple[int, int]] | None = None

    def _sound(self, records: list[RamMemoryBlockRecord]) -> list[RamMemoryBlockRecord]:
        """The records that cover pages inside the 64-bit space, each named; the others with a finding."""
        sound: list[RamMemoryBlockRecord] = []
        for number, record in enumerate(records):
            name = record.key or f"RamMemoryBlock #{number}"
            count, gpa, mbp = record.page_count_total, record.gpa_index_start, record.mbp_index_start
            if count == 0:
                self.findings.add(self.path, None, "ram-map", f"{name} covers no pages; ignored")
            elif gpa + count > _MAX_PAGE or mbp + count > _MAX_PAGE:
                self.findings.add(
                    self.path, None, "ram-map", f"{name} runs past the 64-bit address space; ignored", error=FormatError
                )
            else:
                sound.append(record if record.key else dataclasses.replace(record, key=name))
        return sound

    def _first_wins(self, records: list[RamMemoryBlockRecord]) -> list[RamMemoryBlockRecord]:
        """Overlapping records are corrupt: the first in record order wins, later ones are dropped."""
        gpa_held, raw_held = _Intervals(), _Intervals()
        accepted: list[RamMemoryBlockRecord] = []
        for record in records:
            count, gpa, mbp = record.page_count_total, record.gpa_index_start, record.mbp_index_start
            if gpa_held.overlaps(gpa, gpa + count):
                self.findings.add(
                    self.path,
                    None,
                    "ram-map",
                    f"{record.key} (GPA pages {gpa:#x}+{count:#x}) overlaps an earlier range; the earlier one wins",
                    error=FormatError,
                )
            elif raw_held.overlaps(mbp, mbp + count):
                self.findings.add(
                    self.path,
                    None,
                    "ram-map",
                    f"{record.key} (raw pages {mbp:#x}+{count:#x}) overlaps an earlier range in raw memory; "
                    "the earlier one wins",
                    error=FormatError,
                )
            else:
                gpa_held.add(gpa, gpa + count)
                raw_held.add(mbp, mbp + count)
                accepted.append(record)
        return accepted

    @classmethod
    def identity(
        cls, page_count: int, *, findings: Findings | None = None, path: str | os.PathLike[str] = "<memory>"
    ) -> RamMap:
        """One chunk from GPA 0, raw page = GPA page: the legacy .bin without its .vsv (right for the real sample)."""
        record = RamMemoryBlockRecord(page_count, 0, 0, key="identity")
        return cls([record], findings=findings, path=path)

    def __repr__(self) -> str:
        return f"RamMap({len(self.records)} ranges, {self.page_count} pages, raw {self.raw_size:#x})"

    # -- queries ---------------------------------------------------------------------------------

    @property
    def page_count(self) -> int:
        return sum(r.page_count_total for r in self.records)

    @property
    def minimum_gpa(self) -> int:
        """First backed byte (0 for an empty map)."""
        return self._seg_gpa[0] if self._seg_gpa else 0

    @property
    def maximum_gpa(self) -> int:
        """Last backed byte, inclusive, as Volatility's ``maximum_address`` wants; -1 if empty."""
        return self._seg_end[-1] - 1 if self._seg_end else -1

    def chunks(self) -> list[tuple[int, int]]:
        """``(GpaIndexStart, PageCountTotal)`` per accepted record, in GPA order (GetGuestPhysicalMemoryChunks)."""
        return list(zip(self._starts, self._counts, strict=True))

    def segments(self) -> list[tuple[int, int, int]]:
        """Coalesced ``(gpa, raw_offset, length)`` byte ranges in GPA order."""
        return list(zip(self._seg_gpa, self._seg_raw, self._seg_len, strict=True))

    def raw_page(self, gpa_page: int) -> int | None:
        """Raw page number holding GPA page ``gpa_page``, or None in a hole."""
        raw = self.raw_offset(gpa_page << PAGE_SHIFT)
        return None if raw is None else raw >> PAGE_SHIFT

    def raw_offset(self, gpa: int) -> int | None:
        """Raw saved-memory offset of a GPA (GuestPhysicalAddressToRawSavedMemoryOffset), or None."""
        i = bisect_right(self._seg_gpa, gpa) - 1
        if i < 0 or gpa >= self._seg_end[i]:
            return None
        return self._seg_raw[i] + gpa - self._seg_gpa[i]

    def locate(self, gpa: int) -> tuple[int, int] | None:
        """``(raw_offset, backed bytes from gpa to the end of its segment)``, or None in a hole."""
        i = bisect_right(self._seg_gpa, gpa) - 1
        if i < 0:
            return None
        left = self._seg_end[i] - gpa
        if left <= 0:
            return None
        return self._seg_raw[i] + gpa - self._seg_gpa[i], left

    def is_backed(self, gpa: int) -> bool:
        return self.raw_offset(gpa) is not None

    def runs(self, start_gpa: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Backed pieces ``(gpa, raw_offset, length)`` of [start_gpa, start_gpa + length), holes skipped."""
        end = start_gpa + length
        i = max(bisect_right(self._seg_gpa, start_gpa) - 1, 0)
        seg_gpa, seg_raw, seg_end = self._seg_gpa, self._seg_raw, self._seg_end
        while i < len(seg_gpa) and seg_gpa[i] < end:
            lo = max(start_gpa, seg_gpa[i])
            hi = min(end, seg_end[i])
            if hi > lo:
                yield lo, seg_raw[i] + lo - seg_gpa[i], hi - lo
            i += 1

    def block_ranges(self) -> list[tuple[int, int]]:
        """``(first RamBlock, block count)`` spans that the map needs, merged, in raw order."""
        if self._block_spans is None:  # the map is immutable: computed once (an open asks twice)
            self._block_spans = _block_spans(zip(self._raw_starts, self._raw_ends, strict=True))
        return list(self._block_spans)

    def declared_block_ranges(self) -> list[tuple[int, int]]:
        """Like :meth:`block_ranges` for the ranges the file declares (before :meth:`backed_by`)."""
        if self.declared is self.records:
            return self.block_ranges()
        return _block_spans(sorted((r.mbp_index_start, r.mbp_index_start + r.page_count_total) for r in self.declared))

    def block_extent(self, n: int) -> int:
        """How many leading pages of RamBlock ``n`` the map uses (0..256), in O(log ranges).

        A block's stream may end early after them (the last block of a range); not before."""
        lo, hi = n * PAGES_PER_BLOCK, (n + 1) * PAGES_PER_BLOCK
        i = bisect_left(self._raw_starts, hi) - 1
        if i < 0 or self._raw_ends[i] <= lo:
            return 0
        return min(self._raw_ends[i], hi) - lo

    def backed_by(self, present: Collection[int]) -> tuple[RamMap, list[tuple[str, int, int]]]:
        """This map cut down to the RamBlocks present, and what was cut: ``(record name, GPA, bytes)``.

        A range's backed extent is what its RamBlocks can provide: pages whose RamBlock the file
        lacks become holes, so mapping, chunk lists, exporters and scans cost what the file holds,
        not what it claims (a record may declare 2^40 pages over one RamBlock).  O(records + present
        blocks); the caller reports the cut ranges.
        """
        blocks = sorted(present)
        if all(bisect_right(blocks, a + n - 1) - bisect_left(blocks, a) == n for a, n in self.block_ranges()):
            return self, []  # every RamBlock the map needs is present (the usual case): O(spans)
        pieces: list[RamMemoryBlockRecord] = []
        absent: list[tuple[str, int, int]] = []
        for record in self.records:
            start, end = record.mbp_index_start, record.mbp_index_start + record.page_count_total
            first, last = start // PAGES_PER_BLOCK, (end - 1) // PAGES_PER_BLOCK
            if bisect_right(blocks, last) - bisect_left(blocks, first) == last - first + 1:
                pieces.append(record)  # every RamBlock it needs is present (the usual case)
                continue
            name = record.key or "RamMemoryBlock"
            i = bisect_left(blocks, start // PAGES_PER_BLOCK)
            cur = start  # raw page up to which the record is accounted for
            while i < len(blocks) and blocks[i] * PAGES_PER_BLOCK < end:
                first = blocks[i]
                while i + 1 < len(blocks) and blocks[i + 1] == blocks[i] + 1 and blocks[i + 1] * PAGES_PER_BLOCK < end:
                    i += 1
                lo, hi = max(start, first * PAGES_PER_BLOCK), min(end, (blocks[i] + 1) * PAGES_PER_BLOCK)
                if lo > cur:
                    absent.append(
                        (name, (record.gpa_index_start + cur - start) << PAGE_SHIFT, (lo - cur) << PAGE_SHIFT)
                    )
                pieces.append(
                    dataclasses.replace(
                        record,
                        page_count_total=hi - lo,
                        mbp_index_start=lo,
                        gpa_index_start=record.gpa_index_start + lo - start,
                    )
                )
                cur = hi
                i += 1
            if cur < end:
                absent.append((name, (record.gpa_index_start + cur - start) << PAGE_SHIFT, (end - cur) << PAGE_SHIFT))
        if not absent:
            return self, []
        backed = RamMap(pieces, findings=Findings(), path=self.path)
        backed.declared = self.declared
        backed.findings = self.findings
        return backed, absent


def _block_spans(raw_ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(first RamBlock, block count)`` spans of sorted raw page ranges, merged."""
    spans: list[tuple[int, int]] = []
    for start, end in raw_ranges:
        first, stop = start // PAGES_PER_BLOCK, -(-end // PAGES_PER_BLOCK)
        if spans and spans[-1][0] + spans[-1][1] >= first:
            prev_first, prev_count = spans[-1]
            spans[-1] = (prev_first, max(prev_count, stop - prev_first))
        else:
            spans.append((first, stop - first))
    return spans


def layout_ram(ram_size: int, holes: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """Place ``ram_size`` bytes of RAM from GPA 0, skipping ``(start, size)`` MMIO holes.

    RAM that a hole displaces continues above it (the usual PC layout: RAM below the 32-bit MMIO
    gap, the rest from 4 GiB).  Returns backed ``(gpa, length)`` ranges; all page aligned.
    """
    if ram_size < 0 or ram_size % PAGE_SIZE:
        raise ValueError("ram_size must be a non-negative multiple of 4096")
    ranges: list[tuple[int, int]] = []
    gpa, left = 0, ram_size
    for start, size in sorted(holes):
        if start % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(f"hole ({start:#x}, {size:#x}) is not page aligned")
        if left == 0:
            break
        if start > gpa:
            take = min(left, start - gpa)
            ranges.append((gpa, take))
            left -= take
        gpa = max(gpa, start + size)
    if left:
        ranges.append((gpa, left))
    return ranges


def build_layout(ranges: Iterable[tuple[int, int]]) -> list[RamMemoryBlockRecord]:
    """RamMemoryBlock records for backed ``(gpa, length)`` ranges, laid out as openvmm's writer does.

    Every range starts on a fresh 1 MiB RamBlock (``MbpIndexStart`` a multiple of 256) and the
    last block of a range is zero-padded [1: openvmm], so ``MbpIndexStart`` is *not* a running
    page total — exactly the case a reader must not get wrong.
    """
    records: list[RamMemoryBlockRecord] = []
    next_block = 0
    for n, (gpa, length) in enumerate(sorted(ranges)):
        if gpa % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise ValueError(f"range ({gpa:#x}, {length:#x}) is not page aligned")
        pages = length // PAGE_SIZE
        records.append(
            RamMemoryBlockRecord(pages, next_block * PAGES_PER_BLOCK, gpa // PAGE_SIZE, key=f"RamMemoryBlock{n}")
        )
        next_block += -(-pages // PAGES_PER_BLOCK)
    return records
