"""A memory dump opened for reading: the input ``vmssd create`` turns into a saved state.

Raw, LiME or ELF core, recognised by its first bytes; data is read on demand, so a large dump is streamed.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from ..errors import FormatError, UnmappedAddressError
from .elf import ELF_MAGIC, ElfNote, elf_ranges
from .lime import LIME_MAGIC, lime_ranges
from .ranges import MemoryRange


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
                return cls(spath, "lime", lime_ranges(fh, spath, size))
            if kind == "elf":
                ranges, notes = elf_ranges(fh, spath, size)
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
