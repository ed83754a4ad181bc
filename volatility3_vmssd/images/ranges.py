"""Guest-physical ranges of a memory image: where a dump stores them, and what could not be read."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from itertools import pairwise

from ..errors import VmssdError


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
class MissingRange:
    """Guest-physical bytes ``[gpa, gpa + size)`` inside a backed chunk that could not be read."""

    gpa: int
    size: int
    reason: str  # the provider's message for the first page of the range

    def __str__(self) -> str:
        return f"GPA {self.gpa:#x}-{self.gpa + self.size - 1:#x} ({self.size:,} bytes): {self.reason}"

    def to_json(self) -> dict[str, object]:
        return {"gpa": self.gpa, "size": self.size, "reason": self.reason}


def sorted_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out = sorted((g, n) for g, n in ranges if n > 0)
    for (a, alen), (b, _) in pairwise(out):
        if b < a + alen:
            raise VmssdError(f"GPA ranges overlap at {b:#x}")
    return out


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
