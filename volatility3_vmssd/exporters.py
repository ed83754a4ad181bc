"""Streaming writers for the memory images ``vmssd convert`` produces: flat raw, LiME and ELF64 core.

They sit above the provider and use only its public interface.  What cannot be read (a RamBlock
that is absent, a page record stream cut short) is written as zeros *and recorded*
(:class:`CheckedReader`): the caller decides whether such an image may be kept, and lists the ranges.

Every writer takes the backed guest-physical ranges and a padded read function, reads at most
:data:`READ_SIZE` bytes at a time and never holds more, so memory use does not grow with the guest.
All-zero stretches of :data:`SPARSE_MIN` bytes or more are skipped with a seek instead of written
(the output is a sparse file where the file system supports it; elsewhere the seek fills zeros), and
the file is truncated to its final size at the end, so a trailing zero stretch still counts.

* raw: GPA 0 up to the end of the last range; holes read as zeros.
* LiME: one 32-byte range header per range (magic ``EMiL`` 0x4C694D45, version 1, start, inclusive
  end), then the range's bytes — what Volatility's LimeLayer and ``vmssd create`` read.
* ELF: an ``ET_CORE`` with one ``PT_LOAD`` per range, ``p_paddr`` = ``p_vaddr`` = GPA (as QEMU's
  ``dump-guest-memory paging=false`` writes them; Volatility's Elf64Layer maps ``p_paddr``), and a
  ``PT_NOTE`` with one ``NT_PRSTATUS`` per VP in the Linux layout, so gdb and crash see the CPUs.
* dmp: a Windows x64 kernel crash dump (``images/crashdump.py`` has the format, docs/crashdump.md).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from itertools import pairwise
from typing import TYPE_CHECKING, BinaryIO

from .errors import VmssdError
from .images import crashdump
from .images.winsymbols import KernelImage, kernel_symbols, self_referencing_tables
from .savedstate.images import ELF64_HEADER as ELF64_EHDR  # layouts declared once, beside their reader
from .savedstate.images import ELF64_PHDR, LIME_HEADER, LIME_MAGIC, LIME_VERSION, PT_LOAD, PT_NOTE
from .savedstate.registers import Architecture, RegisterValue, SegmentRegister

if TYPE_CHECKING:
    from .interface import SavedState

READ_SIZE = 16 << 20
SPARSE_MIN = 1 << 20
FORMATS = ("raw", "lime", "elf", "dmp")

ELF_NOTE_HEADER = struct.Struct("<III")
ET_CORE = 4
EM_X86_64 = 62
EM_AARCH64 = 183
PF_R, PF_W, PF_X = 4, 2, 1
NT_PRSTATUS = 1
ELF_DATA_ALIGN = 0x1000

# struct elf_prstatus up to pr_reg: pr_info (3 ints), pr_cursig (short, padded), pr_sigpend, pr_sighold,
# pid, ppid, pgrp, sid, then four struct timeval (utime, stime, cutime, cstime).
PRSTATUS_PREFIX = struct.Struct("<3ih2xQQ4i64x")
X86_64_USER_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
    "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip
"""Linux ``struct user_regs_struct`` order (x86_64), the ``pr_reg`` of an ``NT_PRSTATUS`` note."""
PRSTATUS_X86_64_SIZE = PRSTATUS_PREFIX.size + 8 * len(X86_64_USER_REGS) + 8  # + pr_fpvalid + padding = 336
PRSTATUS_AARCH64_SIZE = PRSTATUS_PREFIX.size + 8 * 34 + 8  # user_pt_regs: x0-x30, sp, pc, pstate = 392

Read = Callable[[int, int], bytes]
Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class MissingRange:
    """Guest-physical bytes ``[gpa, gpa + size)`` inside a backed chunk that could not be read."""

    gpa: int
    size: int
    reason: str  # the provider's message for the first page of the range

    def __str__(self) -> str:
        return f"GPA {self.gpa:#x}-{self.gpa + self.size - 1:#x} ({self.size:,} bytes): {self.reason}"

    def to_json(self) -> dict[str, object]:
        return {"gpa": self.gpa, "size": self.size, "reason": self.reason}


@dataclasses.dataclass
class ExportReport:
    """What a writer produced: ``size`` bytes of file, ``stored`` of them actually written (not seeked).

    ``missing`` lists the ranges written as zeros because the saved state could not provide them.
    """

    format: str
    ranges: int
    ram_bytes: int
    size: int = 0
    stored: int = 0
    missing: list[MissingRange] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user must know about the image
    detail: str = ""  # what kind of image of its format, for the summary line

    @property
    def missing_bytes(self) -> int:
        return sum(m.size for m in self.missing)


class SparseWriter:
    """Writes through to ``out`` but seeks over all-zero :data:`SPARSE_MIN` blocks of the file.

    Blocks are aligned to the file offset (not to each write), so the result does not depend on how
    the caller cut its data; :func:`_copy_range` ends its reads on block boundaries so that every
    block arrives in one write.
    """

    _ZERO = bytes(SPARSE_MIN)

    def __init__(self, out: BinaryIO, start: int = 0) -> None:
        self.out = out
        self.pos = start
        self.stored = 0
        out.seek(start)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        buf = data if isinstance(data, bytes) else bytes(data)
        view = memoryview(buf)
        n = len(buf)
        pending = 0  # start of the stretch of buf not yet written
        i = -self.pos % SPARSE_MIN  # the first block boundary inside buf
        while i + SPARSE_MIN <= n:
            if buf.startswith(self._ZERO, i):
                if pending < i:
                    self._put(view[pending:i])
                self.skip(SPARSE_MIN)
                pending = i + SPARSE_MIN
            i += SPARSE_MIN
        if pending < n:
            self._put(view[pending:])

    def _put(self, view: memoryview) -> None:
        self.out.write(view)
        self.pos += len(view)
        self.stored += len(view)

    def skip(self, count: int) -> None:
        """Leave ``count`` bytes as zeros (a hole in the image)."""
        self.pos += count
        self.out.seek(self.pos)

    def finish(self) -> int:
        """Truncate to the logical end (a trailing seek writes nothing) and return the size."""
        self.out.truncate(self.pos)
        self.out.flush()
        return self.pos


def _copy_range(
    writer: SparseWriter, read: Read, gpa: int, length: int, progress: Progress | None, read_size: int
) -> None:
    read_size = max(SPARSE_MIN, read_size - read_size % SPARSE_MIN)
    done = 0
    while done < length:
        take = min(read_size - writer.pos % SPARSE_MIN, length - done)  # end on a sparse-block boundary
        data = read(gpa + done, take)
        if len(data) != take:
            raise VmssdError(f"short read at GPA {gpa + done:#x}: got {len(data)} of {take} bytes")
        writer.write(data)
        done += take
        if progress is not None:
            progress(take)


def _sorted_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = sorted((g, n) for g, n in ranges if n > 0)
    for (a, alen), (b, _) in pairwise(out):
        if b < a + alen:
            raise VmssdError(f"GPA ranges overlap at {b:#x}")
    return out


def write_raw(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    *,
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """A flat image from GPA 0 to the end of the last range; holes (and zero RAM) are left sparse."""
    rs = _sorted_ranges(ranges)
    writer = SparseWriter(out)
    for gpa, length in rs:
        writer.skip(gpa - writer.pos)
        _copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("raw", len(rs), sum(n for _, n in rs))
    report.size, report.stored = writer.finish(), writer.stored
    return report


def lime_header(gpa: int, length: int) -> bytes:
    return LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, gpa, gpa + length - 1)


def write_lime(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    *,
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """A LiME file: for each range, its header (inclusive end) followed by its bytes."""
    rs = _sorted_ranges(ranges)
    writer = SparseWriter(out)
    for gpa, length in rs:
        writer.write(lime_header(gpa, length))
        _copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("lime", len(rs), sum(n for _, n in rs))
    report.size, report.stored = writer.finish(), writer.stored
    return report


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
    rs = _sorted_ranges(ranges)
    phnum = len(rs) + (1 if notes else 0)
    if phnum > 0xFFFF:
        raise VmssdError(f"{len(rs)} GPA ranges do not fit in an ELF program header table")
    note_offset = ELF64_EHDR.size + phnum * ELF64_PHDR.size
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
    ehdr = ELF64_EHDR.pack(
        ident, ET_CORE, machine, 1, 0, ELF64_EHDR.size, 0, 0, ELF64_EHDR.size, ELF64_PHDR.size, phnum, 0, 0, 0
    )
    writer = SparseWriter(out)
    writer.write(ehdr + b"".join(phdrs) + notes)
    for (gpa, length), off in zip(rs, offsets, strict=True):
        writer.skip(off - writer.pos)
        _copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("elf", len(rs), sum(n for _, n in rs))
    report.size, report.stored = writer.finish(), writer.stored
    return report


def write_dmp(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    inputs: crashdump.DumpInputs,
    *,
    kind: str = "auto",
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """A Windows x64 crash dump: header (and bitmap), then the pages of every run back to back."""
    plan = crashdump.plan_dump(_sorted_ranges(ranges), kind)
    writer = SparseWriter(out)
    for part in crashdump.file_prefix(plan, inputs):
        writer.write(part)
    writer.skip(plan.data_offset - writer.pos)
    for gpa, length in plan.ranges:
        _copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("dmp", len(plan.runs), plan.pages * crashdump.PAGE_SIZE)
    report.size, report.stored = writer.finish(), writer.stored
    kind_text = "full dump" if plan.dump_type == crashdump.DUMP_TYPE_FULL else "bitmap dump"
    report.detail = f"{kind_text}, type {plan.dump_type}, DirectoryTableBase {inputs.dtb:#x} = {inputs.dtb_source}"
    if inputs.symbols is None:
        report.notes.append(crashdump.WITHOUT_SYMBOLS)
    return report


# ------------------------------------------------------------------------------------------ provider glue


DTB_SCAN_READ = 16 << 20
MISSING_PROBE = 0x1000
"""After a failed read, the next read starts at the next boundary of this size (a guest page)."""


class CheckedReader:
    """A padded read over a provider that records what it had to zero-fill instead of hiding it.

    Reads go to the provider's unpadded :meth:`read_guest_physical_address`, which stops short at
    missing data and raises when a read starts on it; each such page is zero-filled and added to
    :attr:`missing` (adjacent pages merge into one range).
    """

    def __init__(self, provider: SavedState) -> None:
        self._read = provider.read_guest_physical_address
        self.missing: list[MissingRange] = []

    def __call__(self, gpa: int, size: int) -> bytes:
        try:
            data = self._read(gpa, size)
        except VmssdError:
            data = b""
        if len(data) == size:
            return data  # the common case: one call, no copy
        out = bytearray(data)
        pos, end = gpa + len(data), gpa + size
        while pos < end:
            try:
                data = self._read(pos, end - pos)
                reason = ""
            except VmssdError as exc:
                data, reason = b"", str(exc)
            if data:
                out += data
                pos += len(data)
                continue
            step = min(end, (pos // MISSING_PROBE + 1) * MISSING_PROBE) - pos
            self._record(pos, step, reason or "the saved state returned no data")
            out += bytes(step)
            pos += step
        return bytes(out)

    def _record(self, gpa: int, size: int, reason: str) -> None:
        last = self.missing[-1] if self.missing else None
        if last is not None and last.gpa + last.size == gpa:
            self.missing[-1] = MissingRange(last.gpa, last.size + size, last.reason)
        else:
            self.missing.append(MissingRange(gpa, size, reason))


def provider_ranges(provider: SavedState) -> list[tuple[int, int]]:
    """``(gpa, length)`` per GPA chunk, in GPA order (the ranges every format writes)."""
    page_size, chunks = provider.get_guest_physical_memory_chunks()
    return sorted((c.guest_physical_start_page_index * page_size, c.page_count * page_size) for c in chunks)


def provider_notes(provider: SavedState) -> tuple[int, bytes]:
    """``(e_machine, PT_NOTE contents)``: one NT_PRSTATUS per VP from its active VTL's registers."""
    count = provider.vp_count() if provider.has_cpu_state() else 0
    if not count:
        return EM_X86_64, b""
    arm = provider.get_architecture(0) == Architecture.ARMV8
    notes = []
    for i in range(count):
        regs = provider.get_registers(i)
        desc = prstatus_aarch64(i, regs) if arm else prstatus_x86_64(i, regs)
        notes.append(elf_note(b"CORE", NT_PRSTATUS, desc))
    return (EM_AARCH64 if arm else EM_X86_64), b"".join(notes)


