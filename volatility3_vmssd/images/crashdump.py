"""Windows x64 kernel crash dumps (``PAGEDU64``): the header, the CONTEXT record and the page layout.

A crash dump is a two-page header followed by guest-physical pages.  A *full* dump (type 1) lists
its pages as runs in the header's physical-memory descriptor, which has room for
:data:`MAX_RUNS` runs; a *bitmap* dump (type 5) puts a summary header and one bit per page frame
after the header, and stores the pages whose bit is set in frame order.  Either way the pages are
contiguous in the file, in GPA order, so writing one is a straight copy of the backed ranges.

Everything here is format: the caller supplies the ranges, the registers and the kernel's
addresses; nothing is read from a saved state.  Field by field, what each value rests on:
docs/crashdump.md.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Protocol

from ..cpu.registers import FpControlStatus, SegmentRegister, XmmControlStatus
from ..errors import VmssdError
from .ranges import sorted_ranges
from .streaming import READ_SIZE, ExportReport, Progress, Read, SparseWriter, copy_range

PAGE_SIZE = 0x1000
HEADER_SIZE = 0x2000
PAGE_FILL = b"PAGE"
"""What Windows leaves in header bytes no field claims; readers use it to tell "not filled" from zero."""
DUMP_TYPE_FULL = 1
DUMP_TYPE_BITMAP = 5
DUMP_KINDS = ("auto", "full", "bitmap")
MACHINE_AMD64 = 0x8664
DTB_MASK = 0x000F_FFFF_FFFF_F000  # a CR3 without its PCID (bits 11:0) and no-flush bit (63)
MAJOR_VERSION_FREE = 0xF  # a retail ("free") build; 0xC would be a checked build
CONTEXT_AMD64 = 0x0010_0000
CONTEXT_ALL = CONTEXT_AMD64 | 0x1F  # control, integer, segments, floating point, debug registers
STATUS_BREAKPOINT = 0x8000_0003
BITMAP_ALIGN_BITS = 64
MAX_BITMAP_PAGES = 1 << 36
"""Page frames a bitmap may describe (256 TiB of guest-physical space; the bitmap is then 8 GiB, sparse)."""
BITMAP_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Layout:
    """A C structure as ``field -> (offset, struct format)``: declared once, used to write and to read back."""

    name: str
    size: int
    fields: Mapping[str, tuple[int, str]]

    def offset(self, field: str) -> int:
        return self.fields[field][0]

    def pack_into(self, buf: bytearray, base: int, **values: Any) -> None:
        for field, value in values.items():
            off, fmt = self.fields[field]
            args = value if isinstance(value, tuple) else (value,)
            struct.pack_into("<" + fmt, buf, base + off, *args)

    def unpack_from(self, buf: bytes | bytearray | memoryview, base: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field, (off, fmt) in self.fields.items():
            values = struct.unpack_from("<" + fmt, buf, base + off)
            out[field] = values[0] if len(values) == 1 else values
        return out


# Offsets: Microsoft's _CONTEXT, _XSAVE_FORMAT and _PHYSICAL_MEMORY_DESCRIPTOR from the kernel symbol
# tables; _DUMP_HEADER64, the exception record and the bitmap summary from Volatility's crash64.json /
# crash_common.json and kdmp-parser's headers (tests/test_crashdump.py checks each against them).
PHYSICAL_MEMORY_DESCRIPTOR = Layout(
    "_PHYSICAL_MEMORY_DESCRIPTOR", 0x10, {"NumberOfRuns": (0x0, "I"), "NumberOfPages": (0x8, "Q")}
)
PHYSICAL_MEMORY_RUN = Layout("_PHYSICAL_MEMORY_RUN", 0x10, {"BasePage": (0x0, "Q"), "PageCount": (0x8, "Q")})
PHYSICAL_MEMORY_ROOM = 700
"""Bytes the header gives the descriptor (``PhysicalMemoryBlockBuffer``), its runs included."""
MAX_RUNS = (PHYSICAL_MEMORY_ROOM - PHYSICAL_MEMORY_DESCRIPTOR.size) // PHYSICAL_MEMORY_RUN.size  # 42

XSAVE_FORMAT = Layout(
    "_XSAVE_FORMAT",
    0x200,
    {
        "ControlWord": (0x0, "H"),
        "StatusWord": (0x2, "H"),
        "TagWord": (0x4, "B"),
        "ErrorOpcode": (0x6, "H"),
        "ErrorOffset": (0x8, "I"),
        "ErrorSelector": (0xC, "H"),
        "Reserved2": (0xE, "H"),
        "DataOffset": (0x10, "I"),
        "DataSelector": (0x14, "H"),
        "Reserved3": (0x16, "H"),
        "MxCsr": (0x18, "I"),
        "MxCsr_Mask": (0x1C, "I"),
        "FloatRegisters": (0x20, "128s"),
        "XmmRegisters": (0xA0, "256s"),
    },
)

_CONTEXT_INTEGERS = ("Rax", "Rcx", "Rdx", "Rbx", "Rsp", "Rbp", "Rsi", "Rdi", *(f"R{i}" for i in range(8, 16)), "Rip")
_CONTEXT_SEGMENTS = ("SegCs", "SegDs", "SegEs", "SegFs", "SegGs", "SegSs")
_CONTEXT_DEBUG = ("Dr0", "Dr1", "Dr2", "Dr3", "Dr6", "Dr7")
CONTEXT = Layout(
    "_CONTEXT",
    0x4D0,
    {
        **{f"P{i}Home": (0x8 * (i - 1), "Q") for i in range(1, 7)},
        "ContextFlags": (0x30, "I"),
        "MxCsr": (0x34, "I"),
        **{name: (0x38 + 2 * i, "H") for i, name in enumerate(_CONTEXT_SEGMENTS)},
        "EFlags": (0x44, "I"),
        **{name: (0x48 + 8 * i, "Q") for i, name in enumerate(_CONTEXT_DEBUG)},
        **{name: (0x78 + 8 * i, "Q") for i, name in enumerate(_CONTEXT_INTEGERS)},
        "FltSave": (0x100, f"{XSAVE_FORMAT.size}s"),
        "VectorRegister": (0x300, "416s"),
        "VectorControl": (0x4A0, "Q"),
        "DebugControl": (0x4A8, "Q"),
        "LastBranchToRip": (0x4B0, "Q"),
        "LastBranchFromRip": (0x4B8, "Q"),
        "LastExceptionToRip": (0x4C0, "Q"),
        "LastExceptionFromRip": (0x4C8, "Q"),
    },
)

EXCEPTION_RECORD64 = Layout(
    "_EXCEPTION_RECORD64",
    0x98,
    {
        "ExceptionCode": (0x0, "I"),
        "ExceptionFlags": (0x4, "I"),
        "ExceptionRecord": (0x8, "Q"),
        "ExceptionAddress": (0x10, "Q"),
        "NumberParameters": (0x18, "I"),
        "ExceptionInformation": (0x20, "15Q"),
    },
)

DUMP_HEADER64 = Layout(
    "_DUMP_HEADER64",
    HEADER_SIZE,
    {
        "Signature": (0x0, "4s"),
        "ValidDump": (0x4, "4s"),
        "MajorVersion": (0x8, "I"),
        "MinorVersion": (0xC, "I"),
        "DirectoryTableBase": (0x10, "Q"),
        "PfnDataBase": (0x18, "Q"),
        "PsLoadedModuleList": (0x20, "Q"),
        "PsActiveProcessHead": (0x28, "Q"),
        "MachineImageType": (0x30, "I"),
        "NumberProcessors": (0x34, "I"),
        "BugCheckCode": (0x38, "I"),
        "BugCheckCodeParameter": (0x40, "4Q"),
        "KdDebuggerDataBlock": (0x80, "Q"),
        "PhysicalMemoryBlockBuffer": (0x88, f"{PHYSICAL_MEMORY_ROOM}s"),
        "ContextRecord": (0x348, f"{CONTEXT.size}s"),  # the header has room for 3000 bytes; one CONTEXT is used
        "Exception": (0xF00, f"{EXCEPTION_RECORD64.size}s"),
        "DumpType": (0xF98, "I"),
        "RequiredDumpSpace": (0xFA0, "Q"),
        "SystemTime": (0xFA8, "Q"),
        "Comment": (0xFB0, "128s"),
        "SystemUpTime": (0x1030, "Q"),
        "MiniDumpFields": (0x1038, "I"),
        "SecondaryDataState": (0x103C, "I"),
        "ProductType": (0x1040, "I"),
        "SuiteMask": (0x1044, "I"),
        "WriterStatus": (0x1048, "I"),
        "KdSecondaryVersion": (0x104D, "B"),
    },
)

BITMAP_HEADER = Layout(
    "_BMP_HEADER64",
    0x38,
    {
        "Signature": (0x0, "4s"),
        "ValidDump": (0x4, "4s"),
        "FirstPage": (0x20, "Q"),  # file offset of the first stored page (Volatility: HeaderSize)
        "TotalPresentPages": (0x28, "Q"),  # bits set (Volatility: Pages)
        "Pages": (0x30, "Q"),  # bits in the bitmap (Volatility: BitmapSize)
    },
)
BITMAP_SIGNATURE_FULL = b"FDMP"  # a complete-memory bitmap dump ("SDMP" is a kernel summary dump)
BITMAP_VALID = b"DUMP"


# ------------------------------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True)
class KernelSymbols:
    """The guest kernel's addresses the header carries, from its symbol table plus its load address."""

    kernel_base: int
    table: str  # "<GUID>-<age>" of the symbol table used
    kd_debugger_data_block: int
    ps_loaded_module_list: int
    ps_active_process_head: int
    pfn_database: int  # the value of MmPfnDatabase (0 when its page was not readable)
    build_number: int | None  # NtBuildNumber's low 16 bits, None when its page was not readable
    product_type: int = 0  # KUSER_SHARED_DATA.NtProductType (1 workstation, 2 domain controller, 3 server)
    system_time: int = 0  # KUSER_SHARED_DATA.SystemTime: FILETIME of the guest's clock when it was saved
    up_time: int = 0  # KUSER_SHARED_DATA.InterruptTime: 100 ns units since boot


