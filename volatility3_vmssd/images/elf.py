"""ELF64 cores: one ``PT_LOAD`` per guest-physical range and a ``PT_NOTE`` with the VPs' registers.

``p_paddr`` = ``p_vaddr`` = GPA, as QEMU's ``dump-guest-memory paging=false`` writes them (Volatility's
Elf64Layer maps ``p_paddr``); one ``NT_PRSTATUS`` per VP in the Linux layout, so gdb and crash see the CPUs.
The reader parses only what is needed to find the ranges and notes.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from ..cpu.registers import RegisterValue, SegmentRegister
from ..errors import FormatError, VmssdError
from .ranges import MemoryRange, sorted_ranges
from .streaming import READ_SIZE, SPARSE_MIN, ExportReport, Progress, Read, SparseWriter, copy_range

ELF_MAGIC = b"\x7fELF"
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
PT_LOAD = 1
PT_NOTE = 4
ELF_NOTE_HEADER = struct.Struct("<III")
ET_CORE = 4
EM_X86_64 = 62
EM_AARCH64 = 183
PF_R, PF_W, PF_X = 4, 2, 1
NT_PRSTATUS = 1
ELF_DATA_ALIGN = 0x1000
PRSTATUS_PREFIX = struct.Struct("<3ih2xQQ4i64x")
X86_64_USER_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip
"""Linux ``struct user_regs_struct`` order (x86_64), the ``pr_reg`` of an ``NT_PRSTATUS`` note."""
PRSTATUS_X86_64_SIZE = PRSTATUS_PREFIX.size + 8 * len(X86_64_USER_REGS) + 8  # + pr_fpvalid + padding = 336
PRSTATUS_AARCH64_SIZE = PRSTATUS_PREFIX.size + 8 * 34 + 8  # user_pt_regs: x0-x30, sp, pc, pstate = 392


@dataclasses.dataclass(frozen=True)
class ElfNote:
    name: bytes
    type: int
    desc: bytes


def elf_ranges(fh: BinaryIO, path: str, size: int) -> tuple[list[MemoryRange], list[ElfNote]]:
    fh.seek(0)
    raw = fh.read(ELF64_HEADER.size)
    if len(raw) < ELF64_HEADER.size or raw[4] != 2 or raw[5] != 1:
        raise FormatError(path, 0, "expected a little-endian ELF64 core")
    fields = ELF64_HEADER.unpack(raw)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    if phentsize != ELF64_PHDR.size or phoff + phnum * phentsize > size:
        raise FormatError(path, phoff, "ELF program headers do not fit in the file")
    fh.seek(phoff)
    table = fh.read(phnum * phentsize)
    ranges, notes = [], []
    for i in range(phnum):
        ptype, _fl, off, _va, paddr, filesz, _memsz, _al = ELF64_PHDR.unpack_from(table, i * phentsize)
        if off + filesz > size:
            raise FormatError(path, phoff + i * phentsize, f"PT segment {i} runs past the end of the file")
        if ptype == PT_LOAD and filesz:
            ranges.append(MemoryRange(paddr, filesz, off))
        elif ptype == PT_NOTE and filesz <= 1 << 20:
            fh.seek(off)
            notes.extend(parse_notes(fh.read(filesz)))
    return ranges, notes


def parse_notes(data: bytes) -> list[ElfNote]:
    notes = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        pos += 12
        name = data[pos : pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        desc = data[pos : pos + descsz]
        pos += (descsz + 3) & ~3
        notes.append(ElfNote(name, ntype, desc))
    return notes


def _reg_int(regs: Mapping[str, RegisterValue], name: str) -> int:
    value = regs.get(name, 0)
    if isinstance(value, SegmentRegister):
        return value.selector
    return value & 0xFFFF_FFFF_FFFF_FFFF if isinstance(value, int) else 0


def _prstatus(pid: int, reg_values: Sequence[int]) -> bytes:
    prefix = PRSTATUS_PREFIX.pack(0, 0, 0, 0, 0, 0, pid, 0, 0, 0)
    return prefix + struct.pack(f"<{len(reg_values)}Q", *reg_values) + bytes(8)  # pr_fpvalid 0, padding


def prstatus_x86_64(vp_index: int, regs: Mapping[str, RegisterValue]) -> bytes:
    """An x86_64 ``elf_prstatus`` (336 bytes) for one VP; ``pr_pid`` is ``vp_index + 1`` (0 means none)."""
    fs, gs = regs.get("fs"), regs.get("gs")
    values: dict[str, int] = {name: _reg_int(regs, name) for name in X86_64_USER_REGS}
    values["eflags"] = _reg_int(regs, "rflags")
    values["orig_rax"] = 0  # not a syscall frame; QEMU writes 0 as well
    values["fs_base"] = fs.base if isinstance(fs, SegmentRegister) else 0
    values["gs_base"] = gs.base if isinstance(gs, SegmentRegister) else 0
    data = _prstatus(vp_index + 1, [values[name] for name in X86_64_USER_REGS])
    assert len(data) == PRSTATUS_X86_64_SIZE
    return data


def prstatus_aarch64(vp_index: int, regs: Mapping[str, RegisterValue]) -> bytes:
    """An aarch64 ``elf_prstatus`` (392 bytes): x0-x30, sp, pc, pstate.

    The saved state keeps pc and pstate in ELR_EL2/SPSR_EL2 (our reading of the layout); sp is
    SP_EL1 when pstate says EL1h, else SP_EL0.
    """
    pc = _reg_int(regs, "pc") or _reg_int(regs, "elr_el2")
    pstate = _reg_int(regs, "cpsr") or _reg_int(regs, "spsr_el2")
    sp = _reg_int(regs, "sp_el1") if pstate & 0xF == 0b0101 else _reg_int(regs, "sp_el0")
    values = [_reg_int(regs, f"x{i}") for i in range(29)]
    values += [_reg_int(regs, "fp"), _reg_int(regs, "lr"), sp, pc, pstate]
    data = _prstatus(vp_index + 1, values)
    assert len(data) == PRSTATUS_AARCH64_SIZE
    return data


def elf_note(name: bytes, note_type: int, desc: bytes) -> bytes:
    """One ELF note, name and descriptor each padded to 4 bytes."""
    name_z = name + b"\0"
    return ELF_NOTE_HEADER.pack(len(name_z), len(desc), note_type) + _pad4(name_z) + _pad4(desc)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def write_elf(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    *,
    machine: int = EM_X86_64,
    notes: bytes = b"",
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """An ELF64 core: ``PT_NOTE`` (when ``notes``), then one ``PT_LOAD`` per range.

    Each range's data starts at a file offset congruent to its GPA modulo :data:`SPARSE_MIN`, so the
    zero MiBs of RAM are whole sparse blocks of the file; the padding is itself a hole (no disk space).
    """
    rs = sorted_ranges(ranges)
    phnum = len(rs) + (1 if notes else 0)
    if phnum > 0xFFFF:
        raise VmssdError(f"{len(rs)} GPA ranges do not fit in an ELF program header table")
    note_offset = ELF64_HEADER.size + phnum * ELF64_PHDR.size
    offset = note_offset + len(notes)
    offsets = []
    for gpa, length in rs:
        offset += (gpa - offset) % SPARSE_MIN
        offsets.append(offset)
        offset += length
    phdrs = []
    if notes:
        phdrs.append(ELF64_PHDR.pack(PT_NOTE, 0, note_offset, 0, 0, len(notes), len(notes), 0))
    for (gpa, length), off in zip(rs, offsets, strict=True):
        phdrs.append(ELF64_PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, off, gpa, gpa, length, length, ELF_DATA_ALIGN))
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, little endian, EV_CURRENT, System V
    ehdr = ELF64_HEADER.pack(
        ident, ET_CORE, machine, 1, 0, ELF64_HEADER.size, 0, 0, ELF64_HEADER.size, ELF64_PHDR.size, phnum, 0, 0, 0
    )
    writer = SparseWriter(out)
    writer.write(ehdr + b"".join(phdrs) + notes)
    for (gpa, length), off in zip(rs, offsets, strict=True):
        writer.skip(off - writer.pos)
        copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("elf", len(rs), sum(n for _, n in rs))
    report.size, report.stored = writer.finish(), writer.stored
    return report
