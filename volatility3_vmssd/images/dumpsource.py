"""What a Windows crash dump takes from a saved state besides its pages: VP 0's registers, the VP count,
the kernel DTB and (with a symbol directory) the kernel's addresses.

The saved state is taken as a :class:`DumpSource`, the few calls this needs, so this room needs nothing
of the provider.  How the DTB is chosen and why: docs/crashdump.md, "DirectoryTableBase".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..cpu.registers import Architecture
from ..errors import VmssdError
from .crashdump import DTB_MASK, DumpInputs, context_record
from .winsymbols import KernelImage, kernel_symbols, self_referencing_tables

DTB_SCAN_READ = 16 << 20
COMMENT = "Hyper-V saved state converted by vmssd"


class DumpSource(Protocol):
    """What the crash-dump header reads of a saved state (the provider interface satisfies it)."""

    def has_cpu_state(self) -> bool: ...
    def vp_count(self) -> int: ...
    def get_architecture(self, vp: int) -> Architecture: ...
    def get_virtual_trust_levels(self, vp: int) -> list[int]: ...
    def get_registers(self, vp: int, vtl: int | None = None) -> Mapping[str, Any]: ...
    def read_guest_physical_address(self, gpa: int, size: int) -> bytes: ...
    def read_guest_physical_address_padded(self, gpa: int, size: int) -> bytes: ...
    def get_guest_physical_memory_chunks(self) -> tuple[int, Sequence[Any]]: ...


@dataclasses.dataclass(frozen=True)
class DumpOptions:
    """What ``convert --format dmp`` is told: the kernel DTB, a symbol directory, the dump type."""

    dtb: int | None = None  # None: chosen from the saved CR3s (kernel_dtb)
    symbols_dir: str | None = None
    kind: str = "auto"


def dump_inputs(source: DumpSource, options: DumpOptions) -> DumpInputs:
    """The crash-dump header's guest facts: VP 0's VTL0 registers, the VP count, the DTB, the kernel symbols."""
    count = source.vp_count() if source.has_cpu_state() else 0
    if not count or source.get_architecture(0) != Architecture.X64:
        raise VmssdError("a Windows crash dump needs the saved registers of an x64 guest (VP 0)")
    banks = [source.get_registers(i, 0) for i in range(count)]
    if options.dtb is not None:
        dtb, origin, image = options.dtb & DTB_MASK, "given with --dtb", None
    else:
        dtb, origin, image = kernel_dtb(source)
    symbols = None
    if options.symbols_dir is not None:
        symbols = kernel_symbols(source.read_guest_physical_address, dtb, banks, options.symbols_dir, image)
    rip = banks[0].get("rip")
    return DumpInputs(
        dtb=dtb,
        processors=count,
        context=context_record(banks[0]),
        exception_address=rip if isinstance(rip, int) else 0,
        symbols=symbols,
        comment=COMMENT,
        dtb_source=origin,
    )


def kernel_dtb(source: DumpSource) -> tuple[int, str, KernelImage | None]:
    """``(DTB, where it came from, the kernel image when known)`` for a crash-dump header.

    With ``cpu/kernel_dtb.py`` (the Windows kernel-DTB proof) every VP's saved CR3, VTL0 first, is
    tried and the first that Windows' own tables vouch for is used; when none qualifies, RAM is
    scanned for a table the proof accepts (as Volatility scans); failing both, or without the proof,
    VP 0's VTL0 CR3.
    """
    cr3 = source.get_registers(0, 0).get("cr3")
    fallback = (cr3 if isinstance(cr3, int) else 0) & DTB_MASK
    try:
        from ..cpu import kernel_dtb as proof  # issue 23 item 1 (branch winguest); VP 0's CR3 until merged
    except ImportError:
        return fallback, "VP 0's saved CR3 (VTL0)", None

    def read(gpa: int, size: int) -> bytes | None:
        try:
            data = source.read_guest_physical_address(gpa, size)
        except VmssdError:
            return None
        return data if len(data) == size else None

    def accepted(table: int) -> KernelImage | None:
        verdict = proof.check_kernel_dtb(read, table, 4, code, idts)
        if verdict.ok and verdict.kernel_base is not None and verdict.pdb_name and verdict.guid:
            return KernelImage(verdict.kernel_base, 0, verdict.pdb_name.lower(), f"{verdict.guid}-{verdict.age}")
        return None

    banks = register_banks(source)
    code, idts = proof.register_hints(regs for _, _, regs in banks)
    for vp, vtl, regs in banks:
        value = regs.get("cr3")
        image = accepted(value & DTB_MASK) if isinstance(value, int) else None
        if image is not None:
            return value & DTB_MASK, f"the saved CR3 of VP {vp} VTL {vtl}", image
    page_size, chunks = source.get_guest_physical_memory_chunks()
    for chunk in sorted(
        chunks, key=lambda c: c.guest_physical_start_page_index
    ):  # no saved CR3 will do (KVA shadow on every VP): scan RAM for the kernel's table
        gpa, length = chunk.guest_physical_start_page_index * page_size, chunk.page_count * page_size
        for off in range(0, length, DTB_SCAN_READ):
            data = source.read_guest_physical_address_padded(gpa + off, min(DTB_SCAN_READ, length - off))
            for table in self_referencing_tables(data, gpa + off):
                image = accepted(table)
                if image is not None:
                    return table, "found by a scan of RAM (no saved CR3 maps the kernel)", image
    return fallback, "VP 0's saved CR3 (VTL0): no saved CR3 maps the kernel and no RAM page is its table", None


def register_banks(source: DumpSource) -> list[tuple[int, int, Mapping[str, Any]]]:
    """``(vp, vtl, registers)`` of every saved register bank: every VP's VTL0 first, then higher VTLs."""
    saved = {vp: source.get_virtual_trust_levels(vp) for vp in range(source.vp_count())}
    banks = []
    for vtl in sorted({v for vtls in saved.values() for v in vtls}):
        for vp, vtls in saved.items():
            if vtl in vtls:
                try:
                    regs = source.get_registers(vp, vtl)
                except VmssdError:
                    continue  # a VTL marker without registers
                if regs:
                    banks.append((vp, vtl, regs))
    return banks
