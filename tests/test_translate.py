"""Page-table walks over hand-built tables in a bytearray "physical memory"."""

from __future__ import annotations

import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from volatility3_vmssd.cpu.cpumode import CR4_PSE, paging_levels, paging_mode
from volatility3_vmssd.cpu.registers import PagingMode, PrologVendor
from volatility3_vmssd.cpu.translate import VaNotMappedError, translate_with_size
from volatility3_vmssd.errors import UnmappedAddressError, UnsupportedError, VmssdError

P, RW, PS = 1, 2, 0x80
NX = 1 << 63
MiB, GiB = 1 << 20, 1 << 30


def translate(read, va: int, **walk):  # type: ignore[no-untyped-def]
    """The GPA alone, as the DLL's GuestVirtualAddressToPhysicalAddress answers."""
    return translate_with_size(read, va, **walk)[0]


class Phys:
    """Guest-physical memory: a bytearray; reads past it fail like an unbacked GPA."""

    def __init__(self, size: int = 4 * MiB) -> None:
        self.mem = bytearray(size)

    def put32(self, addr: int, value: int) -> None:
        struct.pack_into("<I", self.mem, addr, value)

    def put64(self, addr: int, value: int) -> None:
        struct.pack_into("<Q", self.mem, addr, value)

    def read(self, addr: int, size: int) -> bytes:
        if addr < 0 or addr + size > len(self.mem):
            raise UnmappedAddressError(f"GPA {addr:#x} is not backed", addr)
        return bytes(self.mem[addr : addr + size])


def idx(va: int, shift: int, bits: int = 9) -> int:
    return (va >> shift) & ((1 << bits) - 1)


# ---------------------------------------------------------------------------------------------
# 32-bit paging
# ---------------------------------------------------------------------------------------------

PD32, PT32 = 0x1000, 0x2000


def build_32bit() -> Phys:
    phys = Phys()
    phys.put32(PD32 + 1 * 4, PT32 | P | RW)  # VA 0x0040_0000..: page table
    phys.put32(PT32 + 1 * 4, 0x0000_5000 | P)  # VA 0x0040_1000 -> 0x5000
    phys.put32(PD32 + 2 * 4, 0x00C0_0000 | (0x3 << 13) | PS | P)  # VA 0x0080_0000: 4 MiB page, PSE-36 bits
    phys.put32(PD32 + 3 * 4, 0x0000_3000 | PS | P)  # with pse=False this is a page-table pointer
    phys.put32(0x3000 + 5 * 4, 0x0000_7000 | P)
    return phys


def test_32bit_4k_page() -> None:
    phys = build_32bit()
    cr3 = PD32 | 0x18  # PWT/PCD bits must be ignored
    assert translate(phys.read, 0x0040_1234, mode=PagingMode.BIT32, cr3=cr3) == 0x5234
    assert translate_with_size(phys.read, 0x0040_1234, mode=PagingMode.BIT32, cr3=cr3) == (0x5234, 0x1000 - 0x234)


def test_32bit_4m_page_with_pse36_bits() -> None:
    phys = build_32bit()
    gpa, left = translate_with_size(phys.read, 0x0080_1234, mode=PagingMode.BIT32, cr3=PD32)
    assert gpa == 0x3_00C0_1234
    assert left == 4 * MiB - 0x1234


def test_32bit_ps_bit_ignored_without_pse() -> None:
    phys = build_32bit()
    va = 0x00C0_5678
    assert translate(phys.read, va, mode=PagingMode.BIT32, cr3=PD32, pse=False) == 0x7678
    # with PSE the same PDE is a 4 MiB page: bits 31:22 = 0, and bit 13 of 0x3000 is PSE-36 bit 32
    assert translate(phys.read, va, mode=PagingMode.BIT32, cr3=PD32, pse=True) == 0x1_0000_5678


