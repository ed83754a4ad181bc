"""Reader for the HyperVStorage key-value container (``.vmrs``, ``.vmcx``, modern ``.vsv``).

What this reader does that the public ones do not (docs/format.md#quirks): it walks *every* chained object
table from the fixed root at 0x2000, applies the pending replay log in memory before any table is
parsed (and ignores stale log entries), keeps the newest copy of each key table, resolves parents
only after all tables are loaded, and never reads a file object until its value is asked for.

The evidence file is opened read-only and is never written.

>>> with HyperVStorage.open("vm.vmrs") as storage:            # doctest: +SKIP
...     storage.get("/configuration/properties/version").value
2304
"""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from ..errors import ChecksumError, Findings, FormatError, NotFoundError, TruncatedError
from ..sources import hint_reads, is_remote_file, open_binary, redact
from .defs import (
    FILE_HEADER,
    FILE_HEADER_CRC_OFFSET,
    FILE_SIGNATURE,
    FORMAT_VERSION_CURRENT,
    HEADER_COPY_OFFSETS,
    HEADER_PAGE_SIZE,
    KEY_TABLE_HEADER,
    KEY_TABLE_HEADER_CRC_OFFSET,
    KEY_TABLE_SIGNATURE,
    MAX_ALIGNMENT,
    OBJECT_ENTRY,
    OBJECT_ENTRY_CRC_OFFSET,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    OPEN_REGION,
    ROOT_OBJECT_TABLE_OFFSET,
    FileHeaderFields,
    ObjectType,
    crc32_skipping,
    sequence_newer,
)
from .journal import Overlay, ReplayLogEntry, ReplayLogInfo, commit, load_replay_log
from .keytree import Key, KeyTree, NumberedKeys, decode_utf16

__all__ = [
    "FileHeader",
    "HyperVStorage",
    "Key",
    "KeyTableInfo",
    "NumberedKeys",
    "ReplayLogEntry",
    "ReplayLogInfo",
    "StorageObject",
    "commit_replay_log",
    "decode_utf16",
]

Value = int | float | str | bytes | bool | None


@dataclasses.dataclass(frozen=True)
class FileHeader(FileHeaderFields):
    """One copy of the file header as read: its fields, which copy it is, and whether its CRC held."""

    copy: int
    checksum_ok: bool

    @property
    def valid(self) -> bool:
        return self.signature == FILE_SIGNATURE and self.checksum_ok

    @property
    def fields(self) -> FileHeaderFields:
        return FileHeaderFields(*(getattr(self, f.name) for f in dataclasses.fields(FileHeaderFields)))


@dataclasses.dataclass(frozen=True)
class StorageObject:
    """One object-table entry: where a key table, file object or free extent lives."""

    table_offset: int
    slot: int
    type: int
    offset: int
    size: int
    flags: int


@dataclasses.dataclass(frozen=True)
class KeyTableInfo:
    index: int
    sequence: int
    offset: int
    size: int
    entries: int


class ObjectList(Sequence[StorageObject]):
    """The object-table entries that are not empty, as columns; :class:`StorageObject` made on access."""

    def __init__(self) -> None:
        self.table_offset = array("Q")
        self.slot = array("I")
        self.type = array("B")
        self.offset = array("Q")
        self.size = array("I")
        self.flags = array("B")

    def __len__(self) -> int:
        return len(self.slot)

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return StorageObject(
            self.table_offset[i], self.slot[i], self.type[i], self.offset[i], self.size[i], self.flags[i]
        )

    def of_type(self, otype: int) -> Iterator[StorageObject]:
        types = self.type
        start = 0
        while True:
            try:
                i = types.index(otype, start)
            except ValueError:
                return
            yield self[i]
            start = i + 1