@dataclasses.dataclass(frozen=True)
class DumpInputs:
    """Everything of the guest that goes into the header, besides the pages themselves."""

    dtb: int
    processors: int
    context: bytes  # a CONTEXT record (see :func:`context_record`)
    exception_address: int = 0
    symbols: KernelSymbols | None = None
    comment: str = ""
    dtb_source: str = "given"  # in words, for the user: which saved CR3, or how it was chosen


WITHOUT_SYMBOLS = (
    "no kernel symbols given (--symbols): the header has no KdDebuggerDataBlock, PsLoadedModuleList,"
    " PsActiveProcessHead, PfnDataBase, build number or system time, so WinDbg must find the kernel itself"
    " (module list, !process and !pfn may not work until it does)"
)


# ------------------------------------------------------------------------------------------ CONTEXT


def _int(regs: Mapping[str, object], name: str) -> int:
    value = regs.get(name, 0)
    if isinstance(value, SegmentRegister):
        return value.selector
    if hasattr(value, "to_int"):
        return int(value.to_int())  # type: ignore[union-attr]
    return value if isinstance(value, int) else 0


def context_record(regs: Mapping[str, object]) -> bytes:
    """A CONTEXT (x64, 0x4d0 bytes) from one VP's saved registers.

    The saved ``fpcontrolstatus``/``xmmcontrolstatus`` are bytes 0-31 of the FXSAVE image, which is
    what the first 32 bytes of ``_XSAVE_FORMAT`` are; ST0-7 and XMM0-15 follow as in FXSAVE.
    """
    buf = bytearray(CONTEXT.size)
    fp = FpControlStatus.from_int(_int(regs, "fpcontrolstatus"))
    xmm = XmmControlStatus.from_int(_int(regs, "xmmcontrolstatus"))
    fxsave = bytearray(XSAVE_FORMAT.size)
    XSAVE_FORMAT.pack_into(
        fxsave,
        0,
        ControlWord=fp.fcw,
        StatusWord=fp.fsw,
        TagWord=fp.ftw,
        ErrorOpcode=fp.last_op,
        ErrorOffset=fp.last_ip & 0xFFFF_FFFF,
        ErrorSelector=(fp.last_ip >> 32) & 0xFFFF,
        Reserved2=(fp.last_ip >> 48) & 0xFFFF,
        DataOffset=xmm.last_dp & 0xFFFF_FFFF,
        DataSelector=(xmm.last_dp >> 32) & 0xFFFF,
        Reserved3=(xmm.last_dp >> 48) & 0xFFFF,
        MxCsr=xmm.mxcsr,
        MxCsr_Mask=xmm.mxcsr_mask,
        FloatRegisters=b"".join(_int(regs, f"fpmmx{i}").to_bytes(16, "little") for i in range(8)),
        XmmRegisters=b"".join(_int(regs, f"xmm{i}").to_bytes(16, "little") for i in range(16)),
    )
    CONTEXT.pack_into(
        buf,
        0,
        ContextFlags=CONTEXT_ALL,
        MxCsr=xmm.mxcsr,  # kdmp-parser checks that it equals FltSave.MxCsr
        EFlags=_int(regs, "rflags") & 0xFFFF_FFFF,
        FltSave=bytes(fxsave),
        **{name: _int(regs, name[3:].lower()) & 0xFFFF for name in _CONTEXT_SEGMENTS},
        **{name: _int(regs, name.lower()) & 0xFFFF_FFFF_FFFF_FFFF for name in _CONTEXT_DEBUG + _CONTEXT_INTEGERS},
    )
    return bytes(buf)