def test_32bit_non_present_and_out_of_range() -> None:
    phys = build_32bit()
    with pytest.raises(UnmappedAddressError) as exc:
        translate(phys.read, 0x1000_0000, mode=PagingMode.BIT32, cr3=PD32)
    pde = PD32 + (0x1000_0000 >> 22) * 4
    assert str(exc.value) == f"VA {0x1000_0000:#x} not mapped: PD entry at GPA {pde:#x} is 0x0"
    assert exc.value.address == 0x1000_0000
    with pytest.raises(UnmappedAddressError, match=re.escape("PT entry at GPA 0x2008 is 0x0")):
        translate(phys.read, 0x0040_2000, mode=PagingMode.BIT32, cr3=PD32)
    with pytest.raises(UnmappedAddressError, match="above 4 GiB"):
        translate(phys.read, 1 << 32, mode=PagingMode.BIT32, cr3=PD32)


# ---------------------------------------------------------------------------------------------
# PAE
# ---------------------------------------------------------------------------------------------

PDPT_PAE, PD_PAE, PT_PAE = 0x3020, 0x4000, 0x5000


def build_pae() -> Phys:
    phys = Phys()
    phys.put64(PDPT_PAE + 1 * 8, PD_PAE | P)  # VA 0x4000_0000..0x7FFF_FFFF
    phys.put64(PD_PAE + 1 * 8, PT_PAE | P | RW | NX)  # NX on a table pointer must not leak into the address
    phys.put64(PT_PAE + 1 * 8, 0x1_2345_6000 | P | NX)  # above 4 GiB: PAE reaches 52-bit GPAs
    # 2 MiB page with NX, PAT (bit 12) and software bits 62:52 set: only bits 51:21 are the address
    phys.put64(PD_PAE + 2 * 8, NX | (0x7FF << 52) | 0x1_2340_0000 | 0x1000 | PS | P)
    return phys


def test_pae_4k_and_2m_pages() -> None:
    phys = build_pae()
    cr3 = PDPT_PAE | 0x18
    assert translate(phys.read, 0x4020_1ABC, mode=PagingMode.PAE, cr3=cr3) == 0x1_2345_6ABC
    gpa, left = translate_with_size(phys.read, 0x4045_4321, mode=PagingMode.PAE, cr3=cr3)
    assert gpa == 0x1_2340_0000 + 0x5_4321
    assert left == 2 * MiB - 0x5_4321


def test_pae_cr3_alignment_is_32_bytes() -> None:
    phys = build_pae()
    # CR3 bits 31:5 name the PDPT: 0x3020 is not page aligned and must not be rounded down to 0x3000
    with pytest.raises(UnmappedAddressError, match=re.escape("PDPT entry at GPA 0x3008 is 0x0")):
        translate(phys.read, 0x4020_1ABC, mode=PagingMode.PAE, cr3=0x3000)


def test_pae_non_present_pdpte() -> None:
    phys = build_pae()
    with pytest.raises(VaNotMappedError) as exc:
        translate_with_size(phys.read, 0xC000_0000, mode=PagingMode.PAE, cr3=PDPT_PAE)
    assert str(exc.value) == f"VA 0xc0000000 not mapped: PDPT entry at GPA {PDPT_PAE + 24:#x} is 0x0"
    assert exc.value.level == "PDPT" and exc.value.entry_address == PDPT_PAE + 24
    assert exc.value.unmapped_size == GiB


# ---------------------------------------------------------------------------------------------
# 4-level and 5-level long mode
# ---------------------------------------------------------------------------------------------

PML5, PML4, PDPT, PD, PT = 0x9000, 0x10000, 0x11000, 0x12000, 0x13000
KERNEL_VA = 0xFFFF_8000_0020_1000  # PML4[256] PDPT[0] PD[1] PT[1]
HUGE_VA = 0xFFFF_8000_4000_0000  # PDPT[1]: 1 GiB page
LARGE_VA = 0xFFFF_8000_0040_0000  # PD[2]: 2 MiB page
FIVE_LEVEL_VA = 0x00AB_0000_0020_1000  # only canonical with 57-bit addresses


def build_long() -> Phys:
    phys = Phys()
    phys.put64(PML4 + idx(KERNEL_VA, 39) * 8, PDPT | P | RW)
    phys.put64(PDPT + 0 * 8, PD | P | RW)
    phys.put64(PD + 1 * 8, PT | P | RW | NX)
    phys.put64(PT + 1 * 8, 0x0000_7654_3210_0000 | P | NX | 0x100)  # bits above 51 must be masked
    phys.put64(PDPT + 1 * 8, 0x40_0000_0000 | 0x1000 | PS | P)  # 1 GiB page at 256 GiB (PAT bit set)
    phys.put64(PD + 2 * 8, 0x8_0020_0000 | PS | P | NX)  # 2 MiB page
    # 5-level: PML5[0xAB >> 1 ...]: VA bits 56:48 select the PML5 entry
    phys.put64(PML5 + idx(FIVE_LEVEL_VA, 48) * 8, PML4 | P)
    phys.put64(PML4 + idx(FIVE_LEVEL_VA, 39) * 8, PDPT | P)
    return phys


