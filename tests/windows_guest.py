"""Windows-shaped test guests built from a real kernel's Volatility symbol table (ISF).

No Windows memory image can be had on these machines, but the ISF of a real ``ntkrnlmp.pdb`` gives
every type layout and symbol offset of that kernel build.  :func:`build_windows_guest` lays out guest
physical memory the way that kernel would (docs/windows.md, "How the test guests are built"):

* 4-level page tables whose top-level page sits where Windows 10 puts the System process's
  (0x1A0000-0x1AF000) with a self-referencing entry at a randomised index (0x100-0x1FE);
* the kernel image at a randomised 2 MiB-aligned VA: its first 2 MiB as one large page (a PE
  header whose CodeView ``RSDS`` record carries the ISF's GUID and age), the pages holding the
  symbols the analysis reads as 4 KiB pages;
* ``KdDebuggerDataBlock`` (``_KDDEBUGGER_DATA64``, not encoded), ``KdVersionBlock``,
  ``KeNumberProcessors``, ``KUSER_SHARED_DATA`` at its kernel and user addresses, an IDT;
* ``PsActiveProcessHead`` and a tree of ``_EPROCESS`` objects (distinct PIDs, parents, names and
  creation times), each with its own page tables (user half + the shared kernel half);
* VP registers for one of :data:`CONTEXTS`, with guest OS id = Windows NT of the ISF's build.

Only the ISF's type layouts and symbol offsets are used; everything else is generated from ``seed``.
The outputs are a raw image (GPA 0 up, the 0xA0000-0xFFFFF hole zeroed), the LiME form of the same
RAM (the hole left out, as Hyper-V leaves it out) and a ``vmssd-registers/1`` JSON; :func:`wrap`
turns them into a ``.vmrs``, an openvmm raw-block ``.vmrs`` or a legacy pair with ``vmssd create``.

``_KDDEBUGGER_DATA64`` is not in the kernel's PDB; its field offsets are Microsoft's public
``wdbgexts.h`` layout (also Volatility's ``kdbg.json``).
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import random
import struct
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAGE = 0x1000
LARGE = 0x200000
MIB = 1 << 20
#: VP contexts a guest can be saved in (docs/windows.md, "Which CR3 is the kernel's").
CONTEXTS = ("kernel", "user", "kvashadow", "vbs")
#: The forms :func:`wrap` writes.
FORMS = ("vmrs", "rawblocks", "legacy")
KUSER_KERNEL = 0xFFFF_F780_0000_0000
KUSER_USER = 0x7FFE_0000
HOLE = (0xA0000, 0x100000)  # legacy VGA/BIOS window: unbacked on Hyper-V
KERNEL_DTB_RANGE = (0x1A0000, 0x1B0000)  # where Windows 10 puts the System process's PML4
ALLOC_FROM = 0x300000  # every other allocated page lies above this (outside Volatility's first DTB window)
KDBG_OWNER_TAG = 0x4742444B  # "KDBG"
KDBG_SIZE = 0x340
#: _KDDEBUGGER_DATA64 field offsets (wdbgexts.h): not in the kernel PDB.
KDBG_FIELDS = {
    "OwnerTag": 0x10,
    "Size": 0x14,
    "KernBase": 0x18,
    "PsLoadedModuleList": 0x48,
    "PsActiveProcessHead": 0x50,
    "NtBuildLab": 0x208,
    "CmNtCSDVersion": 0x268,
}
#: Windows NT builds of the two shared ISFs (README of the symbol set) -> (product type, build-lab string)
BUILDS = {
    "BBED7C2955FBE4522AAA23F4B8677AD9": (19041, 1, "19041.1.amd64fre.vb_release.191206-1406"),
    "C2EADB24A615E9472CE47C8ADD31F130": (20348, 3, "20348.1.amd64fre.fe_release.210507-1500"),
}
#: (name, parent index or None, session) of the process tree; PIDs and times are drawn from the seed.
PROCESS_TREE: Sequence[tuple[str, int | None, int | None]] = (
    ("System", None, None),
    ("Registry", 0, None),
    ("smss.exe", 0, None),
    ("csrss.exe", 2, 0),
    ("wininit.exe", 2, 0),
    ("services.exe", 4, 0),
    ("lsass.exe", 4, 0),
    ("svchost.exe", 5, 0),
    ("svchost.exe", 5, 0),
    ("winlogon.exe", 2, 1),
    ("explorer.exe", 9, 1),
    ("cmd.exe", 10, 1),
    ("notepad.exe", 10, 1),
)
USER_PROCESS = 10  # explorer.exe: the process a user-mode VP was running (VP n runs USER_PROCESS + n)
FILETIME_2023 = 133_170_048_000_000_000  # 2023-01-01 in 100 ns units since 1601


def shared_isfs(shared: Path) -> list[Path]:
    """The kernel ISFs of the shared data set (empty when it is absent)."""
    return sorted((shared / "data" / "windows-symbols" / "windows" / "ntkrnlmp.pdb").glob("*.json.xz"))


class Isf:
    """The parts of a kernel ISF the builder reads: struct field offsets, symbol offsets, PDB identity."""

    def __init__(self, path: Path) -> None:
        with lzma.open(path, "rt") as fh:
            doc = json.load(fh)
        self.path = path
        self.types: dict[str, Any] = doc["user_types"]
        self.symbols: dict[str, Any] = doc["symbols"]
        pdb = doc["metadata"]["windows"]["pdb"]
        self.guid: str = pdb["GUID"].upper()
        self.age: int = int(pdb["age"])
        self.pdb_name: str = pdb["database"]

    def symbol(self, name: str) -> int:
        return int(self.symbols[name]["address"])

    def offset(self, struct_name: str, dotted: str) -> int:
        """Offset of ``a.b.c`` inside ``struct_name`` (nested structs followed through the ISF)."""
        total, current = 0, struct_name
        for part in dotted.split("."):
            field = self.types[current]["fields"][part]
            total += int(field["offset"])
            current = field["type"].get("name", "")
        return total

    def size(self, struct_name: str) -> int:
        return int(self.types[struct_name]["size"])


@dataclasses.dataclass(frozen=True)
class ExpectedProcess:
    pid: int
    ppid: int
    name: str
    create_time: int  # FILETIME
    eprocess: int  # kernel VA of the _EPROCESS
    dtb: int  # physical address of its PML4
    session: int | None


@dataclasses.dataclass(frozen=True)
class WindowsGuest:
    """What :func:`build_windows_guest` wrote and what an analysis of it must find."""

    context: str
    seed: int
    isf: Path
    guid: str
    age: int
    build: int  # the Windows NT build of the ISF's kernel
    raw: Path  # RAM from GPA 0, hole zeroed
    lime: Path  # the same RAM as LiME, hole left out
    registers: Path  # vmssd-registers/1
    ram_size: int
    kernel_base: int
    dtb: int  # the System process's PML4 (the kernel DTB)
    self_ref_index: int
    vp_count: int
    #: the DTB the saved-CR3 path must choose (None: no saved CR3 maps the kernel, Volatility must scan)
    saved_cr3_dtb: int | None
    #: (VP, VTL) whose CR3 gives ``saved_cr3_dtb``
    saved_cr3_source: tuple[int, int] | None
    processes: tuple[ExpectedProcess, ...]
    holes: tuple[tuple[int, int], ...] = (HOLE,)


# ------------------------------------------------------------------------------------------ memory


class _Memory:
    """Guest RAM plus a page allocator drawing scattered free pages from a seeded generator."""

    def __init__(self, size: int, rng: random.Random, reserved: Sequence[tuple[int, int]]) -> None:
        self.data = bytearray(size)
        self.rng = rng
        taken = {p for lo, hi in reserved for p in range(lo // PAGE, hi // PAGE)}
        self._free = [p for p in range(ALLOC_FROM // PAGE, size // PAGE) if p not in taken]
        rng.shuffle(self._free)

    def page(self) -> int:
        if not self._free:
            raise RuntimeError("the test guest ran out of RAM; give build_windows_guest a larger ram_size")
        return self._free.pop() * PAGE

    def write(self, pa: int, data: bytes) -> None:
        self.data[pa : pa + len(data)] = data

    def u64(self, pa: int, value: int) -> None:
        self.data[pa : pa + 8] = value.to_bytes(8, "little")

    def read_u64(self, pa: int) -> int:
        return int.from_bytes(self.data[pa : pa + 8], "little")


#: PTE flags: present|rw|accessed|dirty for kernel pages, plus U/S for user pages; NX on data/self-ref.
KERNEL_FLAGS = 0x63
USER_FLAGS = 0x67
NX = 1 << 63
PS = 0x80
ADDR = 0x000F_FFFF_FFFF_F000


class _Tables:
    """One 4-level hierarchy in guest RAM (the top-level page and the tables below it)."""

    def __init__(self, mem: _Memory, root: int | None = None) -> None:
        self.mem = mem
        self.root = mem.page() if root is None else root

    def _child(self, table: int, index: int, user: bool) -> int:
        entry = self.mem.read_u64(table + 8 * index)
        if entry & 1:
            if user and not entry & 4:
                self.mem.u64(table + 8 * index, entry | 4)
            return entry & ADDR
        child = self.mem.page()
        self.mem.u64(table + 8 * index, child | (USER_FLAGS if user else KERNEL_FLAGS))
        return child

    def map(self, va: int, pa: int, *, user: bool = False, nx: bool = False) -> None:
        table = self.root
        for shift in (39, 30, 21):
            table = self._child(table, (va >> shift) & 0x1FF, user)
        self.mem.u64(table + 8 * ((va >> 12) & 0x1FF), pa | (USER_FLAGS if user else KERNEL_FLAGS) | (NX if nx else 0))

    def map_large(self, va: int, pa: int) -> None:
        """A 2 MiB page (PDE with PS), as Windows maps the kernel image."""
        table = self.root
        for shift in (39, 30):
            table = self._child(table, (va >> shift) & 0x1FF, False)
        self.mem.u64(table + 8 * ((va >> 21) & 0x1FF), pa | KERNEL_FLAGS | PS)

    def self_reference(self, index: int) -> None:
        self.mem.u64(self.root + 8 * index, self.root | KERNEL_FLAGS | NX)

    def share_kernel_half(self, other: _Tables, skip: int) -> None:
        """Copy ``other``'s kernel-half PML4 entries (all but its self-reference), as every process does."""
        for index in range(256, 512):
            if index != skip:
                self.mem.u64(self.root + 8 * index, self.mem.read_u64(other.root + 8 * index))


