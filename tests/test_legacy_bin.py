"""The legacy .bin container (spec §5.1): the real sample, the writer, and damaged files.

test_file.bin comes from rafawo/vmsavedstatetodump-rs @ 2cb5f1f : tests/test_file.bin (MIT OR
Apache-2.0); its expected values were produced by that crate's tests against Microsoft's DLL.
See ../shared/data/real/README.md.
"""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_data import SHARED

from volatility3_vmssd.errors import Findings, FormatError, TruncatedError, VmssdError
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE
from volatility3_vmssd.memory.legacy_bin import (
    BIN_HEADER,
    BIN_INDEX_ENTRY,
    BIN_SIGNATURE,
    BinFile,
    write_bin,
)
from volatility3_vmssd.memory.ramblock import encode_block

REAL_BIN = SHARED / "data" / "real" / "test_file.bin"
MiB = 1 << 20


@pytest.fixture(scope="module")
def real_bin() -> Path:
    if not REAL_BIN.exists():
        pytest.skip(f"needs {REAL_BIN} (the shared real-data folder beside the repository); not present here")
    return REAL_BIN


# -- the real file ------------------------------------------------------------------------------------


@pytest.mark.shared
def test_real_bin_header_and_index(real_bin: Path) -> None:
    with BinFile.open(real_bin) as image:
        assert image.vm_version == 0x0500
        assert (image.index_capacity, image.index_offset) == (1024, 0x179000)
        assert (image.name_table_offset, image.name_table_size, image.name_bytes_used) == (0x17F000, 0x4000, 0xD5A)
        assert sorted(image.blocks) == list(range(252))
        assert image.other_entries == {} and image.findings == []
        # Entries are in write order, not numeric order.
        assert [e.name for e in image.entries[:3]] == ["RamBlock/3/", "RamBlock/2/", "RamBlock/4/"]
        assert image.block_location(0) == (0x5000, 107631)


@pytest.mark.shared
def test_real_bin_matches_the_dll_ground_truth(real_bin: Path) -> None:
    with BinFile.open(real_bin) as image:
        memory = image.guest_memory()
        assert memory.blocks_decoded == 0 and memory.blocks_indexed == 0  # opening decodes nothing
        assert memory.ram_map.chunks() == [(0, 64512)]
        assert memory.raw_size == 264_241_152
        assert struct.unpack("<3I", memory.read_gpa(0xC0FFE, 12)) == (75826887, 1235222542, 3439375364)
        assert memory.blocks_decoded == 1
        offset = 0
        while chunk := memory.read_raw(offset, MiB):
            assert len(chunk) == MiB
            offset += len(chunk)
        assert offset == 264_241_152
        assert memory.findings == []


@pytest.mark.shared
def test_real_bin_record_statistics(real_bin: Path) -> None:
    with BinFile.open(real_bin) as image:
        stats = image.guest_memory().record_stats()
    assert stats.blocks == 252 and stats.raw_blocks == 0
    assert (stats.fill_records, stats.xpress_pages, stats.raw_pages) == (64_321, 185, 6)
    assert (stats.multi_fill_records, stats.variable_runs, stats.missing_pages) == (0, 0, 0)
    assert stats.end_markers == 252


@pytest.mark.shared
def test_writer_reproduces_the_real_layout(real_bin: Path, tmp_path: Path) -> None:
    # Write the real values back in their original order: the file must come out identical, except
    # the slack after each value, which Hyper-V leaves stale and we zero.
    out = tmp_path / "copy.bin"
    with BinFile.open(real_bin) as image:
        blocks = [(int(re.fullmatch(r"RamBlock/(\d+)/", e.name).group(1)), image.read_entry(e)) for e in image.entries]
        write_bin(out, blocks, vm_version=image.vm_version)
        real = bytearray(real_bin.read_bytes())
        for e in image.entries:
            real[e.offset + e.size : e.offset + e.allocated_size] = bytes(e.allocated_size - e.size)
    assert out.read_bytes() == bytes(real)


# -- synthetic files ----------------------------------------------------------------------------------


