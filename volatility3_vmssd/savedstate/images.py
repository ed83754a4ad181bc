"""Readers for the memory dumps ``vmssd create`` turns into saved states: raw, LiME and ELF cores.

Only what is needed to find guest-physical ranges is parsed: LiME range headers, and the PT_LOAD
program headers of an ELF core with physical addresses (QEMU ``dump-guest-memory paging=false``,
Volatility's own ELF layer reads the same).  Data is read on demand, so a large dump is streamed.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import BinaryIO

from ..errors import FormatError, UnmappedAddressError

LIME_MAGIC = 0x4C694D45  # "EMiL" little-endian
LIME_VERSION = 1
LIME_HEADER = struct.Struct("<IIQQ8x")  # magic, version, start (inclusive), end (inclusive), reserved
ELF_MAGIC = b"\x7fELF"
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
PT_LOAD = 1
PT_NOTE = 4


@dataclasses.dataclass(frozen=True)
class MemoryRange:
    """``length`` bytes of guest-physical memory at ``gpa``, stored at ``file_offset`` of the dump."""

    gpa: int
    length: int
    file_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.length


@dataclasses.dataclass(frozen=True)
class ElfNote:
    name: bytes
    type: int
    desc: bytes


class MemoryImage:
    """A read-only memory dump: its physical ranges (sorted, non-overlapping) and their bytes."""

    def __init__(self, path: str, kind: str, ranges: list[MemoryRange], notes: list[ElfNote] | None = None):
        self.path = path
        self.kind = kind
        self.ranges = sorted(ranges, key=lambda r: r.gpa)
        self.notes = notes or []
        for a, b in zip(self.ranges, self.ranges[1:], strict=False):
            if b.gpa < a.end:
                raise FormatError(path, b.file_offset, f"memory ranges overlap at GPA {b.gpa:#x}")
        self._fh: BinaryIO | None = open(path, "rb")  # noqa: SIM115 - closed by close()

    @classmethod
    def open(cls, path: str | os.PathLike[str], kind: str = "auto") -> MemoryImage:
        spath = os.fspath(path)
        size = os.path.getsize(spath)
        with open(spath, "rb") as fh:
            head = fh.read(64)
            if kind == "auto":
                if head[:4] == ELF_MAGIC:
                    kind = "elf"
                elif len(head) >= 4 and struct.unpack_from("<I", head)[0] == LIME_MAGIC:
                    kind = "lime"
                else:
                    kind = "raw"
            if kind == "raw":
                return cls(spath, "raw", [MemoryRange(0, size, 0)] if size else [])
            if kind == "lime":
                return cls(spath, "lime", _lime_ranges(fh, spath, size))
            if kind == "elf":
                ranges, notes = _elf_ranges(fh, spath, size)
                return cls(spath, "elf", ranges, notes)
        raise ValueError(f"unknown memory image kind {kind!r} (raw, lime, elf or auto)")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> MemoryImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def size(self) -> int:
        """Bytes of memory held (not counting holes)."""
        return sum(r.length for r in self.ranges)

    def read(self, gpa: int, size: int) -> bytes:
        """Bytes at ``gpa``; unbacked bytes inside the request are zero; a request wholly outside raises."""
        out = bytearray(size)
        hit = False
        end = gpa + size
        assert self._fh is not None
        for r in self.ranges:
            lo, hi = max(gpa, r.gpa), min(end, r.end)
            if lo < hi:
                hit = True
                self._fh.seek(r.file_offset + lo - r.gpa)
                data = self._fh.read(hi - lo)
                out[lo - gpa : lo - gpa + len(data)] = data
        if not hit and size:
            raise UnmappedAddressError(f"{self.path}: GPA {gpa:#x} is not in the image", gpa)
        return bytes(out)


def _lime_ranges(fh: BinaryIO, path: str, size: int) -> list[MemoryRange]:
    ranges = []
    pos = 0
    while pos < size:
        fh.seek(pos)
        raw = fh.read(LIME_HEADER.size)
        if len(raw) < LIME_HEADER.size:
            raise FormatError(path, pos, "LiME range header cut short")
        magic, _version, start, end_incl = LIME_HEADER.unpack(raw)
        if magic != LIME_MAGIC:
            raise FormatError(path, pos, f"expected a LiME range header (magic {LIME_MAGIC:#x}), found {magic:#x}")
        if end_incl < start or pos + LIME_HEADER.size + (end_incl - start + 1) > size:
            raise FormatError(path, pos, f"LiME range {start:#x}-{end_incl:#x} does not fit in the file")
        length = end_incl - start + 1
        ranges.append(MemoryRange(start, length, pos + LIME_HEADER.size))
        pos += LIME_HEADER.size + length
    return ranges


def _elf_ranges(fh: BinaryIO, path: str, size: int) -> tuple[list[MemoryRange], list[ElfNote]]:
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
            notes.extend(_parse_notes(fh.read(filesz)))
    return ranges, notes


def _parse_notes(data: bytes) -> list[ElfNote]:
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


def subtract_holes(ranges: list[MemoryRange], holes: list[tuple[int, int]]) -> list[MemoryRange]:
    """Cut ``[start, end)`` holes out of the ranges: the hole's bytes are simply not saved."""
    out = list(ranges)
    for start, end in holes:
        nxt = []
        for r in out:
            if end <= r.gpa or start >= r.end:
                nxt.append(r)
                continue
            if r.gpa < start:
                nxt.append(MemoryRange(r.gpa, start - r.gpa, r.file_offset))
            if end < r.end:
                nxt.append(MemoryRange(end, r.end - end, r.file_offset + end - r.gpa))
        out = nxt
    return out
