"""tests/windows_guest.py itself: what it writes is what a Windows kernel of the ISF's build would hold.

Checked without Volatility: the PE header parses with pefile and carries the ISF's GUID and age,
the LiME form is the raw image minus the hole, the registers JSON loads as a partition state whose
guest OS id is Windows NT of the build, the process list can be walked from PsActiveProcessHead
through the kernel DTB, and a wrapped ``.vmrs`` is classified as a Windows guest by triage (so
``vmssd triage`` picks the Windows plugins).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from shared_data import SHARED
from windows_guest import CONTEXTS, HOLE, Isf, build_windows_guest, shared_isfs, wrap

from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.cpu.guestos import decode_guest_os_id

ISFS = shared_isfs(SHARED)
pytestmark = pytest.mark.skipif(not ISFS, reason=f"needs the Windows symbol tables under {SHARED}; not present")
MIB = 1 << 20


def isf_id(path: Path) -> str:
    return path.name[:8]


class Phys:
    """Reads the raw image through 4-level tables (the builder's own walk is not reused)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def u64(self, pa: int) -> int:
        return int.from_bytes(self.raw[pa : pa + 8], "little")

    def translate(self, dtb: int, va: int) -> int | None:
        table = dtb
        for shift in (39, 30, 21):
            entry = self.u64(table + 8 * ((va >> shift) & 0x1FF))
            if not entry & 1:
                return None
            if entry & 0x80 and shift < 39:
                size = 1 << shift
                return (entry & 0x000F_FFFF_FFFF_F000 & ~(size - 1)) + (va & (size - 1))
            table = entry & 0x000F_FFFF_FFFF_F000
        entry = self.u64(table + 8 * ((va >> 12) & 0x1FF))
        return (entry & 0x000F_FFFF_FFFF_F000) + (va & 0xFFF) if entry & 1 else None

    def read(self, dtb: int, va: int, length: int) -> bytes:
        pa = self.translate(dtb, va)
        assert pa is not None, f"{va:#x} is not mapped"
        return self.raw[pa : pa + length]


@pytest.mark.parametrize("isf_path", ISFS, ids=isf_id)
def test_kernel_image_processes_and_registers_are_what_the_isf_says(isf_path: Path, tmp_path: Path) -> None:
    import pefile

    isf = Isf(isf_path)
    guest = build_windows_guest(isf_path, "kernel", 11, tmp_path, ram_size=16 * MIB)
    raw = guest.raw.read_bytes()
    mem = Phys(raw)
    # the PE header, through the kernel DTB, as pefile reads it
    header = mem.read(guest.dtb, guest.kernel_base, 0x1000)
    pe = pefile.PE(data=header + bytes(0x1000), fast_load=True)
    pe.parse_data_directories(directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_DEBUG"]])
    (debug,) = pe.DIRECTORY_ENTRY_DEBUG
    cv = debug.entry
    guid = f"{cv.Signature_Data1:08X}{cv.Signature_Data2:04X}{cv.Signature_Data3:04X}"
    guid += f"{cv.Signature_Data4:02X}{cv.Signature_Data5:02X}{cv.Signature_Data6.hex().upper()}"
    assert (guid, cv.Age, cv.PdbFileName.rstrip(b"\0").decode()) == (isf.guid, isf.age, isf.pdb_name)
    assert pe.OPTIONAL_HEADER.ImageBase == guest.kernel_base and pe.FILE_HEADER.Machine == 0x8664
    # the self-reference at the index the builder reports
    assert mem.u64(guest.dtb + 8 * guest.self_ref_index) & 0x000F_FFFF_FFFF_F000 == guest.dtb
    # PsActiveProcessHead -> every _EPROCESS, in order, with the ISF's field offsets
    links = isf.offset("_EPROCESS", "ActiveProcessLinks")
    head = guest.kernel_base + isf.symbol("PsActiveProcessHead")
    walked = []
    entry = struct.unpack("<Q", mem.read(guest.dtb, head, 8))[0]
    while entry != head and len(walked) < 100:
        eproc = entry - links
        pid = struct.unpack("<Q", mem.read(guest.dtb, eproc + isf.offset("_EPROCESS", "UniqueProcessId"), 8))[0]
        name = mem.read(guest.dtb, eproc + isf.offset("_EPROCESS", "ImageFileName"), 15).rstrip(b"\0").decode()
        walked.append((eproc, pid, name))
        entry = struct.unpack("<Q", mem.read(guest.dtb, entry, 8))[0]
    assert walked == [(p.eprocess, p.pid, p.name) for p in guest.processes]
    assert len({p.pid for p in guest.processes}) == len(guest.processes)
    assert len({p.create_time for p in guest.processes}) == len(guest.processes)
    by_pid = {p.pid: p for p in guest.processes}
    for p in guest.processes[1:]:
        assert p.create_time > by_pid[p.ppid].create_time  # a child is created after its parent
    # KDBG: the OwnerTag and the kernel base Volatility's KDBG method reads
    kdbg = mem.read(guest.dtb, guest.kernel_base + isf.symbol("KdDebuggerDataBlock"), 0x20)
    assert kdbg[0x10:0x14] == b"KDBG" and struct.unpack_from("<Q", kdbg, 0x18)[0] == guest.kernel_base
    # the LiME form is the raw image without the hole
    lime = guest.lime.read_bytes()
    first = struct.unpack_from("<IIQQQ", lime, 0)
    assert first[:4] == (0x4C694D45, 1, 0, HOLE[0] - 1)
    assert lime[32 : 32 + HOLE[0]] == raw[: HOLE[0]]
    assert lime[32 + HOLE[0] + 32 :] == raw[HOLE[1] :]
    # the registers load, and say Windows NT of this build
    state = state_from_json(json.loads(guest.registers.read_text()))
    info = decode_guest_os_id(state.guest_os_id)
    assert (info.vendor_name, info.os_id, info.major, info.build_number) == ("Microsoft", 4, 10, guest.build)
    assert len(state.vps) == guest.vp_count


@pytest.mark.parametrize("context", CONTEXTS)
def test_contexts_save_the_cr3_they_claim(context: str, tmp_path: Path) -> None:
    guest = build_windows_guest(ISFS[0], context, 12, tmp_path, ram_size=16 * MIB)
    doc = json.loads(guest.registers.read_text())
    dtbs = {p.dtb for p in guest.processes}
    for vp in doc["vps"]:
        cr3 = int(vp["vtls"]["0"]["cr3"], 16) & ~0xFFF
        if context in ("kernel", "vbs"):
            assert cr3 == guest.dtb
        elif context == "user":
            assert cr3 in dtbs - {guest.dtb}  # a process's full table
        else:
            assert cr3 not in dtbs  # the shadow table
        assert ("1" in vp["vtls"]) == (context == "vbs")


def test_triage_classifies_the_guest_as_windows(tmp_path: Path) -> None:
    from volatility3_vmssd.triage import plugins
    from volatility3_vmssd.triage.classify import classify
    from volatility3_vmssd.triage.discovery import discover

    guest = build_windows_guest(ISFS[0], "user", 13, tmp_path, ram_size=16 * MIB)
    vmrs = wrap(guest, "vmrs", tmp_path / "host")
    (found,) = [f for f in discover([vmrs.parent]).files if f.path.endswith(".vmrs")]
    result = classify(found)
    assert (result.cls, result.os_family) == ("saved-memory", "windows")
    assert result.guest_os is not None and str(guest.build) in result.guest_os
    assert plugins.initial_plugins(result.os_family, None) == ["hyperv.info", *plugins.WINDOWS]
