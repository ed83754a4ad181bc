"""Damaged containers give a clear error or a finding naming file, offset and expectation."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from builders import key_offsets, patch_key_entry, write_storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volatility3_vmssd.errors import ChecksumError, FormatError, TruncatedError, VmssdError
from volatility3_vmssd.storage import HyperVStorage

TREE = {
    "configuration": {"properties": {"version": 2304}, "name": "vm"},
    "savedstate": {"RamBlock0": bytes(range(256)) * 16, "a": {"b": {"c": 1}}},
}


@pytest.fixture
def good(tmp_path: Path) -> bytes:
    path = tmp_path / "good.vmrs"
    write_storage(path, TREE)
    return path.read_bytes()


def write(tmp_path: Path, data: bytes | bytearray, name: str = "bad.vmrs") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_bad_signature_names_file_and_offset(tmp_path: Path) -> None:
    path = write(tmp_path, b"MZ" + bytes(0x3000))
    with pytest.raises(FormatError) as err:
        HyperVStorage.open(path)
    assert str(path) in str(err.value) and "offset 0x0" in str(err.value) and "0x01282014" in str(err.value)


def test_tiny_file_is_truncated_error(tmp_path: Path) -> None:
    with pytest.raises(TruncatedError, match="too short"):
        HyperVStorage.open(write(tmp_path, b"\x14\x20\x28\x01"))


def test_damaged_header_copy_falls_back_to_the_other(tmp_path: Path, good: bytes) -> None:
    data = bytearray(good)
    data[20] ^= 0xFF  # inside copy 0 (the newer one): its CRC no longer matches
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert s.header.copy == 1
        assert any(f.kind == "crc" and f.offset == 0 for f in s.findings)
        assert s.get("/configuration/properties/version").value == 2304
    with pytest.raises(ChecksumError):
        HyperVStorage.open(write(tmp_path, data, "b2.vmrs"), strict=True)


def test_both_headers_bad_signature(tmp_path: Path, good: bytes) -> None:
    data = bytearray(good)
    data[0:4] = b"XXXX"
    data[0x1000:0x1004] = b"XXXX"
    with pytest.raises(FormatError, match="not a HyperVStorage container"):
        HyperVStorage.open(write(tmp_path, data))


def test_both_header_crcs_bad_reads_on_with_findings(tmp_path: Path, good: bytes) -> None:
    data = bytearray(good)
    data[20] ^= 1
    data[0x1000 + 20] ^= 1
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert sum(f.kind == "crc" for f in s.findings) >= 2


def test_header_sequence_wraps_around(tmp_path: Path, good: bytes) -> None:
    from volatility3_vmssd.storage.writer import file_header

    data = bytearray(good)
    for off, seq in ((0, 0xFFFF), (0x1000, 0)):  # 0 follows 0xFFFF: copy 1 is newer
        data[off : off + 46] = file_header(seq, 0x1000, 0x3000, 0x4000)
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert s.header.copy == 1


def test_object_table_entry_past_eof(tmp_path: Path, good: bytes) -> None:
    from volatility3_vmssd.storage.writer import HyperVStorageWriter

    data = bytearray(good)
    # rewrite slot 0 of the root table (a file object) to point far past the end, with a valid CRC
    ent = HyperVStorageWriter._object_entry(3, 0x7FFF_0000, 0x1000, 1)
    data[0x2008 : 0x2008 + 18] = ent
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert any(f.kind == "truncated" and f.offset == 0x2008 for f in s.findings)


def test_object_table_count_larger_than_space(tmp_path: Path, good: bytes) -> None:
    data = bytearray(good)
    struct.pack_into("<I", data, 0x2004, 0xFFFFFFFF)
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert any("fit" in f.message for f in s.findings)


def test_root_object_table_missing(tmp_path: Path, good: bytes) -> None:
    with pytest.raises(TruncatedError, match="root object table"):
        HyperVStorage.open(write(tmp_path, good[:0x2004]))


def test_key_entry_size_zero_and_oversized(tmp_path: Path, good: bytes) -> None:
    path = write(tmp_path, good, "ok.vmrs")
    off = key_offsets(str(path))["/savedstate/a/b/c"]
    data = bytearray(good)
    patch_key_entry(data, off, size=0x7FFFFFFF)
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert any(f.kind == "key-table" and f.offset == off and "does not fit" in f.message for f in s.findings)
        assert s.find("/savedstate/a/b/c") is None
    with pytest.raises(FormatError):
        HyperVStorage.open(write(tmp_path, data, "s.vmrs"), strict=True)
    data = bytearray(good)
    struct.pack_into("<I", data, off + 2, 0)  # size 0 ends the table early
    with HyperVStorage.open(write(tmp_path, data, "z.vmrs")) as s:
        assert s.find("/savedstate/a/b/c") is None


def test_parent_cycle_is_reported_not_looped(tmp_path: Path, good: bytes) -> None:
    path = write(tmp_path, good, "ok.vmrs")
    offs = key_offsets(str(path))
    with HyperVStorage.open(path) as s:
        b = s.get("/savedstate/a/b")
    data = bytearray(good)
    # make /savedstate/a a child of its own child b: a <-> b form a cycle cut off from the root
    patch_key_entry(data, offs["/savedstate/a"], parent_table=b.table_index, parent_offset=b.entry_offset)
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert s.find("/savedstate/a") is None
        assert any(f.kind == "orphan" and "cycle" in f.message for f in s.findings)


def test_key_entry_crc_mismatch_is_a_finding_or_strict_error(tmp_path: Path, good: bytes) -> None:
    path = write(tmp_path, good, "ok.vmrs")
    off = key_offsets(str(path))["/configuration/properties/version"]
    data = bytearray(good)
    data[off + 21 + len("version") + 1] ^= 0x01  # flip a value bit; CRC now wrong
    with HyperVStorage.open(write(tmp_path, data)) as s:
        assert s.get("/configuration/properties/version").value == 2305
        assert any(f.kind == "crc" and f.offset == off for f in s.findings)
    with pytest.raises(ChecksumError, match=hex(off)):
        HyperVStorage.open(write(tmp_path, data, "s.vmrs"), strict=True)


def test_truncated_file_object_value(tmp_path: Path, good: bytes) -> None:
    path = write(tmp_path, good, "ok.vmrs")
    with HyperVStorage.open(path) as s:
        fo = s.get("/savedstate/RamBlock0").data_location
    assert fo is not None
    cut = write(tmp_path, good[: fo[0] + 100], "cut.vmrs")
    with HyperVStorage.open(cut) as s:
        key = s.find("/savedstate/RamBlock0")
        if key is not None:  # key tables come after file objects, so usually the key is gone too
            with pytest.raises(TruncatedError):
                key.read()
            assert len(key.read(allow_partial=True)) == 100
        assert s.findings


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutations_and_truncations_only_raise_vmssd_errors(tmp_path: Path, good: bytes, data: st.DataObject) -> None:
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(0, 8))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    path = write(tmp_path, buf, "fuzz.vmrs")
    try:
        with HyperVStorage.open(path) as s:
            for key in s.walk():
                if not key.is_node:
                    _ = key.read(allow_partial=True) if key.size < 1 << 20 else None
                    _ = key.value if key.size < 1 << 16 and not key.is_file_object else None
    except VmssdError:
        pass