class HyperVStorage:
    """An opened HyperVStorage container. Use :meth:`open`; close it (or use ``with``)."""

    def __init__(self, fh: BinaryIO, path: str, *, strict: bool = False, apply_replay_log: bool = True):
        self.path = path
        self._fh: BinaryIO | None = fh
        self._lock = threading.Lock()
        self.findings = Findings(strict=strict)
        self._truncation_offsets: set[int] = set()
        fh.seek(0, os.SEEK_END)
        self.file_size = fh.tell()
        self.overlay: Overlay | None = None  # the pending journal, applied in memory
        self.virtual_size = self.file_size
        hint_reads(fh, [(0, OPEN_REGION)])
        self.header = self._select_header()
        if is_remote_file(fh):  # the hint parses the root table: only where requests cost
            hint_reads(fh, self._open_hint())
        self.replay_log, overlay = load_replay_log(
            path, self.header.fields, self.file_size, self.read_at, self.findings, apply_replay_log
        )
        if overlay is not None:
            self.overlay = overlay
            self.virtual_size = max(self.file_size, overlay.end)
            # The journal may rewrite a header page; the tables are parsed with the committed one.
            self.header = self._select_header(quiet=True) or self.header
        if self.header.format_version != FORMAT_VERSION_CURRENT:
            self.findings.add(
                path,
                0,
                "version",
                f"container format version {self.header.format_version:#06x} is not the documented"
                f" {FORMAT_VERSION_CURRENT:#06x}; reading it with the 4.0 layout",
            )
        self.objects = self._load_object_tables()
        self.key_tables: list[KeyTableInfo] = []
        self._tree = KeyTree(self)
        self._load_keys()
        self.root = Key(self._tree, self._tree.root)

    # ------------------------------------------------------------------ opening / raw access
    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, strict: bool = False, apply_replay_log: bool = True
    ) -> HyperVStorage:
        """Open ``path`` read-only and index it (headers, journal, object and key tables).

        ``strict`` raises :class:`ChecksumError`/:class:`FormatError` where the default records a
        finding and reads on with the best valid copy.
        """
        spath = os.fspath(path)
        fh = open_binary(spath)  # a local file, or a remote object (docs/remote.md); closed by close()
        try:
            return cls(fh, redact(spath), strict=strict, apply_replay_log=apply_replay_log)
        except BaseException:
            fh.close()
            raise

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> HyperVStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shadowed_count(self) -> int:
        """Keys hidden because a newer sibling has the same name."""
        return self._tree.shadowed_count

    @property
    def key_count(self) -> int:
        """Keys read from the key tables (also those left out of the tree)."""
        return len(self._tree)

    def _open_hint(self) -> list[tuple[int, int]]:
        """The replay log's header and the key tables the root object table names as stored: what the open
        parses next, fetched together.  Only a hint: the tables are parsed later with the log applied and
        every check made, and whatever the hint missed is fetched then."""
        fields = self.header.fields
        spans = []
        if fields.replay_log_offset and fields.replay_log_size:
            spans.append((fields.replay_log_offset, max(1, min(fields.replay_log_header_size, fields.replay_log_size))))
        raw = self._pread(ROOT_OBJECT_TABLE_OFFSET, HEADER_PAGE_SIZE)  # fetched with the open region
        if len(raw) >= OBJECT_TABLE_HEADER.size:
            count = min(
                OBJECT_TABLE_HEADER.unpack_from(raw)[1], (len(raw) - OBJECT_TABLE_HEADER.size) // OBJECT_ENTRY.size
            )
            entries = memoryview(raw)[OBJECT_TABLE_HEADER.size : OBJECT_TABLE_HEADER.size + count * OBJECT_ENTRY.size]
            key_table = int(ObjectType.KEY_TABLE)
            spans += [(off, size) for kind, _, off, size, _ in OBJECT_ENTRY.iter_unpack(entries) if kind == key_table]
        return spans

    def _pread(self, offset: int, size: int) -> bytes:
        if self._fh is None:
            raise FormatError(self.path, offset, "the storage file is closed")
        if size <= 0 or offset >= self.file_size:
            return b""
        size = min(size, self.file_size - offset)
        pread = getattr(self._fh, "pread", None)
        if pread is not None:  # a remote object: ranged requests, cached (sources/remote.py)
            return pread(offset, size)
        if hasattr(os, "pread"):
            return os.pread(self._fh.fileno(), size, offset)
        with self._lock:
            self._fh.seek(offset)
            return self._fh.read(size)

    def read_at(self, offset: int, size: int) -> bytes:
        """File bytes as the committed journal would leave them; short at the end of the file."""
        if offset < 0 or size <= 0:
            return b""
        end = min(offset + size, self.virtual_size)
        if end <= offset:
            return b""
        data = self._pread(offset, end - offset)
        if self.overlay is None:
            return data
        return self.overlay.patch(offset, data, end)

    def note_truncation(self, offset: int, message: str) -> None:
        """Record (once per offset) that a value is cut short by the end of the file."""
        if offset not in self._truncation_offsets:
            self._truncation_offsets.add(offset)
            self.findings.add(self.path, offset, "truncated", message, group="value")

    # ------------------------------------------------------------------ file header
    def _read_header_copy(self, copy: int) -> FileHeader | None:
        off = HEADER_COPY_OFFSETS[copy]
        raw = self.read_at(off, FILE_HEADER.size)
        if len(raw) < FILE_HEADER.size:
            return None
        fields = FileHeaderFields.parse(raw)
        ok = crc32_skipping(raw, FILE_HEADER_CRC_OFFSET) == fields.checksum
        return FileHeader(**dataclasses.asdict(fields), copy=copy, checksum_ok=ok)

    def _select_header(self, quiet: bool = False) -> FileHeader:
        copies = [self._read_header_copy(0), self._read_header_copy(1)]
        if copies[0] is None:
            raise TruncatedError(
                self.path,
                0,
                f"file of {self.file_size} bytes is too short for a HyperVStorage header"
                f" ({FILE_HEADER.size} bytes expected at offset 0)",
            )
        signed = [c for c in copies if c is not None and c.signature == FILE_SIGNATURE]
        if not signed:
            raise FormatError(
                self.path,
                0,
                f"not a HyperVStorage container: signature {copies[0].signature:#010x},"
                f" expected {FILE_SIGNATURE:#010x} at offset 0 or 0x1000",
            )
        valid = [c for c in signed if c.checksum_ok]
        if not quiet:
            for c in copies:
                where = HEADER_COPY_OFFSETS[copies.index(c)] if c is not None else 0x1000
                if c is None:
                    self.findings.add(self.path, where, "truncated", "header copy 1 is missing (file too short)")
                elif c.signature != FILE_SIGNATURE:
                    self.findings.add(
                        self.path, where, "header", f"header copy {c.copy} has a bad signature {c.signature:#010x}"
                    )
                elif not c.checksum_ok:
                    self.findings.add(
                        self.path,
                        where,
                        "crc",
                        f"header copy {c.copy} fails its CRC-32 (stored {c.checksum:#010x})",
                        error=ChecksumError,
                    )
        if not valid:
            chosen = signed[0] if len(signed) == 1 else self._newer(signed[0], signed[1])
            if not quiet:
                self.findings.add(
                    self.path,
                    HEADER_COPY_OFFSETS[chosen.copy],
                    "crc",
                    f"no header copy passes its CRC; using copy {chosen.copy} (sequence {chosen.sequence})",
                )
            return chosen
        if len(valid) == 1:
            if (not quiet and len(signed) == 2) or (copies[1] is None and not quiet):
                self.findings.add(
                    self.path,
                    HEADER_COPY_OFFSETS[valid[0].copy],
                    "header",
                    f"using header copy {valid[0].copy}, the only valid one",
                )
            return valid[0]
        a, b = valid
        if a.sequence == b.sequence and not quiet:
            # openvmm notes that Microsoft's loader rejects equal sequences; we read on.
            self.findings.add(self.path, 0, "header", f"both header copies carry sequence {a.sequence}; using copy 0")
        return self._newer(a, b)

    @staticmethod
    def _newer(a: FileHeader, b: FileHeader) -> FileHeader:
        return b if sequence_newer(b.sequence, a.sequence) else a

    # ------------------------------------------------------------------ object tables
    def _load_object_tables(self) -> ObjectList:
        objects = ObjectList()
        queue: deque[tuple[int, int | None]] = deque([(ROOT_OBJECT_TABLE_OFFSET, None)])
        visited: set[int] = set()
        spans: list[tuple[int, int]] = []  # [start, end) of the tables read, sorted, disjoint
        path, findings = self.path, self.findings
        while queue:
            table_off, table_size = queue.popleft()
            if table_off in visited:
                findings.add(
                    path, table_off, "object-table", "object-table chain loops back to a visited table", group="table"
                )
                continue
            visited.add(table_off)
            raw = self.read_at(table_off, OBJECT_TABLE_HEADER.size)
            if len(raw) < OBJECT_TABLE_HEADER.size:
                if table_off == ROOT_OBJECT_TABLE_OFFSET:
                    raise TruncatedError(path, table_off, "file ends before the root object table")
                findings.add(
                    path, table_off, "truncated", "chained object table lies past the end of the file", group="table"
                )
                continue
            sig, count = OBJECT_TABLE_HEADER.unpack(raw)
            if sig != OBJECT_TABLE_SIGNATURE:
                message = f"object table signature {sig:#010x}, expected {OBJECT_TABLE_SIGNATURE:#010x}"
                if table_off == ROOT_OBJECT_TABLE_OFFSET:
                    raise FormatError(path, table_off, message)
                findings.add(
                    path, table_off, "object-table", message + "; table skipped", error=FormatError, group="table"
                )
                continue
            room = self.virtual_size - table_off - OBJECT_TABLE_HEADER.size
            if table_size is not None:
                room = min(room, table_size - OBJECT_TABLE_HEADER.size)
            elif table_off == ROOT_OBJECT_TABLE_OFFSET:
                # The root table fills one page (227 slots) in every known file; one flipped count
                # byte must not make a multi-GiB file parse as 10**8 garbage entries.
                room = min(room, MAX_ALIGNMENT - OBJECT_TABLE_HEADER.size)
            fit = max(0, room // OBJECT_ENTRY.size)
            if count > fit:
                findings.add(
                    path,
                    table_off,
                    "object-table",
                    f"object table declares {count} entries but only {fit} fit in its space",
                    error=FormatError,
                    group="table",
                )
                count = fit
            extent = (table_off, table_off + OBJECT_TABLE_HEADER.size + count * OBJECT_ENTRY.size)
            if _overlaps(spans, extent):
                # Chained tables that overlap would re-read the same entries (docs/robustness.md).
                findings.add(
                    path,
                    table_off,
                    "object-table",
                    "chained object table overlaps an earlier object table; table skipped",
                    error=FormatError,
                    group="table",
                )
                continue
            _insert_span(spans, extent)
            data = self.read_at(table_off + OBJECT_TABLE_HEADER.size, count * OBJECT_ENTRY.size)
            self._parse_object_table(table_off, data, objects, queue)
        return objects

    def _parse_object_table(
        self, table_off: int, data: bytes, objects: ObjectList, queue: deque[tuple[int, int | None]]
    ) -> None:
        esize = OBJECT_ENTRY.size
        # One CRC call per entry over a copy whose CRC fields are zeroed by four strided assignments.
        zeroed = bytearray(data)
        n = len(data) // esize
        for k in range(4):
            field = slice(OBJECT_ENTRY_CRC_OFFSET + k, len(data), esize)
            zeroed[field] = bytes(len(range(*field.indices(len(data)))))
        crc32 = zlib.crc32
        path, findings, end_of_file = self.path, self.findings, self.virtual_size
        base = table_off + OBJECT_TABLE_HEADER.size
        empty, free, chained = int(ObjectType.EMPTY), int(ObjectType.FREE), int(ObjectType.OBJECT_TABLE)
        known = max(ObjectType)
        bad = array("I")  # slots whose CRC fails, reported together below
        add = (
            objects.table_offset.append,
            objects.slot.append,
            objects.type.append,
            objects.offset.append,
            objects.size.append,
            objects.flags.append,
        )
        for slot, (otype, ocrc, ooff, osize, oflags) in enumerate(OBJECT_ENTRY.iter_unpack(data[: n * esize])):
            p = slot * esize
            if crc32(zeroed[p : p + esize]) != ocrc:  # type: ignore[operator]
                bad.append(slot)
                if otype > known:  # a damaged entry of no known type: garbage, counted and not kept
                    continue
            if otype == empty:
                continue
            if otype != free and ooff + osize > end_of_file:
                message = ""
                if findings.verbatim(path, "truncated", "object-entry"):
                    message = (
                        f"object-table entry {slot} ({_object_name(otype)}, {osize} bytes at {ooff:#x})"
                        f" reaches past the end of the file ({end_of_file:#x})"
                    )
                findings.add(path, base + p, "truncated", message, group="object-entry")
            if otype == chained:
                queue.append((ooff, osize or None))
            for column, v in zip(add, (table_off, slot, otype, ooff, osize, oflags), strict=True):
                column(v)
        if bad:
            types = data[0 : n * esize : esize]
            findings.add_all(
                path,
                "crc",
                _EntryOffsets(bad, base, esize),
                lambda j: f"object-table entry {bad[j]} (type {types[bad[j]]}) fails its CRC-32",
                error=ChecksumError,
                group="object-entry",
            )

    # ------------------------------------------------------------------ key tables
    def _load_keys(self) -> None:
        chosen: dict[int, tuple[int, StorageObject]] = {}
        spans: list[tuple[int, int]] = []  # key tables read so far, sorted, disjoint
        path, findings = self.path, self.findings
        hint_reads(self._fh, [(obj.offset, obj.size) for obj in self.objects.of_type(ObjectType.KEY_TABLE)])
        for obj in self.objects.of_type(ObjectType.KEY_TABLE):
            head = self.read_at(obj.offset, min(obj.size, KEY_TABLE_HEADER.size))
            if len(head) < KEY_TABLE_HEADER.size:
                findings.add(path, obj.offset, "truncated", "key table lies past the end of the file", group="table")
                continue
            sig, index, seq, crc = KEY_TABLE_HEADER.unpack_from(head)
            if sig != KEY_TABLE_SIGNATURE:
                findings.add(
                    path,
                    obj.offset,
                    "key-table",
                    f"key table signature {sig:#06x}, expected {KEY_TABLE_SIGNATURE:#06x}; table skipped",
                    error=FormatError,
                    group="table",
                )
                continue
            extent = (obj.offset, obj.offset + obj.size)
            if _overlaps(spans, extent):
                # Key tables never share bytes; n entries naming overlapping tables would make the
                # reader parse O(n * file size) key entries (docs/robustness.md).
                findings.add(
                    path,
                    obj.offset,
                    "key-table",
                    f"key table {index} overlaps an earlier key table; table skipped",
                    error=FormatError,
                    group="table",
                )
                continue
            _insert_span(spans, extent)
            if crc32_skipping(head, KEY_TABLE_HEADER_CRC_OFFSET) != crc:
                findings.add(
                    path,
                    obj.offset,
                    "crc",
                    f"key table {index} header fails its CRC-32",
                    error=ChecksumError,
                    group="table",
                )
            previous = chosen.get(index)
            if previous is not None:
                if previous[0] == seq:
                    findings.add(
                        path,
                        obj.offset,
                        "key-table",
                        f"two key tables with index {index} share sequence {seq}; keeping the first",
                        group="table",
                    )
                    continue
                if not sequence_newer(seq, previous[0]):
                    continue
            chosen[index] = (seq, obj)
        tree = self._tree
        for index in sorted(chosen):
            seq, obj = chosen[index]
            n = tree.add_table(index, obj.offset, self.read_at(obj.offset, obj.size))
            self.key_tables.append(KeyTableInfo(index, seq, obj.offset, obj.size, n))
        tree.link()

    # ------------------------------------------------------------------ lookups
    def get(self, path: str) -> Key:
        """The key at ``path`` (``/savedstate/RamBlock12``); raises :class:`NotFoundError`."""
        key = self.root
        for part in path.strip("/").split("/"):
            if part:
                found = key.get(part)
                if found is None:
                    raise NotFoundError(f"{self.path}: no key {path!r}")
                key = found
        return key

    def find(self, path: str) -> Key | None:
        try:
            return self.get(path)
        except NotFoundError:
            return None

    def __contains__(self, path: str) -> bool:
        return self.find(path) is not None

    def walk(self) -> Iterator[Key]:
        """Every key in tree order."""
        return self.root.walk()

    def stats(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        types = self.objects.type
        for otype in set(types):
            counts[_object_name(otype, upper=True)] = types.count(otype)
        return counts


class _EntryOffsets(Sequence[int]):
    """File offsets of the given slots of one table, computed on access (millions cost one array)."""

    def __init__(self, slots: array[int], base: int, size: int) -> None:
        self.slots, self.base, self.size = slots, base, size

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, j):  # type: ignore[no-untyped-def]
        return self.base + self.slots[j] * self.size


def _overlaps(spans: list[tuple[int, int]], span: tuple[int, int]) -> bool:
    """Whether ``span`` meets any of the sorted, disjoint ``spans``."""
    i = bisect_right(spans, (span[0], span[0]))
    if i and spans[i - 1][1] > span[0]:
        return True
    return i < len(spans) and spans[i][0] < span[1]


def _insert_span(spans: list[tuple[int, int]], span: tuple[int, int]) -> None:
    spans.insert(bisect_right(spans, span), span)


def _object_name(otype: int, upper: bool = False) -> str:
    try:
        name = ObjectType(otype).name
    except ValueError:
        return f"TYPE_{otype}" if upper else f"type {otype}"
    return name if upper else name.lower()


def commit_replay_log(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Write a copy of ``src`` with its pending journal applied (``journal.commit``); ``src`` is only read.

    Returns the number of entries applied; refuses to write over ``src``.  ``src`` is opened in
    strict mode: a journal that does not verify is not committed.
    """
    with HyperVStorage.open(src, strict=True) as storage:
        return commit(storage, dst)