@dataclasses.dataclass(frozen=True)
class DumpOptions:
    """What ``convert --format dmp`` is told: the kernel DTB, a symbol directory, the dump type."""

    dtb: int | None = None  # None: VP 0's saved VTL0 CR3
    symbols_dir: str | None = None
    kind: str = "auto"


def provider_dump_inputs(provider: SavedState, options: DumpOptions) -> crashdump.DumpInputs:
    """The crash-dump header's guest facts: VP 0's VTL0 registers, the VP count, the DTB, the kernel symbols."""
    count = provider.vp_count() if provider.has_cpu_state() else 0
    if not count or provider.get_architecture(0) != Architecture.X64:
        raise VmssdError("a Windows crash dump needs the saved registers of an x64 guest (VP 0)")
    banks = [provider.get_registers(i, 0) for i in range(count)]
    if options.dtb is not None:
        dtb, source, image = options.dtb & crashdump.DTB_MASK, "given with --dtb", None
    else:
        dtb, source, image = kernel_dtb(provider)
    symbols = None
    if options.symbols_dir is not None:
        symbols = kernel_symbols(provider.read_guest_physical_address, dtb, banks, options.symbols_dir, image)
    rip = banks[0].get("rip")
    return crashdump.DumpInputs(
        dtb=dtb,
        processors=count,
        context=crashdump.context_record(banks[0]),
        exception_address=rip if isinstance(rip, int) else 0,
        symbols=symbols,
        comment="Hyper-V saved state converted by vmssd",
        dtb_source=source,
    )


