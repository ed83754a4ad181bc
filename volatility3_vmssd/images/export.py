"""``vmssd convert``: a saved state's RAM streamed into a raw, LiME, ELF or Windows crash-dump image.

What cannot be read (a RamBlock that is absent, a page record stream cut short) is written as zeros *and
recorded* (:class:`CheckedReader`): the caller decides whether such an image may be kept, and lists the
ranges.  The saved state is taken as a :class:`MemorySource`, so this room needs nothing of the provider.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, Protocol

from ..cpu.registers import Architecture
from ..errors import VmssdError
from .crashdump import write_dmp
from .dumpsource import DumpOptions, dump_inputs
from .elf import EM_AARCH64, EM_X86_64, NT_PRSTATUS, elf_note, prstatus_aarch64, prstatus_x86_64, write_elf
from .lime import write_lime
from .ranges import MissingRange
from .raw import write_raw
from .streaming import ExportReport, Progress

FORMATS = ("raw", "lime", "elf", "dmp")


class MemorySource(Protocol):
    """What an export reads of a saved state (the provider interface satisfies it)."""

    def read_guest_physical_address(self, gpa: int, size: int) -> bytes: ...
    def get_guest_physical_memory_chunks(self) -> tuple[int, Sequence[Any]]: ...
    def has_cpu_state(self) -> bool: ...
    def vp_count(self) -> int: ...
    def get_architecture(self, vp: int) -> Architecture: ...
    def get_registers(self, vp: int) -> Mapping[str, Any]: ...


MISSING_PROBE = 0x1000
"""After a failed read, the next read starts at the next boundary of this size (a guest page)."""


class CheckedReader:
    """A padded read over a provider that records what it had to zero-fill instead of hiding it.

    Reads go to the provider's unpadded :meth:`read_guest_physical_address`, which stops short at
    missing data and raises when a read starts on it; each such page is zero-filled and added to
    :attr:`missing` (adjacent pages merge into one range).
    """

    def __init__(self, provider: MemorySource) -> None:
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


def provider_ranges(provider: MemorySource) -> list[tuple[int, int]]:
    """``(gpa, length)`` per GPA chunk, in GPA order (the ranges every format writes)."""
    page_size, chunks = provider.get_guest_physical_memory_chunks()
    return sorted((c.guest_physical_start_page_index * page_size, c.page_count * page_size) for c in chunks)


def provider_notes(provider: MemorySource) -> tuple[int, bytes]:
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


def export(
    provider: MemorySource,
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
        inputs, scan = dump_inputs(provider, options)  # type: ignore[arg-type]  # the provider is a DumpSource too
        report = write_dmp(out, ranges, read, inputs, kind=options.kind, progress=progress, deferred=scan)
    else:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    report.missing = read.missing
    return report