# ------------------------------------------------------------------------------------------ layout


@dataclasses.dataclass(frozen=True)
class DumpPlan:
    """Where everything goes: the dump type, the page runs and the file offset of the first page."""

    dump_type: int
    runs: tuple[tuple[int, int], ...]  # (first page frame, page count), GPA order, not adjacent
    bitmap_pages: int = 0  # bits in the bitmap (type 5), a multiple of BITMAP_ALIGN_BITS

    @property
    def pages(self) -> int:
        return sum(n for _, n in self.runs)

    @property
    def data_offset(self) -> int:
        if self.dump_type == DUMP_TYPE_FULL:
            return HEADER_SIZE
        end = HEADER_SIZE + BITMAP_HEADER.size + self.bitmap_pages // 8
        return -(-end // PAGE_SIZE) * PAGE_SIZE

    @property
    def size(self) -> int:
        return self.data_offset + self.pages * PAGE_SIZE

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """``(gpa, length)`` of each run: what is copied after the header, in this order."""
        return [(page * PAGE_SIZE, count * PAGE_SIZE) for page, count in self.runs]


def page_runs(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping byte ranges as page runs; touching ranges merge into one run."""
    runs: list[tuple[int, int]] = []
    for gpa, length in sorted((g, n) for g, n in ranges if n > 0):
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise VmssdError(
                f"GPA range {gpa:#x}+{length:#x} is not whole 4 KiB pages: a crash dump stores whole pages"
            )
        page, count = gpa // PAGE_SIZE, length // PAGE_SIZE
        if runs and page < runs[-1][0] + runs[-1][1]:
            raise VmssdError(f"GPA ranges overlap at {gpa:#x}")
        if runs and page == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((page, count))
    return runs


def plan_dump(ranges: Sequence[tuple[int, int]], kind: str = "auto") -> DumpPlan:
    """Choose the dump type: a full dump when the runs fit the header (at most :data:`MAX_RUNS`), else a
    bitmap dump; ``kind`` "full" or "bitmap" forces one (a full dump that cannot hold the runs is an error).
    """
    if kind not in DUMP_KINDS:
        raise ValueError(f"unknown dump kind {kind!r} (one of {', '.join(DUMP_KINDS)})")
    runs = tuple(page_runs(ranges))
    if not runs:
        raise VmssdError("no guest-physical memory to put in a crash dump")
    if kind == "full" or (kind == "auto" and len(runs) <= MAX_RUNS):
        if len(runs) > MAX_RUNS:
            raise VmssdError(
                f"a full crash dump describes at most {MAX_RUNS} physical-memory runs in its header; this guest has"
                f" {len(runs)}: use a bitmap dump (--dump-type bitmap)"
            )
        return DumpPlan(DUMP_TYPE_FULL, runs)
    frames = runs[-1][0] + runs[-1][1]
    if frames > MAX_BITMAP_PAGES:
        raise VmssdError(
            f"a bitmap crash dump would need {frames:,} bits (RAM up to GPA {frames * PAGE_SIZE - 1:#x});"
            f" at most {MAX_BITMAP_PAGES:,} are written"
        )
    return DumpPlan(DUMP_TYPE_BITMAP, runs, -(-frames // BITMAP_ALIGN_BITS) * BITMAP_ALIGN_BITS)


# ------------------------------------------------------------------------------------------ header


def build_header(plan: DumpPlan, inputs: DumpInputs) -> bytes:
    """The two header pages (``_DUMP_HEADER64``); bytes no field claims keep Windows' ``PAGE`` fill."""
    if len(inputs.context) != CONTEXT.size:
        raise ValueError(f"a CONTEXT record is {CONTEXT.size:#x} bytes, not {len(inputs.context):#x}")
    buf = bytearray(PAGE_FILL * (HEADER_SIZE // len(PAGE_FILL)))
    sym = inputs.symbols
    exception = bytearray(EXCEPTION_RECORD64.size)
    EXCEPTION_RECORD64.pack_into(
        exception, 0, ExceptionCode=STATUS_BREAKPOINT, ExceptionAddress=inputs.exception_address
    )
    build = sym.build_number if sym is not None and sym.build_number is not None else 0
    DUMP_HEADER64.pack_into(
        buf,
        0,
        Signature=b"PAGE",
        ValidDump=b"DU64",
        MajorVersion=MAJOR_VERSION_FREE,
        MinorVersion=build,
        DirectoryTableBase=inputs.dtb,
        PfnDataBase=sym.pfn_database if sym else 0,
        PsLoadedModuleList=sym.ps_loaded_module_list if sym else 0,
        PsActiveProcessHead=sym.ps_active_process_head if sym else 0,
        MachineImageType=MACHINE_AMD64,
        NumberProcessors=inputs.processors,
        BugCheckCode=0,
        BugCheckCodeParameter=(0, 0, 0, 0),
        KdDebuggerDataBlock=sym.kd_debugger_data_block if sym else 0,
        ContextRecord=inputs.context,
        Exception=bytes(exception),
        DumpType=plan.dump_type,
        RequiredDumpSpace=plan.size,
        SystemTime=sym.system_time if sym else 0,
        Comment=inputs.comment.encode("ascii", "replace")[:127],
        SystemUpTime=sym.up_time if sym else 0,
        MiniDumpFields=0,
        SecondaryDataState=0,
        ProductType=sym.product_type if sym else 0,
        SuiteMask=0,
        WriterStatus=0,
        KdSecondaryVersion=0,
    )
    if plan.dump_type == DUMP_TYPE_FULL:
        base = DUMP_HEADER64.offset("PhysicalMemoryBlockBuffer")
        buf[base : base + PHYSICAL_MEMORY_DESCRIPTOR.size] = bytes(PHYSICAL_MEMORY_DESCRIPTOR.size)  # no filler
        PHYSICAL_MEMORY_DESCRIPTOR.pack_into(buf, base, NumberOfRuns=len(plan.runs), NumberOfPages=plan.pages)
        for i, (page, count) in enumerate(plan.runs):
            at = base + PHYSICAL_MEMORY_DESCRIPTOR.size + i * PHYSICAL_MEMORY_RUN.size
            PHYSICAL_MEMORY_RUN.pack_into(buf, at, BasePage=page, PageCount=count)
    return bytes(buf)


def bitmap_header(plan: DumpPlan) -> bytes:
    """The summary header that follows the dump header in a bitmap dump (the bitmap itself follows it)."""
    buf = bytearray(BITMAP_HEADER.size)
    BITMAP_HEADER.pack_into(
        buf,
        0,
        Signature=BITMAP_SIGNATURE_FULL,
        ValidDump=BITMAP_VALID,
        FirstPage=plan.data_offset,
        TotalPresentPages=plan.pages,
        Pages=plan.bitmap_pages,
    )
    return bytes(buf)


def _set_bits(buf: bytearray, lo: int, hi: int) -> None:
    """Set bits ``[lo, hi)`` of ``buf`` (bit n is bit n % 8 of byte n // 8)."""
    while lo < hi and lo % 8:
        buf[lo >> 3] |= 1 << (lo & 7)
        lo += 1
    whole = hi - hi % 8
    if lo < whole:
        buf[lo >> 3 : whole >> 3] = b"\xff" * ((whole - lo) >> 3)
        lo = whole
    while lo < hi:
        buf[lo >> 3] |= 1 << (lo & 7)
        lo += 1


def bitmap_chunks(plan: DumpPlan, chunk: int = BITMAP_CHUNK) -> Iterator[bytes]:
    """The page bitmap, ``chunk`` bytes at a time (memory stays bounded however large the guest)."""
    total = plan.bitmap_pages // 8
    i = 0
    for start in range(0, total, chunk):
        size = min(chunk, total - start)
        buf = bytearray(size)
        lo_bit, hi_bit = start * 8, start * 8 + size * 8
        while i < len(plan.runs) and plan.runs[i][0] + plan.runs[i][1] <= lo_bit:
            i += 1
        j = i
        while j < len(plan.runs) and plan.runs[j][0] < hi_bit:
            page, count = plan.runs[j]
            _set_bits(buf, max(page, lo_bit) - lo_bit, min(page + count, hi_bit) - lo_bit)
            j += 1
        yield bytes(buf)


def file_prefix(plan: DumpPlan, inputs: DumpInputs) -> Iterator[bytes]:
    """Everything before the first page: the header, and for a bitmap dump its summary and bitmap."""
    yield build_header(plan, inputs)
    if plan.dump_type == DUMP_TYPE_BITMAP:
        yield bitmap_header(plan)
        yield from bitmap_chunks(plan)


class DeferredDtb(Protocol):
    """A DTB still to be found in the pages being written (dumpsource.DtbScan): fed, then asked once."""

    def feed(self, data: bytes, gpa: int) -> None: ...
    def inputs(self, first: DumpInputs) -> DumpInputs: ...


def write_dmp(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    inputs: DumpInputs,
    *,
    kind: str = "auto",
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
    deferred: DeferredDtb | None = None,
) -> ExportReport:
    """A Windows x64 crash dump: header (and bitmap), then the pages of every run back to back.

    With ``deferred``, every page written is also shown to it, and the header is written again at the
    end with what it found (the header's size does not depend on its values).
    """
    plan = plan_dump(sorted_ranges(ranges), kind)
    writer = SparseWriter(out)
    for part in file_prefix(plan, inputs):
        writer.write(part)
    writer.skip(plan.data_offset - writer.pos)
    if deferred is not None:
        plain = read

        def read(gpa: int, size: int) -> bytes:
            data = plain(gpa, size)
            deferred.feed(data, gpa)
            return data

    for gpa, length in plan.ranges:
        copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("dmp", len(plan.runs), plan.pages * PAGE_SIZE)
    report.size, report.stored = writer.finish(), writer.stored
    if deferred is not None:
        inputs = deferred.inputs(inputs)
        out.seek(0)
        out.write(build_header(plan, inputs))
        out.flush()
    kind_text = "full dump" if plan.dump_type == DUMP_TYPE_FULL else "bitmap dump"
    report.detail = f"{kind_text}, type {plan.dump_type}, DirectoryTableBase {inputs.dtb:#x} = {inputs.dtb_source}"
    if inputs.symbols is None:
        report.notes.append(WITHOUT_SYMBOLS)
    return report