# --------------------------------------------------------------------------------------- PE image


def pe_header(image_base: int, size_of_image: int, guid: str, age: int, pdb_name: str, timestamp: int) -> bytes:
    """A PE32+ header page for an AMD64 kernel whose debug directory holds one CodeView RSDS record."""
    page = bytearray(PAGE)
    e_lfanew = 0x100
    page[0:2] = b"MZ"
    struct.pack_into("<I", page, 0x3C, e_lfanew)
    page[e_lfanew : e_lfanew + 4] = b"PE\0\0"
    file_header = e_lfanew + 4
    optional = file_header + 20
    size_of_optional = 0xF0
    sections = optional + size_of_optional
    struct.pack_into("<HHIIIHH", page, file_header, 0x8664, 1, timestamp, 0, 0, size_of_optional, 0x22)
    debug_dir_rva, codeview_rva = 0x400, 0x440
    codeview = b"RSDS" + uuid.UUID(guid).bytes_le + struct.pack("<I", age) + pdb_name.encode() + b"\0"
    struct.pack_into(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        page,
        optional,
        0x20B,  # PE32+
        14,
        20,  # linker version
        size_of_image - PAGE,  # SizeOfCode
        0,
        0,
        0,  # AddressOfEntryPoint: none given
        PAGE,  # BaseOfCode
        image_base,
        PAGE,  # SectionAlignment
        0x200,  # FileAlignment
        10,
        0,  # OperatingSystemVersion 10.0
        10,
        0,  # ImageVersion
        10,
        0,  # SubsystemVersion
        0,
        size_of_image,
        PAGE,  # SizeOfHeaders
        0,  # CheckSum
        1,  # IMAGE_SUBSYSTEM_NATIVE
        0x4160,  # DllCharacteristics: high-entropy VA, dynamic base, NX compatible, guard CF
        0x80000,
        0x2000,
        0x100000,
        0x1000,  # stack/heap reserve and commit
        0,
        16,  # NumberOfRvaAndSizes
    )
    directories = optional + 112
    struct.pack_into("<II", page, directories + 6 * 8, debug_dir_rva, 28)  # IMAGE_DIRECTORY_ENTRY_DEBUG
    struct.pack_into(
        "<8sIIIIII",
        page,
        sections,
        b".text",
        size_of_image - PAGE,
        PAGE,
        size_of_image - PAGE,
        PAGE,
        0,
        0,
    )
    struct.pack_into("<I", page, sections + 36, 0x68000020)  # code, execute, read, not paged
    struct.pack_into("<IIHHIIII", page, debug_dir_rva, 0, timestamp, 0, 0, 2, len(codeview), codeview_rva, codeview_rva)
    page[codeview_rva : codeview_rva + len(codeview)] = codeview
    return bytes(page)


