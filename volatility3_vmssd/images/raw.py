"""Flat raw images: GPA 0 up to the end of the last range, holes left as (sparse) zeros."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

from .streaming import READ_SIZE, ExportReport, Progress, Read, stream_ranges


def write_raw(
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    *,
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """A flat image from GPA 0 to the end of the last range; holes (and zero RAM) are left sparse."""
    return stream_ranges(
        "raw", out, ranges, read, lambda w, gpa, _n: w.skip(gpa - w.pos), progress=progress, read_size=read_size
    )
