"""Issue 14: every legitimate block form on the fast path, raw blocks as file reads, fragmented maps;
issue 18 item 1: a range's backed extent is what its RamBlocks hold.

Nothing here is timed: the benchmark harness measures the speed; these prove what each read costs
(which path served a block) and that the bytes are right.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from blockforms import INLINE_BELOW, write_every_form_vmrs, write_raw_vmrs
from shared_data import REPO

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.errors import Findings, UnmappedAddressError
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.memory import guestmemory
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE
from volatility3_vmssd.memory.pagedecode import decode_block_bytes
from volatility3_vmssd.memory.ramblock import encode_block, index_block
from volatility3_vmssd.memory.rammap import FLAG_HOT_ADDED, FLAG_VTL2_MB, RamMap, RamMemoryBlockRecord
from volatility3_vmssd.storage.writer import HyperVStorageWriter

MIB = 1 << 20
STATE = state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"efer": "0xd01", "cr0": "0x11"}}}]})
HOLES = [(0xA0000, 0x100000)]


def synthetic_ram(path: Path, mib: int, seed: int) -> None:
    """Zero, patterned, text-like and random pages, so that every record kind occurs; 2 MiB in 8 are
    free (zero), so some blocks are small enough to be stored inline."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(64)]
    with open(path, "wb") as fh:
        for n in range(mib * 256):
            r = 0.0 if (n >> 9) % 4 == 2 else rng.random()
            if r < 0.45:
                page = bytes(PAGE_SIZE)
            elif r < 0.55:
                page = rng.randbytes(8) * 512
            elif r < 0.85:
                buf = bytearray()
                while len(buf) < PAGE_SIZE:
                    buf += rng.choice(words) + bytes(rng.randrange(0, 24))
                page = bytes(buf[:PAGE_SIZE])
            else:
                page = rng.randbytes(PAGE_SIZE)
            fh.write(page)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("forms") / "ram.raw"
    synthetic_ram(path, 24, seed=3)
    return path


def read_all(p: SavedStateProvider, chunk: int = 16 * MIB, pad: bool = False) -> list[tuple[int, bytes]]:
    read = p.read_guest_physical_address_padded if pad else p.read_guest_physical_address
    out = []
    for start, count in p.get_guest_physical_memory_chunks()[1]:
        gpa, end = start * PAGE_SIZE, (start + count) * PAGE_SIZE
        while gpa < end:
            n = min(chunk, end - gpa)
            out.append((gpa, read(gpa, n)))
            gpa += n
    return out


# ------------------------------------------------------------------------------------ every form
@pytest.mark.parametrize("seed", [1, 2])
def test_every_record_form_is_served_by_the_fast_walk(image_path: Path, tmp_path: Path, seed: int) -> None:
    vmrs = tmp_path / "forms.vmrs"
    with MemoryImage.open(image_path) as image:
        forms = write_every_form_vmrs(vmrs, image, STATE, holes=HOLES, seed=seed)
        # The file really holds every form (a builder that drifted would make this test vacuous).
        names = " | ".join(forms)
        for form in ("early end", "variable runs", "mixed fills", "raw 1 MiB", "no end marker", "inline"):
            assert form in names, (form, forms)
        with SavedStateProvider.load_vmrs(vmrs) as p:
            memory = p.memory
            reads = read_all(p)
            assert memory.blocks_careful == 0, "a sound block took the careful path"
            assert memory.blocks_decoded > 0 and p.findings() == []
            for gpa, data in reads:
                assert data == image.read(gpa, len(data)), hex(gpa)
            # The careful path (index, then page by page) gives the same bytes, block by block.
            source = memory.source
            for n in sorted(source.block_numbers()):
                value = source.read_block_value(n)
                if len(value) == BLOCK_SIZE:
                    continue
                index = index_block(
                    value, path=str(vmrs), file_offset=0, findings=Findings(), needed=memory.ram_map.block_extent(n)
                )
                careful = decode_block_bytes(value, index)
                fast = memory._load_many([n])[n]
                got = fast.data if fast.data is not None else b"".join(fast.pages)  # type: ignore[arg-type]
                assert got == careful, n
            assert memory.blocks_careful == 0


