"""Saved states written by Microsoft's openvmm writer (``../shared/data/openvmm``), read exactly.

Every file there is read through ``lzma``: every qword of RAM must equal the pattern its README states,
every register of ``<name>.regs.json`` must come back from the provider and from ``vmssd registers
--json``, VTL by VTL, and the RAM map (holes, raw offsets) must follow openvmm's layout rule.  A file that
``vmssd create --raw-blocks`` writes from the same content must have the same structure as openvmm's.
The format facts these files show are in docs/format.md#openvmm-files.
"""

from __future__ import annotations

import array
import json
import lzma
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from shared_data import REPO, SHARED, need

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.chunkparser import parse_partition_state
from volatility3_vmssd.cpu.chunks import VID_SAVED_STATE_DESCRIPTOR, VM_SAVE_CHUNK_HEADER, ChunkId
from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.cpu.cpumode import paging_levels
from volatility3_vmssd.cpu.registers import Architecture, PagingMode, PrologVendor
from volatility3_vmssd.errors import Findings, NotFoundError, VmssdError
from volatility3_vmssd.storage import HyperVStorage

OPENVMM = SHARED / "data" / "openvmm"
CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PAGE, BLOCK = 4 * KIB, MIB
PATTERN_TAG = 0xA5 << 56  # the qword at GPA g holds g | 0xA5 << 56 (data README)

# The content the data README gives for each file: its guest RAM ranges as (GPA, length).  These are the
# writer's inputs, not results: the tests derive everything else (blocks, offsets, holes) from them.
RANGES: dict[str, list[tuple[int, int]]] = {
    "x64_2vp": [(0, 16 * MIB)],
    "x64_holes": [(0, 640 * KIB), (1 * MIB, 6 * MIB), (4 * GIB, 1 * MIB + 4 * KIB)],
    "arm64": [(1 * GIB, 2 * MIB)],
}
NAMES = sorted(RANGES)


