"""What a Windows crash dump takes from a saved state besides its pages: VP 0's registers, the VP count,
the kernel DTB and (with a symbol directory) the kernel's addresses.

The saved state is taken as a :class:`DumpSource`, the few calls this needs, so this room needs nothing
of the provider.  How the DTB is chosen and why: docs/crashdump.md, "DirectoryTableBase".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..cpu import kernel_dtb as proof
from ..cpu.guestos import GuestOsInfo
from ..cpu.registers import Architecture
from ..errors import VmssdError
from .crashdump import DTB_MASK, DumpInputs, context_record
from .winsymbols import KernelImage, kernel_symbols, self_referencing_tables

COMMENT = "Hyper-V saved state converted by vmssd"


class DumpSource(Protocol):
    """What the crash-dump header reads of a saved state (the provider interface satisfies it)."""

    def has_cpu_state(self) -> bool: ...
    def get_guest_os_info(self, vtl: int = 0) -> GuestOsInfo | None: ...
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


def dump_inputs(source: DumpSource, options: DumpOptions) -> tuple[DumpInputs, DtbScan | None]:
    """The crash-dump header's guest facts: VP 0's VTL0 registers, the VP count, the DTB, the kernel symbols.

    When no saved CR3 is the kernel's (KVA shadow on every VP), the DTB is found by a scan of RAM that
    the dump writer feeds with the pages it writes anyway (:class:`DtbScan`): one pass over RAM, not
    two; the header is rewritten with what the scan found.
    """
    count = source.vp_count() if source.has_cpu_state() else 0
    if not count or source.get_architecture(0) != Architecture.X64:
        raise VmssdError("a Windows crash dump needs the saved registers of an x64 guest (VP 0)")
    banks = [source.get_registers(i, 0) for i in range(count)]
    scan = None
    if options.dtb is not None:
        dtb, origin, image = options.dtb & DTB_MASK, "given with --dtb", None
    else:
        dtb, origin, image = kernel_dtb(source)
        if image is None and _says_windows(source):  # no saved CR3 will do: the writer's pass looks for it
            scan = DtbScan(source, options, banks)
        elif image is None:
            origin = (
                "VP 0's saved CR3 (VTL0): no saved CR3 maps a Windows kernel, and the guest did not register as"
                " Windows, so RAM was not scanned for one (--dtb gives the table)"
            )
    symbols = None
    if options.symbols_dir is not None and scan is None:
        symbols = kernel_symbols(source.read_guest_physical_address, dtb, banks, options.symbols_dir, image)
    rip = banks[0].get("rip")
    inputs = DumpInputs(
        dtb=dtb,
        processors=count,
        context=context_record(banks[0]),
        exception_address=rip if isinstance(rip, int) else 0,
        symbols=symbols,
        comment=COMMENT,
        dtb_source=origin,
    )
    return inputs, scan


def _says_windows(source: DumpSource) -> bool:
    """VTL0's guest OS id says Windows NT: only then is RAM worth a scan for the kernel's table."""
    try:
        info = source.get_guest_os_info(0)
    except VmssdError:
        return False
    return info is not None and info.os_family == "windows"


def _proof(source: DumpSource) -> tuple[list[tuple[int, int, Mapping[str, Any]]], Callable[[int], KernelImage | None]]:
    """Every saved register bank, and the test that a table is the kernel's (cpu/kernel_dtb.py's proof)."""

    def read(gpa: int, size: int) -> bytes | None:
        try:
            data = source.read_guest_physical_address(gpa, size)
        except VmssdError:
            return None
        return data if len(data) == size else None

    banks = register_banks(source)
    code, idts = proof.register_hints(regs for _, _, regs in banks)

    def accepted(table: int) -> KernelImage | None:
        verdict = proof.check_kernel_dtb(read, table, 4, code, idts)
        if verdict.ok and verdict.kernel_base is not None and verdict.pdb_name and verdict.guid:
            return KernelImage(verdict.kernel_base, 0, verdict.pdb_name.lower(), f"{verdict.guid}-{verdict.age}")
        return None

    return banks, accepted


def kernel_dtb(source: DumpSource) -> tuple[int, str, KernelImage | None]:
    """``(DTB, where it came from, the kernel image when known)`` from the saved register banks.

    Every VP's saved CR3, VTL0 first, is tried and the first that Windows' own tables vouch for
    (cpu/kernel_dtb.py) is used.  When none qualifies the image is None and the DTB is VP 0's VTL0
    CR3 until :class:`DtbScan` finds the kernel's table in RAM.
    """
    cr3 = source.get_registers(0, 0).get("cr3")
    fallback = (cr3 if isinstance(cr3, int) else 0) & DTB_MASK
    banks, accepted = _proof(source)
    for vp, vtl, regs in banks:
        value = regs.get("cr3")
        image = accepted(value & DTB_MASK) if isinstance(value, int) else None
        if image is not None:
            return value & DTB_MASK, f"the saved CR3 of VP {vp} VTL {vtl}", image
    return fallback, "VP 0's saved CR3 (VTL0): no saved CR3 maps the kernel and no RAM page is its table", None


class DtbScan:
    """The scan of RAM for the kernel's top-level table when no saved CR3 is it (as Volatility scans).

    The dump writer calls :meth:`feed` with every stretch of pages it writes; the first self-referencing
    table that the proof accepts is the DTB, and :meth:`inputs` gives the header to write over the first.
    """

    def __init__(self, source: DumpSource, options: DumpOptions, banks: list[Mapping[str, Any]]) -> None:
        self._source, self._options, self._banks = source, options, banks
        self._accepted = _proof(source)[1]
        self.found: tuple[int, KernelImage] | None = None

    def feed(self, data: bytes, gpa: int) -> None:
        if self.found is not None:
            return
        for table in self_referencing_tables(data, gpa):
            image = self._accepted(table)
            if image is not None:
                self.found = (table, image)
                return

    def inputs(self, first: DumpInputs) -> DumpInputs:
        """The header's facts once every page was fed: the DTB found (and the symbols through it)."""
        dtb, image = first.dtb, None
        origin = first.dtb_source
        if self.found is not None:
            (dtb, image), origin = self.found, "found by a scan of RAM (no saved CR3 maps the kernel)"
        symbols = None
        if self._options.symbols_dir is not None:
            read = self._source.read_guest_physical_address
            symbols = kernel_symbols(read, dtb, self._banks, self._options.symbols_dir, image)
        return dataclasses.replace(first, dtb=dtb, dtb_source=origin, symbols=symbols)


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
