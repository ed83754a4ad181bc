"""Flat raw images: GPA 0 up to the end of the last range, holes left as (sparse) zeros."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, BinaryIO

from .streaming import ExportReport, Read, SparseWriter, stream_ranges


def _skip_to(writer: SparseWriter, gpa: int, _length: int) -> None:
    writer.skip(gpa - writer.pos)


def write_raw(out: BinaryIO, ranges: Sequence[tuple[int, int]], read: Read, **options: Any) -> ExportReport:
    """A flat image from GPA 0 to the end of the last range; holes (and zero RAM) are left sparse.

    ``options``: ``progress`` and ``read_size``, as :func:`stream_ranges` takes them.
    """
    return stream_ranges("raw", out, ranges, read, _skip_to, **options)