def test_a_damaged_block_still_takes_the_careful_path_and_is_reported(image_path: Path, tmp_path: Path) -> None:
    vmrs = tmp_path / "forms.vmrs"
    with MemoryImage.open(image_path) as image:
        write_every_form_vmrs(vmrs, image, STATE, holes=HOLES, seed=1)
    with SavedStateProvider.load_vmrs(vmrs) as p:
        source = p.memory.source
        victim = next(
            n for n in sorted(source.block_numbers()) if INLINE_BELOW < len(source.read_block_value(n)) < BLOCK_SIZE
        )
        location = source.block_location(victim)
        assert location is not None
    data = bytearray(vmrs.read_bytes())
    data[location[0] : location[0] + 4] = struct.pack("<I", 0x12345678)  # an unknown tag as the first record
    damaged = tmp_path / "damaged.vmrs"
    damaged.write_bytes(bytes(data))
    with SavedStateProvider.load_vmrs(damaged) as p:
        read_all(p, pad=True)
        assert p.memory.blocks_careful == 1
        assert [f.offset for f in p.findings() if f.kind == "bad-record"] == [location[0]]


def test_early_end_before_a_needed_page_is_a_finding() -> None:
    """An end marker is a legitimate way to close a range only after the pages the map uses."""
    records = [RamMemoryBlockRecord(300, 0, 0)]  # block 1 must provide 44 pages
    blocks = {0: encode_block(bytes(BLOCK_SIZE)), 1: encode_block(b"\x01" * BLOCK_SIZE, pages=40)}
    memory = guestmemory.GuestMemory(RamMap(records), guestmemory.InMemoryBlockSource(blocks))
    assert memory.ram_map.block_extent(1) == 44
    data = memory.read_gpa_padded(0, 300 * PAGE_SIZE)
    assert data[MIB : MIB + 40 * PAGE_SIZE] == b"\x01" * (40 * PAGE_SIZE) and not any(data[MIB + 40 * PAGE_SIZE :])
    assert memory.blocks_careful == 1 and [f.kind for f in memory.findings] == ["truncated"]
    enough = {0: blocks[0], 1: encode_block(b"\x01" * BLOCK_SIZE, pages=44)}
    memory = guestmemory.GuestMemory(RamMap(records), guestmemory.InMemoryBlockSource(enough))
    assert memory.read_gpa(0, 300 * PAGE_SIZE)[MIB:] == b"\x01" * (44 * PAGE_SIZE)
    assert memory.blocks_careful == 0 and memory.findings == []