def kernel_dtb(provider: SavedState) -> tuple[int, str, KernelImage | None]:
    """``(DTB, where it came from, the kernel image when known)`` for a crash-dump header.

    With ``cpu/kernel_dtb.py`` (the Windows kernel-DTB proof) every VP's saved CR3, VTL0 first, is
    tried and the first that Windows' own tables vouch for is used; otherwise, or when none
    qualifies, VP 0's VTL0 CR3 (docs/crashdump.md, "DirectoryTableBase").
    """
    cr3 = provider.get_registers(0, 0).get("cr3")
    fallback = (cr3 if isinstance(cr3, int) else 0) & crashdump.DTB_MASK
    try:
        from .cpu import kernel_dtb as proof  # branch winguest; VP 0's CR3 until it is merged
    except ImportError:
        return fallback, "VP 0's saved CR3 (VTL0)", None

    def read(gpa: int, size: int) -> bytes | None:
        try:
            data = provider.read_guest_physical_address(gpa, size)
        except VmssdError:
            return None
        return data if len(data) == size else None

    banks = _register_banks(provider)
    code, idts = proof.register_hints(regs for _, _, regs in banks)
    for vp, vtl, regs in banks:
        value = regs.get("cr3")
        if not isinstance(value, int):
            continue
        verdict = proof.check_kernel_dtb(read, value & crashdump.DTB_MASK, 4, code, idts)
        if verdict.ok and verdict.kernel_base is not None and verdict.pdb_name and verdict.guid:
            image = KernelImage(verdict.kernel_base, 0, verdict.pdb_name.lower(), f"{verdict.guid}-{verdict.age}")
            return verdict.dtb, f"the saved CR3 of VP {vp} VTL {vtl}", image
    for gpa, length in provider_ranges(provider):  # as Volatility does when no saved CR3 will do: scan RAM
        for off in range(0, length, DTB_SCAN_READ):
            data = provider.read_guest_physical_address_padded(gpa + off, min(DTB_SCAN_READ, length - off))
            for table in self_referencing_tables(data, gpa + off):
                verdict = proof.check_kernel_dtb(read, table, 4, code, idts)
                if verdict.ok and verdict.kernel_base is not None and verdict.pdb_name and verdict.guid:
                    image = KernelImage(
                        verdict.kernel_base, 0, verdict.pdb_name.lower(), f"{verdict.guid}-{verdict.age}"
                    )
                    return table, "found by a scan of RAM (no saved CR3 maps the kernel)", image
    return fallback, "VP 0's saved CR3 (VTL0): no saved CR3 maps the kernel and no RAM page is its table", None


