"""Flat raw images: GPA 0 up to the end of the last range, holes left as (sparse) zeros."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from .ranges import sorted_ranges
from .streaming import READ_SIZE, ExportReport, Progress, Read, SparseWriter, copy_range


def write_raw(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    *,
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """A flat image from GPA 0 to the end of the last range; holes (and zero RAM) are left sparse."""
    rs = sorted_ranges(ranges)
    writer = SparseWriter(out)
    for gpa, length in rs:
        writer.skip(gpa - writer.pos)
        copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport("raw", len(rs), sum(n for _, n in rs))
    report.size, report.stored = writer.finish(), writer.stored
    return report
