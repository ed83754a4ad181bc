"""The public provider API: the crate's integration tests ported, the real Linux guest, synthetic cases."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest
from builders import add_journal_entries
from shared_data import BIOS_ROM, LOW_HOLE

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.chunkwriter import build_partition_state
from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.cpu.cpustate import PartitionState, VpState
from volatility3_vmssd.cpu.registers import Architecture, PagingMode, PrologVendor, SegmentRegister
from volatility3_vmssd.cpu.translate import translate
from volatility3_vmssd.errors import FormatError, NotFoundError, UnmappedAddressError
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.memory.rammap import RamMemoryBlockRecord
from volatility3_vmssd.provider import open_saved_state
from volatility3_vmssd.storage import HyperVStorage, HyperVStorageWriter
from volatility3_vmssd.vmrs.writer import write_bin_vsv, write_vmrs

# --------------------------------------------------------------------------- the crate's tests
# rafawo/vmsavedstatetodump-rs tests/integration_test.rs expectations, measured by the DLL on the
# same test VM (see ../shared/data/real/README.md).


def crate_vsv(path: Path) -> None:
    """A .vsv for test_file.bin carrying what the crate's tests expect of CPU state: 4 VPs, x86,
    32-bit paging, ECX = 4 on VP0 (0 elsewhere). The real .vsv could not be recovered (§5.2)."""
    vps = []
    for i in range(4):
        regs = {"cr0": 0x80000011, "cr4": 0, "efer": 0, "cr3": 0x1000, "rcx": 4 if i == 0 else 0}
        vps.append(VpState(index=i, registers={0: regs}))
    state = PartitionState(processor_vendor=PrologVendor.INTEL, partition_vtls=[0], vps=vps)
    with HyperVStorageWriter(path) as w:
        w.set("/configuration/properties/version", 0x0500)
        w.set("/savedVM/partition_state", build_partition_state(state))
        w.set("/RamMemoryBlock/0", RamMemoryBlockRecord(64512, 0, 0).build())


def test_crate_expectations_on_real_bin(real_dir: Path, tmp_path: Path) -> None:
    bin_path = tmp_path / "test_file.bin"
    shutil.copyfile(real_dir / "test_file.bin", bin_path)
    crate_vsv(tmp_path / "test_file.VSV")  # partner found beside it, extension in another case
    with open_saved_state(bin_path) as p:
        assert p.kind == "bin+vsv"
        assert p.get_guest_physical_memory_chunks() == (4096, [(0, 64512)])
        assert p.get_guest_raw_saved_memory_size() == 264_241_152
        assert p.guest_physical_address_to_raw_saved_memory_offset(0xC0FFE) == 0xC0FFE
        assert struct.unpack("<3I", p.read_guest_physical_address(0xC0FFE, 12)) == (75826887, 1235222542, 3439375364)
        assert p.vp_count() == 4
        assert p.get_architecture(0) == Architecture.X86
        assert p.get_paging_mode(0) == PagingMode.BIT32
        assert [p.get_register_value(i, "RCX") for i in range(4)] == [4, 0, 0, 0]
        with pytest.raises(UnmappedAddressError):
            p.guest_virtual_to_physical(0, 0x80001000)  # no page tables in that guest
        total = 0
        step = 1 << 20
        while total < p.get_guest_raw_saved_memory_size():
            total += len(p.read_guest_raw_saved_memory(total, step))
        assert total == p.get_guest_raw_saved_memory_size()
        assert p.read_guest_raw_saved_memory(total, step) == b""  # a short read marks the end, as in the DLL


def test_bin_alone_serves_memory_and_says_cpu_state_is_missing(real_dir: Path) -> None:
    with SavedStateProvider.load_bin(real_dir / "test_file.bin") as p:
        assert p.vp_count() == 0
        assert any(f.kind == "no-cpu-state" for f in p.findings())
        assert struct.unpack("<I", p.read_guest_physical_address(0xC0FFE, 4))[0] == 75826887
        with pytest.raises(NotFoundError):
            p.get_registers(0)
        assert p.memory.blocks_decoded == 1


def test_unsupported_vsv_container_still_serves_memory(real_dir: Path, tmp_path: Path) -> None:
    vsv = tmp_path / "x.vsv"
    vsv.write_bytes(b"\x03\x20\x18\x02" + bytes(4092))  # not HyperVStorage
    with SavedStateProvider.load_bin_vsv(real_dir / "test_file.bin", vsv) as p:
        assert any("unsupported legacy .vsv container" in f.message for f in p.findings())
        assert p.read_guest_physical_address(0xC0FFE, 4) == struct.pack("<I", 75826887)


def test_runtime_state_vmrs_without_memory(real_dir: Path) -> None:
    with SavedStateProvider.load_vmrs(real_dir / "test.VMRS") as p:
        assert p.vp_count() == 0 and p.get_guest_physical_memory_chunks() == (4096, [])
        assert any(f.kind == "no-memory" for f in p.findings())
        assert p.summary().vm_version == "9.0"


# --------------------------------------------------------------------------- the real Linux guest
@pytest.mark.parametrize("holes", [[BIOS_ROM], [LOW_HOLE, BIOS_ROM]], ids=["plain", "split"])
def test_linux_guest_round_trip(guest_elf: Path, guest_registers: dict, tmp_path: Path, holes: list) -> None:
    out = tmp_path / "guest.vmrs"
    with MemoryImage.open(guest_elf) as image:
        state = state_from_json(guest_registers)
        write_vmrs(out, image, state, holes=holes, jobs=2)
        ram = image.ranges[0]
    with SavedStateProvider.load_vmrs(out) as p, open(guest_elf, "rb") as raw:
        assert p.memory.blocks_decoded == 0
        assert not p.findings()
        chunks = p.get_guest_physical_memory_chunks()[1]
        assert sum(c.page_count for c in chunks) * 4096 == ram.length - sum(
            min(e, ram.end) - s for s, e in holes if s < ram.end
        )
        raw.seek(ram.file_offset)
        for gpa in range(0, ram.length, 4 << 20):
            want = raw.read(4 << 20)
            got = p.read_guest_physical_address_padded(gpa, len(want))
            for s, e in holes:
                lo, hi = max(s, gpa), min(e, gpa + len(want))
                if lo < hi:  # the hole is not backed: zero when padded, and not readable
                    want = want[: lo - gpa] + bytes(hi - lo) + want[hi - gpa :]
                    assert not p.memory.is_backed(lo)
            assert got == want, hex(gpa)
        # registers read back equal to the JSON
        assert p.vp_count() == len(guest_registers["vps"])
        for i, vp in enumerate(guest_registers["vps"]):
            regs = p.get_registers(i)
            assert regs["rip"] == int(vp["rip"], 16)
            assert regs["cr3"] == int(vp["control"]["cr3"], 16)
            assert regs["efer"] == int(vp["efer"], 16)
            assert regs["gs"].base == int(vp["gs_base"], 16)  # type: ignore[union-attr]
            cs = regs["cs"]
            assert isinstance(cs, SegmentRegister) and cs.attributes == int(vp["segments"]["cs"]["attributes"], 16)
        assert p.get_paging_mode(0) == PagingMode.LONG and p.get_architecture(1) == Architecture.X64
        # the kernel's own page tables (init_top_pgt, located by Volatility: data README) agree
        rip = p.get_register_value(0, "rip")
        gpa = p.guest_virtual_to_physical(0, rip)
        assert gpa == translate(p.read_guest_physical_address, rip, mode=PagingMode.LONG, cr3=0x7C10000, levels=4)
        assert (
            p.read_guest_physical_address(gpa, 16)
            == p.read_guest_physical_address(gpa & ~0xFFF, 4096)[gpa & 0xFFF : (gpa & 0xFFF) + 16]
        )
        with pytest.raises(UnmappedAddressError):
            p.guest_virtual_to_physical(0, 0x0000_7FFF_FFFF_F000)


def test_linux_guest_as_legacy_pair(guest_elf: Path, guest_registers: dict, tmp_path: Path) -> None:
    bin_path, vsv_path = tmp_path / "g.bin", tmp_path / "g.vsv"
    with MemoryImage.open(guest_elf) as image:
        write_bin_vsv(bin_path, vsv_path, image, state_from_json(guest_registers), holes=[BIOS_ROM], jobs=2)
        ram = image.ranges[0]
        sample = [image.read(g, 4096) for g in range(0, ram.length, 16 << 20)]
    for opened in (open_saved_state(bin_path), open_saved_state(vsv_path)):
        with opened as p:
            assert p.kind == "bin+vsv" and p.vp_count() == 2
            assert [p.read_guest_physical_address(g, 4096) for g in range(0, ram.length, 16 << 20)] == sample


# --------------------------------------------------------------------------- synthetic cases
def _raw_image(tmp_path: Path, size: int = 4 << 20) -> Path:
    data = bytearray(size)
    for page in range(0, size, 4096):
        data[page : page + 8] = struct.pack("<Q", page)
        if page % 3 == 0:
            data[page + 8 : page + 4096] = os.urandom(4088)
    path = tmp_path / "ram.raw"
    path.write_bytes(bytes(data))
    return path


def test_two_vps_two_vtls_active_and_forced(tmp_path: Path) -> None:
    doc = {
        "format": "vmssd-registers/1",
        "vendor": "amd",
        "guest_os_id": "0x8100000006010000",
        "vps": [
            {"vp_index": 0, "vtl_runnable": True, "vtls": {"0": {"rax": 1, "cr0": "0x80000011"}, "1": {"rax": 2}}},
            {"vp_index": 1, "vtl_runnable": False, "vtls": {"0": {"rax": 3}, "1": {"rax": 4}}},
        ],
    }
    out = tmp_path / "vtl.vmrs"
    with MemoryImage.open(_raw_image(tmp_path)) as image:
        write_vmrs(out, image, state_from_json(doc))
    with SavedStateProvider.load_vmrs(out) as p:
        assert p.get_processor_vendor().name == "AMD"
        assert p.get_enabled_virtual_trust_levels(0) == 0b11 and p.get_guest_enabled_virtual_trust_levels() == 0b11
        # VtlIsRunnable = 1 on VP 0 does not mean VTL1 ran: the VTL rule uses VTL0 (docs/format.md#vtl-rule).
        assert p.get_active_virtual_trust_level(0) == 0 and p.get_register_value(0, "RAX") == 1
        assert [f.kind for f in p.findings() if f.kind == "vtl-not-recorded"] == ["vtl-not-recorded"]
        assert p.get_active_virtual_trust_level(1) == 0 and p.get_register_value(1, "rax") == 3
        p.force_active_virtual_trust_level(1, 1)
        assert p.get_register_value(1, "rax") == 4
        with pytest.raises(NotFoundError, match="VTL 2 cannot be used: its registers were not saved"):
            p.force_active_virtual_trust_level(0, 2)  # a VTL without registers is never used
        assert p.is_active_virtual_trust_level_enabled(0)
        assert "Linux" in p.get_guest_os_info().description
        assert p.get_registers(1, 1)["rax"] == 4


def test_holes_short_reads_and_raw_offsets(tmp_path: Path) -> None:
    raw = _raw_image(tmp_path)
    out = tmp_path / "holes.vmrs"
    with MemoryImage.open(raw) as image:
        write_vmrs(
            out,
            image,
            state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {}}}]}),
            holes=[(0x100000, 0x180000)],
        )
    data = raw.read_bytes()
    with SavedStateProvider.load_vmrs(out) as p:
        assert p.get_guest_physical_memory_chunks()[1] == [(0, 256), (0x180, 0x280)]
        # the second range starts on a fresh RamBlock: its raw offset is not a running total
        assert p.guest_physical_address_to_raw_saved_memory_offset(0x180000) == 0x100000
        assert p.read_guest_physical_address(0xFF000, 0x3000) == data[0xFF000:0x100000]  # stops at the hole
        with pytest.raises(UnmappedAddressError):
            p.read_guest_physical_address(0x100000, 16)
        with pytest.raises(NotFoundError):
            p.guest_physical_address_to_raw_saved_memory_offset(0x120000)
        assert p.read_guest_physical_address(0x180000, 4096) == data[0x180000:0x181000]
        mm = p.memory_map()
        assert [m.first_ramblock for m in mm] == [0, 1]


def test_pending_journal_over_ram_is_applied(tmp_path: Path) -> None:
    raw = _raw_image(tmp_path, 2 << 20)
    out = tmp_path / "j.vmrs"
    with MemoryImage.open(raw) as image:
        write_vmrs(
            out, image, state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {}}}]}), compress=False
        )
    with HyperVStorage.open(out) as s:
        loc = s.get("/savedstate/RamBlock1").data_location
    assert loc is not None
    add_journal_entries(out, pending=[(loc[0], bytes(4096))])  # the main area now holds stale zeros
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    with SavedStateProvider.load_vmrs(out) as p:
        assert p.read_guest_physical_address(0x100000, 4096) == raw.read_bytes()[0x100000:0x101000]
        assert any(f.kind == "journal" for f in p.findings())
    committed = tmp_path / "c.vmrs"
    assert SavedStateProvider.apply_pending_replay_log(out, committed) == 1
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    with SavedStateProvider.load_vmrs(committed) as p:
        assert not p.findings()


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.vmrs"
    junk.write_bytes(os.urandom(9000))
    with pytest.raises(FormatError, match=r"junk\.vmrs"):
        open_saved_state(junk)
    with pytest.raises(ValueError):
        open_saved_state(junk, backend="bogus")  # backend choice lives in the factory only


def test_vtl_list_and_saved_memory_queries(tmp_path: Path, real_dir: Path) -> None:
    doc = {"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rax": 1}, "1": {"rax": 2}}}]}
    out = tmp_path / "q.vmrs"
    with MemoryImage.open(_raw_image(tmp_path, 1 << 20)) as image:
        write_vmrs(out, image, state_from_json(doc))
    with SavedStateProvider.load_vmrs(out) as p:
        assert p.get_virtual_trust_levels(0) == [0, 1]
        assert p.has_saved_memory()
    with SavedStateProvider.load_vmrs(real_dir / "test.VMRS") as p:
        assert not p.has_saved_memory()


def test_close_drops_the_decoded_block_cache() -> None:
    """Up to 256 MiB of decoded blocks must go at close, not whenever the cyclic GC runs."""
    sample = Path(__file__).parent / "data" / "sample.vmrs"
    with SavedStateProvider.load_vmrs(sample) as p:
        start, count = p.get_guest_physical_memory_chunks()[1][0]
        p.read_guest_physical_address_padded(start * 4096, count * 4096)
        assert p.memory.cached_blocks
    assert p.memory.cached_blocks == []


def _memoryless(path: Path, *, vm_version: int, ram_map: bool, legacy_paths: bool = False) -> Path:
    """A container with (or without) a RAM map and no RamBlock at all."""
    from volatility3_vmssd.storage import HyperVStorageWriter

    with HyperVStorageWriter(path) as w:
        w.set("/savedstate/VmVersion", vm_version)
        state = "/savedVM/partition_state" if legacy_paths else "/savedstate/savedVM/partition_state"
        w.set(state, build_partition_state(PartitionState(vps=[VpState(index=0, registers={0: {"rax": 1}})])))
        if ram_map:
            w.set("/savedstate/RamMemoryBlock0", RamMemoryBlockRecord(256, 0, 0).build())
    return path


@pytest.mark.parametrize(
    ("name", "vm_version", "ram_map", "legacy_paths", "says"),
    [
        ("cut.vmrs", 0x0900, True, False, "the file is damaged or cut short"),
        ("old.vmrs", 0x0500, True, False, "the .vsv of a legacy saved state (VM version 5.0)"),
        ("moved.vmrs", 0x0900, True, True, "partition_state under /savedVM"),
        ("named.VSV", 0x0900, True, False, "the .vsv of a legacy saved state"),
        ("runtime.vmrs", 0x0900, False, False, "save the VM (Save-VM) or take a standard checkpoint"),
    ],
)
def test_no_ramblocks_message_says_what_the_file_is(
    tmp_path: Path, name: str, vm_version: int, ram_map: bool, legacy_paths: bool, says: str
) -> None:
    """A .vmrs that lost its RamBlocks is not called a legacy .vsv: what the file says about itself decides."""
    path = _memoryless(tmp_path / name, vm_version=vm_version, ram_map=ram_map, legacy_paths=legacy_paths)
    with SavedStateProvider.load_vmrs(path) as p:
        assert not p.has_saved_memory()
        assert says in (p.memory_absence() or "")
        assert p.summary().memory == p.memory_absence()
    if name == "cut.vmrs":
        with SavedStateProvider.load_vmrs(path) as p:
            assert "legacy" not in (p.memory_absence() or "")