def test_long_mode_4k_with_pcid_bits_in_cr3() -> None:
    phys = build_long()
    cr3 = PML4 | 0x123 | 1 << 63  # PCID 0x123 and the no-flush bit
    gpa, left = translate_with_size(phys.read, KERNEL_VA + 0x2A, mode=PagingMode.LONG, cr3=cr3)
    assert gpa == 0x7654_3210_002A
    assert left == 0x1000 - 0x2A


def test_long_mode_2m_and_1g_pages() -> None:
    phys = build_long()
    assert translate_with_size(phys.read, LARGE_VA + 0x12345, mode=PagingMode.LONG, cr3=PML4) == (
        0x8_0020_0000 + 0x12345,
        2 * MiB - 0x12345,
    )
    assert translate_with_size(phys.read, HUGE_VA + 0x1234_5678, mode=PagingMode.LONG, cr3=PML4) == (
        0x40_0000_0000 + 0x1234_5678,
        GiB - 0x1234_5678,
    )


def test_long_mode_non_present_levels() -> None:
    phys = build_long()
    with pytest.raises(VaNotMappedError) as exc:
        translate(phys.read, 0x80_0000_1000, mode=PagingMode.LONG, cr3=PML4)  # PML4[1]
    assert str(exc.value) == f"VA 0x8000001000 not mapped: PML4 entry at GPA {PML4 + 8:#x} is 0x0"
    assert exc.value.unmapped_size == (1 << 39) - 0x1000
    va = KERNEL_VA + 0x1000  # PT[2] is empty
    with pytest.raises(VaNotMappedError) as exc:
        translate(phys.read, va, mode=PagingMode.LONG, cr3=PML4)
    assert exc.value.level == "PT" and exc.value.entry_address == PT + 16 and exc.value.unmapped_size == 0x1000


def test_non_canonical_addresses() -> None:
    phys = build_long()
    for va in (0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF, FIVE_LEVEL_VA):
        with pytest.raises(VaNotMappedError, match="not canonical") as exc:
            translate(phys.read, va, mode=PagingMode.LONG, cr3=PML4)
        assert exc.value.unmapped_size == 0xFFFF_8000_0000_0000 - va
    with pytest.raises(UnmappedAddressError, match="not canonical"):
        translate(phys.read, 0x0100_0000_0000_0000, mode=PagingMode.LONG, cr3=PML5, levels=5)
    with pytest.raises(UnmappedAddressError):
        translate(phys.read, 1 << 64, mode=PagingMode.LONG, cr3=PML4)
    with pytest.raises(UnmappedAddressError):
        translate(phys.read, -1, mode=PagingMode.LONG, cr3=PML4)


def test_five_level_paging() -> None:
    phys = build_long()
    assert translate(phys.read, FIVE_LEVEL_VA + 0x10, mode=PagingMode.LONG, cr3=PML5 | 0x5, levels=5) == (
        0x7654_3210_0010
    )
    # the upper half under LA57 starts at 0xFF00_0000_0000_0000; PML5[511] is empty here
    with pytest.raises(UnmappedAddressError, match="PML5 entry"):
        translate(phys.read, 0xFF00_0000_0000_0000, mode=PagingMode.LONG, cr3=PML5, levels=5)