def _register_banks(provider: SavedState) -> list[tuple[int, int, dict[str, RegisterValue]]]:
    """``(vp, vtl, registers)`` of every saved register bank: every VP's VTL0 first, then higher VTLs."""
    saved = {vp: provider.get_virtual_trust_levels(vp) for vp in range(provider.vp_count())}
    banks = []
    for vtl in sorted({v for vtls in saved.values() for v in vtls}):
        for vp, vtls in saved.items():
            if vtl in vtls:
                try:
                    regs = provider.get_registers(vp, vtl)
                except VmssdError:
                    continue  # a VTL marker without registers
                if regs:
                    banks.append((vp, vtl, regs))
    return banks


def export(
    provider: SavedState,
    out: BinaryIO,
    fmt: str,
    *,
    progress: Progress | None = None,
    dump: DumpOptions | None = None,
) -> ExportReport:
    """Write the saved state's RAM to ``out`` as ``fmt`` (raw, lime, elf or dmp), streaming.

    Unreadable ranges are zero-filled and listed in the report's ``missing``.
    """
    ranges = provider_ranges(provider)
    read = CheckedReader(provider)
    if fmt == "raw":
        report = write_raw(out, ranges, read, progress=progress)
    elif fmt == "lime":
        report = write_lime(out, ranges, read, progress=progress)
    elif fmt == "elf":
        machine, notes = provider_notes(provider)
        report = write_elf(out, ranges, read, machine=machine, notes=notes, progress=progress)
    elif fmt == "dmp":
        options = dump or DumpOptions()
        inputs = provider_dump_inputs(provider, options)
        report = write_dmp(out, ranges, read, inputs, kind=options.kind, progress=progress)
    else:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    report.missing = read.missing
    return report


# ------------------------------------------------------------------------------------------ safe outputs


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: ``samefile`` when both exist, else the resolved paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@contextmanager
def partial_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path + ".partial"`` and rename it to ``path`` on success; remove it on any failure or Ctrl-C.

    A reader never sees a half-written image under the final name.
    """
    final = os.fspath(path)
    tmp = final + ".partial"
    fh = open(tmp, "wb")  # noqa: SIM115 - closed below on every path
    try:
        yield fh
        fh.close()
        os.replace(tmp, final)
    except BaseException:
        fh.close()
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
