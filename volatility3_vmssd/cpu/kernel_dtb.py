"""Is a saved CR3 a Windows kernel DTB?  Proven from the page tables themselves, as Windows builds them.

A VP's saved CR3 is whatever table it ran on.  Under KVA shadowing a VP saved in user mode runs on
the process's *shadow* table: its user half and the handful of kernel pages needed to enter the
kernel (KUSER_SHARED_DATA, the shadow syscall entry, the IDT), but neither the kernel image nor the
self-referencing entry.  Such a table passes a "KUSER_SHARED_DATA is mapped" test and still cannot
find the kernel.  So a table is accepted here only when (docs/windows.md, "The kernel DTB"):

1. its top level maps itself the way Windows' tables do: one self-referencing PML4 entry in the
   kernel half (4-level), the last page directory mapping all four page directories (PAE), or
   PDE 0x300 pointing back at the directory (32-bit); and
2. the NT kernel image is reachable through it: from a kernel address the saved registers hold
   (LSTAR, the IDT's gates, a kernel-mode RIP) the pages below are walked back to a PE header whose
   CodeView record names a kernel PDB (``ntkrnlmp.pdb`` …) and whose image covers that address.

Physical memory is read through a callable, so this module knows nothing of Volatility; the glue
(``volatility/kernel.py``) gives it the saved-state layer.  5-level tables are refused with a
reason: Volatility 3 has no 5-level Intel layer to hand the DTB to.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .cpumode import paging_levels

#: Reads ``length`` bytes of guest physical memory at ``address``; None when they are not all backed.
ReadPhysical = Callable[[int, int], bytes | None]

PAGE = 0x1000
#: PDB names of the NT kernel (uniprocessor/multiprocessor, PAE or not), as its CodeView record gives them.
KERNEL_PDB_NAMES = frozenset({"ntkrnlmp.pdb", "ntoskrnl.pdb", "ntkrnlpa.pdb", "ntkrpamp.pdb"})
#: How far below a hint the image header may lie: larger than any NT kernel image (about 16 MiB).
MAX_IMAGE_SPAN = 32 << 20
#: IDT gates read for hints (the exception vectors, whose handlers are in the kernel image).
IDT_GATES = 32
_ADDR_64 = 0x000F_FFFF_FFFF_F000
_PRESENT = 0x1
_PS = 0x80


@dataclasses.dataclass(frozen=True)
class KernelDtbVerdict:
    """The answer for one DTB: accepted (``kernel_base`` set) or refused, ``reason`` in words either way.

    ``kind`` names the outcome for summaries: ``kernel``, ``no-self-reference`` (a KVA-shadow user
    table, or not a Windows table), ``no-kernel-image``, ``no-hints``, ``unreadable``, ``unsupported``.
    """

    dtb: int
    levels: int
    kind: str
    reason: str
    self_ref_index: int | None = None
    kernel_base: int | None = None
    pdb_name: str | None = None
    guid: str | None = None
    age: int | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "kernel"


# -------------------------------------------------------------------------------------- translation


class PageTables:
    """Walks one hierarchy (2, 3 or 4 levels), caching the table pages it reads."""

    def __init__(self, read: ReadPhysical, dtb: int, levels: int) -> None:
        if levels not in (2, 3, 4):
            raise ValueError(f"{levels}-level paging is not walked here")
        self.read = read
        self.dtb = dtb
        self.levels = levels
        self._tables: dict[int, bytes | None] = {}

    def table(self, address: int) -> bytes | None:
        """A whole table page (PAE's 32-byte top level is read as the 32 bytes at CR3)."""
        if address not in self._tables:
            size = 32 if (self.levels == 3 and address == self.dtb) else PAGE
            data = self.read(address, size)
            self._tables[address] = data if data is not None and len(data) == size else None
        return self._tables[address]

    def entry(self, table: int, index: int) -> int | None:
        data = self.table(table)
        if data is None:
            return None
        width = 4 if self.levels == 2 else 8
        return int.from_bytes(data[index * width : (index + 1) * width], "little")

    def _layout(self) -> tuple[list[tuple[int, int]], tuple[int, int], int]:
        """(upper levels as (shift, index mask), the last level, the entry address mask) of this mode."""
        if self.levels == 2:
            return [(22, 0x3FF)], (12, 0x3FF), 0xFFFF_F000
        if self.levels == 3:
            return [(30, 0x3), (21, 0x1FF)], (12, 0x1FF), _ADDR_64
        return [(39, 0x1FF), (30, 0x1FF), (21, 0x1FF)], (12, 0x1FF), _ADDR_64

    @property
    def address_bits(self) -> int:
        return 32 if self.levels == 2 else 48

    def canonical(self, va: int) -> int:
        """``va`` reduced to the bits the tables translate (sign extension dropped)."""
        return va & ((1 << self.address_bits) - 1)

    def translate(self, va: int) -> tuple[int, int] | None:
        """``(physical address, bytes left in that page)`` for ``va``, or None when it is not mapped.

        The span tells a walker how far it may skip: an unmapped upper-level entry covers its whole range.
        """
        va = self.canonical(va)
        steps, last, mask = self._layout()
        table = self.dtb
        for depth, (shift, index_mask) in enumerate(steps):
            entry = self.entry(table, (va >> shift) & index_mask)
            if entry is None or not entry & _PRESENT:
                return None
            # a large page: 1 GiB at a 4-level PDPT, 2 MiB at a PD (4 MiB with 32-bit PSE); never at a 64-bit top
            if entry & _PS and (depth > 0 or self.levels == 2):
                span = 1 << shift
                return (entry & mask & ~(span - 1)) + (va & (span - 1)), span - (va & (span - 1))
            table = entry & mask
        entry = self.entry(table, (va >> last[0]) & last[1])
        if entry is None or not entry & _PRESENT:
            return None
        return (entry & mask) + (va & (PAGE - 1)), PAGE - (va & (PAGE - 1))

    def unmapped_span(self, va: int) -> int:
        """How many bytes below and including ``va``'s page share its missing table entry (at least a page)."""
        va = self.canonical(va)
        steps, _last, mask = self._layout()
        table = self.dtb
        for shift, index_mask in steps:
            entry = self.entry(table, (va >> shift) & index_mask)
            if entry is None or not entry & _PRESENT:
                return (va & ((1 << shift) - 1)) + PAGE - (va & (PAGE - 1))
            if entry & _PS:
                return PAGE
            table = entry & mask
        return PAGE

    def sign_extend(self, va: int) -> int:
        """The canonical form of a translated address (bit 47 copied up in 4-level mode)."""
        if self.levels == 4 and va >> 47 & 1:
            return va | 0xFFFF_0000_0000_0000
        return va

    def read_virtual(self, va: int, length: int) -> bytes | None:
        """``length`` bytes at ``va`` (across pages), or None if any of them is unmapped or unbacked."""
        out = bytearray()
        while length > 0:
            hit = self.translate(va)
            if hit is None:
                return None
            pa, left = hit
            chunk = min(left, length, PAGE - (va & (PAGE - 1)))
            data = self.read(pa, chunk)
            if data is None or len(data) != chunk:
                return None
            out += data
            va += chunk
            length -= chunk
        return bytes(out)


# ---------------------------------------------------------------------------------- self-reference


def self_reference(tables: PageTables) -> tuple[int | None, str]:
    """``(index, why)``: the self-referencing top-level entry Windows keeps, or None and why not."""
    if tables.levels == 4:
        top = tables.table(tables.dtb)
        if top is None:
            return None, f"the top-level table at {tables.dtb:#x} is not backed by saved RAM"
        hits = [
            i
            for i in range(512)
            if (e := int.from_bytes(top[8 * i : 8 * i + 8], "little")) & _PRESENT and e & _ADDR_64 == tables.dtb
        ]
        kernel = [i for i in hits if i >= 256]
        if len(kernel) == 1 and len(hits) == 1:
            return kernel[0], f"PML4 entry {kernel[0]:#x} maps the table itself"
        if not hits:
            return None, "no PML4 entry points back at the table (a KVA-shadow user table, or not Windows')"
        return None, f"PML4 entries {', '.join(hex(i) for i in hits)} point back at the table (Windows keeps one)"
    if tables.levels == 3:
        pdpt = tables.table(tables.dtb)
        if pdpt is None:
            return None, f"the PDPT at {tables.dtb:#x} is not backed by saved RAM"
        pds = [int.from_bytes(pdpt[8 * i : 8 * i + 8], "little") for i in range(4)]
        if not all(e & _PRESENT for e in pds):
            return None, "not all four PDPT entries are present (Windows maps all four page directories)"
        last = pds[3] & _ADDR_64
        if all((tables.entry(last, i) or 0) & _ADDR_64 == pds[i] & _ADDR_64 for i in range(4)):
            return 3, "the last page directory maps all four page directories (PDEs 0x0-0x3 of 0xC0000000)"
        return None, "the last page directory does not map the four page directories"
    entry = tables.entry(tables.dtb, 0x300)
    if entry is None:
        return None, f"the page directory at {tables.dtb:#x} is not backed by saved RAM"
    if entry & _PRESENT and entry & 0xFFFF_F000 == tables.dtb:
        return 0x300, "PDE 0x300 maps the directory itself"
    return None, "PDE 0x300 does not point back at the directory"


# ------------------------------------------------------------------------------------ kernel image


@dataclasses.dataclass(frozen=True)
class _Image:
    base: int
    size: int
    pdb_name: str | None
    guid: str | None
    age: int | None


def _pe_image(tables: PageTables, base: int) -> _Image | None:
    """The PE image at ``base`` with its CodeView PDB name, or None if the header does not parse."""
    head = tables.read_virtual(base, 0x400)
    if head is None or head[:2] != b"MZ":
        return None
    (lfanew,) = struct.unpack_from("<I", head, 0x3C)
    if not 0x40 <= lfanew <= 0x400 - 0x108 or head[lfanew : lfanew + 4] != b"PE\0\0":
        return None
    optional = lfanew + 24
    (magic,) = struct.unpack_from("<H", head, optional)
    if magic == 0x20B:
        size_of_image = struct.unpack_from("<I", head, optional + 56)[0]
        directories = optional + 112
    elif magic == 0x10B:
        size_of_image = struct.unpack_from("<I", head, optional + 56)[0]
        directories = optional + 96
    else:
        return None
    rva, size = struct.unpack_from("<II", head, directories + 6 * 8)  # IMAGE_DIRECTORY_ENTRY_DEBUG
    image = _Image(base, size_of_image, None, None, None)
    if not rva or not 0 < size <= 28 * 16 or rva + size > size_of_image:
        return image
    entries = tables.read_virtual(base + rva, size)
    for n in range(len(entries or b"") // 28):
        assert entries is not None
        kind, length, address = struct.unpack_from("<III", entries, 28 * n + 12)
        if kind != 2 or not 24 < length <= 0x400 or address + length > size_of_image:  # IMAGE_DEBUG_TYPE_CODEVIEW
            continue
        record = tables.read_virtual(base + address, length)
        if record is None or record[:4] != b"RSDS":
            continue
        guid = record[4:20]
        (age,) = struct.unpack_from("<I", record, 20)
        name = record[24:].split(b"\0", 1)[0].decode("ascii", "replace")
        text = (guid[3::-1] + guid[5:3:-1] + guid[7:5:-1] + guid[8:]).hex().upper()
        return _Image(base, size_of_image, name.rsplit("\\", 1)[-1], text, age)
    return image


def find_image(tables: PageTables, hint: int) -> _Image | None:
    """The PE image containing ``hint``: its header is the nearest mapped ``MZ`` page below (bounded walk)."""
    va = tables.canonical(hint) & ~(PAGE - 1)
    floor = max(0, va - MAX_IMAGE_SPAN)
    while va >= floor:
        hit = tables.translate(va)
        if hit is None:
            va -= tables.unmapped_span(va)
            continue
        data = tables.read(hit[0], 2)
        if data == b"MZ":
            image = _pe_image(tables, va)
            if image is not None and image.base <= tables.canonical(hint) < image.base + image.size:
                return image
        va -= PAGE
    return None


# ------------------------------------------------------------------------------------------- hints


def _kernel_half(va: int, levels: int) -> bool:
    """Upper half of the address space: where Windows keeps the kernel (canonical high for 4-level)."""
    if levels == 4:
        return va >= 0xFFFF_8000_0000_0000
    return 0x8000_0000 <= va < 1 << 32


def register_hints(banks: Iterable[Mapping[str, Any]]) -> tuple[list[int], list[int]]:
    """``(code addresses, IDT bases)`` from saved register banks: LSTAR, kernel-half RIPs, IDTR bases.

    Every bank is worth reading: LSTAR and the IDT are the same on every VP, and a user-mode VP's
    RIP is simply skipped (it is not in the kernel half).
    """
    code: list[int] = []
    idts: list[int] = []
    for regs in banks:
        for name in ("lstar", "rip"):
            value = regs.get(name)
            if isinstance(value, int) and value and value not in code:
                code.append(value)
        idtr = regs.get("idtr")
        base = getattr(idtr, "base", None)
        if isinstance(base, int) and base and base not in idts:
            idts.append(base)
    return code, idts


def _gate_targets(tables: PageTables, idt: int) -> list[int]:
    """Handler addresses of the first IDT gates (16-byte long-mode gates, 8-byte legacy ones)."""
    gates = 16 if tables.levels == 4 else 8
    data = tables.read_virtual(idt, IDT_GATES * gates)
    if data is None:
        return []
    out: list[int] = []
    for n in range(IDT_GATES):
        low, _selector, _ist, attributes, mid = struct.unpack_from("<HHBBH", data, n * gates)
        if not attributes & 0x80:  # not present
            continue
        target = low | mid << 16
        if gates == 16:
            target |= struct.unpack_from("<I", data, n * gates + 8)[0] << 32
        if target and target not in out:
            out.append(target)
    return out


# -------------------------------------------------------------------------------------------- check


def check_kernel_dtb(
    read: ReadPhysical, dtb: int, levels: int, code_hints: Iterable[int], idt_bases: Iterable[int] = ()
) -> KernelDtbVerdict:
    """Prove (or refuse) ``dtb`` as a Windows kernel DTB; see the module docstring for the two tests."""
    if levels == 5:
        return KernelDtbVerdict(
            dtb, levels, "unsupported", "5-level paging (CR4.LA57): Volatility 3 has no 5-level Intel layer"
        )
    if levels not in (2, 3, 4):
        return KernelDtbVerdict(dtb, levels, "unsupported", "paging is off (or not an x86 register bank)")
    tables = PageTables(read, dtb, levels)
    index, why = self_reference(tables)
    if index is None:
        kind = "unreadable" if "not backed" in why else "no-self-reference"
        return KernelDtbVerdict(dtb, levels, kind, why)
    hints = [h for h in code_hints if _kernel_half(h, levels)]
    for idt in idt_bases:
        if _kernel_half(idt, levels):
            hints += [t for t in _gate_targets(tables, idt) if _kernel_half(t, levels) and t not in hints]
    if not hints:
        return KernelDtbVerdict(
            dtb, levels, "no-hints", f"{why}, but no saved register points into the kernel (LSTAR, IDT, RIP)", index
        )
    others: list[str] = []
    for hint in hints:
        image = find_image(tables, hint)
        if image is None:
            continue
        if image.pdb_name is not None and image.pdb_name.lower() in KERNEL_PDB_NAMES:
            return KernelDtbVerdict(
                dtb,
                levels,
                "kernel",
                f"{why}; {image.pdb_name} {image.guid}-{image.age} at {tables.sign_extend(image.base):#x} is mapped",
                index,
                tables.sign_extend(image.base),
                image.pdb_name,
                image.guid,
                image.age,
            )
        others.append(image.pdb_name or f"an image without a PDB name at {image.base:#x}")
    if others:
        found = ", ".join(sorted(set(others)))
        why = f"{why}, but its kernel addresses are in {found}"
        return KernelDtbVerdict(dtb, levels, "no-kernel-image", why, index)
    return KernelDtbVerdict(
        dtb,
        levels,
        "no-kernel-image",
        f"{why}, but no NT kernel image is mapped below the {len(hints)} kernel address(es) the registers hold",
        index,
    )


# ----------------------------------------------------------------------------------- the choice

#: CR3 address bits per page-table depth (the low bits hold PCID, or PWT/PCD).
CR3_MASKS = {4: 0x000F_FFFF_FFFF_F000, 5: 0x000F_FFFF_FFFF_F000, 3: 0xFFFF_FFE0, 2: 0xFFFF_F000}


@dataclasses.dataclass(frozen=True)
class KernelDtbChoice:
    """The first saved bank whose CR3 proves a kernel DTB (``vp``, ``vtl``, ``verdict``), and every refusal."""

    vp: int | None
    vtl: int | None
    verdict: KernelDtbVerdict | None
    refused: tuple[tuple[int, int, KernelDtbVerdict], ...]


def choose_kernel_dtb(read: ReadPhysical, banks: Iterable[tuple[int, int, Mapping[str, Any]]]) -> KernelDtbChoice:
    """Try every saved ``(vp, vtl, registers)`` bank, every VP's VTL0 first, and take the first proven DTB.

    What the Volatility glue does too (it adds Volatility's own KUSER_SHARED_DATA check), for callers
    that have no Volatility, such as a crash-dump writer.  Hints for a VTL come from that VTL's banks.
    """
    ordered = sorted(banks, key=lambda b: (b[1], b[0]))
    hints = {vtl: register_hints(regs for _, v, regs in ordered if v == vtl) for vtl in {b[1] for b in ordered}}
    refused: list[tuple[int, int, KernelDtbVerdict]] = []
    for vp, vtl, regs in ordered:
        levels = paging_levels(regs)
        cr3 = regs.get("cr3")
        if not isinstance(cr3, int) or levels not in CR3_MASKS:
            reason = "no CR3 saved" if not isinstance(cr3, int) else "paging is off (or not an x86 register bank)"
            refused.append((vp, vtl, KernelDtbVerdict(cr3 or 0, levels, "unsupported", reason)))
            continue
        verdict = check_kernel_dtb(read, cr3 & CR3_MASKS[levels], levels, *hints[vtl])
        if verdict.ok:
            return KernelDtbChoice(vp, vtl, verdict, tuple(refused))
        refused.append((vp, vtl, verdict))
    return KernelDtbChoice(None, None, None, tuple(refused))