def sample_blocks() -> list[tuple[int, bytes]]:
    rng = random.Random(3)
    text = b"".join(b"line %d of saved state; " % i for i in range(2000))
    block = bytearray(BLOCK_SIZE)
    block[PAGE_SIZE : 2 * PAGE_SIZE] = text[:PAGE_SIZE]
    block[5 * PAGE_SIZE : 6 * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    block[9 * PAGE_SIZE : 10 * PAGE_SIZE] = b"\x42" * PAGE_SIZE
    return [
        (2, encode_block(bytes(block))),
        (0, encode_block(bytes(BLOCK_SIZE))),
        (1, rng.randbytes(BLOCK_SIZE)),  # a raw 1 MiB value
    ]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bin") / "synthetic.bin"
    write_bin(path, sample_blocks(), vm_version=0x0402)
    return path


def test_round_trip_through_guest_memory(synthetic: Path) -> None:
    blocks = dict(sample_blocks())
    with BinFile.open(synthetic) as image:
        assert image.vm_version == 0x0402
        assert sorted(image.blocks) == [0, 1, 2]
        memory = image.guest_memory()
        assert memory.read_gpa(0, MiB) == bytes(MiB)
        assert memory.read_gpa(MiB, MiB) == blocks[1]
        third = memory.read_gpa(2 * MiB, MiB)
        assert third[PAGE_SIZE : 2 * PAGE_SIZE].startswith(b"line 0 of saved state")
        assert third[9 * PAGE_SIZE : 10 * PAGE_SIZE] == b"\x42" * PAGE_SIZE
        assert image.read_block_value(2) == blocks[2]
        assert image.findings == [] and memory.findings == []


def test_writer_layout(synthetic: Path) -> None:
    data = synthetic.read_bytes()
    header = BIN_HEADER.unpack_from(data)
    assert header[0] == BIN_SIGNATURE and header[2] == 1 and header[3] == 1024
    index_offset, names_offset, names_size = header[4], header[5], header[6]
    assert index_offset % PAGE_SIZE == 0 and names_offset == index_offset + 1024 * 24
    assert names_offset + names_size == len(data)
    first = BIN_INDEX_ENTRY.unpack_from(data, index_offset)
    assert first[-1] == 0x1000  # values start at 0x1000
    assert data[names_offset : names_offset + header[7]] == b"RamBlock/2/\0RamBlock/0/\0RamBlock/1/\0"


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_bin(tmp_path / "a.bin", [(0, b"x"), (0, b"y")])
    with pytest.raises(ValueError):
        write_bin(tmp_path / "b.bin", [(0, bytes(BLOCK_SIZE + 1))])


def test_huge_block_number_opens_instantly(tmp_path: Path) -> None:
    # A .bin has no RAM map, so the identity map spans up to the highest block number; a hostile
    # name must not make opening walk 10**11 blocks.
    path = tmp_path / "sparse.bin"
    write_bin(path, [(0, encode_block(bytes(BLOCK_SIZE))), (10**11, encode_block(bytes(BLOCK_SIZE)))])
    with BinFile.open(path) as image:
        memory = image.guest_memory()
        assert memory.raw_size == (10**11 + 1) * MiB
        assert [f.kind for f in image.findings] == ["missing-block"]
        assert memory.read_gpa(10**11 * MiB, 4) == bytes(4)


def test_closed_file_refuses_reads(synthetic: Path) -> None:
    image = BinFile.open(synthetic)
    image.close()
    image.close()
    with pytest.raises(VmssdError):
        image.read_block_value(0)
    with pytest.raises(KeyError):  # NotFoundError is a KeyError too
        BinFile.open(synthetic).read_block_value(7)


# -- damaged files ------------------------------------------------------------------------------------


def patched(synthetic: Path, tmp_path: Path, patches: list[tuple[int, bytes]], truncate: int | None = None) -> Path:
    data = bytearray(synthetic.read_bytes())
    for offset, raw in patches:
        data[offset : offset + len(raw)] = raw
    if truncate is not None:
        del data[truncate:]
    out = tmp_path / "damaged.bin"
    out.write_bytes(bytes(data))
    return out


def header_of(path: Path) -> tuple[int, ...]:
    return BIN_HEADER.unpack_from(path.read_bytes())


@pytest.mark.parametrize(
    ("patches", "truncate", "error", "offset"),
    [
        ([], 20, TruncatedError, 0),
        ([(0, b"\x00\x00\x00\x00")], None, FormatError, 0),
        ([(12, struct.pack("<I", 0xFFFFFFFF))], None, FormatError, 12),  # absurd capacity
        ([(16, struct.pack("<Q", 1 << 40))], None, TruncatedError, 16),  # index table past EOF
        ([(24, struct.pack("<Q", 1 << 40))], None, TruncatedError, 24),  # name table past EOF
        ([(32, struct.pack("<I", 0x7FFFFFFF))], None, FormatError, 32),  # absurd name table size
    ],
)
def test_damaged_header_is_a_format_error(
    synthetic: Path, tmp_path: Path, patches: list[tuple[int, bytes]], truncate: int | None, error: type, offset: int
) -> None:
    path = patched(synthetic, tmp_path, patches, truncate)
    with pytest.raises(error) as err:
        BinFile.open(path)
    assert err.value.offset == offset and err.value.path == str(path)


def test_truncated_file_cuts_off_the_tables(synthetic: Path, tmp_path: Path) -> None:
    with pytest.raises(TruncatedError):
        BinFile.open(patched(synthetic, tmp_path, [], truncate=len(synthetic.read_bytes()) - 10))


def entry_offset(path: Path, slot: int) -> int:
    return header_of(path)[4] + slot * BIN_INDEX_ENTRY.size


def test_entry_with_name_outside_the_name_table_is_skipped(synthetic: Path, tmp_path: Path) -> None:
    at = entry_offset(synthetic, 0)
    path = patched(synthetic, tmp_path, [(at, struct.pack("<I", 0x10000))])
    findings = Findings()
    with BinFile.open(path, findings=findings) as image:
        assert sorted(image.blocks) == [0, 1]
    assert [(f.kind, f.offset) for f in findings] == [("bad-entry", at)]
    with pytest.raises(FormatError):
        BinFile.open(path, findings=Findings(strict=True))


def test_entry_pointing_past_eof_is_skipped(synthetic: Path, tmp_path: Path) -> None:
    at = entry_offset(synthetic, 1)
    path = patched(synthetic, tmp_path, [(at + 16, struct.pack("<Q", 1 << 33))])
    findings = Findings()
    with BinFile.open(path, findings=findings) as image:
        assert sorted(image.blocks) == [1, 2]
        memory = image.guest_memory()
        assert [f.kind for f in findings] == ["truncated", "missing-block"]
        assert memory.read_gpa_padded(0, 16) == bytes(16)
    with pytest.raises(TruncatedError):
        BinFile.open(path, findings=Findings(strict=True))


def test_unknown_and_duplicate_names_are_findings(synthetic: Path, tmp_path: Path) -> None:
    names_offset = header_of(synthetic)[5]
    # "RamBlock/2/" -> "Vm_State/2/" (same length), and slot 1 renamed to a second "RamBlock/1/".
    path = patched(synthetic, tmp_path, [(names_offset, b"Vm_State/2/\0"), (names_offset + 12, b"RamBlock/1/\0")])
    findings = Findings()
    with BinFile.open(path, findings=findings) as image:
        assert sorted(image.blocks) == [1]
        assert list(image.other_entries) == ["Vm_State/2/"]
    assert sorted(f.kind for f in findings) == ["bad-entry", "unknown-entry"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["header", "index", "names", "data"]),
            st.integers(0, 1 << 16),
            st.binary(min_size=1, max_size=8),
        ),
        min_size=1,
        max_size=5,
    ),
    strict=st.booleans(),
)
def test_fuzzed_files_raise_only_vmssd_errors(
    synthetic: Path, tmp_path: Path, edits: list[tuple[str, int, bytes]], strict: bool
) -> None:
    data = bytearray(synthetic.read_bytes())
    header = BIN_HEADER.unpack_from(data)
    regions = {"header": (0, 40), "index": (header[4], 3 * 24), "names": (header[5], 36), "data": (0x1000, 0x3000)}
    for region, where, raw in edits:
        start, size = regions[region]
        at = start + where % size
        data[at : at + len(raw)] = raw
    path = tmp_path / "fuzz.bin"
    path.write_bytes(bytes(data))
    try:
        with BinFile.open(path, findings=Findings(strict=strict)) as image:
            memory = image.guest_memory(cache_limit=1)
            for n in sorted(image.blocks)[:4]:
                memory.read_gpa_padded(n * MiB, 64)
                memory.read_gpa_padded(n * MiB + 5 * PAGE_SIZE, 8)
    except VmssdError:
        pass
