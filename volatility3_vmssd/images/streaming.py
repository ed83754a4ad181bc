"""Streaming an image to disk: bounded reads, sparse zero stretches, the report of what was written.

Every writer reads at most :data:`READ_SIZE` bytes at a time and never holds more, so memory use does not
grow with the guest.  All-zero stretches of :data:`SPARSE_MIN` bytes or more are skipped with a seek instead
of written (a sparse file where the file system supports it), and the file is truncated to its final size
at the end, so a trailing zero stretch still counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import BinaryIO

from ..errors import VmssdError
from .ranges import MissingRange, sorted_ranges

READ_SIZE = 16 << 20
SPARSE_MIN = 1 << 20
Read = Callable[[int, int], bytes]
Progress = Callable[[int], None]


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
    the caller cut its data; :func:`copy_range` ends its reads on block boundaries so that every
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


def copy_range(
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


def stream_ranges(
    fmt: str,
    out: BinaryIO,
    ranges: Sequence[tuple[int, int]],
    read: Read,
    before: Callable[[SparseWriter, int, int], None],
    *,
    progress: Progress | None = None,
    read_size: int = READ_SIZE,
) -> ExportReport:
    """Each range in GPA order: ``before(writer, gpa, length)`` (a header, a hole), then its bytes."""
    rs = sorted_ranges(ranges)
    writer = SparseWriter(out)
    for gpa, length in rs:
        before(writer, gpa, length)
        copy_range(writer, read, gpa, length, progress, read_size)
    report = ExportReport(fmt, len(rs), sum(n for _, n in rs))
    report.size, report.stored = writer.finish(), writer.stored
    return report
