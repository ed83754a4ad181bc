"""The replay log (journal) of a container: load it, apply it in memory, commit it to a copy.

Hyper-V writes changed pages into the replay log first; a file saved while that log is pending
holds its current bytes in the log, not in place.  The reader applies the pending entries in
memory (the evidence is never written); :func:`commit` writes a committed copy and changes nothing
in the log header but the pending count and the CRC (docs/container-format.md).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import zlib
from bisect import bisect_right
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..errors import ChecksumError, FormatError, VmssdError
from ..outputs import partial_paths
from ..sources import is_remote, open_binary
from .defs import (
    REPLAY_LOG_ENTRY,
    REPLAY_LOG_ENTRY_CRC_OFFSET,
    REPLAY_LOG_HEADER,
    REPLAY_LOG_HEADER_CRC_OFFSET,
    REPLAY_LOG_SIGNATURE,
    ReplayLogHeaderFields,
    crc32_skipping,
)

if TYPE_CHECKING:
    from ..errors import Findings
    from .defs import FileHeaderFields


class _Opened(Protocol):
    """What :func:`commit` needs of an opened container (``reader.HyperVStorage``)."""

    path: str
    replay_log: ReplayLogInfo | None
    overlay: Overlay | None


#: Entries kept as :class:`ReplayLogEntry` objects; more are still checked (and pending ones applied)
#: but only counted, so a header claiming 2**32 entries costs no memory per entry.
ENTRIES_KEPT = 4096


@dataclasses.dataclass(frozen=True)
class ReplayLogEntry:
    slot: int
    destination_offset: int
    destination_size: int
    offset_inside_log: int
    pending: bool
    applied: bool
    checksum_ok: bool  # entry and data CRCs both verify (reported for stale entries too)


@dataclasses.dataclass(frozen=True)
class ReplayLogInfo:
    offset: int
    size: int
    pending_count: int
    maximum_entries: int
    entries: tuple[ReplayLogEntry, ...]  # the first ENTRIES_KEPT entries examined
    applied_count: int = 0
    stale_count: int = 0
    header: ReplayLogHeaderFields | None = None


class Overlay:
    """Pending journal entries flattened to sorted, disjoint pieces; patches reads of the file."""

    def __init__(self, entries: list[tuple[int, bytes]]) -> None:
        self.entries = entries  # in log order, as they were applied
        self.segments = _flatten(entries)
        self.starts = [d for d, _ in self.segments]
        self.end = max((d + len(b) for d, b in entries), default=0)

    def patch(self, offset: int, data: bytes, end: int) -> bytes:
        """``data`` (file bytes from ``offset``, possibly short) with the journal applied up to ``end``."""
        buf = bytearray(data)
        if len(buf) < end - offset:  # the journal may write past the current end of file
            buf.extend(bytes(end - offset - len(buf)))
        # Bisect into the flattened journal (docs/robustness.md: many tiny entries, many reads).
        starts, segments = self.starts, self.segments
        i = max(bisect_right(starts, offset) - 1, 0)
        while i < len(segments) and starts[i] < end:
            dst, piece = segments[i]
            lo, hi = max(dst, offset), min(dst + len(piece), end)
            if lo < hi:
                buf[lo - offset : hi - offset] = piece[lo - dst : hi - dst]
            i += 1
        return bytes(buf)


def load_replay_log(
    path: str,
    header: FileHeaderFields,
    file_size: int,
    read: Callable[[int, int], bytes],
    findings: Findings,
    apply: bool,
) -> tuple[ReplayLogInfo | None, Overlay | None]:
    """Check the replay log named by ``header``; return what it holds and, with ``apply``, its overlay.

    Every count is checked against the bytes the file can hold before any loop: the entry area
    against the log's header area and the end of the file, the entries' data against the data area.
    """
    off, size, hdr_size = header.replay_log_offset, header.replay_log_size, header.replay_log_header_size
    if off == 0 or size == 0:
        return None, None
    raw = read(off, REPLAY_LOG_HEADER.size)
    if len(raw) < REPLAY_LOG_HEADER.size:
        findings.add(path, off, "truncated", "replay log header lies past the end of the file")
        return None, None
    fields = ReplayLogHeaderFields.parse(raw)
    count, max_entries = fields.pending_count, fields.maximum_entries
    if fields.signature != REPLAY_LOG_SIGNATURE:
        findings.add(
            path,
            off,
            "journal",
            f"replay log signature {fields.signature:#010x}, expected {REPLAY_LOG_SIGNATURE:#010x}; journal ignored",
            error=FormatError,
        )
        return None, None
    if crc32_skipping(raw, REPLAY_LOG_HEADER_CRC_OFFSET) != fields.checksum:
        findings.add(
            path,
            off,
            "crc",
            "replay log header fails its CRC-32; its pending entries cannot be trusted and are not applied",
            error=ChecksumError,
        )
        count = 0
    area_bytes = min(hdr_size, size, max(0, file_size - off)) - REPLAY_LOG_HEADER.size
    capacity = max(0, area_bytes // REPLAY_LOG_ENTRY.size)
    if count > capacity:
        findings.add(
            path,
            off,
            "journal",
            f"replay log claims {count} pending entries but its header area (and the file) holds {capacity}",
            error=FormatError,
        )
        count = capacity
    slots = min(capacity, max(count, max_entries))
    table = read(off + REPLAY_LOG_HEADER.size, slots * REPLAY_LOG_ENTRY.size)
    entries: list[ReplayLogEntry] = []
    overlay: list[tuple[int, bytes]] = []
    applied_count = stale_count = examined = 0
    # Entries of one transaction hold disjoint pieces of the data area, so their sizes add up to at
    # most its size (docs/robustness.md: many entries naming the same megabytes).
    area = max(0, min(size, file_size - off) - hdr_size)
    budget = {True: area, False: area}  # pending entries, stale entries
    esize = REPLAY_LOG_ENTRY.size
    whole = len(table) // esize * esize
    # One CRC call per entry over a copy whose CRC fields are zeroed by four strided assignments.
    zeroed = bytearray(table[:whole])
    for k in range(4):
        field = slice(REPLAY_LOG_ENTRY_CRC_OFFSET + k, whole, esize)
        zeroed[field] = bytes(len(range(*field.indices(whole))))
    crc32 = zlib.crc32
    for i, (dst, dsize, inlog, ecrc, dcrc) in enumerate(REPLAY_LOG_ENTRY.iter_unpack(table[:whole])):
        pending = i < count
        if not pending and not (dst or dsize or inlog or ecrc or dcrc):
            break  # the unused tail of the entry area
        eoff = off + REPLAY_LOG_HEADER.size + i * esize
        examined += 1
        applied = False
        problem = None
        data = b""
        if crc32(zeroed[i * esize : (i + 1) * esize]) != ecrc:  # type: ignore[operator]
            problem = "fails its entry CRC-32"
        elif inlog < hdr_size or inlog + dsize > size:
            problem = f"points at {dsize} bytes at log offset {inlog:#x}, outside the log's data area"
        elif pending and dst > file_size:
            # A destination past the end would stretch the file's virtual size (docs/robustness.md).
            problem = f"writes to {dst:#x}, beyond the end of the file ({file_size:#x})"
        elif dsize > budget[pending]:
            problem = "has more data than is left in the log's data area (entries overlap)"
        else:
            budget[pending] -= dsize
            data = read(off + inlog, dsize)
            if len(data) < dsize:
                problem = "data lies past the end of the file"
            elif zlib.crc32(data) != dcrc:
                problem = "data fails its CRC-32"
        if pending:
            if problem:
                message = ""
                if findings.verbatim(path, "journal", "journal-entry"):
                    message = f"pending replay-log entry {i} ({dsize} bytes for {dst:#x}) {problem}; not applied"
                findings.add(path, eoff, "journal", message, error=ChecksumError, group="journal-entry")
            elif apply:
                overlay.append((dst, data))
                applied = True
                applied_count += 1
        else:
            stale_count += 1
        if len(entries) < ENTRIES_KEPT:
            entries.append(ReplayLogEntry(i, dst, dsize, inlog, pending, applied, problem is None))
    if examined > ENTRIES_KEPT:
        findings.add(
            path,
            off,
            "journal",
            f"replay log has more than {ENTRIES_KEPT} entries; all were checked, the first {ENTRIES_KEPT} are listed",
        )
    info = ReplayLogInfo(off, size, count, max_entries, tuple(entries), applied_count, stale_count, fields)
    if overlay:
        findings.add(
            path,
            off,
            "journal",
            f"{len(overlay)} pending replay-log entr{'y' if len(overlay) == 1 else 'ies'} applied in"
            " memory: the file was not cleanly committed (the file itself is unchanged)",
        )
        return info, Overlay(overlay)
    if count and not apply:
        findings.add(path, off, "journal", f"{count} pending replay-log entries were NOT applied (as asked)")
    return info, None


def _flatten(overlay: list[tuple[int, bytes]]) -> list[tuple[int, bytearray]]:
    """Sorted, disjoint ``(offset, bytes)`` pieces equal to applying ``overlay`` in order (later wins).

    Paints the elementary intervals between entry boundaries from the last entry backwards, skipping
    painted ones with a next-unpainted pointer, so it costs O(n log n) for n entries.
    """
    points = sorted({d for d, b in overlay} | {d + len(b) for d, b in overlay})
    where = {p: i for i, p in enumerate(points)}
    owner = [-1] * len(points)
    after = list(range(len(points) + 1))  # after[i]: first unpainted interval >= i (path-halved)

    def find(i: int) -> int:
        while after[i] != i:
            after[i] = after[after[i]]
            i = after[i]
        return i

    for k in range(len(overlay) - 1, -1, -1):
        dst, data = overlay[k]
        i, stop = find(where[dst]), where[dst + len(data)]
        while i < stop:
            owner[i] = k
            after[i] = i + 1
            i = find(i + 1)
    pieces: list[tuple[int, bytearray]] = []
    for i in range(len(points) - 1):
        k = owner[i]
        if k >= 0:
            dst, data = overlay[k]
            piece = data[points[i] - dst : points[i + 1] - dst]
            if pieces and pieces[-1][0] + len(pieces[-1][1]) == points[i]:
                pieces[-1][1].extend(piece)  # adjacent pieces become one, so a read meets few
            else:
                pieces.append((points[i], bytearray(piece)))
    return pieces


def commit(storage: _Opened, dst: str | os.PathLike[str]) -> int:
    """Write a copy of the opened ``storage``'s file with its pending journal applied; returns the entries applied.

    The copy keeps the entries as stale leftovers and its log header as it was except for the
    pending count (0) and the CRC: what a clean Hyper-V commit leaves behind.  ``dst`` is written
    through a temporary file beside it and renamed into place (``outputs.partial_paths``); the source
    is only read.  Opening is the caller's (``reader.commit_replay_log``), so this module does not import the reader.
    """
    ssrc, sdst = storage.path, os.fspath(dst)
    remote = is_remote(ssrc)
    if not remote and os.path.exists(sdst) and os.path.samefile(ssrc, sdst):
        raise VmssdError(f"refusing to write the committed copy over its input {ssrc}")
    log = storage.replay_log
    overlay = storage.overlay.entries if storage.overlay is not None else []
    with partial_paths(sdst, force=True) as (tmp,):
        if remote:  # an object in a store (docs/remote.md): streamed through the ranged reader
            with open_binary(ssrc) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
        else:
            shutil.copyfile(ssrc, tmp)
        with open(tmp, "r+b") as fh:
            for dest, data in overlay:
                fh.seek(dest)
                fh.write(data)
            if log is not None and log.header is not None:
                fh.seek(log.offset)
                fh.write(dataclasses.replace(log.header, pending_count=0).pack())
    return len(overlay)
