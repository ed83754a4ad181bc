"""Resource attacks of the open-cost issue, at test scale: counts checked against the file, findings aggregated.

Each test builds one kind of input of the issue's table with the tests' own writer (smaller where the
real row is tens of megabytes) and checks structure, never time: the count a field claims is
rejected against what the file can hold, what was skipped is reported, and the findings list stays
small (the first ``KEEP_PER_KIND`` verbatim, then one summary with a count).  The time and memory
of the full-size rows are measured by ``tests/fuzz/resource.py`` (printed, not asserted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from builders import write_storage
from shared_data import REPO
from test_hostile import ROOT, add_object, base, write

from volatility3_vmssd.errors import KEEP_PER_KIND, Finding, Findings, summarize
from volatility3_vmssd.memory.legacy_bin import BIN_HEADER, BIN_INDEX_ENTRY, BinFile, write_bin
from volatility3_vmssd.storage import HyperVStorage
from volatility3_vmssd.storage.defs import (
    FILE_HEADER,
    FILE_HEADER_CRC_OFFSET,
    HEADER_COPY_OFFSETS,
    KEY_ENTRY_CRC_OFFSET,
    OBJECT_TABLE_SIGNATURE,
    FileHeaderFields,
    ReplayLogHeaderFields,
    seal,
)
from volatility3_vmssd.storage.journal import ENTRIES_KEPT

KEYS = 20_000  # the row has 1,000,000; the structure is the same


def many_keys(tmp_path: Path, n: int = KEYS) -> Path:
    path = tmp_path / "many.vmrs"
    write_storage(path, {"savedstate": {f"RamBlock{i}": b"\x01" * 20 for i in range(n)}, "other": {"x": 1}})
    return path


def test_many_keys_in_one_node_are_indexed_compactly(tmp_path: Path) -> None:
    path = many_keys(tmp_path)
    with HyperVStorage.open(path) as s:
        assert s.key_count == KEYS + 3 and len(s.findings) == 0
        node = s.get("/savedstate")
        blocks = node.numbered_children("RamBlock")
        assert len(blocks) == KEYS and list(blocks.keys()[:3]) == [0, 1, 2]
        assert blocks[KEYS - 1].path == f"/savedstate/RamBlock{KEYS - 1}"
        assert s.get(f"/savedstate/ramblock{KEYS // 2}").name == f"RamBlock{KEYS // 2}"  # case-insensitive
        assert s.find("/savedstate/RamBlock007") is None and s.find(f"/savedstate/RamBlock{KEYS}") is None
        assert node.child_count == KEYS and s.get("/other/x").value == 1


def test_bad_key_crcs_are_counted_not_listed(tmp_path: Path) -> None:
    path = many_keys(tmp_path)
    with HyperVStorage.open(path) as s:
        offsets = [k.file_offset for k in s.walk() if k.name.startswith("RamBlock")]
    buf = bytearray(path.read_bytes())
    for off in offsets:
        buf[off + KEY_ENTRY_CRC_OFFSET] ^= 0xFF
    with HyperVStorage.open(write(tmp_path, buf)) as s:
        assert s.findings.tally("crc", "key-entry") == KEYS
        crc = [f for f in s.findings if f.kind == "crc"]
        assert len(crc) == KEEP_PER_KIND + 1 and crc[-1].suppressed == KEYS - KEEP_PER_KIND
        assert str(KEYS - KEEP_PER_KIND) in crc[-1].message and crc[-1].offset == offsets[KEEP_PER_KIND]
        assert len(s.get("/savedstate").numbered_children("RamBlock")) == KEYS  # read on, as before


def reseal_file_header(buf: bytearray, **changes: int) -> None:
    for at in HEADER_COPY_OFFSETS:
        fields = dataclasses.replace(FileHeaderFields.parse(buf, at), **changes)
        buf[at : at + FILE_HEADER.size] = FILE_HEADER.pack(*dataclasses.astuple(fields))
        seal(buf, FILE_HEADER_CRC_OFFSET, at, at + FILE_HEADER.size)


def test_replay_log_claiming_2_32_entries_is_bounded_by_the_file(tmp_path: Path) -> None:
    buf = base(tmp_path)
    log = FileHeaderFields.parse(buf).replay_log_offset
    buf += os.urandom(1 << 20)  # garbage "entries" as far as the claimed log reaches
    reseal_file_header(buf, replay_log_size=1 << 40, replay_log_header_size=0xFFFFFFFF)
    header = ReplayLogHeaderFields.parse(buf, log)
    buf[log : log + 34] = dataclasses.replace(header, pending_count=0xFFFFFFFF, maximum_entries=0xFFFFFFFF).pack()
    with HyperVStorage.open(write(tmp_path, buf)) as s:
        capacity = (len(buf) - log - 34) // 28
        assert any(
            f"claims {0xFFFFFFFF} pending entries" in f.message and f"holds {capacity}" in f.message for f in s.findings
        )
        info = s.replay_log
        assert info is not None and info.pending_count == capacity and info.applied_count == 0
        assert len(info.entries) == ENTRIES_KEPT
        assert s.findings.tally("journal", "journal-entry") == capacity  # every entry refused, counted
        assert len(s.findings) < 4 * KEEP_PER_KIND
        assert s.get("/a/b").value == 1


def test_chained_object_table_count_is_bounded_by_its_space(tmp_path: Path) -> None:
    buf = base(tmp_path)
    at = len(buf)
    garbage = os.urandom(1 << 20)
    buf += struct.pack("<II", OBJECT_TABLE_SIGNATURE, 0xFFFFFFFF) + garbage
    add_object(buf, 1, at, 8 + len(garbage))
    with HyperVStorage.open(write(tmp_path, buf)) as s:
        fit = len(garbage) // 18
        assert any(f"declares {0xFFFFFFFF} entries but only {fit} fit" in f.message for f in s.findings)
        assert s.findings.tally("crc", "object-entry") > fit // 2  # random entries fail their CRC
        assert len(s.findings) < 6 * KEEP_PER_KIND
        assert s.get("/a/b").value == 1


def test_root_table_count_is_bounded(tmp_path: Path) -> None:
    buf = base(tmp_path)
    struct.pack_into("<I", buf, ROOT + 4, 0xFFFFFFFF)
    buf += bytes(0x20000)  # the root table may not take more than one 64 KiB unit of it
    with HyperVStorage.open(write(tmp_path, buf)) as s:
        assert any("declares 4294967295 entries but only 3640 fit" in f.message for f in s.findings)
        assert s.findings.tally("crc", "object-entry") == 3640 - 227  # the zeros after the real page


def test_flooded_bin_name_index_costs_no_object_per_slot(tmp_path: Path) -> None:
    path = tmp_path / "flood.bin"
    write_bin(path, [(0, b"\x00" * 16), (1, b"\x00" * 16)])
    buf = bytearray(path.read_bytes())
    signature, version, unknown, _cap, index_offset, names_offset, names_size, used = BIN_HEADER.unpack_from(buf)
    first = BIN_INDEX_ENTRY.unpack_from(buf, index_offset)
    slots = 50_000
    index = BIN_INDEX_ENTRY.pack(*first) * slots  # every slot names RamBlock/0/
    names = bytes(buf[names_offset : names_offset + names_size])
    buf = buf[:index_offset] + index + names
    BIN_HEADER.pack_into(
        buf, 0, signature, version, unknown, slots, index_offset, index_offset + len(index), names_size, used
    )
    flood = write(tmp_path, buf, "flooded.bin")
    with BinFile.open(flood) as image:
        assert sorted(image.blocks) == [0] and len(image.entries) == 1
        assert image.findings.tally("bad-entry", "repeat") == slots - 1
        assert len(image.findings) == KEEP_PER_KIND + 1


def test_findings_aggregate_per_kind_and_group() -> None:
    f = Findings()
    for i in range(1000):
        f.add("x", i, "crc", f"entry {i} fails", group="entry")
    f.add("x", 5000, "crc", "header fails")  # another group of the same kind is not swallowed
    kept = [x for x in f if not x.suppressed]
    assert len(f) == KEEP_PER_KIND + 2 and len(kept) == KEEP_PER_KIND + 1
    assert kept[-1].message == "header fails"
    summary = next(x for x in f if x.suppressed)
    assert summary.suppressed == 1000 - KEEP_PER_KIND and summary.offset == KEEP_PER_KIND
    assert f"{KEEP_PER_KIND:#x} to {999:#x}" in summary.message
    lines = summarize(f, per_kind=3)
    assert lines[:3] == [str(x) for x in kept[:3]]
    assert lines[-1].startswith("[crc] ... and") and f"{1000 - 3 + 1} more" in lines[-1]
    assert f.tally("crc", "entry") == 1000 and f.suppressed == 1000 - KEEP_PER_KIND
    assert Finding("x", 1, "crc", "m").to_json()["suppressed"] == 0


def test_vmssd_info_prints_aggregated_findings_and_the_full_list_as_json(tmp_path: Path) -> None:
    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.vmrs.writer import write_fill_vmrs

    path = tmp_path / "fill.vmrs"
    state = state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"efer": "0xd01"}}}]})
    write_fill_vmrs(path, 2 << 30, state, holes=())
    with HyperVStorage.open(path) as s:
        offsets = [k.file_offset for k in s.get("/savedstate").numbered_children("RamBlock").values()]
    buf = bytearray(path.read_bytes())
    for off in offsets:
        buf[off + KEY_ENTRY_CRC_OFFSET] ^= 0xFF
    bad = write(tmp_path, buf, "bad.vmrs")
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "info"]
    text = subprocess.run([*cmd, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    lines = [line for line in text.stdout.splitlines() if line.startswith("  [crc]")]
    assert len(lines) == 4 and f"and {len(offsets) - 3} more" in lines[-1]
    assert f"Findings               {len(offsets)}" in text.stdout
    full = subprocess.run([*cmd, "--findings-json", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=120)
    kept = json.loads(full.stdout)
    crc = [f for f in kept if f["kind"] == "crc"]
    assert len(crc) == KEEP_PER_KIND + 1 and crc[-1]["suppressed"] == len(offsets) - KEEP_PER_KIND


def test_distinct_unknown_chunk_ids_share_one_bucket() -> None:
    from fuzz.resource import _partition_state_with

    from volatility3_vmssd.cpu.chunkparser import MAX_DISTINCT_IDS, parse_partition_state
    from volatility3_vmssd.cpu.chunks import VM_SAVE_CHUNK_HEADER

    n = 20_000
    blob = _partition_state_with(b"".join(VM_SAVE_CHUNK_HEADER.pack(0x7000_0000 + i, 0) for i in range(n)))
    findings = Findings()
    state = parse_partition_state(blob, path="ps", findings=findings)
    assert len(state.chunk_counts) <= MAX_DISTINCT_IDS + 1 and state.chunk_counts[-1] > n - MAX_DISTINCT_IDS
    assert findings.tally("unknown-chunk") <= MAX_DISTINCT_IDS + 1  # one per id kept, one bucket
    assert any("further ids" in f.message and f"{n - MAX_DISTINCT_IDS} occurrences" in f.message for f in findings)
    assert len(findings) < 2 * KEEP_PER_KIND


def test_vp_markers_beyond_the_vp_limit_are_not_kept() -> None:
    from fuzz.resource import _partition_state_with

    from volatility3_vmssd.cpu.chunkparser import parse_partition_state
    from volatility3_vmssd.cpu.chunks import MAX_VP_BITMAP_BYTES, VM_SAVE_CHUNK_HEADER, ChunkId

    n = 10_000
    one = VM_SAVE_CHUNK_HEADER.pack(ChunkId.VP, 16)
    blob = _partition_state_with(b"".join(one + struct.pack("<I12x", i) for i in range(1, n)))
    findings = Findings()
    state = parse_partition_state(blob, path="ps", findings=findings)
    assert len(state.vps) == MAX_VP_BITMAP_BYTES * 8
    assert any(f.kind == "vp-indices" and f"{n - MAX_VP_BITMAP_BYTES * 8} occurrences" in f.message for f in findings)
