"""The legacy ``.bin`` saved-memory file (VM version ≤ 5.0, docs/format.md#legacy-bin-vsv): reader and writer.

Not a flat memory image but a small key/value container [V on one real file]::

    0x0000  header (40 meaningful bytes, rest of the page zero)
    0x1000  values, one after another, each padded to 4 KiB
    ...     index table: capacity x 24-byte entries (unused slots all zero)
    ...     name table: NUL-terminated ASCII names ``RamBlock/<n>/``; the file ends with it

Each value is a RamBlock (docs/format.md#ramblock-values).  The two bytes after the name length
(1 and 1 in every entry of the sample) and the header's third u32 (1) are not understood; they
are kept and written back unchanged.  Slack after a value's used size is *not* zero in the sample
(it holds stale bytes), so readers must honour the used size.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import threading
from collections.abc import Callable, Collection, Iterable
from types import TracebackType
from typing import BinaryIO

from ..errors import Findings, FormatError, NotFoundError, TruncatedError, VmssdError
from ..sources import open_binary, redact
from .geometry import BLOCK_SIZE, PAGES_PER_BLOCK
from .guestmemory import DEFAULT_CACHE_LIMIT, GuestMemory
from .rammap import RamMap

__all__ = ["BIN_HEADER", "BIN_INDEX_ENTRY", "BIN_SIGNATURE", "BinEntry", "BinFile", "write_bin"]

BIN_SIGNATURE = 0x02182003
#: Signature, VmVersion, Unknown (1), IndexCapacity, IndexTableOffset, NameTableOffset,
#: NameTableSize, NameBytesUsed (seen on the real sample).
BIN_HEADER = struct.Struct("<IIIIQQII")
#: NameOffset, NameLength (with NUL), Type? (1), Flags? (1), AllocatedSize, UsedSize, FileOffset (seen on the
#: real sample).
BIN_INDEX_ENTRY = struct.Struct("<IHBBIIQ")
BIN_DATA_START = 0x1000
BIN_ALIGNMENT = 0x1000
#: The sample has 1024 slots and 16 name-table bytes per slot (0x4000); the writer keeps both
#: ratios, growing the capacity in steps of 1024 (inferred).
BIN_CAPACITY_STEP = 1024
BIN_NAME_BYTES_PER_SLOT = 16
#: 4 Mi slots = 4 TiB of RAM; anything larger is treated as corrupt rather than allocated.
MAX_INDEX_CAPACITY = 1 << 22
MAX_NAME_TABLE = 64 << 20

_RAMBLOCK_NAME = re.compile(r"RamBlock/(\d{1,12})/")
_EMPTY_ENTRY = bytes(BIN_INDEX_ENTRY.size)


@dataclasses.dataclass(frozen=True)
class BinEntry:
    """One used index slot."""

    slot: int
    name: str
    name_offset: int
    entry_type: int
    entry_flags: int
    allocated_size: int
    size: int
    offset: int


class BinFile:
    """A legacy ``.bin`` opened read-only; also a :class:`~.guestmemory.BlockSource`."""

    def __init__(
        self, path: str, fh: BinaryIO, header: tuple[int, ...], entries: list[BinEntry], findings: Findings
    ) -> None:
        self.path = path
        self._fh: BinaryIO | None = fh
        self._lock = threading.Lock()
        (
            _,
            self.vm_version,
            self.header_unknown,
            self.index_capacity,
            self.index_offset,
            self.name_table_offset,
            self.name_table_size,
            self.name_bytes_used,
        ) = header
        self.entries = entries
        self.findings = findings
        self.blocks: dict[int, BinEntry] = {}
        self.other_entries: dict[str, BinEntry] = {}
        for entry in entries:
            match = _RAMBLOCK_NAME.fullmatch(entry.name)
            if match is None:
                self.other_entries.setdefault(entry.name, entry)
                findings.add(
                    path,
                    self.index_offset + BIN_INDEX_ENTRY.size * entry.slot,
                    "unknown-entry",
                    f"entry {entry.name!r} is not a RamBlock; kept",
                    group="slot",
                )
                continue
            n = int(match.group(1))
            if n in self.blocks:
                findings.add(
                    path,
                    self.index_offset + BIN_INDEX_ENTRY.size * entry.slot,
                    "bad-entry",
                    f"RamBlock {n} appears twice (slots {self.blocks[n].slot} and {entry.slot}); the first wins",
                    error=FormatError,
                    group="repeat",
                )
                continue
            self.blocks[n] = entry

    @classmethod
    def open(cls, path: str | os.PathLike[str], findings: Findings | None = None) -> BinFile:
        """Open and index a .bin (header, index table, names); no value is read."""
        findings = findings if findings is not None else Findings()
        spath = redact(path)  # what is shown: a URL without credentials or query string
        fh = open_binary(path)  # a local file, or a remote object (docs/remote.md); closed by close()
        try:
            header, entries = _parse(spath, fh, findings)
            return cls(spath, fh, header, entries, findings)
        except BaseException:
            fh.close()
            raise

    # -- BlockSource ------------------------------------------------------------------------------

    def block_numbers(self) -> Collection[int]:
        return self.blocks.keys()

    def block_location(self, n: int) -> tuple[int, int] | None:
        entry = self.blocks.get(n)
        return None if entry is None else (entry.offset, entry.size)

    def read_block_value(self, n: int) -> bytes:
        entry = self.blocks.get(n)
        if entry is None:
            raise NotFoundError(f"{self.path}: RamBlock {n} is not in this .bin")
        return self.read_entry(entry)

    def read_entry(self, entry: BinEntry) -> bytes:
        with self._lock:
            if self._fh is None:
                raise VmssdError(f"{self.path}: file is closed")
            self._fh.seek(entry.offset)
            data = self._fh.read(entry.size)
        if len(data) != entry.size:
            raise TruncatedError(self.path, entry.offset, f"{entry.name}: {entry.size} bytes of value, got {len(data)}")
        return data

    # -- convenience ------------------------------------------------------------------------------

    def identity_map(self) -> RamMap:
        """GPA = block x 1 MiB + offset over blocks 0..max: right for the real sample; a .vsv
        would carry the real RamMemoryBlock metadata (unavailable: docs/format.md#legacy-bin-vsv)."""
        count = (max(self.blocks) + 1) * PAGES_PER_BLOCK if self.blocks else 0
        return RamMap.identity(count, findings=self.findings, path=self.path) if count else RamMap([], path=self.path)

    def guest_memory(
        self,
        ram_map: RamMap | None = None,
        *,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        on_fallback: Callable[[str], object] | None = None,
    ) -> GuestMemory:
        """A :class:`GuestMemory` over this file (identity map unless ``ram_map`` is given); findings are shared."""
        return GuestMemory(
            ram_map if ram_map is not None else self.identity_map(),
            self,
            findings=self.findings,
            cache_limit=cache_limit,
            on_fallback=on_fallback,
        )

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> BinFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BinFile({self.path!r}, vm_version={self.vm_version:#06x}, {len(self.blocks)} RamBlocks)"


def _parse(path: str, fh: BinaryIO, findings: Findings) -> tuple[tuple[int, ...], list[BinEntry]]:
    file_size = fh.seek(0, os.SEEK_END)
    fh.seek(0)
    raw = fh.read(BIN_HEADER.size)
    if len(raw) < BIN_HEADER.size:
        raise TruncatedError(path, 0, f"legacy .bin header needs {BIN_HEADER.size} bytes, file has {len(raw)}")
    header = BIN_HEADER.unpack(raw)
    signature, _, unknown, capacity, index_offset, names_offset, names_size, names_used = header
    if signature != BIN_SIGNATURE:
        raise FormatError(path, 0, f"legacy .bin signature {BIN_SIGNATURE:#010x} expected, found {signature:#010x}")
    if unknown != 1:
        findings.add(path, 8, "unknown-field", f"header field at 8 is {unknown} (1 in the known sample)")
    if capacity > MAX_INDEX_CAPACITY:
        raise FormatError(path, 12, f"index capacity {capacity} is absurd (at most {MAX_INDEX_CAPACITY})")
    index_size = capacity * BIN_INDEX_ENTRY.size
    if index_offset < BIN_HEADER.size or index_offset + index_size > file_size:
        raise TruncatedError(
            path,
            16,
            f"index table ({capacity} x 24 bytes at {index_offset:#x}) outside the file ({file_size:#x} bytes)",
        )
    if names_size > MAX_NAME_TABLE:
        raise FormatError(path, 32, f"name table size {names_size:#x} is absurd (at most {MAX_NAME_TABLE:#x})")
    if names_offset < BIN_HEADER.size or names_offset + names_size > file_size:
        raise TruncatedError(
            path, 24, f"name table ({names_size:#x} bytes at {names_offset:#x}) outside the file ({file_size:#x} bytes)"
        )
    if names_used > names_size:
        findings.add(
            path,
            36,
            "bad-header",
            f"{names_used:#x} name bytes used in a {names_size:#x}-byte name table",
            error=FormatError,
        )
    fh.seek(index_offset)
    index = fh.read(index_size)
    fh.seek(names_offset)
    names = fh.read(names_size)
    if len(index) != index_size or len(names) != names_size:
        raise TruncatedError(path, index_offset, "index or name table cut short while reading")

    entries: list[BinEntry] = []
    # Slots naming bytes already seen are repeats of an earlier name: reported (aggregated) and not
    # kept, so an index flooded with one name costs a counter, not an object per slot.
    seen_names: dict[tuple[int, int], int] = {}
    for slot, fields in enumerate(BIN_INDEX_ENTRY.iter_unpack(index)):
        if not any(fields):
            continue
        name_off, name_len, etype, eflags, allocated, size, offset = fields
        entry_offset = index_offset + slot * BIN_INDEX_ENTRY.size
        if name_len == 0 or name_off + name_len > names_size:
            findings.add(
                path,
                entry_offset,
                "bad-entry",
                f"slot {slot}: name ({name_len} bytes at {name_off:#x}) outside the "
                f"{names_size:#x}-byte name table; skipped",
                error=FormatError,
                group="slot",
            )
            continue
        first = seen_names.get((name_off, name_len))
        if first is not None:
            findings.add(
                path,
                entry_offset,
                "bad-entry",
                f"slot {slot} names the same bytes as slot {first}; the first wins",
                error=FormatError,
                group="repeat",
            )
            continue
        seen_names[(name_off, name_len)] = slot
        name_raw = names[name_off : name_off + name_len]
        if name_raw[-1] != 0:
            findings.add(path, entry_offset, "bad-entry", f"slot {slot}: name is not NUL-terminated", group="slot")
        name = name_raw.split(b"\0", 1)[0].decode("ascii", "replace")
        if offset + size > file_size:
            findings.add(
                path,
                entry_offset,
                "truncated",
                f"slot {slot} ({name}): {size:#x} bytes at {offset:#x} run past the end of the file; skipped",
                error=TruncatedError,
                group="slot",
            )
            continue
        if size > allocated:
            findings.add(
                path,
                entry_offset,
                "bad-entry",
                f"slot {slot} ({name}): used size {size:#x} > allocated {allocated:#x}",
                group="slot",
            )
        entries.append(BinEntry(slot, name, name_off, etype, eflags, allocated, size, offset))
    return header, entries


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def write_bin(path: str | os.PathLike[str], blocks: Iterable[tuple[int, bytes]], vm_version: int = 0x0500) -> None:
    """Write RamBlock values (already encoded, e.g. by :func:`~.ramblock.encode_block`) as a legacy .bin.

    Mirrors the real sample: values from 0x1000 in the given order, each padded to 4 KiB with
    zeros, then the index table (capacity a multiple of 1024) and the name table (16 bytes per
    slot, at least the names' size, rounded to 4 KiB), which ends the file.
    """
    entries: list[tuple[int, int, int, int, int, int, int]] = []
    names = bytearray()
    seen: set[int] = set()
    with open(path, "wb") as fh:
        fh.write(bytes(BIN_DATA_START))
        offset = BIN_DATA_START
        for n, value in blocks:
            if n < 0 or n in seen:
                raise ValueError(f"RamBlock number {n} is negative or repeated")
            if len(value) > BLOCK_SIZE:
                raise ValueError(f"RamBlock {n} value is {len(value)} bytes; at most {BLOCK_SIZE}")
            seen.add(n)
            name = f"RamBlock/{n}/".encode("ascii") + b"\0"
            allocated = _round_up(len(value), BIN_ALIGNMENT)
            entries.append((len(names), len(name), 1, 1, allocated, len(value), offset))
            names += name
            fh.write(value)
            fh.write(bytes(allocated - len(value)))
            offset += allocated
        capacity = max(BIN_CAPACITY_STEP, _round_up(len(entries), BIN_CAPACITY_STEP))
        index_offset = offset
        fh.write(b"".join(BIN_INDEX_ENTRY.pack(*entry) for entry in entries))
        fh.write(bytes((capacity - len(entries)) * BIN_INDEX_ENTRY.size))
        names_offset = index_offset + capacity * BIN_INDEX_ENTRY.size
        names_size = _round_up(max(capacity * BIN_NAME_BYTES_PER_SLOT, len(names)), BIN_ALIGNMENT)
        fh.write(names)
        fh.write(bytes(names_size - len(names)))
        fh.seek(0)
        fh.write(
            BIN_HEADER.pack(BIN_SIGNATURE, vm_version, 1, capacity, index_offset, names_offset, names_size, len(names))
        )
