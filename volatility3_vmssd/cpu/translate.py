"""Guest-virtual to guest-physical translation from saved CPU state (what the DLL's
GuestVirtualAddressToPhysicalAddress does), for the x86 paging modes.

The walk only reads page-table entries through ``read_physical(gpa, size)``; it never trusts them:
every failure is an :class:`UnmappedAddressError` naming the VA, the level and the table GPA.
Accessed/dirty bits, protection keys and permission bits are ignored: a forensic reader wants where a
page is, not whether the guest may touch it.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from ..errors import UnmappedAddressError, UnsupportedError, VmssdError
from .registers import PagingMode

ReadPhysical = Callable[[int, int], bytes]

PTE32 = struct.Struct("<I")
PTE64 = struct.Struct("<Q")

ENTRY_PRESENT = 1 << 0
ENTRY_PAGE_SIZE = 1 << 7  # PS: this PDE/PDPTE maps a large page
ADDRESS_MASK_64 = 0x000F_FFFF_FFFF_F000  # PTE bits 51:12; NX (63) and software bits 62:52 dropped
ADDRESS_MASK_32 = 0xFFFF_F000
LARGE_PAGE_32_MASK = 0xFFC0_0000  # 4 MiB PDE bits 31:22
LONG_CR3_MASK = 0x000F_FFFF_FFFF_F000  # drops PCID (11:0) and the CR3 no-flush bit 63
PAE_CR3_MASK = 0xFFFF_FFE0  # PAE PDPT is 32-byte aligned, bits 31:5
BIT32_CR3_MASK = 0xFFFF_F000
_U64 = 1 << 64


@dataclasses.dataclass(frozen=True)
class _Level:
    name: str
    shift: int  # VA bit where this level's index starts
    index_bits: int
    entry: struct.Struct
    large: bool  # PS=1 may map a page here


_LEVELS_32 = (
    _Level("PD", 22, 10, PTE32, True),
    _Level("PT", 12, 10, PTE32, False),
)
_LEVELS_PAE = (
    _Level("PDPT", 30, 2, PTE64, False),
    _Level("PD", 21, 9, PTE64, True),
    _Level("PT", 12, 9, PTE64, False),
)
_LEVELS_4 = (
    _Level("PML4", 39, 9, PTE64, False),
    _Level("PDPT", 30, 9, PTE64, True),  # 1 GiB pages
    _Level("PD", 21, 9, PTE64, True),  # 2 MiB pages
    _Level("PT", 12, 9, PTE64, False),
)
_LEVELS_5 = (_Level("PML5", 48, 9, PTE64, False), *_LEVELS_4)

_NATURAL_LEVELS = {PagingMode.NON_PAGED: 0, PagingMode.BIT32: 2, PagingMode.PAE: 3}


class VaNotMappedError(UnmappedAddressError):
    """An unmapped VA, with how far the hole extends (mirrors the newer DLL's unmappedRegionSize).

    ``unmapped_size`` counts bytes from the VA to the end of the region the failing entry (or the
    non-canonical hole) covers, so a scanner can skip it in one step.  It is always at least 1.
    """

    def __init__(
        self,
        message: str,
        address: int,
        *,
        unmapped_size: int,
        level: str | None = None,
        entry_address: int | None = None,
        entry_value: int | None = None,
    ) -> None:
        super().__init__(message, address)
        self.unmapped_size = max(1, unmapped_size)
        self.level = level
        self.entry_address = entry_address
        self.entry_value = entry_value


def _remaining(va: int, shift: int) -> int:
    size = 1 << shift
    return size - (va & (size - 1))


def _check_canonical(va: int, va_bits: int) -> None:
    """x86-64 canonical form: bits 63..va_bits-1 all equal."""
    top = va >> (va_bits - 1)
    if top in (0, (1 << (65 - va_bits)) - 1):
        return
    hole_end = _U64 - (1 << (va_bits - 1))  # first canonical upper-half address
    raise VaNotMappedError(
        f"VA {va:#x} not mapped: not canonical for {va_bits}-bit virtual addresses",
        va,
        unmapped_size=hole_end - va,
    )


def _read_entry(read_physical: ReadPhysical, va: int, level: _Level, addr: int) -> int:
    """Read one entry; an unreadable table makes the whole range that table covers unmapped."""
    size = level.entry.size
    table_shift = level.shift + level.index_bits
    cause: VmssdError | None = None
    try:
        raw = read_physical(addr, size)
    except VmssdError as exc:
        raw, cause = b"", exc
    if len(raw) != size:
        why = cause if cause is not None else f"got {len(raw)} of {size} bytes"
        raise VaNotMappedError(
            f"VA {va:#x} not mapped: cannot read {level.name} entry at GPA {addr:#x}: {why}",
            va,
            unmapped_size=_remaining(va, table_shift),
            level=level.name,
            entry_address=addr,
        ) from cause
    return int(level.entry.unpack(raw)[0])


def translate_with_size(
    read_physical: ReadPhysical,
    va: int,
    *,
    mode: PagingMode,
    cr3: int,
    levels: int | None = None,
    pse: bool = True,
) -> tuple[int, int]:
    """Translate ``va``; return ``(gpa, bytes left in that page or large page from gpa)``.

    ``levels`` picks 4- or 5-level (LA57) paging in long mode; for other modes it may only repeat
    the mode's own depth.  ``pse`` is CR4.PSE: whether 32-bit paging honours PS=1 (4 MiB pages).
    """
    mode = PagingMode(mode)
    if not 0 <= va < _U64:
        raise VaNotMappedError(f"VA {va:#x} not mapped: outside the 64-bit address space", va, unmapped_size=1)
    if mode is PagingMode.ARMV8:
        raise UnsupportedError("ARMv8 stage-1 translation (TTBR0/1_EL1, TCR_EL1) is not implemented")
    if mode is PagingMode.INVALID:
        raise UnsupportedError("paging mode Invalid: the VP state does not say how to translate")
    if mode is PagingMode.LONG:
        if levels is None:
            levels = 4
        if levels not in (4, 5):
            raise ValueError(f"long mode uses 4 or 5 paging levels, not {levels}")
        _check_canonical(va, 57 if levels == 5 else 48)
        table_levels = _LEVELS_5 if levels == 5 else _LEVELS_4
        table = cr3 & LONG_CR3_MASK
    else:
        natural = _NATURAL_LEVELS[mode]
        if levels is not None and levels != natural:
            raise ValueError(f"paging mode {mode.name} uses {natural} levels, not {levels}")
        if mode is PagingMode.NON_PAGED:
            return va, _remaining(va, 12)
        if va >> 32:
            raise VaNotMappedError(
                f"VA {va:#x} not mapped: above 4 GiB in {mode.name} paging", va, unmapped_size=_U64 - va
            )
        if mode is PagingMode.PAE:
            table_levels, table = _LEVELS_PAE, cr3 & PAE_CR3_MASK
        else:
            table_levels, table = _LEVELS_32, cr3 & BIT32_CR3_MASK

    is32 = mode is PagingMode.BIT32
    for depth, level in enumerate(table_levels):
        index = (va >> level.shift) & ((1 << level.index_bits) - 1)
        addr = table + index * level.entry.size
        entry = _read_entry(read_physical, va, level, addr)
        if not entry & ENTRY_PRESENT:
            raise VaNotMappedError(
                f"VA {va:#x} not mapped: {level.name} entry at GPA {addr:#x} is {entry:#x}",
                va,
                unmapped_size=_remaining(va, level.shift),
                level=level.name,
                entry_address=addr,
                entry_value=entry,
            )
        last = depth == len(table_levels) - 1
        if last or (level.large and entry & ENTRY_PAGE_SIZE and (pse or not is32)):
            offset_mask = (1 << level.shift) - 1
            if is32 and not last:
                # 4 MiB page; PSE-36/40 put physical bits 39:32 in PDE bits 20:13.
                base = (entry & LARGE_PAGE_32_MASK) | ((entry >> 13) & 0xFF) << 32
            elif is32:
                base = entry & ADDRESS_MASK_32
            else:
                base = entry & ADDRESS_MASK_64 & ~offset_mask
            return base | (va & offset_mask), _remaining(va, level.shift)
        table = entry & (ADDRESS_MASK_32 if is32 else ADDRESS_MASK_64)
    raise AssertionError("unreachable: the last level always returns")  # pragma: no cover