# ------------------------------------------------------------------------------------------ builder


def _guest_os_id(build: int) -> int:
    """HV_GUEST_OS_ID of Windows NT 10.0 ``build`` (Microsoft vendor, closed-source layout)."""
    return 1 << 48 | 4 << 40 | 10 << 32 | build


def _segment(selector: int, attributes: int) -> dict[str, str]:
    return {"selector": hex(selector), "base": "0x0", "limit": "0xffffffff", "attributes": hex(attributes)}


class _Builder:
    def __init__(self, isf_path: Path, context: str, seed: int, ram_size: int, vp_count: int) -> None:
        if context not in CONTEXTS:
            raise ValueError(f"context {context!r}: one of {', '.join(CONTEXTS)}")
        if not 16 * MIB <= ram_size <= 512 * MIB or ram_size % LARGE:
            raise ValueError("ram_size: a multiple of 2 MiB between 16 MiB and 512 MiB")
        self.isf = Isf(isf_path)
        self.context = context
        self.seed = seed
        self.rng = random.Random(f"{seed}:{self.isf.guid}:{context}")
        self.vp_count = vp_count
        self.ram_size = ram_size
        rng = self.rng
        self.build, self.product_type, self.build_lab = BUILDS.get(self.isf.guid, (19041, 1, "19041.1.amd64fre"))
        # the kernel's first 2 MiB: one large page, physically 2 MiB-aligned above the allocator floor
        self.kernel_large_pa = rng.randrange(ALLOC_FROM // LARGE + 1, ram_size // LARGE) * LARGE
        self.mem = _Memory(ram_size, rng, [(self.kernel_large_pa, self.kernel_large_pa + LARGE)])
        self.dtb = rng.randrange(KERNEL_DTB_RANGE[0], KERNEL_DTB_RANGE[1], PAGE)
        reserved_indices = {0x1EF, 0x1F0}  # KUSER_SHARED_DATA's and the kernel image's PML4 slots
        self.pool_index = rng.choice([i for i in range(0x180, 0x1E0)])
        self.self_ref = rng.choice([i for i in range(0x100, 0x1FF) if i not in reserved_indices | {self.pool_index}])
        self.kernel_base = 0xFFFF_F800_0000_0000 + rng.randrange(0x10, 0x400) * LARGE
        self.pool_base = 0xFFFF_0000_0000_0000 | self.pool_index << 39 | rng.randrange(0, 1 << 20) << 12
        self._pool_next = self.pool_base
        self.kernel = _Tables(self.mem, self.dtb)
        self.kernel.self_reference(self.self_ref)
        self.kuser_pa = self.mem.page()
        # every kernel-half PML4 slot exists before a process copies them (later pages land below them)
        self.kernel.map(KUSER_KERNEL, self.kuser_pa, nx=True)
        self.image_pages: dict[int, int] = {}  # RVA page -> PA (4 KiB part of the image)

    # -- kernel VA helpers
    def pool_page(self) -> tuple[int, int]:
        """A fresh kernel pool page: (VA, PA), mapped in the kernel half."""
        va, pa = self._pool_next, self.mem.page()
        self._pool_next += PAGE
        self.kernel.map(va, pa, nx=True)
        return va, pa

    def image_pa(self, rva: int) -> int:
        """The physical address of kernel image RVA ``rva`` (mapping its 4 KiB page on first use)."""
        if rva < LARGE:
            return self.kernel_large_pa + rva
        page = rva & ~(PAGE - 1)
        if page not in self.image_pages:
            pa = self.mem.page()
            self.image_pages[page] = pa
            self.kernel.map(self.kernel_base + page, pa)
        return self.image_pages[page] + (rva - page)

    def sym_pa(self, name: str, delta: int = 0) -> int:
        return self.image_pa(self.isf.symbol(name) + delta)

    def sym_va(self, name: str) -> int:
        return self.kernel_base + self.isf.symbol(name)

    # -- the pieces
    def write_image(self) -> None:
        isf = self.isf
        size_of_image = max(int(s["address"]) for s in isf.symbols.values()) + 2 * PAGE & ~(PAGE - 1)
        timestamp = self.rng.randrange(0x5E000000, 0x62000000)
        self.mem.write(
            self.kernel_large_pa,
            pe_header(self.kernel_base, size_of_image, isf.guid, isf.age, isf.pdb_name, timestamp),
        )
        code = random.Random(self.rng.random()).randbytes(LARGE - PAGE)
        self.mem.write(self.kernel_large_pa + PAGE, code.replace(b"MZ", b"Mz").replace(b"RSDS", b"RSDs"))
        self.kernel.map_large(self.kernel_base, self.kernel_large_pa)
        self.size_of_image = size_of_image

    def write_kuser(self, system_time: int) -> None:
        isf, kuser = self.isf, self.kuser_pa
        off = lambda f: isf.offset("_KUSER_SHARED_DATA", f)  # noqa: E731
        self.mem.write(kuser + off("NtMajorVersion"), struct.pack("<I", 10))
        self.mem.write(kuser + off("NtMinorVersion"), struct.pack("<I", 0))
        self.mem.write(kuser + off("NtBuildNumber"), struct.pack("<I", self.build))
        self.mem.write(kuser + off("NtProductType"), struct.pack("<I", self.product_type))
        self.mem.write(kuser + off("NtSystemRoot"), "C:\\Windows".encode("utf-16-le") + b"\0\0")
        st = off("SystemTime")
        self.mem.write(kuser + st, struct.pack("<IiI", system_time & 0xFFFFFFFF, system_time >> 32, system_time >> 32))

    def write_debugger_blocks(self, process_head_va: int) -> None:
        isf, mem = self.isf, self.mem
        kdbg_va, kdbg_pa = self.sym_va("KdDebuggerDataBlock"), self.sym_pa("KdDebuggerDataBlock")
        version_pa = self.sym_pa("KdVersionBlock")
        modules_va = self.sym_va("PsLoadedModuleList")
        modules_pa = self.sym_pa("PsLoadedModuleList")
        mem.u64(modules_pa, modules_va)  # an empty module list: Flink = Blink = the head
        mem.u64(modules_pa + 8, modules_va)
        lab_pa = self.sym_pa("NtBuildLab")
        mem.write(lab_pa, self.build_lab.encode() + b"\0")
        mem.write(self.sym_pa("CmNtCSDVersion"), struct.pack("<I", 0))
        mem.write(self.sym_pa("KeNumberProcessors"), struct.pack("<I", self.vp_count))
        # _DBGKD_GET_VERSION64 (KdVersionBlock): its DebuggerDataList points at a list holding KDBG
        v = lambda f: version_pa + isf.offset("_DBGKD_GET_VERSION64", f)  # noqa: E731
        mem.write(v("MajorVersion"), struct.pack("<H", 0xF))
        mem.write(v("MinorVersion"), struct.pack("<H", self.build))
        mem.write(v("ProtocolVersion"), struct.pack("<B", 6))
        mem.write(v("MachineType"), struct.pack("<H", 0x8664))
        mem.u64(v("KernBase"), self.kernel_base)
        mem.u64(v("PsLoadedModuleList"), modules_va)
        mem.u64(v("DebuggerDataList"), kdbg_va)
        # _KDDEBUGGER_DATA64, stored in the clear (KdpDataBlockEncoded = 0)
        mem.u64(kdbg_pa, kdbg_va)
        mem.u64(kdbg_pa + 8, kdbg_va)
        k = KDBG_FIELDS
        mem.write(kdbg_pa + k["OwnerTag"], struct.pack("<II", KDBG_OWNER_TAG, KDBG_SIZE))
        mem.u64(kdbg_pa + k["KernBase"], self.kernel_base)
        mem.u64(kdbg_pa + k["PsLoadedModuleList"], modules_va)
        mem.u64(kdbg_pa + k["PsActiveProcessHead"], process_head_va)
        mem.u64(kdbg_pa + k["NtBuildLab"], self.sym_va("NtBuildLab"))
        mem.u64(kdbg_pa + k["CmNtCSDVersion"], self.sym_va("CmNtCSDVersion"))
        if "KdpDataBlockEncoded" in isf.symbols:
            mem.write(self.sym_pa("KdpDataBlockEncoded"), b"\0")

    def write_idt(self) -> int:
        """An IDT whose first gates point at the kernel's exception handlers; returns its VA."""
        va, pa = self.pool_page()
        handlers = [n for n in ("KiDivideErrorFault", "KiDebugTrapOrFault", "KiPageFault") if n in self.isf.symbols]
        for vector, name in enumerate(handlers):
            target = self.sym_va(name)
            self.image_pa(self.isf.symbol(name))  # the handler's page is part of the mapped image
            gate = struct.pack(
                "<HHBBHII", target & 0xFFFF, 0x10, 0, 0x8E, (target >> 16) & 0xFFFF, target >> 32 & 0xFFFFFFFF, 0
            )
            self.mem.write(pa + 16 * vector, gate)
        self.idt_pa = pa
        return va

    def write_processes(self) -> tuple[int, list[ExpectedProcess], list[_Tables]]:
        isf, mem, rng = self.isf, self.mem, self.rng
        eoff = lambda f: isf.offset("_EPROCESS", f)  # noqa: E731
        head_va, head_pa = self.sym_va("PsActiveProcessHead"), self.sym_pa("PsActiveProcessHead")
        session_pages: dict[int, int] = {}
        pids = [4, *(4 * p for p in sorted(rng.sample(range(25, 3000), len(PROCESS_TREE) - 1)))]
        boot = FILETIME_2023 + rng.randrange(0, 10**15)
        expected: list[ExpectedProcess] = []
        tables: list[_Tables] = []
        links: list[tuple[int, int]] = []  # (VA, PA) of each ActiveProcessLinks
        created: list[int] = []
        for index, (name, parent, session) in enumerate(PROCESS_TREE):
            va, pa = self.pool_page()
            if isf.size("_EPROCESS") > PAGE:
                raise RuntimeError("_EPROCESS does not fit in one page")
            if parent is None:
                ctime, ppid = boot, 0
            else:
                ctime, ppid = created[parent] + rng.randrange(10**6, 10**9), pids[parent]
            created.append(ctime)
            proc_tables = self.kernel if index == 0 else _Tables(self.mem)
            if index:
                proc_tables.self_reference(self.self_ref)
                proc_tables.share_kernel_half(self.kernel, self.self_ref)
                self.map_user_half(proc_tables, index)
            tables.append(proc_tables)
            mem.u64(pa + eoff("Pcb.DirectoryTableBase"), proc_tables.root)
            mem.write(pa + eoff("Pcb.Header.Type"), b"\x03")  # ProcessObject
            mem.u64(pa + eoff("UniqueProcessId"), pids[index])
            mem.u64(pa + eoff("InheritedFromUniqueProcessId"), ppid)
            mem.write(pa + eoff("ImageFileName"), name.encode()[:14].ljust(15, b"\0"))
            mem.u64(pa + eoff("CreateTime"), ctime)
            mem.write(pa + eoff("ActiveThreads"), struct.pack("<I", rng.randrange(1, 200)))
            handle_va, handle_pa = self.pool_page()
            mem.u64(handle_pa + isf.offset("_HANDLE_TABLE", "UniqueProcessId"), pids[index])
            mem.u64(pa + eoff("ObjectTable"), handle_va)
            if session is not None:
                if session not in session_pages:
                    session_va, session_pa = self.pool_page()
                    mem.write(session_pa + isf.offset("_MM_SESSION_SPACE", "SessionId"), struct.pack("<I", session))
                    session_pages[session] = session_va
                mem.u64(pa + eoff("Session"), session_pages[session])
            links.append((va + eoff("ActiveProcessLinks"), pa + eoff("ActiveProcessLinks")))
            expected.append(ExpectedProcess(pids[index], ppid, name[:14], ctime, va, proc_tables.root, session))
        ring = [(head_va, head_pa), *links]
        for i, (_va, pa) in enumerate(ring):
            mem.u64(pa, ring[(i + 1) % len(ring)][0])  # Flink
            mem.u64(pa + 8, ring[i - 1][0])  # Blink
        self.eprocess_pa = {p.pid: self._pa_of(p.eprocess) for p in expected}
        return max(created), expected, tables

    def _pa_of(self, va: int) -> int:
        table = self.kernel.root
        for shift in (39, 30, 21, 12):
            entry = self.mem.read_u64(table + 8 * ((va >> shift) & 0x1FF))
            if entry & PS and shift == 21:
                return (entry & ADDR & ~(LARGE - 1)) + (va & (LARGE - 1))
            table = entry & ADDR
        return table + (va & (PAGE - 1))

    def map_user_half(self, tables: _Tables, index: int) -> None:
        """An image page, a stack page and KUSER_SHARED_DATA's user view."""
        base = 0x7FF6_0000_0000 + self.rng.randrange(0, 0x1000) * 0x10000
        image = self.mem.page()
        self.mem.write(image, f"user image of process {index}".encode())
        tables.map(base, image, user=True)
        stack = self.mem.page()
        tables.map(0x0000_00A0_0000_0000 + index * 0x100000, stack, user=True, nx=True)
        tables.map(KUSER_USER, self.kuser_pa, user=True, nx=True)
        tables.user_rip = base + 0x40  # type: ignore[attr-defined]
        tables.user_rsp = 0x0000_00A0_0000_0000 + index * 0x100000 + 0xF00  # type: ignore[attr-defined]

    def shadow_of(self, tables: _Tables, idt_va: int) -> _Tables:
        """The KVA-shadow (user) table of a process: its user half plus the few kernel pages user mode
        must reach (KUSER_SHARED_DATA, the shadow syscall entry, the IDT); no self-reference."""
        shadow = _Tables(self.mem)
        for index in range(256):
            self.mem.u64(shadow.root + 8 * index, self.mem.read_u64(tables.root + 8 * index))
        shadow.map(KUSER_KERNEL, self.kuser_pa, nx=True)
        entry = self.isf.symbol("KiSystemCall64Shadow")
        shadow.map(self.kernel_base + (entry & ~(PAGE - 1)), self.image_pa(entry))
        shadow.map(idt_va, self.idt_pa, nx=True)
        return shadow

    def secure_kernel(self) -> _Tables:
        """VTL1's tables: their own self-reference and a securekernel image, nothing of VTL0's."""
        secure = _Tables(self.mem)
        index = self.rng.choice([i for i in range(0x100, 0x1FF) if i not in (self.self_ref, 0x1F0)])
        secure.self_reference(index)
        base = 0xFFFF_F800_0000_0000 + self.rng.randrange(0x400, 0x800) * LARGE
        header = self.mem.page()
        guid = str(uuid.UUID(int=self.rng.getrandbits(128))).replace("-", "").upper()
        self.mem.write(header, pe_header(base, 0x100000, guid, 1, "securekernel.pdb", 0x5F000000))
        secure.map(base, header)
        code = self.mem.page()
        secure.map(base + 0x10000, code)
        secure.entry = base + 0x10000  # type: ignore[attr-defined]
        return secure

    # -- registers
    def bank(self, *, cr3: int, user: bool, lstar: int, idt_va: int, rip: int, rsp: int, gs: int) -> dict[str, Any]:
        if user:
            cs, ss = _segment(0x33, 0xA0FB), _segment(0x2B, 0xC0F3)
        else:
            cs, ss = _segment(0x10, 0xA09B), _segment(0x18, 0xC093)
        return {
            "rip": hex(rip),
            "rsp": hex(rsp),
            "rflags": "0x246" if user else "0x86",
            "cr0": "0x80050033",
            "cr3": hex(cr3),
            "cr4": hex(0x350EF8),  # PAE PGE OSFXSR OSXMMEXCPT FSGSBASE PCIDE OSXSAVE SMEP SMAP
            "efer": "0xd01",
            "cs": cs,
            "ss": ss,
            "gs": {**_segment(0x2B, 0xC0F3), "base": hex(0 if user else gs)},
            "kernelgsbase": hex(gs if user else 0),
            "idtr": {"base": hex(idt_va), "limit": "0xfff"},
            "lstar": hex(lstar),
            "star": hex(0x0023_0010_0000_0000),
            "sfmask": "0x4700",
            "cpl": 3 if user else 0,
        }

    def run(self, out_dir: Path) -> WindowsGuest:
        self.write_image()
        idt_va = self.write_idt()
        newest, processes, tables = self.write_processes()
        self.write_kuser(newest + self.rng.randrange(10**7, 10**10))
        self.write_debugger_blocks(self.sym_va("PsActiveProcessHead"))
        kva_shadow = self.context == "kvashadow"
        lstar = self.sym_va("KiSystemCall64Shadow" if kva_shadow or self.context == "vbs" else "KiSystemCall64")
        self.image_pa(lstar - self.kernel_base)
        idle = self.sym_va("KiIdleLoop") if "KiIdleLoop" in self.isf.symbols else lstar
        self.image_pa(idle - self.kernel_base)
        vps: list[dict[str, Any]] = []
        source: tuple[int, int] | None = (0, 0)
        chosen: int | None = self.dtb
        for vp in range(self.vp_count):
            kpcr, _ = self.pool_page()
            stack, _ = self.pool_page()
            if self.context in ("kernel", "vbs"):
                bank = self.bank(
                    cr3=self.dtb | 2, user=False, lstar=lstar, idt_va=idt_va, rip=idle, rsp=stack + 0xF00, gs=kpcr
                )
            else:
                proc = tables[USER_PROCESS + vp % (len(tables) - USER_PROCESS)]
                cr3 = proc.root
                if kva_shadow:
                    shadow = self.shadow_of(proc, idt_va)
                    eproc_pa = self.eprocess_pa[processes[tables.index(proc)].pid]
                    self.mem.u64(eproc_pa + self.isf.offset("_EPROCESS", "Pcb.UserDirectoryTableBase"), shadow.root)
                    cr3 = shadow.root
                bank = self.bank(
                    cr3=cr3 | 1,
                    user=True,
                    lstar=lstar,
                    idt_va=idt_va,
                    rip=proc.user_rip,  # type: ignore[attr-defined]
                    rsp=proc.user_rsp,  # type: ignore[attr-defined]
                    gs=kpcr,
                )
                if vp == 0:
                    chosen = None if kva_shadow else proc.root
            entry: dict[str, Any] = {"vp_index": vp, "vtls": {"0": bank}}
            if self.context == "vbs":
                secure = self.secure_kernel()
                entry["vtls"]["1"] = self.bank(
                    cr3=secure.root,
                    user=False,
                    lstar=secure.entry,  # type: ignore[attr-defined]
                    idt_va=0,
                    rip=secure.entry,  # type: ignore[attr-defined]
                    rsp=0,
                    gs=0,
                )
                entry["vtl_runnable"] = True
            vps.append(entry)
        if chosen is None:
            source = None
        doc: dict[str, Any] = {
            "format": "vmssd-registers/1",
            "vendor": "intel",
            "guest_os_id": hex(_guest_os_id(self.build)),
            "vps": vps,
        }
        if self.context == "vbs":
            doc["guest_os_ids"] = {"1": hex(_guest_os_id(self.build) | 0x0A << 24)}
        return self.write_outputs(out_dir, doc, processes, chosen, source)

    def write_outputs(
        self,
        out_dir: Path,
        doc: dict[str, Any],
        processes: list[ExpectedProcess],
        chosen: int | None,
        source: tuple[int, int] | None,
    ) -> WindowsGuest:
        out_dir.mkdir(parents=True, exist_ok=True)
        data = self.mem.data
        data[HOLE[0] : HOLE[1]] = bytes(HOLE[1] - HOLE[0])
        stem = f"win-{self.build}-{self.context}-{self.seed}"
        raw = out_dir / f"{stem}.raw"
        raw.write_bytes(data)
        lime = out_dir / f"{stem}.lime"
        with open(lime, "wb") as fh:
            for lo, hi in ((0, HOLE[0]), (HOLE[1], len(data))):
                fh.write(struct.pack("<IIQQQ", 0x4C694D45, 1, lo, hi - 1, 0))
                fh.write(data[lo:hi])
        registers = out_dir / f"{stem}.json"
        registers.write_text(json.dumps(doc, indent=1))
        return WindowsGuest(
            context=self.context,
            seed=self.seed,
            isf=self.isf.path,
            guid=self.isf.guid,
            age=self.isf.age,
            build=self.build,
            raw=raw,
            lime=lime,
            registers=registers,
            ram_size=self.ram_size,
            kernel_base=self.kernel_base,
            dtb=self.dtb,
            self_ref_index=self.self_ref,
            vp_count=self.vp_count,
            saved_cr3_dtb=chosen,
            saved_cr3_source=source,
            processes=tuple(processes),
        )


def build_windows_guest(
    isf_path: Path, context: str, seed: int, out_dir: Path, *, ram_size: int = 32 * MIB, vp_count: int = 2
) -> WindowsGuest:
    """Write a Windows-shaped guest for the kernel of ``isf_path`` saved in VP ``context`` (see
    :data:`CONTEXTS`): ``<out_dir>/win-<build>-<context>-<seed>.{raw,lime,json}``."""
    return _Builder(Path(isf_path), context, seed, ram_size, vp_count).run(Path(out_dir))


def wrap(guest: WindowsGuest, form: str, out_dir: Path, *, extra: Sequence[str] = ()) -> Path:
    """``vmssd create`` the guest (from its LiME form) as ``form`` (see :data:`FORMS`); returns what to
    give ``vol -f`` (the .vmrs, or the .bin of a legacy pair)."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {', '.join(FORMS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = guest.lime.stem
    out = out_dir / (f"{stem}.bin" if form == "legacy" else f"{stem}-{form}.vmrs")
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "create", "--memory", str(guest.lime)]
    cmd += ["--registers", str(guest.registers), "-o", str(out), "--force", "-q", "--jobs", "1", *extra]
    if form == "legacy":
        cmd.append("--legacy")
    elif form == "rawblocks":
        cmd.append("--raw-blocks")
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"vmssd create failed ({done.returncode}): {done.stderr.strip()}")
    return out


if __name__ == "__main__":  # python tests/windows_guest.py ISF CONTEXT SEED OUT_DIR [FORM...]
    guest = build_windows_guest(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    for name in sys.argv[5:]:
        print(wrap(guest, name, Path(sys.argv[4])))
    print(json.dumps(dataclasses.asdict(guest), default=str, indent=1))
