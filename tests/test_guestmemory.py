"""GuestMemory: lazy, bounded, thread-safe reads over a RamMap and a source of RamBlock values."""

from __future__ import annotations

import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest

from volatility3_vmssd.codecs import xpress
from volatility3_vmssd.errors import Findings, FormatError, UnmappedAddressError
from volatility3_vmssd.memory import ramblock as rb
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE
from volatility3_vmssd.memory.guestmemory import BlockSource, GuestMemory, InMemoryBlockSource
from volatility3_vmssd.memory.ramblock import MissingPageError, encode_block
from volatility3_vmssd.memory.rammap import RamMap, build_layout

MiB = 1 << 20

# Ranges chosen to hit the interesting cases: a range that is not a multiple of 1 MiB (its last block is
# zero-padded and the next range starts on a fresh block), two ranges adjacent in GPA but not in raw
# memory (reads must cross them correctly), and a hole.
RANGES = [(0, MiB + 512 * 1024), (MiB + 512 * 1024, MiB), (4 * MiB, 2 * MiB)]
HOLE = (MiB + 512 * 1024 + MiB, 4 * MiB)  # [2.5 MiB, 4 MiB)


def page_content(gpa_page: int) -> bytes:
    """Deterministic guest content: mostly fills, some compressible and some incompressible pages."""
    if gpa_page % 7 == 3:
        rng = random.Random(gpa_page)
        text = b"".join(b"gpa %08x word %d; " % (gpa_page, rng.randrange(100)) for _ in range(300))
        return text[:PAGE_SIZE]
    if gpa_page % 13 == 5:
        return random.Random(gpa_page).randbytes(PAGE_SIZE)
    if gpa_page % 3 == 0:
        return bytes(PAGE_SIZE)
    return struct.pack("<Q", gpa_page * 0x0101) * 512


def expected_gpa(gpa: int, size: int) -> bytes:
    """Reference bytes with holes as zeros."""
    out = bytearray()
    for page in range(gpa >> 12, ((gpa + size - 1) >> 12) + 1):
        backed = any(g <= page * PAGE_SIZE < g + n for g, n in RANGES)
        out += page_content(page) if backed else bytes(PAGE_SIZE)
    skip = gpa & 0xFFF
    return bytes(out[skip : skip + size])


def build_blocks(records: list, *, variable_runs_for: set[int] = frozenset()) -> dict[int, bytes]:
    raw: dict[int, bytearray] = {}
    for record in records:
        for i in range(record.page_count_total):
            r = record.mbp_index_start + i
            block = raw.setdefault(r >> 8, bytearray(BLOCK_SIZE))
            block[(r & 0xFF) * PAGE_SIZE : ((r & 0xFF) + 1) * PAGE_SIZE] = page_content(record.gpa_index_start + i)
    return {n: encode_block(bytes(data), use_variable_runs=n in variable_runs_for) for n, data in sorted(raw.items())}


RECORDS = build_layout(RANGES)
BLOCKS = build_blocks(RECORDS, variable_runs_for={2})