# ------------------------------------------------------------------------------------ raw blocks
def test_raw_blocks_are_one_file_read_handed_out_without_a_copy(
    image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmrs = tmp_path / "raw.vmrs"
    with MemoryImage.open(image_path) as image:
        write_raw_vmrs(vmrs, image, STATE, holes=HOLES)
        spans: list[tuple[int, int, bytes]] = []
        with SavedStateProvider.load_vmrs(vmrs) as p:
            real = p.memory.source.read_span

            def spy(offset: int, size: int) -> bytes:
                data = real(offset, size)
                spans.append((offset, size, data))
                return data

            monkeypatch.setattr(p.memory.source, "read_span", spy)
            second = p.get_guest_physical_memory_chunks()[1][1]  # 1 MiB .. 24 MiB, blocks 1.. back to back
            gpa = second[0] * PAGE_SIZE
            data = p.read_guest_physical_address(gpa, 16 * MIB)
            assert data == image.read(gpa, 16 * MIB)
            assert len(spans) == 1 and data is spans[0][2], "not one read handed out as it is"
            assert p.memory.blocks_decoded == 0 and p.memory.cached_blocks == []
            for gpa, data in read_all(p):
                assert data == image.read(gpa, len(data))
            assert p.memory.blocks_careful == 0 and p.findings() == []


def test_a_cut_raw_block_falls_back_to_the_block_path(image_path: Path, tmp_path: Path) -> None:
    vmrs = tmp_path / "raw.vmrs"
    with MemoryImage.open(image_path) as image:
        write_raw_vmrs(vmrs, image, STATE, holes=HOLES)
    cut = tmp_path / "cut.vmrs"
    cut.write_bytes(vmrs.read_bytes()[: -MIB // 2])
    with SavedStateProvider.load_vmrs(cut) as p:
        chunks = p.get_guest_physical_memory_chunks()[1]
        start, count = chunks[-1]
        end = (start + count) * PAGE_SIZE
        data = p.read_guest_physical_address_padded(end - 4 * MIB, 4 * MIB)
        assert len(data) == 4 * MIB and not any(data[-MIB // 2 :])
        assert any(f.kind == "truncated" for f in p.findings())


# ------------------------------------------------------------------------------------ fragmented maps
def write_fragmented(
    path: Path, count: int, *, reverse: bool = False, flags_every: int = 3
) -> list[RamMemoryBlockRecord]:
    """``count`` RamMemoryBlocks of one page each, 2 pages apart in GPA, all in RamBlock 0 ... count-1."""
    records = [
        RamMemoryBlockRecord(
            1,
            n * 256,
            2 * n,
            flags=(FLAG_HOT_ADDED | FLAG_VTL2_MB) if n % flags_every == 0 else 0,
            key=f"/savedstate/RamMemoryBlock{n}",
        )
        for n in range(count)
    ]
    fill = encode_block(bytes(BLOCK_SIZE))
    with HyperVStorageWriter(path) as w:
        w.set("/savedstate/VmVersion", 0x0900)
        order = reversed(range(count)) if reverse else range(count)
        for n in order:
            w.set(f"/savedstate/RamMemoryBlock{n}", records[n].build())
            w.set(f"/savedstate/RamBlock{n}", fill)
    return records


@pytest.mark.parametrize("reverse", [False, True])
def test_ten_thousand_ram_memory_blocks_open_without_decoding(tmp_path: Path, reverse: bool) -> None:
    vmrs = tmp_path / "fragmented.vmrs"
    records = write_fragmented(vmrs, 10_000, reverse=reverse)
    with SavedStateProvider.load_vmrs(vmrs) as p:
        chunks = p.get_guest_physical_memory_chunks()[1]
        assert [(c.guest_physical_start_page_index, c.page_count) for c in chunks] == [
            (r.gpa_index_start, 1) for r in records
        ]
        assert p.memory.blocks_decoded == 0 and p.memory.blocks_indexed == 0
        mm = p.memory_map()
        assert [m.flags for m in mm[:4]] == [FLAG_HOT_ADDED | FLAG_VTL2_MB, 0, 0, FLAG_HOT_ADDED | FLAG_VTL2_MB]
        assert p.guest_physical_address_to_raw_saved_memory_offset(2 * 7777 * PAGE_SIZE + 5) == 7777 * MIB + 5
        with pytest.raises(UnmappedAddressError):
            p.read_guest_physical_address((2 * 7777 + 1) * PAGE_SIZE, 8)
        assert p.memory.blocks_decoded == 0


def test_ram_map_overlap_rule_is_kept_whatever_the_order() -> None:
    """The first record in file order wins an overlap, also when later ones sort before it."""
    records = [RamMemoryBlockRecord(10, 1000, 100), RamMemoryBlockRecord(10, 0, 95), RamMemoryBlockRecord(5, 50, 90)]
    findings = Findings()
    ram_map = RamMap(records, findings=findings)
    assert ram_map.records == (records[2], records[0])
    assert [f.kind for f in findings] == ["ram-map"]
    many = [RamMemoryBlockRecord(1, 2 * n, 3 * n) for n in range(5000)]
    for order in (many, many[::-1], random.Random(4).sample(many, len(many))):
        assert RamMap([*order, RamMemoryBlockRecord(1, 10**6, 3 * 4321)]).records == tuple(many)


def test_memmap_shows_the_flags(tmp_path: Path) -> None:
    vmrs = tmp_path / "fragmented.vmrs"
    write_fragmented(vmrs, 4)
    r = subprocess.run(
        [sys.executable, "-m", "volatility3_vmssd.cli.main", "memmap", str(vmrs), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert [m["flags"] for m in json.loads(r.stdout)] == [5, 0, 0, 5]
    r = subprocess.run(
        [sys.executable, "-m", "volatility3_vmssd.cli.main", "memmap", str(vmrs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("IsHotAdded") == 2 and r.stdout.count("IsVtl2Mb") == 2


# ------------------------------------------------------------------------------------ issue 18 item 1
def write_declared_huge(path: Path, pages: int) -> bytes:
    """One RamMemoryBlock declaring ``pages`` pages from GPA 0, one RamBlock present: the fuzz finding."""
    block = (b"banner Linux version 6.1 " + bytes(100)) * (BLOCK_SIZE // 125) + bytes(BLOCK_SIZE % 125)
    with HyperVStorageWriter(path) as w:
        w.set("/savedstate/VmVersion", 0x0900)
        w.set("/savedstate/RamMemoryBlock0", RamMemoryBlockRecord(pages, 0, 0).build())
        w.set("/savedstate/RamBlock0", encode_block(block))
    return block


def test_declared_ram_is_bounded_by_its_ramblocks(tmp_path: Path) -> None:
    huge = tmp_path / "huge.vmrs"
    block = write_declared_huge(huge, 1 << 40)
    with SavedStateProvider.load_vmrs(huge) as p:
        assert [tuple(c) for c in p.get_guest_physical_memory_chunks()[1]] == [(0, 256)]
        assert p.memory.ram_map.maximum_gpa == MIB - 1
        assert p.get_guest_raw_saved_memory_size() == MIB
        assert [r.as_dict() for r in p.memory_map()] == [
            {"gpa_start": 0, "size": MIB, "raw_offset": 0, "first_ramblock": 0, "last_ramblock": 0}
            | {"ramblocks_present": 1, "flags": 0}
        ]
        [finding] = [f for f in p.findings() if f.kind == "missing-block"]
        assert f"GPA 0x100000-{(1 << 52) - 1:#x}" in finding.message and "capped" in finding.message
        assert p.read_guest_physical_address(0, 2 * MIB) == block
        with pytest.raises(UnmappedAddressError):
            p.read_guest_physical_address(MIB, 8)


def test_a_layer_over_the_huge_file_maps_only_the_present_block(tmp_path: Path) -> None:
    pytest.importorskip("volatility3")
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    from volatility3_vmssd.volatility.layer import HyperVSavedStateLayer

    huge = tmp_path / "huge.vmrs"
    write_declared_huge(huge, 1 << 40)
    ctx = contexts.Context()
    ctx.config["base.location"] = huge.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["hv.base_layer"] = "base"
    layer = HyperVSavedStateLayer(ctx, "hv", "hv")
    assert layer.maximum_address == MIB - 1
    assert [m[:4] for m in layer.mapping(0, 1 << 52, ignore_errors=True)] == [(0, MIB, 0, MIB)]


@pytest.mark.slow
def test_convert_of_the_huge_file_finishes_and_reports_the_absent_range(tmp_path: Path) -> None:
    huge = tmp_path / "huge.vmrs"
    block = write_declared_huge(huge, 1 << 40)
    out = tmp_path / "out.raw"
    r = subprocess.run(
        [sys.executable, "-m", "volatility3_vmssd.cli.main", "convert", str(huge), "-o", str(out), "--format", "raw"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:MIB] == block and out.stat().st_size == MIB
    assert "no RamBlock in the file" in r.stderr + r.stdout
