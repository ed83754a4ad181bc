"""RamMemoryBlock records and the GPA ↔ raw saved-memory map (spec §3.1)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volatility3_vmssd.errors import Findings, FormatError, TruncatedError, UnsupportedError
from volatility3_vmssd.memory.rammap import (
    RAM_MEMORY_BLOCK_V3,
    RamMap,
    RamMemoryBlockRecord,
    build_layout,
    layout_ram,
)

MiB = 1 << 20
PAGE = 4096


def test_record_round_trip_is_48_bytes() -> None:
    record = RamMemoryBlockRecord(0x123, 0x400, 0x100000, flags=0b1011, virtual_node=2, ksr_block_id=7)
    data = record.build()
    assert len(data) == RAM_MEMORY_BLOCK_V3.size == 48
    # Field offsets from the spec table: PageCountTotal @8, MbpIndexStart @16, GpaIndexStart @24.
    assert struct.unpack_from("<IIQQQ", data) == (3, 0b1011, 0x123, 0x400, 0x100000)
    assert struct.unpack_from("<IIQ", data, 32) == (2, 0, 7)
    parsed = RamMemoryBlockRecord.parse(data, key="RamMemoryBlock0")
    assert parsed == record and parsed.key == "RamMemoryBlock0"
    assert parsed.is_hot_added and parsed.is_sgx and not parsed.is_vtl2_mb and parsed.is_specific_purpose


def test_unknown_version_is_unsupported_so_callers_can_fall_back() -> None:
    # Legacy (VM version <= 5.0) records have another, undocumented layout [1].
    data = bytearray(RamMemoryBlockRecord(1, 0, 0).build())
    data[0] = 2
    with pytest.raises(UnsupportedError):
        RamMemoryBlockRecord.parse(bytes(data))


@pytest.mark.parametrize("size", [0, 3, 4, 47])
def test_short_record_is_a_format_error(size: int) -> None:
    with pytest.raises(TruncatedError) as err:
        RamMemoryBlockRecord.parse(RamMemoryBlockRecord(1, 0, 0).build()[:size], path="x.vmrs", offset=0x40)
    assert isinstance(err.value, FormatError) and err.value.offset == 0x40


def test_build_layout_starts_every_range_on_a_fresh_block() -> None:
    # openvmm's writer: MbpIndexStart is a multiple of 256 and not a running page total.
    ranges = [(0, 0xA0000), (0x100000, 3 * MiB + 2 * PAGE), (4 << 30, 5 * PAGE)]
    records = build_layout(ranges)
    assert [(r.gpa_index_start, r.page_count_total, r.mbp_index_start) for r in records] == [
        (0, 160, 0),
        (0x100, 770, 256),
        (0x100000, 5, 256 + 4 * 256),
    ]
    assert [r.key for r in records] == ["RamMemoryBlock0", "RamMemoryBlock1", "RamMemoryBlock2"]


def test_build_layout_rejects_unaligned_ranges() -> None:
    with pytest.raises(ValueError):
        build_layout([(100, PAGE)])


def test_layout_ram_relocates_ram_above_holes() -> None:
    assert layout_ram(8 * MiB, [(2 * MiB, MiB)]) == [(0, 2 * MiB), (3 * MiB, 6 * MiB)]
    assert layout_ram(2 * MiB, [(4 * MiB, MiB)]) == [(0, 2 * MiB)]
    assert layout_ram(4 * MiB, [(0, MiB)]) == [(MiB, 4 * MiB)]


def holey_map() -> RamMap:
    return RamMap(build_layout([(0, 0xA0000), (0x100000, 3 * MiB + 2 * PAGE), (8 * MiB, MiB)]))


def test_gpa_to_raw_uses_mbp_index_start_not_a_running_total() -> None:
    ram = holey_map()
    assert ram.raw_page(0) == 0
    assert ram.raw_page(0x9F) == 0x9F
    assert ram.raw_page(0xA0) is None  # the legacy VGA hole
    assert ram.raw_page(0x100) == 256  # a running total would say 160
    assert ram.raw_page(0x100 + 769) == 256 + 769
    assert ram.raw_page(0x100 + 770) is None
    assert ram.raw_page(0x800) == 256 * 5
    assert ram.raw_offset(0x100123) == 256 * PAGE + 0x123
    assert ram.chunks() == [(0, 160), (0x100, 770), (0x800, 256)]
    assert ram.maximum_gpa == 9 * MiB - 1 and ram.minimum_gpa == 0
    assert ram.page_count == 160 + 770 + 256
    # Raw memory is whole blocks: 1 + 4 (last one zero-padded) + 1.
    assert ram.raw_block_count == 6 and ram.raw_size == 6 * MiB
    assert ram.block_ranges() == [(0, 6)]


def test_runs_skip_holes_and_clip_to_the_window() -> None:
    ram = holey_map()
    runs = list(ram.runs(0x9E000, 0x100000 - 0x9E000 + 0x2000))
    assert runs == [(0x9E000, 0x9E000, 0x2000), (0x100000, MiB, 0x2000)]
    assert list(ram.runs(0xA0000, 0x1000)) == []
    assert list(ram.runs(0, 0)) == []


def test_runs_coalesce_ranges_contiguous_in_gpa_and_raw() -> None:
    # Two records back to back in both spaces read as one piece; a raw gap splits them.
    joined = RamMap([RamMemoryBlockRecord(256, 0, 0), RamMemoryBlockRecord(256, 256, 256)])
    assert list(joined.runs(0, 2 * MiB)) == [(0, 0, 2 * MiB)]
    assert joined.segments() == [(0, 0, 2 * MiB)]
    assert joined.chunks() == [(0, 256), (256, 256)]
    split = RamMap([RamMemoryBlockRecord(256, 0, 0), RamMemoryBlockRecord(256, 512, 256)])
    assert list(split.runs(MiB - 8, 16)) == [(MiB - 8, MiB - 8, 8), (MiB, 2 * MiB, 8)]


def test_locate_reports_the_backed_bytes_left() -> None:
    ram = holey_map()
    assert ram.locate(0x9F000) == (0x9F000, 0x1000)
    assert ram.locate(0xA0000) is None
    assert ram.locate(-1) is None
    assert ram.is_backed(0x100000) and not ram.is_backed(9 * MiB)


def test_records_are_sorted_by_gpa_whatever_their_order() -> None:
    ram = RamMap([RamMemoryBlockRecord(16, 256, 0x1000), RamMemoryBlockRecord(16, 0, 0)])
    assert ram.chunks() == [(0, 16), (0x1000, 16)]
    assert ram.raw_page(0x1000) == 256


def test_overlapping_gpa_ranges_first_wins() -> None:
    findings = Findings()
    first = RamMemoryBlockRecord(100, 0, 0, key="RamMemoryBlock0")
    second = RamMemoryBlockRecord(100, 256, 50, key="RamMemoryBlock1")
    ram = RamMap([first, second], findings=findings, path="x.vmrs")
    assert ram.records == (first,)
    assert [f.kind for f in findings] == ["ram-map"] and "RamMemoryBlock1" in findings[0].message
    with pytest.raises(FormatError):
        RamMap([first, second], findings=Findings(strict=True))


def test_overlapping_raw_ranges_first_wins() -> None:
    findings = Findings()
    ram = RamMap([RamMemoryBlockRecord(100, 0, 0), RamMemoryBlockRecord(100, 99, 0x1000)], findings=findings)
    assert ram.chunks() == [(0, 100)]
    assert "raw" in findings[0].message


def test_empty_and_absurd_records_are_dropped_with_findings() -> None:
    findings = Findings()
    ram = RamMap([RamMemoryBlockRecord(0, 0, 0), RamMemoryBlockRecord(2, 0, (1 << 52) - 1)], findings=findings)
    assert ram.chunks() == [] and ram.maximum_gpa == -1 and ram.raw_size == 0
    assert len(findings) == 2


def test_identity_map_matches_the_real_bin_ground_truth() -> None:
    # The DLL (rafawo tests): one chunk {0, 64512} and a raw saved-memory size of 264,241,152.
    ram = RamMap.identity(64512)
    assert ram.chunks() == [(0, 64512)]
    assert ram.raw_size == 264_241_152
    assert ram.maximum_gpa == 264_241_152 - 1
    assert ram.raw_offset(0xC0FFE) == 0xC0FFE


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 64), st.integers(1, 700)), min_size=1, max_size=6),
    st.data(),
)
def test_random_layouts_map_every_page_through_its_own_record(
    spans: list[tuple[int, int]], data: st.DataObject
) -> None:
    ranges, gpa_page = [], 0
    for gap, pages in spans:
        gpa_page += gap
        ranges.append((gpa_page * PAGE, pages * PAGE))
        gpa_page += pages
    records = build_layout(ranges)
    ram = RamMap(records)
    for record in records:
        page = data.draw(st.integers(record.gpa_index_start, record.gpa_index_start + record.page_count_total - 1))
        assert ram.raw_page(page) == record.mbp_index_start + page - record.gpa_index_start
        assert record.mbp_index_start % 256 == 0
    window_start = data.draw(st.integers(0, gpa_page * PAGE))
    window = data.draw(st.integers(0, gpa_page * PAGE))
    covered = sum(max(0, min(window_start + window, g + n) - max(window_start, g)) for g, n in ranges)
    pieces = list(ram.runs(window_start, window))
    assert sum(length for _, _, length in pieces) == covered
    for gpa, raw, length in pieces:
        assert ram.raw_offset(gpa) == raw and ram.raw_offset(gpa + length - 1) == raw + length - 1


def test_parse_sound_is_parse_without_error_context() -> None:
    # The RAM map's fast path: the same record as parse() for every value parse() accepts, and
    # None (so that parse() reports it with its offset) for every value parse() rejects.
    good = RamMemoryBlockRecord(5, 256, 0x100, flags=0x5, virtual_node=1, ksr_block_id=9, padding=2).build()
    assert RamMemoryBlockRecord.parse_sound(good, "k") == RamMemoryBlockRecord.parse(good, key="k")
    assert RamMemoryBlockRecord.parse_sound(good + b"tail", "k") == RamMemoryBlockRecord.parse(good + b"tail")
    for bad in (good[:47], b"", good[:3], (4).to_bytes(4, "little") + good[4:]):
        assert RamMemoryBlockRecord.parse_sound(bad) is None
        with pytest.raises((TruncatedError, UnsupportedError)):
            RamMemoryBlockRecord.parse(bad)
