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
    """EFER.LMA -> Long; else CR0.PG clear -> NonPaged; CR4.PAE -> Pae; else 32Bit.

    See docs/format.md#architecture-and-paging-mode.
    """
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


SCTLR_M = 1 << 0  # SCTLR_EL1.M: stage-1 translation enabled
TCR_T1SZ_SHIFT, TCR_TG1_SHIFT = 16, 30  # TCR_EL1 fields of the TTBR1 (kernel) half
_TG1_GRANULE_BITS = {1: 14, 2: 12, 3: 16}  # TCR_EL1.TG1: 16 KiB, 4 KiB, 64 KiB (0 is reserved)


def arm64_paging_levels(regs: Mapping[str, RegisterValue]) -> int:
    """Stage-1 table depth of the TTBR1_EL1 (kernel) half from TCR_EL1: 0 when SCTLR_EL1.M is clear.

    levels = ceil((64 - T1SZ - granule bits) / (granule bits - 3)): 4 for a 48-bit, 4 KiB-granule
    kernel (docs/format.md#arm64).  A reserved TG1 or an out-of-range T1SZ raises UnsupportedError.
    """
    if "sctlr_el1" in regs and not _reg(regs, "sctlr_el1") & SCTLR_M:
        return 0
    if "tcr_el1" not in regs:
        raise UnsupportedError("no TCR_EL1 saved: the ARMv8 page-table depth is unknown")
    tcr = _reg(regs, "tcr_el1")
    t1sz = tcr >> TCR_T1SZ_SHIFT & 0x3F
    granule = _TG1_GRANULE_BITS.get(tcr >> TCR_TG1_SHIFT & 3)
    if granule is None or not 12 <= t1sz <= 48:
        raise UnsupportedError(f"TCR_EL1 {tcr:#x}: TG1/T1SZ do not describe a stage-1 translation")
    return -(-(64 - t1sz - granule) // (granule - 3))


def paging_levels(regs: Mapping[str, RegisterValue], vendor: int | None = None) -> int:
    """Page-table depth: 0 (none/unknown), 2 (32-bit), 3 (PAE), 4 (long), 5 (long with LA57); ARMv8 from TCR_EL1.

    The SDK's PAGING_MODE has no 5-level value, so this is how 5-level paging is reported.
    """
    mode = paging_mode(regs, vendor)
    if mode is PagingMode.ARMV8:
        return arm64_paging_levels(regs)
    return x86_levels(mode, is_la57(regs))


def x86_levels(mode: PagingMode, la57: bool) -> int:
    """Page-table depth of an x86 paging mode (LA57 only counts in long mode)."""
    if mode is PagingMode.LONG:
        return 5 if la57 else 4
    return {PagingMode.BIT32: 2, PagingMode.PAE: 3}.get(mode, 0)
