"""Architecture and paging mode of a register bank (what GetArchitecture/GetPagingMode report)."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import UnsupportedError
from .registers import Architecture, PagingMode, PrologVendor, RegisterValue

EFER_LMA = 1 << 10
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12


def _reg(regs: Mapping[str, RegisterValue], name: str) -> int:
    value = regs.get(name, 0)
    return value if isinstance(value, int) else 0


def architecture(regs: Mapping[str, RegisterValue], vendor: int | None) -> Architecture:
    """ARM vendor -> Armv8; x86: EFER.LMA -> x64, else x86.  No control registers -> Unknown."""
    if vendor == PrologVendor.ARM:
        return Architecture.ARMV8
    if "efer" not in regs and "cr0" not in regs:
        return Architecture.UNKNOWN
    return Architecture.X64 if _reg(regs, "efer") & EFER_LMA else Architecture.X86


def paging_mode(regs: Mapping[str, RegisterValue], vendor: int | None) -> PagingMode:
    """EFER.LMA -> Long; else CR0.PG clear -> NonPaged; CR4.PAE -> Pae; else 32Bit (spec §4.3)."""
    arch = architecture(regs, vendor)
    if arch is Architecture.ARMV8:
        return PagingMode.ARMV8
    if arch is Architecture.UNKNOWN:
        return PagingMode.INVALID
    if arch is Architecture.X64:
        return PagingMode.LONG
    if not _reg(regs, "cr0") & CR0_PG:
        return PagingMode.NON_PAGED
    return PagingMode.PAE if _reg(regs, "cr4") & CR4_PAE else PagingMode.BIT32


def is_la57(regs: Mapping[str, RegisterValue]) -> bool:
    """CR4.LA57 (bit 12).  It only takes effect in long mode; :func:`paging_levels` checks that."""
    return bool(_reg(regs, "cr4") & CR4_LA57)


def paging_levels(regs: Mapping[str, RegisterValue], vendor: int | None = None) -> int:
    """Page-table depth: 0 (none/unknown), 2 (32-bit), 3 (PAE), 4 (long), 5 (long with LA57).

    The SDK's PAGING_MODE has no 5-level value, so this is how 5-level paging is reported.
    """
    return levels_of(paging_mode(regs, vendor), is_la57(regs))


def levels_of(mode: PagingMode, la57: bool) -> int:
    """Page-table depth of a paging mode (the one rule both backends answer with)."""
    if mode is PagingMode.ARMV8:
        raise UnsupportedError("ARMv8 page-table depth depends on TCR_EL1 and is not decoded")
    if mode is PagingMode.LONG:
        return 5 if la57 else 4
    return {PagingMode.BIT32: 2, PagingMode.PAE: 3}.get(mode, 0)