def openvmm_layout(ranges: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(GPA, length, MbpIndexStart) per range by openvmm's rule: each range starts on a fresh 1 MiB block."""
    out, block = [], 0
    for gpa, length in ranges:
        out.append((gpa, length, block * (BLOCK // PAGE)))
        block += -(-length // BLOCK)
    return out


def pattern(gpa: int, length: int) -> bytes:
    """The writer's RAM: the little-endian qword at GPA g is g | (0xA5 << 56) (GPAs stay below bit 56)."""
    return array.array("Q", range(gpa | PATTERN_TAG, (gpa + length) | PATTERN_TAG, 8)).tobytes()


def first_bad_qword(data: bytes, expected: bytes) -> int | None:
    if data == expected:
        return None
    return next(i for i in range(0, min(len(data), len(expected)), 8) if data[i : i + 8] != expected[i : i + 8])


def vmssd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO)


@pytest.fixture(scope="session")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every ``*.vmrs.xz`` of the openvmm folder, decompressed once per session (they are small)."""
    need(OPENVMM)
    found = sorted(p.name.removesuffix(".vmrs.xz") for p in OPENVMM.glob("*.vmrs.xz"))
    assert found == NAMES, f"the openvmm folder holds {found}; this test knows {NAMES} (update RANGES)"
    folder = tmp_path_factory.mktemp("openvmm")
    out = {}
    for name in NAMES:
        out[name] = folder / f"{name}.vmrs"
        with lzma.open(OPENVMM / f"{name}.vmrs.xz") as fin, open(out[name], "wb") as fout:
            shutil.copyfileobj(fin, fout, 4 * MIB)
    return out


def regs_json(name: str) -> dict[str, Any]:
    return json.loads(need(OPENVMM / f"{name}.regs.json").read_text())


def chunk_stream(blob: bytes) -> list[tuple[int, int, int]]:
    """(offset, ChunkId, DataLength) of every chunk up to and including the Epilog."""
    _, header_size, total = VID_SAVED_STATE_DESCRIPTOR.unpack_from(blob)
    pos, out = header_size + 16, []
    while pos + VM_SAVE_CHUNK_HEADER.size <= total:
        cid, length = VM_SAVE_CHUNK_HEADER.unpack_from(blob, pos)
        out.append((pos, cid, length))
        if cid == ChunkId.EPILOG:
            break
        pos += VM_SAVE_CHUNK_HEADER.size + length
    return out


# ------------------------------------------------------------------------------------------ RAM
@pytest.mark.parametrize("name", NAMES)
def test_every_qword_of_ram_equals_the_pattern(unpacked: dict[str, Path], name: str) -> None:
    with SavedStateProvider.load_vmrs(unpacked[name]) as p:
        assert p.findings() == []
        page_size, chunks = p.get_guest_physical_memory_chunks()
        assert page_size == PAGE
        got = [(c.guest_physical_start_page_index * PAGE, c.page_count * PAGE) for c in chunks]
        assert got == RANGES[name]
        for gpa, length in RANGES[name]:
            for off in range(0, length, 4 * MIB):
                size = min(4 * MIB, length - off)
                data = p.read_guest_physical_address(gpa + off, size)
                assert len(data) == size, f"{name}: short read at GPA {gpa + off:#x}"
                bad = first_bad_qword(data, pattern(gpa + off, size))
                assert bad is None, f"{name}: qword at GPA {gpa + off + bad:#x} is wrong"


@pytest.mark.parametrize("name", NAMES)
def test_holes_and_raw_offsets_follow_openvmm_layout(unpacked: dict[str, Path], name: str) -> None:
    layout = openvmm_layout(RANGES[name])
    blocks = sum(-(-length // BLOCK) for _, length, _ in layout)
    with SavedStateProvider.load_vmrs(unpacked[name]) as p:
        assert p.get_guest_raw_saved_memory_size() == blocks * BLOCK  # every RamBlock a full 1 MiB
        for gpa, length, mbp in layout:
            raw = mbp * PAGE
            for off in (0, PAGE, length - PAGE):
                assert p.guest_physical_address_to_raw_saved_memory_offset(gpa + off + 8) == raw + off + 8
            # The raw stream holds the range's bytes at its MbpIndexStart ...
            assert p.read_guest_raw_saved_memory(raw, PAGE) == pattern(gpa, PAGE)
            # ... and the zero padding up to the end of its last block, which maps to no GPA.
            pad = -length % BLOCK
            if pad:
                assert p.read_guest_raw_saved_memory(raw + length, pad) == bytes(pad)
            end = gpa + length
            if all(not s <= end < s + n for s, n in RANGES[name]):
                with pytest.raises(NotFoundError):
                    p.guest_physical_address_to_raw_saved_memory_offset(end)
                with pytest.raises(VmssdError):
                    p.read_guest_physical_address(end, 8)
                # A read running into the hole stops there; the padded read fills the hole with zeros.
                assert len(p.read_guest_physical_address(end - 8, 16)) == 8
                padded = p.read_guest_physical_address_padded(end - 8, 16)
                assert padded[:8] == pattern(end - 8, 8) and padded[8:] == bytes(8)
    with HyperVStorage.open(unpacked[name]) as storage:
        for i, (gpa, length, mbp) in enumerate(layout):
            record = storage.get(f"/savedstate/RamMemoryBlock{i}").read()
            assert struct.unpack_from("<IIQQQ", record) == (3, 0, length // PAGE, mbp, gpa // PAGE)
        assert storage.find(f"/savedstate/RamMemoryBlock{len(layout)}") is None


# ------------------------------------------------------------------------------------------ registers
def banks_by_vp(doc: dict[str, Any]) -> dict[int, dict[int, dict[str, Any]]]:
    state = state_from_json(doc)
    return {vp.index: vp.registers for vp in state.vps}


@pytest.mark.parametrize("name", NAMES)
def test_every_register_equals_regs_json_vtl_by_vtl(unpacked: dict[str, Path], name: str) -> None:
    doc = regs_json(name)
    want = banks_by_vp(doc)
    with SavedStateProvider.load_vmrs(unpacked[name]) as p:
        assert p.vp_count() == len(want)
        assert p.get_guest_os_info().value == int(doc["guest_os_id"], 16)
        for vp, banks in want.items():
            assert p.get_virtual_trust_levels(vp) == sorted(banks)
            assert p.get_active_virtual_trust_level(vp) == 0
            for vtl, bank in banks.items():
                # Equal as dicts: nothing missing, and nothing the file does not hold (no invented PC/CPSR).
                assert p.get_registers(vp, vtl) == bank, f"{name} VP {vp} VTL {vtl}"


@pytest.mark.parametrize("name", NAMES)
def test_vmssd_registers_json_equals_regs_json(unpacked: dict[str, Path], name: str) -> None:
    run = vmssd("registers", "--json", unpacked[name])
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    doc = regs_json(name)
    assert banks_by_vp(out) == banks_by_vp(doc)
    assert (out["vendor"], int(out["guest_os_id"], 16)) == (doc["vendor"], int(doc["guest_os_id"], 16))


def test_arm64_shows_what_is_saved_and_no_pc_or_cpsr(unpacked: dict[str, Path]) -> None:
    with SavedStateProvider.load_vmrs(unpacked["arm64"]) as p:
        regs = p.get_registers(0)
        assert "pc" not in regs and "cpsr" not in regs
        assert p.get_architecture(0) is Architecture.ARMV8 and p.get_paging_mode(0) is PagingMode.ARMV8
        # TCR_EL1 0x35b5103510: T1SZ 16 (48-bit kernel VAs), TG1 = 2 (4 KiB granule) -> 4 levels of 9 bits.
        assert regs["tcr_el1"] == 0x35B5103510
        assert p.get_paging_levels(0) == paging_levels(regs, PrologVendor.ARM) == 4
    run = vmssd("registers", unpacked["arm64"])
    assert run.returncode == 0, run.stderr
    names = {line.split()[0] for line in run.stdout.splitlines() if line.startswith("  ")}
    assert "tcr_el1" in names and "x28" in names and not names & {"pc", "cpsr"}


# ------------------------------------------------------------------------------------------ chunk stream
@pytest.mark.parametrize("name", NAMES)
def test_chunk_stream_shows_what_the_readme_says(unpacked: dict[str, Path], name: str) -> None:
    """PartitionVtl and VP VTL markers on a VTL0-only VM, a 12-byte VpIndices, no padding after it."""
    with HyperVStorage.open(unpacked[name]) as storage:
        blob = storage.get("/savedstate/savedVM/partition_state").read()
        assert storage.find("/savedstate/type") is None
    findings = Findings()
    state = parse_partition_state(blob, path=name, findings=findings)
    assert list(findings) == []
    stream = chunk_stream(blob)
    ids = [cid for _, cid, _ in stream]
    assert ids.count(ChunkId.PARTITION_VTL) == 1 and state.partition_vtls == [0]
    assert ids.count(ChunkId.VP_VTL) == ids.count(ChunkId.VP) == state.vp_count
    assert ChunkId.VP_VTL_CONTROL_PAGE not in ids  # one VTL per VP
    for i, cid in enumerate(ids):
        if cid == ChunkId.VP:
            assert ids[i + 1] == ChunkId.VP_VTL
    (indices,) = [(pos, length) for pos, cid, length in stream if cid == ChunkId.VP_INDICES]
    assert indices[1] == 12
    assert all(pos % 16 == 4 for pos, _, _ in stream if pos > indices[0])


# ------------------------------------------------------------------------------------------ our writer
def write_lime(path: Path, ranges: list[tuple[int, int]]) -> Path:
    """A LiME image of the README's content: the pattern over every range (built here, not read back)."""
    with open(path, "wb") as fh:
        for gpa, length in ranges:
            fh.write(struct.pack("<IIQQ8x", 0x4C694D45, 1, gpa, gpa + length - 1))
            fh.write(pattern(gpa, length))
    return path


def structure(path: Path) -> tuple[dict[str, str], list[tuple[int, int]], bytes, dict[str, bytes]]:
    """(key -> type, partition_state (id, DataLength) list, partition_state bytes, RamBlock bytes by key)."""
    with HyperVStorage.open(path) as storage:
        keys = {k.path: k.type_label for k in storage.walk() if not k.is_node}
        blob = storage.get("/savedstate/savedVM/partition_state").read()
        blocks = {k: storage.get(k).read() for k in keys if "/RamBlock" in k}
    return keys, [(cid, length) for _, cid, length in chunk_stream(blob)], blob, blocks


@pytest.mark.parametrize("name", NAMES)
def test_vmssd_create_raw_blocks_has_openvmm_structure(unpacked: dict[str, Path], tmp_path: Path, name: str) -> None:
    lime = write_lime(tmp_path / f"{name}.lime", RANGES[name])
    ours = tmp_path / f"{name}.vmrs"
    run = vmssd(
        "create", "--raw-blocks", "--vm-version", "10.0", "--jobs", "1",
        "--memory", lime, "--registers", OPENVMM / f"{name}.regs.json", "-o", ours,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    our_keys, our_chunks, our_blob, our_blocks = structure(ours)
    their_keys, their_chunks, their_blob, their_blocks = structure(unpacked[name])
    assert our_keys == their_keys  # the same key set and value types
    assert our_chunks == their_chunks  # the same chunk order and chunk sizes
    assert our_blob == their_blob  # and, for the same registers, the same bytes
    assert {k: len(v) for k, v in our_blocks.items()} == {k: BLOCK for k in their_blocks}
    assert our_blocks == their_blocks
    with HyperVStorage.open(ours) as mine, HyperVStorage.open(unpacked[name]) as theirs:
        for key in ("/savedstate/VmVersion", "/configuration/properties/version"):
            assert mine.get(key).value == theirs.get(key).value