def test_read_failure_names_the_table_gpa() -> None:
    phys = build_long()
    phys.put64(PD + 3 * 8, 0xFFF_0000 | P)  # page table beyond the 4 MiB of "RAM"
    va = 0xFFFF_8000_0060_0000
    with pytest.raises(VaNotMappedError) as exc:
        translate(phys.read, va, mode=PagingMode.LONG, cr3=PML4)
    assert f"cannot read PT entry at GPA {0xFFF_0000:#x}" in str(exc.value)
    assert isinstance(exc.value.__cause__, UnmappedAddressError)
    assert exc.value.unmapped_size == 2 * MiB

    def short_read(addr: int, size: int) -> bytes:
        return phys.read(addr, size)[:3]

    with pytest.raises(UnmappedAddressError, match="got 3 of 8 bytes"):
        translate(short_read, KERNEL_VA, mode=PagingMode.LONG, cr3=PML4)

    def buggy(addr: int, size: int) -> bytes:
        raise RuntimeError("a bug, not an unmapped address")

    with pytest.raises(RuntimeError):
        translate(buggy, KERNEL_VA, mode=PagingMode.LONG, cr3=PML4)


# ---------------------------------------------------------------------------------------------
# modes without a walk
# ---------------------------------------------------------------------------------------------


def test_non_paged_is_identity() -> None:
    def never(addr: int, size: int) -> bytes:
        raise AssertionError("no table reads in non-paged mode")

    assert translate_with_size(never, 0x12_3456, mode=PagingMode.NON_PAGED, cr3=0xDEAD) == (0x12_3456, 0xBAA)


def test_unsupported_modes_and_bad_levels() -> None:
    phys = Phys(0x1000)
    with pytest.raises(UnsupportedError, match="ARMv8"):
        translate(phys.read, 0, mode=PagingMode.ARMV8, cr3=0)
    with pytest.raises(UnsupportedError):
        translate(phys.read, 0, mode=PagingMode.INVALID, cr3=0)
    with pytest.raises(ValueError):
        translate(phys.read, 0, mode=PagingMode.LONG, cr3=0, levels=3)
    with pytest.raises(ValueError):
        translate(phys.read, 0, mode=PagingMode.PAE, cr3=0, levels=4)
    assert translate(phys.read, 0x1234, mode=PagingMode.NON_PAGED, cr3=0, levels=0) == 0x1234


def test_partition_state_helpers_feed_the_walker() -> None:
    """paging_mode/paging_levels/CR4.PSE give exactly the arguments translate() takes."""
    phys = build_long()
    regs = {"cr0": 0x8005_0033, "cr3": PML5, "cr4": 0x6F0 | 1 << 12, "efer": 0xD01}
    mode = paging_mode(regs, PrologVendor.INTEL)
    levels = paging_levels(regs, PrologVendor.INTEL)
    assert (mode, levels) == (PagingMode.LONG, 5)
    gpa = translate(
        phys.read, FIVE_LEVEL_VA, mode=mode, cr3=regs["cr3"], levels=levels, pse=bool(regs["cr4"] & CR4_PSE)
    )
    assert gpa == 0x7654_3210_0000


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------

_LONG = build_long()


@given(st.integers(min_value=0, max_value=2 * MiB - 1))
def test_offsets_within_a_large_page(offset: int) -> None:
    gpa, left = translate_with_size(_LONG.read, LARGE_VA + offset, mode=PagingMode.LONG, cr3=PML4)
    assert gpa == 0x8_0020_0000 + offset
    assert left == 2 * MiB - offset


@settings(max_examples=200, deadline=None)
@given(
    memory=st.binary(min_size=64, max_size=0x3000),
    va=st.integers(min_value=0, max_value=(1 << 64) - 1),
    cr3=st.integers(min_value=0, max_value=(1 << 64) - 1),
    mode_levels=st.sampled_from(
        [(PagingMode.BIT32, None), (PagingMode.PAE, None), (PagingMode.LONG, 4), (PagingMode.LONG, 5)]
    ),
    pse=st.booleans(),
)
def test_random_tables_only_raise_vmssd_errors(
    memory: bytes, va: int, cr3: int, mode_levels: tuple[PagingMode, int | None], pse: bool
) -> None:
    """Garbage tables (entries pointing anywhere) give a GPA or an UnmappedAddressError, nothing else."""
    mode, levels = mode_levels

    def read(addr: int, size: int) -> bytes:
        start = addr % len(memory)  # wrap: every table "exists"
        return (memory[start:] + memory)[:size]

    try:
        gpa, left = translate_with_size(read, va, mode=mode, cr3=cr3, levels=levels, pse=pse)
    except VmssdError as exc:
        assert isinstance(exc, UnmappedAddressError)
        return
    assert 0 <= gpa < 1 << 52
    assert 1 <= left <= GiB
