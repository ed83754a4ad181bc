"""cpu/kernel_dtb.py on hand-built page tables: a kernel DTB is accepted only when Windows would vouch for it.

Each test lays out tables in a bytearray (4-level, PAE or 32-bit), with the self-reference at an
index drawn from a seeded generator, and a PE header whose CodeView record names a PDB.  The
expected verdict is derived from what was built, never written down.
"""

from __future__ import annotations

import random
import struct
import uuid

import pytest
from shared_data import SHARED
from windows_guest import CONTEXTS, build_windows_guest, pe_header, shared_isfs

from volatility3_vmssd.cpu.kernel_dtb import (
    MAX_IMAGE_SPAN,
    PageTables,
    check_kernel_dtb,
    choose_kernel_dtb,
    register_hints,
)

PAGE = 0x1000
RAM = 8 << 20
KUSER_KERNEL = 0xFFFF_F780_0000_0000
KUSER_USER = 0x7FFE_0000


class Guest:
    """Guest RAM with a page allocator and x86 table writers for the three Windows paging modes."""

    def __init__(self, levels: int, seed: int) -> None:
        self.levels = levels
        self.ram = bytearray(RAM)
        self.rng = random.Random(seed)
        self.free = list(range(0x100, RAM // PAGE))
        self.rng.shuffle(self.free)
        self.width = 4 if levels == 2 else 8

    def page(self) -> int:
        return self.free.pop() * PAGE

    def entry(self, table: int, index: int) -> int:
        return int.from_bytes(self.ram[table + index * self.width : table + (index + 1) * self.width], "little")

    def set(self, table: int, index: int, value: int) -> None:
        self.ram[table + index * self.width : table + (index + 1) * self.width] = value.to_bytes(self.width, "little")

    def indices(self, va: int) -> list[int]:
        if self.levels == 4:
            return [(va >> s) & 0x1FF for s in (39, 30, 21, 12)]
        if self.levels == 3:
            return [(va >> 30) & 3, (va >> 21) & 0x1FF, (va >> 12) & 0x1FF]
        return [(va >> 22) & 0x3FF, (va >> 12) & 0x3FF]

    def new_root(self) -> int:
        if self.levels != 3:
            return self.page()
        pdpt = self.page()  # Windows PAE: all four page directories exist
        for i in range(4):
            self.set(pdpt, i, self.page() | 1)
        return pdpt

    def map(self, root: int, va: int, pa: int, flags: int = 0x63) -> None:
        *upper, last = self.indices(va)
        table = root
        for depth, index in enumerate(upper):
            entry = self.entry(table, index)
            if not entry & 1:
                entry = self.page() | (1 if self.levels == 3 and depth == 0 else 0x67)
                self.set(table, index, entry)
            table = entry & 0x000F_FFFF_FFFF_F000
        self.set(table, last, pa | flags)

    def self_map(self, root: int, index: int | None = None) -> int:
        """The mode's self-reference (4-level: at ``index``, drawn when None); returns the index."""
        if self.levels == 4:
            index = self.rng.randrange(0x100, 0x200) if index is None else index
            self.set(root, index, root | 0x63)
            return index
        if self.levels == 3:
            last = self.entry(root, 3) & ~0xFFF
            for i in range(4):
                self.set(last, i, (self.entry(root, i) & ~0xFFF) | 0x63)
            return 3
        self.set(root, 0x300, root | 0x63)
        return 0x300

    def read(self, address: int, length: int) -> bytes | None:
        return bytes(self.ram[address : address + length]) if address >= 0 and address + length <= RAM else None

    def kernel_image(self, root: int, base: int, pdb: str = "ntkrnlmp.pdb", pages: int = 8) -> tuple[str, int]:
        """A PE header at ``base`` (plus ``pages`` - 1 mapped pages) naming ``pdb``; returns (GUID, age)."""
        guid = str(uuid.UUID(int=self.rng.getrandbits(128))).replace("-", "").upper()
        age = self.rng.randrange(1, 5)
        header = self.page()
        self.ram[header : header + PAGE] = pe_header(base, pages * PAGE, guid, age, pdb, 0x5F000000)
        self.map(root, base, header)
        for n in range(1, pages):
            self.map(root, base + n * PAGE, self.page())
        return guid, age


def kernel_va(levels: int) -> int:
    return 0xFFFF_F806_1240_0000 if levels == 4 else 0x8240_0000


@pytest.mark.parametrize("seed", range(6))
def test_long_mode_kernel_table_is_accepted_whatever_the_self_reference_index(seed: int) -> None:
    g = Guest(4, seed)
    root = g.new_root()
    index = g.self_map(root)
    base = kernel_va(4) + g.rng.randrange(0, 64) * 0x200000
    guid, age = g.kernel_image(root, base)
    verdict = check_kernel_dtb(g.read, root, 4, [base + 5 * PAGE + 0x180])
    assert verdict.ok, verdict.reason
    assert (verdict.self_ref_index, verdict.kernel_base, verdict.guid, verdict.age) == (index, base, guid, age)
    assert verdict.pdb_name == "ntkrnlmp.pdb"


def test_kva_shadow_user_table_is_refused() -> None:
    """User half + KUSER_SHARED_DATA + the shadow syscall entry page: what a user-mode VP runs on."""
    g = Guest(4, 7)
    kernel = g.new_root()
    g.self_map(kernel)
    base = kernel_va(4)
    g.kernel_image(kernel, base, pages=16)
    shadow = g.new_root()
    kuser = g.page()
    g.map(shadow, KUSER_USER, kuser, 0x67)
    g.map(shadow, KUSER_KERNEL, kuser)
    entry = base + 12 * PAGE
    g.map(shadow, entry, g.page())
    verdict = check_kernel_dtb(g.read, shadow, 4, [entry])
    assert not verdict.ok and verdict.kind == "no-self-reference"
    assert check_kernel_dtb(g.read, kernel, 4, [entry]).ok  # the same hint through the kernel's own table


def test_self_reference_without_the_kernel_image_is_refused() -> None:
    g = Guest(4, 8)
    root = g.new_root()
    g.self_map(root)
    code = kernel_va(4) + 0x3000
    g.map(root, code, g.page())  # code mapped, but no header anywhere below it
    verdict = check_kernel_dtb(g.read, root, 4, [code])
    assert verdict.kind == "no-kernel-image" and verdict.self_ref_index is not None


def test_an_image_that_is_not_the_nt_kernel_is_refused() -> None:
    """VTL1's tables: a self-reference and the secure kernel's image, whose PDB is not the NT kernel's."""
    g = Guest(4, 9)
    root = g.new_root()
    g.self_map(root)
    g.kernel_image(root, kernel_va(4), pdb="securekernel.pdb")
    verdict = check_kernel_dtb(g.read, root, 4, [kernel_va(4) + 0x2000])
    assert verdict.kind == "no-kernel-image" and "securekernel.pdb" in verdict.reason


def test_hint_beyond_the_image_does_not_count() -> None:
    g = Guest(4, 10)
    root = g.new_root()
    g.self_map(root)
    g.kernel_image(root, kernel_va(4), pages=4)
    outside = kernel_va(4) + 6 * PAGE
    g.map(root, outside, g.page())
    assert check_kernel_dtb(g.read, root, 4, [outside]).kind == "no-kernel-image"
    far = kernel_va(4) + MAX_IMAGE_SPAN + 2 * PAGE  # the walk back is bounded
    assert check_kernel_dtb(g.read, root, 4, [far]).kind == "no-kernel-image"


@pytest.mark.parametrize(
    ("indices", "why"),
    [((0x20,), "no PML4 entry"), ((0x1A0, 0x1B0), "point back")],
    ids=["user-half", "two"],
)
def test_self_reference_must_be_one_kernel_half_entry(indices: tuple[int, ...], why: str) -> None:
    g = Guest(4, 11)
    root = g.new_root()
    for index in indices:
        g.self_map(root, index)
    g.kernel_image(root, kernel_va(4))
    verdict = check_kernel_dtb(g.read, root, 4, [kernel_va(4) + 0x100])
    assert not verdict.ok
    if len(indices) == 1:
        assert verdict.kind == "no-self-reference"  # a user-half self-map is not Windows'
    else:
        assert why in verdict.reason


def test_without_kernel_addresses_in_the_registers_nothing_is_proven() -> None:
    g = Guest(4, 12)
    root = g.new_root()
    g.self_map(root)
    g.kernel_image(root, kernel_va(4))
    verdict = check_kernel_dtb(g.read, root, 4, [0x7FF6_0000_1000])  # a user-mode RIP only
    assert verdict.kind == "no-hints"


def test_idt_gates_are_hints() -> None:
    g = Guest(4, 13)
    root = g.new_root()
    g.self_map(root)
    base = kernel_va(4)
    g.kernel_image(root, base)
    idt_va, idt = 0xFFFF_F806_0000_0000, g.page()
    g.map(root, idt_va, idt)
    handler = base + 3 * PAGE + 0x40
    g.ram[idt + 14 * 16 : idt + 15 * 16] = struct.pack(
        "<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E, handler >> 16 & 0xFFFF, handler >> 32, 0
    )
    verdict = check_kernel_dtb(g.read, root, 4, [], [idt_va])
    assert verdict.ok and verdict.kernel_base == base


def test_register_hints_take_lstar_rip_and_idtr() -> None:
    class Table:
        def __init__(self, base: int) -> None:
            self.base = base

    code, idts = register_hints([{"lstar": 5, "rip": 6, "idtr": Table(7)}, {"lstar": 5, "rip": 8}])
    assert (code, idts) == ([5, 6, 8], [7])


def test_pae_self_map_and_image() -> None:
    g = Guest(3, 14)
    root = g.new_root()
    assert g.self_map(root) == 3
    base = kernel_va(3)
    g.kernel_image(root, base)
    verdict = check_kernel_dtb(g.read, root, 3, [base + 0x1800])
    assert verdict.ok and verdict.kernel_base == base
    last = g.entry(root, 3) & ~0xFFF
    g.set(last, 1, 0)  # the last directory no longer maps the second one
    assert check_kernel_dtb(g.read, root, 3, [base + 0x1800]).kind == "no-self-reference"


def test_32bit_self_map_and_large_page_image() -> None:
    g = Guest(2, 15)
    root = g.new_root()
    assert g.self_map(root) == 0x300
    base = 0x8240_0000  # 4 MiB aligned: one PSE page holding the image
    phys = 0x400000
    g.ram[phys : phys + PAGE] = pe_header(base, 0x10000, uuid.uuid4().hex, 1, "ntkrpamp.pdb", 0)
    g.set(root, base >> 22, phys | 0xE3)
    verdict = check_kernel_dtb(g.read, root, 2, [base + 0x8000])
    assert verdict.ok and verdict.pdb_name == "ntkrpamp.pdb"
    tables = PageTables(g.read, root, 2)
    assert tables.translate(base + 0x8123) == (phys + 0x8123, 0x400000 - 0x8123)


def test_five_level_and_unbacked_tables_are_refused_with_a_reason() -> None:
    g = Guest(4, 16)
    verdict = check_kernel_dtb(g.read, 0x1000, 5, [kernel_va(4)])
    assert verdict.kind == "unsupported" and "LA57" in verdict.reason
    verdict = check_kernel_dtb(g.read, RAM + 0x1000, 4, [kernel_va(4)])
    assert verdict.kind == "unreadable" and "not backed" in verdict.reason


# ---------------------------------------------------------------------------- the builder's guests


@pytest.mark.parametrize("context", CONTEXTS)
def test_builder_guests_vouch_exactly_as_built(context: str, tmp_path) -> None:
    """choose_kernel_dtb on every saved bank of a built guest picks the DTB the builder intended."""
    import json

    from volatility3_vmssd.cpu.cpujson import state_from_json

    isfs = shared_isfs(SHARED)
    if not isfs:
        pytest.skip(f"needs the Windows symbol tables under {SHARED}/data/windows-symbols; not present")
    guest = build_windows_guest(isfs[0], context, 3, tmp_path, ram_size=16 << 20)
    raw = guest.raw.read_bytes()

    def read(address: int, length: int) -> bytes | None:
        return raw[address : address + length] if address + length <= len(raw) else None

    state = state_from_json(json.loads(guest.registers.read_text()))
    banks = [(vp.index, vtl, regs) for vp in state.vps for vtl, regs in vp.registers.items()]
    choice = choose_kernel_dtb(read, banks)
    if guest.saved_cr3_dtb is None:
        assert choice.verdict is None
        assert {v.kind for _, vtl, v in choice.refused if vtl == 0} == {"no-self-reference"}  # shadow tables
    else:
        assert choice.verdict is not None and choice.verdict.dtb == guest.saved_cr3_dtb
        assert (choice.vp, choice.vtl) == guest.saved_cr3_source
        assert choice.verdict.kernel_base == guest.kernel_base and choice.verdict.guid == guest.guid
    if context == "vbs":  # VTL1's secure kernel is refused when reached: only forced here
        vtl1 = choose_kernel_dtb(read, [b for b in banks if b[1] == 1])
        assert vtl1.verdict is None and all("securekernel.pdb" in v.reason for _, _, v in vtl1.refused)