class CountingBlockSource(InMemoryBlockSource):
    """Counts value reads, so that tests can prove laziness."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.value_reads = 0

    def read_block_value(self, n: int) -> bytes:
        value = super().read_block_value(n)
        self.value_reads += 1
        return value


def make(blocks: dict[int, bytes] | None = None, *, findings: Findings | None = None, **kwargs: object) -> GuestMemory:
    source = CountingBlockSource(blocks if blocks is not None else BLOCKS, path="guest.vmrs")
    return GuestMemory(RamMap(RECORDS), source, findings=findings, **kwargs)  # type: ignore[arg-type]


def test_layout_under_test() -> None:
    assert [(r.gpa_index_start, r.page_count_total, r.mbp_index_start) for r in RECORDS] == [
        (0, 384, 0),
        (384, 256, 512),
        (1024, 512, 768),
    ]
    assert sorted(BLOCKS) == [0, 1, 2, 3, 4]


def test_open_reads_indexes_and_decodes_nothing() -> None:
    memory = make()
    assert isinstance(memory.source, BlockSource)
    assert (memory.blocks_indexed, memory.blocks_decoded, memory.source.value_reads) == (0, 0, 0)
    assert memory.is_backed(0) and not memory.is_backed(HOLE[0]) and memory.is_backed(4 * MiB)
    assert memory.source.value_reads == 0
    assert memory.cache_limit == 256
    assert memory.findings == []


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (0, 8),
        (0xC0FFE, 12),
        (0, MiB + 512 * 1024),
        (MiB - 4, 8),  # block boundary inside one range
        (MiB + 512 * 1024 - 100, 200),  # GPA-adjacent ranges, raw not contiguous
        (MiB, MiB + 512 * 1024),  # to the end of the second range
        (4 * MiB + 123, 2 * MiB - 123),
        (2 * MiB + 256 * 1024, 4096),  # inside the variable-run block
    ],
)
def test_reads_match_the_reference(gpa: int, size: int) -> None:
    memory = make()
    assert memory.read_gpa(gpa, size) == expected_gpa(gpa, size)
    assert memory.read_gpa_padded(gpa, size) == expected_gpa(gpa, size)


def test_read_running_into_a_hole_returns_the_bytes_before_it() -> None:
    memory = make()
    start = HOLE[0] - 100
    assert memory.read_gpa(start, 1000) == expected_gpa(start, 100)
    assert memory.read_gpa_padded(start, 1000) == expected_gpa(start, 100) + bytes(900)


def test_read_starting_in_a_hole_raises() -> None:
    memory = make()
    with pytest.raises(UnmappedAddressError) as err:
        memory.read_gpa(HOLE[0], 8)
    assert err.value.address == HOLE[0]
    with pytest.raises(UnmappedAddressError):
        memory.read_gpa(6 * MiB, 1)  # past the last range
    assert memory.read_gpa_padded(HOLE[0], 8) == bytes(8)
    assert memory.read_gpa_padded(6 * MiB - 4, 8) == expected_gpa(6 * MiB - 4, 4) + bytes(4)


def test_padded_read_across_the_hole() -> None:
    memory = make()
    start, size = 2 * MiB, 3 * MiB
    assert memory.read_gpa_padded(start, size) == expected_gpa(start, size)
    assert memory.read_gpa(0, 0) == b"" and memory.read_gpa_padded(HOLE[0], 0) == b""


def test_raw_reads_are_one_flat_stream_of_blocks() -> None:
    memory = make()
    assert memory.raw_size == 5 * MiB
    chunks, offset = [], 0
    while chunk := memory.read_raw(offset, MiB):
        chunks.append(chunk)
        offset += len(chunk)
    assert offset == memory.raw_size
    raw = b"".join(chunks)
    # The last block of the first range is zero-padded after its 128 pages (writer layout).
    assert raw[MiB + 512 * 1024 : 2 * MiB] == bytes(512 * 1024)
    assert raw[2 * MiB : 3 * MiB] == expected_gpa(MiB + 512 * 1024, MiB)
    assert memory.read_raw(memory.raw_size - 4, 100) == raw[-4:]
    assert memory.read_raw(memory.raw_size, 100) == b""
    with pytest.raises(ValueError):
        memory.read_raw(-1, 1)


def test_cache_limit_and_lru_eviction() -> None:
    memory = make(cache_limit=2)
    for n in (0, 1, 2):
        memory.read_raw(n * MiB, 8)
    assert memory.cached_blocks == [1, 2]
    memory.read_raw(MiB, 8)  # touch 1: now most recent
    memory.read_raw(3 * MiB, 8)
    assert memory.cached_blocks == [1, 3]
    assert memory.blocks_decoded == 4
    memory.read_raw(MiB + 100, 8)
    assert memory.blocks_decoded == 4  # a hit decodes nothing
    memory.set_cache_limit(1)
    assert memory.cached_blocks == [1]
    with pytest.raises(ValueError):
        memory.set_cache_limit(-1)


def test_cache_limit_zero_decodes_only_the_pages_asked_for() -> None:
    memory = make(cache_limit=0)
    assert memory.read_gpa(0x3000, 8) == expected_gpa(0x3000, 8)
    assert (memory.blocks_decoded, memory.pages_decoded, memory.cached_blocks) == (0, 1, [])
    assert memory.read_gpa(0, 2 * MiB) == expected_gpa(0, 2 * MiB)
    assert memory.blocks_decoded == 1  # the whole first block in one pass; nothing kept
    assert memory.cached_blocks == []


def test_sequential_read_decodes_each_block_once() -> None:
    memory = make()
    memory.read_gpa_padded(0, 6 * MiB)
    assert memory.blocks_decoded == 5 and memory.blocks_indexed <= 5
    memory.read_gpa_padded(0, 6 * MiB)
    assert memory.blocks_decoded == 5


def test_missing_block_is_reported_and_reads_as_a_hole() -> None:
    """A declared range whose RamBlock is absent is a hole (issue 18): the map backs only what the file holds."""
    blocks = dict(BLOCKS)
    del blocks[1]
    memory = make(blocks)
    assert [f.kind for f in memory.findings] == ["missing-block"]
    # Block 1 held GPA 1 MiB .. 1.5 MiB (the end of the first range) and nothing else.
    assert "0x80000 bytes" in memory.findings[0].message and "GPA 0x100000-0x17ffff" in memory.findings[0].message
    assert not memory.is_backed(MiB)
    with pytest.raises(UnmappedAddressError):
        memory.read_gpa(MiB, 8)
    assert memory.read_gpa(MiB - 8, 16) == expected_gpa(MiB - 8, 8)
    assert memory.read_gpa_padded(MiB - 8, 16) == expected_gpa(MiB - 8, 8) + bytes(8)
    assert memory.ram_map.chunks() == [(0, 256), (384, 256), (1024, 512)]
    assert memory.ram_map.declared == RamMap(RECORDS).records
    with pytest.raises(MissingPageError) as err:
        memory.read_raw(0, 2 * MiB)  # raw saved memory still has block 1's place
    assert "RamBlock 1 is absent" in str(err.value)
    with pytest.raises(FormatError):
        make(blocks, findings=Findings(strict=True))


def test_absurd_map_opens_instantly() -> None:
    # Hostile metadata claiming 2**40 pages must not make the open walk every block.
    findings = Findings()
    memory = GuestMemory(RamMap.identity(1 << 40), InMemoryBlockSource(BLOCKS), findings=findings)
    assert [f.kind for f in findings] == ["missing-block"]
    assert f"{((1 << 40) - 5 * 256) << 12:#x} bytes" in findings[0].message
    assert "GPA 0x500000-0xfffffffffffff" in findings[0].message
    assert memory.read_gpa(0, 8) == memory.read_raw(0, 8) == expected_gpa(0, 8)
    assert memory.ram_map.chunks() == [(0, 5 * 256)] and memory.maximum_gpa == 5 * MiB - 1


def test_unreferenced_block_is_noted() -> None:
    blocks = dict(BLOCKS)
    blocks[40] = encode_block(bytes(BLOCK_SIZE))
    memory = make(blocks)
    assert [f.kind for f in memory.findings] == ["unreferenced-block"]
    assert "40" in memory.findings[0].message


def test_truncated_block_pages_are_missing_and_reported_once() -> None:
    blocks = dict(BLOCKS)
    # Block 0 cut after its first 10 pages: keep the records for pages 0..9 and add an early end marker.
    data = b"".join(page_content(p) for p in range(256))
    full = encode_block(data)
    index = rb.index_block(full, path="x", file_offset=0, findings=Findings())
    cut = next(index.args[p] - 4 for p in range(10, 256) if index.kinds[p] in (rb.KIND_RAW, rb.KIND_XPRESS))
    assert cut > 0
    blocks[0] = full[:cut] + struct.pack("<I", rb.TAG_END)
    memory = make(blocks, cache_limit=1)
    start_missing = next(
        p for p in range(256) if rb.index_block(blocks[0], path="x", file_offset=0, findings=Findings()).kinds[p] == 0
    )
    gpa = start_missing * PAGE_SIZE
    with pytest.raises(MissingPageError):
        memory.read_gpa(gpa, 8)
    assert memory.read_gpa(gpa - 8, 100) == expected_gpa(gpa - 8, 8)
    assert memory.read_gpa_padded(gpa - 8, 100) == expected_gpa(gpa - 8, 8) + bytes(92)
    memory.read_gpa(2 * MiB, 8)  # evict block 0
    memory.read_gpa(0, 8)  # and index it again
    assert memory.blocks_indexed >= 2
    assert [f.kind for f in memory.findings] == ["truncated"]


def test_corrupt_xpress_page_reads_as_missing_with_one_finding() -> None:
    blocks = dict(BLOCKS)
    index = rb.index_block(blocks[0], path="x", file_offset=0, findings=Findings())
    page = next(p for p in range(256) if index.kinds[p] == rb.KIND_XPRESS)
    value = bytearray(blocks[0])
    start = index.args[page]
    value[start : start + index.lengths[page]] = b"\xff" * index.lengths[page]
    blocks[0] = bytes(value)
    memory = make(blocks, cache_limit=1)
    gpa = page * PAGE_SIZE
    with pytest.raises(MissingPageError):
        memory.read_gpa(gpa, 8)
    assert memory.read_gpa_padded(gpa, 8) == bytes(8)
    memory.read_gpa(2 * MiB, 8)
    with pytest.raises(MissingPageError):
        memory.read_gpa(gpa, 8)
    assert [f.kind for f in memory.findings] == ["bad-page"]


def test_native_decoder_failure_falls_back_with_a_finding() -> None:
    # libfwnt rejects the valid 32-bit extended-length form (spec §3.2 decoder notes): the page must
    # still decode, through the pure-Python decoder, and the analyst must be told.
    if xpress.active_decoder() == "python":
        pytest.skip("no native XPRESS decoder here, so there is nothing to fall back from")
    python_codec = pytest.importorskip("volatility3_vmssd.codecs._xpress_python")
    page = b"A" + bytes(PAGE_SIZE - 1)
    packed = python_codec.compress(page, force_u32=True)
    value = struct.pack("<I", len(packed)) + packed + struct.pack("<IQI", rb.TAG_MULTI_FILL, 0, 255)
    value += struct.pack("<I", rb.TAG_END)
    calls: list[str] = []
    memory = GuestMemory(RamMap.identity(256), InMemoryBlockSource({0: value}), on_fallback=calls.append)
    assert memory.read_gpa(0, 8) == page[:8]
    assert len(calls) == 1
    assert [f.kind for f in memory.findings] == ["xpress-fallback"]


def test_memoryview_values_are_accepted() -> None:
    views = {n: memoryview(value) for n, value in BLOCKS.items()}
    memory = GuestMemory(RamMap(RECORDS), InMemoryBlockSource(views))  # type: ignore[arg-type]
    assert memory.read_gpa_padded(0, 6 * MiB) == expected_gpa(0, 6 * MiB)
    assert memory.read_raw(3 * MiB, 16) == expected_gpa(4 * MiB, 16)  # raw block 3 = first page of range 3


def test_negative_address_is_unmapped() -> None:
    with pytest.raises(UnmappedAddressError):
        make().read_gpa(-8, 16)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[8, 64, 4096, 70000], [8, 4096, 2 * MiB + 100, 5 * MiB]], ids=["small", "mixed"])
def test_parallel_readers_see_consistent_data(sizes: list[int]) -> None:
    """Small reads (the LRU) and, in "mixed", scans (batches on decode threads, the ring) at once."""
    memory = make(cache_limit=2, decode_threads=2)  # small cache: constant eviction while threads read
    rng = random.Random(5)
    spans = [(rng.randrange(0, 6 * MiB - 64), rng.choice(sizes)) for _ in range(400)]

    def check(span: tuple[int, int]) -> bool:
        gpa, size = span
        return memory.read_gpa_padded(gpa, size) == expected_gpa(gpa, size)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(check, spans))
    assert len(memory.cached_blocks) <= 2


def test_record_stats_index_without_decoding() -> None:
    memory = make()
    stats = memory.record_stats()
    assert memory.blocks_decoded == 0
    assert stats.blocks == 5
    assert stats.variable_runs > 0
    assert stats.end_markers == 5


# -- whole-block batches (the scan path) ---------------------------------------------------------------------


def _batch_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from volatility3_vmssd.memory import guestmemory

    sizes: list[int] = []
    real = guestmemory.decompress_many

    def spy(streams: list[bytes], out_size: object, **kwargs: object) -> list[object]:
        sizes.append(len(streams))
        return real(streams, out_size, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(guestmemory, "decompress_many", spy)
    return sizes


@pytest.mark.parametrize("threads", [1, 2])
def test_a_multi_block_read_decodes_its_pages_in_one_batch(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    if xpress.active_decoder() == "python":
        pytest.skip("batches need a native XPRESS decoder")
    monkeypatch.setattr(xpress, "MIN_STREAMS_PER_THREAD", 2)
    batches = _batch_spy(monkeypatch)
    memory = make(decode_threads=threads)
    assert memory.read_gpa_padded(0, 6 * MiB) == expected_gpa(0, 6 * MiB)
    # All five blocks (block 2 has variable runs) share one batch; none takes the careful path.
    expected = sum(len(rb.plan_block(BLOCKS[n]).streams) for n in range(5))  # type: ignore[union-attr]
    assert batches == [expected] and expected > 0
    assert memory.blocks_decoded == 5 and memory.findings == [] and memory.blocks_careful == 0
    assert memory.read_gpa_padded(0, 6 * MiB) == expected_gpa(0, 6 * MiB)
    assert batches == [expected]  # all cached now


def test_a_bad_page_in_a_batch_is_reported_and_the_rest_is_served() -> None:
    blocks = dict(BLOCKS)
    plan = rb.plan_block(blocks[3])
    assert plan is not None and plan.streams
    bad_stream = plan.streams[0]
    bad_page = plan.slots[0]
    blocks[3] = blocks[3].replace(bad_stream, b"\xff" * len(bad_stream), 1)
    memory = make(blocks)
    data = memory.read_gpa_padded(0, 6 * MiB)
    bad_gpa = 4 * MiB + bad_page * PAGE_SIZE  # raw block 3 is the start of the third range
    assert data[bad_gpa : bad_gpa + PAGE_SIZE] == bytes(PAGE_SIZE)
    assert data[:bad_gpa] == expected_gpa(0, bad_gpa)
    assert data[bad_gpa + PAGE_SIZE :] == expected_gpa(bad_gpa + PAGE_SIZE, 6 * MiB - bad_gpa - PAGE_SIZE)
    assert [f.kind for f in memory.findings] == ["bad-page"]
    assert "RamBlock 3" in memory.findings[0].message
    with pytest.raises(MissingPageError):
        memory.read_gpa(bad_gpa, 8)


def test_cache_off_still_batches_whole_blocks_and_decodes_partial_ends_alone() -> None:
    memory = make(cache_limit=0)
    gpa, size = 0x1234, 6 * MiB - 0x3000
    assert memory.read_gpa_padded(gpa, size) == expected_gpa(gpa, size)
    assert memory.cached_blocks == []
    assert memory.pages_decoded > 0  # the partly read blocks went through the page-at-a-time path


def _zero_memory() -> GuestMemory:
    zero = encode_block(bytes(BLOCK_SIZE))
    blocks = {n: zero for n in range(8)}
    blocks[6] = encode_block(b"\x01" + bytes(BLOCK_SIZE - 1))
    return GuestMemory(RamMap.identity(8 * 256), InMemoryBlockSource(blocks))


def test_all_zero_reads_share_one_result() -> None:
    memory = _zero_memory()
    first = memory.read_gpa(0, 4 * MiB)
    assert first == bytes(4 * MiB)
    assert memory.read_gpa(MiB, 4 * MiB) is first  # the same immutable object: nothing copied
    assert memory.read_gpa_padded(0, 4 * MiB) is first
    assert memory.read_raw(0, 4 * MiB) is first
    odd = memory.read_gpa(100, 3 * MiB)
    assert odd == bytes(3 * MiB)
    mixed = memory.read_gpa(4 * MiB, 4 * MiB)
    assert mixed[2 * MiB] == 1 and mixed.count(0) == 4 * MiB - 1
    # A hole padded with zeros next to zero blocks is all zero too.
    assert memory.read_gpa_padded(7 * MiB, 4 * MiB) == bytes(4 * MiB)
    from volatility3_vmssd.memory import guestmemory

    assert len(guestmemory._ZERO_RESULTS) <= guestmemory._ZERO_RESULT_SIZES


def _identity_memory(blocks: int, **kwargs: object) -> GuestMemory:
    values = {n: encode_block(struct.pack("<Q", n + 1) * (BLOCK_SIZE // 8)) for n in range(blocks)}
    return GuestMemory(RamMap.identity(blocks * 256), InMemoryBlockSource(values), **kwargs)  # type: ignore[arg-type]


def test_a_scan_keeps_a_bounded_ring_and_spares_the_working_set() -> None:
    from volatility3_vmssd.memory.guestmemory import SCAN_RING

    blocks = SCAN_RING + 40
    memory = _identity_memory(blocks, cache_limit=SCAN_RING + 8)
    for n in range(4):  # the working set: small reads, as a page-table walk makes them
        memory.read_gpa(n * MiB + 8, 8)
    for start in range(4, blocks, 16):  # a scanner's 16 MiB chunks over everything else
        size = min(16, blocks - start) * MiB
        data = memory.read_gpa(start * MiB, size)
        assert data[:8] == struct.pack("<Q", start + 1) and len(data) == size
    cached = memory.cached_blocks
    assert len(cached) <= memory.cache_limit
    assert cached[-4:] == [0, 1, 2, 3]  # the working set survived the scan
    ring = cached[:-4]
    assert len(ring) <= SCAN_RING and ring == sorted(ring) and ring[-1] == blocks - 1
    # A small read of a ring block moves it to the LRU; another scan does not evict it first.
    decoded = memory.blocks_decoded
    memory.read_gpa(ring[0] * MiB, 8)
    assert memory.blocks_decoded == decoded and memory.cached_blocks[-1] == ring[0]
    memory.read_gpa(4 * MiB, 16 * MiB)
    assert ring[0] in memory.cached_blocks and {0, 1, 2, 3} <= set(memory.cached_blocks)


def test_the_cache_limit_covers_the_ring_too() -> None:
    memory = _identity_memory(20, cache_limit=6)
    memory.read_gpa(0, 8)
    memory.read_gpa(MiB, 16 * MiB)
    assert len(memory.cached_blocks) == 6 and memory.cached_blocks[-1] == 0
    memory.set_cache_limit(2)
    assert memory.cached_blocks == [16, 0]  # the ring goes first
    memory.clear_cache()
    assert memory.cached_blocks == []
