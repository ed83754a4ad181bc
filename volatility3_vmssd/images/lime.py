"""LiME images: one 32-byte range header per range (magic ``EMiL``, version 1, start, inclusive end), then its bytes.

What Volatility's LimeLayer reads; ``vmssd create`` reads it back as guest memory.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any, BinaryIO

from ..errors import FormatError
from .ranges import MemoryRange
from .streaming import ExportReport, Read, SparseWriter, stream_ranges

LIME_MAGIC = 0x4C694D45  # "EMiL" little-endian
LIME_VERSION = 1
LIME_HEADER = struct.Struct("<IIQQ8x")  # magic, version, start (inclusive), end (inclusive), reserved


def lime_ranges(fh: BinaryIO, path: str, size: int) -> list[MemoryRange]:
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


def lime_header(gpa: int, length: int) -> bytes:
    return LIME_HEADER.pack(LIME_MAGIC, LIME_VERSION, gpa, gpa + length - 1)


def _range_header(writer: SparseWriter, gpa: int, length: int) -> None:
    writer.write(lime_header(gpa, length))


def write_lime(out: BinaryIO, ranges: Sequence[tuple[int, int]], read: Read, **options: Any) -> ExportReport:
    """A LiME file: for each range, its header (inclusive end) followed by its bytes.

    ``options``: ``progress`` and ``read_size``, as :func:`stream_ranges` takes them.
    """
    return stream_ranges("lime", out, ranges, read, _range_header, **options)
