"""Writer for the HyperVStorage container: files our reader and Microsoft's loader accept.

The writer streams: large values (file objects) go to disk as they are added, and only the key
tree is held in memory until :meth:`HyperVStorageWriter.close` lays out the key tables and object
tables and writes both headers.  So a multi-GiB saved state can be written with bounded memory.

>>> with HyperVStorageWriter("out.vmrs") as w:             # doctest: +SKIP
...     w.set("/configuration/properties/version", 2304)
...     w.set("/savedstate/RamBlock0", bytes(1 << 20))

Layout: header copies at 0x0 and 0x1000, the root object table at 0x2000 (one page, 227 slots, as
Hyper-V writes it), the replay log at the next aligned offset, then file objects, key tables and
chained object tables (openvmm writes overflow tables after the replay log too).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zlib
from typing import BinaryIO

from .defs import (
    FILE_HEADER,
    FILE_HEADER_CRC_OFFSET,
    FILE_OBJECT_POINTER,
    FILE_OBJECT_THRESHOLD,
    FILE_SIGNATURE,
    FORMAT_VERSION_CURRENT,
    HEADER_COPY_OFFSETS,
    KEY_ENTRY_CRC_OFFSET,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    KEY_TABLE_HEADER,
    KEY_TABLE_HEADER_CRC_OFFSET,
    KEY_TABLE_SIGNATURE,
    LENGTH_PREFIX,
    MAX_ALIGNMENT,
    MIN_ALIGNMENT,
    NODE_VALUE,
    OBJECT_ENTRY,
    OBJECT_ENTRY_CRC_OFFSET,
    OBJECT_FLAG_ALLOCATED,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    REPLAY_LOG_ENTRY,
    REPLAY_LOG_ENTRY_CRC_OFFSET,
    REPLAY_LOG_HEADER,
    REPLAY_LOG_SIGNATURE,
    ROOT_OBJECT_TABLE_OFFSET,
    SCALAR_FORMATS,
    FileHeaderFields,
    KeyType,
    ObjectType,
    ReplayLogHeaderFields,
    align_up,
    seal,
)

__all__ = ["HyperVStorageWriter", "TypedValue", "encode_value", "uint"]

ROOT_TABLE_BYTES = 0x1000
REPLAY_LOG_HEADER_BYTES = 0x1000
MAX_NAME_BYTES = 254  # NameSize is a u8 that counts the trailing NUL


@dataclasses.dataclass(frozen=True)
class TypedValue:
    """A value with an explicit key type, for the cases Python types cannot express (UInt)."""

    type: KeyType
    value: object


def uint(value: int) -> TypedValue:
    return TypedValue(KeyType.UINT, value)


class _Node:
    __slots__ = ("children", "flags", "fo", "name", "payload", "type")

    def __init__(self, name: str, key_type: KeyType = KeyType.NODE) -> None:
        self.name = name
        self.type = key_type
        self.flags = 0
        self.payload = b""  # meaningful inline value bytes (what the entry CRC covers)
        self.fo: tuple[int, int] | None = None  # (size, offset) of a file object
        self.children: dict[str, _Node] = {}


def encode_value(value: object) -> tuple[KeyType, bytes]:
    """Map a Python value to (key type, value bytes without any length prefix)."""
    if isinstance(value, TypedValue):
        t, v = value.type, value.value
        fmt = SCALAR_FORMATS.get(t)
        if fmt is not None:
            if t == KeyType.DOUBLE:
                return t, fmt.pack(float(v))  # type: ignore[arg-type]
            return t, fmt.pack(int(v) if t != KeyType.BOOL else (1 if v else 0))  # type: ignore[call-overload]
        if t == KeyType.STRING:
            return t, str(v).encode("utf-16-le")
        if t == KeyType.ARRAY:
            return t, bytes(v)  # type: ignore[call-overload]
        raise ValueError(f"cannot write a value of key type {t!r}")
    if isinstance(value, bool):
        return KeyType.BOOL, SCALAR_FORMATS[KeyType.BOOL].pack(int(value))
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return KeyType.INT, SCALAR_FORMATS[KeyType.INT].pack(value)
        return KeyType.UINT, SCALAR_FORMATS[KeyType.UINT].pack(value)
    if isinstance(value, float):
        return KeyType.DOUBLE, SCALAR_FORMATS[KeyType.DOUBLE].pack(value)
    if isinstance(value, str):
        # The real samples store strings without a terminating NUL (a 36-character GUID has
        # length 72), so we do the same.
        return KeyType.STRING, value.encode("utf-16-le")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return KeyType.ARRAY, bytes(value)
    raise TypeError(f"cannot store a {type(value).__name__} in a HyperVStorage key")


class HyperVStorageWriter:
    """Write a new HyperVStorage file. Never used on evidence: it refuses existing files by default."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        alignment: int = 0x1000,
        overwrite: bool = False,
        replay_log_data_size: int = 0x3000,
        key_table_size: int | None = None,
        tables_first: bool = True,
    ) -> None:
        if alignment < MIN_ALIGNMENT or alignment > MAX_ALIGNMENT or alignment & (alignment - 1):
            raise ValueError(f"data alignment must be a power of two in 0x1000..0x10000, not {alignment:#x}")
        self.path = os.fspath(path)
        self.alignment = alignment
        self.key_table_size = align_up(key_table_size or 0x1000, alignment)
        self.replay_log_offset = align_up(ROOT_OBJECT_TABLE_OFFSET + ROOT_TABLE_BYTES, alignment)
        self.replay_log_size = align_up(REPLAY_LOG_HEADER_BYTES + replay_log_data_size, alignment)
        mode = "wb+" if overwrite else "xb+"
        self._fh: BinaryIO | None = open(self.path, mode)  # noqa: SIM115 - closed by close()
        self._end = self.replay_log_offset + self.replay_log_size
        self._objects: list[tuple[ObjectType, int, int]] = []  # (type, offset, size)
        self._root = _Node("")
        # With tables_first, values stream to a spill file and are appended after the key tables at
        # close: a copy cut short (evidence copied while the VM was saving) then keeps its tables and
        # loses only RAM, which the reader can report page by page.
        self._spill: BinaryIO | None = None
        self._spill_end = 0
        self._fo_nodes: list[_Node] = []
        self._fo_ids: set[int] = set()
        if tables_first:
            self._spill = tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(self.path)))  # noqa: SIM115

    # ------------------------------------------------------------------ building the tree
    def _node_for(self, path: str, create_leaf_type: KeyType | None) -> _Node:
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise ValueError("the root key cannot be set")
        node = self._root
        for i, part in enumerate(parts):
            if len(part.encode("utf-8")) > MAX_NAME_BYTES:
                raise ValueError(f"key name {part!r} is longer than {MAX_NAME_BYTES} UTF-8 bytes")
            if "\0" in part:
                raise ValueError(f"key name {part!r} contains a NUL")
            last = i == len(parts) - 1
            child = node.children.get(part)
            if child is None:
                child = _Node(part, create_leaf_type if last and create_leaf_type else KeyType.NODE)
                node.children[part] = child
            elif not last and child.type != KeyType.NODE:
                raise ValueError(f"{'/'.join(parts[: i + 1])} is a value, not a node")
            node = child
        return node

    def mkdir(self, path: str) -> None:
        """Create the node at ``path`` (and its parents) even if it gets no children."""
        node = self._node_for(path, KeyType.NODE)
        if node.type != KeyType.NODE:
            raise ValueError(f"{path} already holds a value")

    def set(self, path: str, value: object) -> None:
        """Set the key at ``path``; parents are created; values of 2048+ bytes become file objects."""
        key_type, data = encode_value(value)
        node = self._node_for(path, key_type)
        if node.children:
            raise ValueError(f"{path} is a node with children")
        node.type = key_type
        node.fo = None
        node.flags = 0
        if key_type in (KeyType.STRING, KeyType.ARRAY):
            if len(data) >= FILE_OBJECT_THRESHOLD:
                node.fo = (len(data), self._write_file_object(data))
                if self._spill is not None and id(node) not in self._fo_ids:
                    self._fo_ids.add(id(node))
                    self._fo_nodes.append(node)
                node.flags = KEY_FLAG_FILE_OBJECT
                node.payload = FILE_OBJECT_POINTER.pack(*node.fo)
            else:
                node.payload = LENGTH_PREFIX.pack(len(data)) + data
        else:
            node.payload = data

    def _write_file_object(self, data: bytes) -> int:
        if self._spill is not None:  # offset relative to the spill; made absolute at close
            offset = self._spill_end
            size = align_up(max(len(data), 1), self.alignment)
            self._spill.seek(offset)
            self._spill.write(data)
            self._spill_end = offset + size
            return offset
        assert self._fh is not None
        offset = self._end
        size = align_up(max(len(data), 1), self.alignment)
        self._fh.seek(offset)
        self._fh.write(data)
        if size > len(data):
            self._fh.write(bytes(size - len(data)))
        self._end = offset + size
        self._objects.append((ObjectType.FILE_OBJECT, offset, size))
        return offset

    # ------------------------------------------------------------------ layout at close
    def _entries_in_order(self) -> list[tuple[_Node, _Node | None, int]]:
        """(node, parent, insertion sequence) in tree pre-order, so parents precede children."""
        out: list[tuple[_Node, _Node | None, int]] = []
        stack: list[tuple[_Node, _Node | None, int]] = [
            (c, None, i) for i, c in reversed(list(enumerate(self._root.children.values(), 1)))
        ]
        while stack:
            node, parent, seq = stack.pop()
            out.append((node, parent, seq))
            stack.extend((c, node, i) for i, c in reversed(list(enumerate(node.children.values(), 1))))
        return out

    def _layout_key_tables(self) -> list[bytearray]:
        entries = self._entries_in_order()
        size = self.key_table_size
        where: dict[int, tuple[int, int]] = {}  # id(node) -> (table index, offset in table)
        placed: list[list[tuple[int, _Node, _Node | None, int, int]]] = [[]]  # (off, node, parent, seq, size)
        pos = KEY_TABLE_HEADER.size
        for node, parent, seq in entries:
            name = node.name.encode("utf-8") + b"\0"
            value = node.payload if node.type != KeyType.NODE else NODE_VALUE.pack(0, len(node.children) + 1)
            esize = KEY_ENTRY_HEADER.size + len(name) + len(value)
            if pos + esize > size:
                placed.append([])
                pos = KEY_TABLE_HEADER.size
            placed[-1].append((pos, node, parent, seq, esize))
            where[id(node)] = (len(placed), pos)
            pos += esize
        tables: list[bytearray] = []
        for index, items in enumerate(placed, 1):
            buf = bytearray(size)
            for n, (off, node, parent, seq, esize) in enumerate(items):
                end = items[n + 1][0] if n + 1 < len(items) else size
                gap = end - (off + esize)
                # Entries fill the table exactly: a gap too small for a Free entry becomes slack of
                # the entry before it (openvmm: Microsoft's loader rejects a smaller Free entry).
                if gap >= KEY_ENTRY_HEADER.size + 1:
                    slack = 0
                    KEY_ENTRY_HEADER.pack_into(buf, off + esize, KeyType.FREE, 0, gap, 0, 0, 0, 0, 0)
                else:
                    slack = gap
                ptable, poff = where[id(parent)] if parent is not None else (0, 0)
                name = node.name.encode("utf-8") + b"\0"
                value = node.payload if node.type != KeyType.NODE else NODE_VALUE.pack(0, len(node.children) + 1)
                header = KEY_ENTRY_HEADER.pack(node.type, node.flags, esize + slack, ptable, poff, 0, seq, len(name))
                buf[off : off + esize] = header + name + value
                seal(buf, KEY_ENTRY_CRC_OFFSET, off, off + esize)  # the CRC covers header, name, value
            if not items:
                KEY_ENTRY_HEADER.pack_into(buf, KEY_TABLE_HEADER.size, KeyType.FREE, 0, size - 10, 0, 0, 0, 0, 0)
            buf[: KEY_TABLE_HEADER.size] = KEY_TABLE_HEADER.pack(KEY_TABLE_SIGNATURE, index, 1, 0)
            seal(buf, KEY_TABLE_HEADER_CRC_OFFSET, 0, KEY_TABLE_HEADER.size)
            tables.append(buf)
        return tables

    @staticmethod
    def _object_entry(otype: int, offset: int, size: int, flags: int) -> bytes:
        return bytes(seal(bytearray(OBJECT_ENTRY.pack(otype, 0, offset, size, flags)), OBJECT_ENTRY_CRC_OFFSET))

    def _object_table(self, entries: list[bytes], table_bytes: int) -> bytes:
        slots = (table_bytes - OBJECT_TABLE_HEADER.size) // OBJECT_ENTRY.size
        empty = self._object_entry(ObjectType.EMPTY, 0, 0, 0)
        body = b"".join(entries) + empty * (slots - len(entries))
        buf = OBJECT_TABLE_HEADER.pack(OBJECT_TABLE_SIGNATURE, slots) + body
        return buf + bytes(table_bytes - len(buf))

    def close(self) -> None:
        if self._fh is None:
            return
        fh = self._fh
        try:
            if self._spill is not None:
                # Table sizes do not depend on the file-object offsets (a pointer is 12 bytes), so
                # lay out once to learn where the values will start, then fix the pointers.
                base = self._end + len(self._layout_key_tables()) * self.key_table_size
                for node in self._fo_nodes:
                    assert node.fo is not None
                    node.fo = (node.fo[0], base + node.fo[1])
                    node.payload = FILE_OBJECT_POINTER.pack(*node.fo)
            for table in self._layout_key_tables():
                offset = self._end
                fh.seek(offset)
                fh.write(table)
                self._end += len(table)
                self._objects.append((ObjectType.KEY_TABLE, offset, len(table)))
            if self._spill is not None:
                self._spill.seek(0)
                fh.seek(self._end)
                for node in self._fo_nodes:
                    assert node.fo is not None
                    self._objects.append(
                        (ObjectType.FILE_OBJECT, node.fo[1], align_up(max(node.fo[0], 1), self.alignment))
                    )
                shutil.copyfileobj(self._spill, fh, 1 << 22)
                self._end += self._spill_end
            self._write_object_tables(fh)
            self._write_replay_log(fh)
            self._write_headers(fh)
            fh.truncate(self._end)
        finally:
            fh.close()
            self._fh = None
            if self._spill is not None:
                self._spill.close()
                self._spill = None

    def _write_object_tables(self, fh: BinaryIO) -> None:
        """Root table at 0x2000; when it overflows, its last slot chains to further tables."""
        entries = [self._object_entry(t, o, s, OBJECT_FLAG_ALLOCATED) for t, o, s in self._objects]
        root_slots = (ROOT_TABLE_BYTES - OBJECT_TABLE_HEADER.size) // OBJECT_ENTRY.size
        chunk_bytes = max(self.alignment, 0x1000)
        chunk_slots = (chunk_bytes - OBJECT_TABLE_HEADER.size) // OBJECT_ENTRY.size
        # Split the entry list: every table but the last keeps its final slot for the chain entry.
        groups: list[list[bytes]] = []
        rest = entries
        capacity = root_slots
        while len(rest) > capacity:
            groups.append(rest[: capacity - 1])
            rest = rest[capacity - 1 :]
            capacity = chunk_slots
        groups.append(rest)
        offsets = [ROOT_OBJECT_TABLE_OFFSET]
        for _ in groups[1:]:
            offsets.append(self._end)
            self._end += chunk_bytes
        for i, group in enumerate(groups):
            items = list(group)
            if i + 1 < len(groups):
                items.append(
                    self._object_entry(ObjectType.OBJECT_TABLE, offsets[i + 1], chunk_bytes, OBJECT_FLAG_ALLOCATED)
                )
            fh.seek(offsets[i])
            fh.write(self._object_table(items, ROOT_TABLE_BYTES if i == 0 else chunk_bytes))

    def _write_replay_log(self, fh: BinaryIO) -> None:
        fh.seek(self.replay_log_offset)
        fh.write(empty_replay_log(self.replay_log_size))

    def _write_headers(self, fh: BinaryIO) -> None:
        # Copy 0 carries the higher sequence, as in the real samples (7 and 6).
        for copy, seq in ((0, 2), (1, 1)):
            fh.seek(HEADER_COPY_OFFSETS[copy])
            fh.write(
                file_header(seq, self.alignment, self.replay_log_offset, self.replay_log_size)
                + bytes(0x1000 - FILE_HEADER.size)
            )

    def __enter__(self) -> HyperVStorageWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # do not leave a half-written file that looks valid
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if self._spill is not None:
                self._spill.close()
                self._spill = None
            with _suppress_os_error():
                os.unlink(self.path)


class _suppress_os_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, *exc: object) -> bool:
        return isinstance(exc_type, type) and issubclass(exc_type, OSError)


def file_header(sequence: int, alignment: int, log_offset: int, log_size: int) -> bytes:
    fields = FileHeaderFields(
        FILE_SIGNATURE,
        0,
        sequence,
        FORMAT_VERSION_CURRENT,
        0,
        0,
        alignment,
        log_offset,
        log_size,
        REPLAY_LOG_HEADER_BYTES,
    )
    return bytes(seal(bytearray(FILE_HEADER.pack(*dataclasses.astuple(fields))), FILE_HEADER_CRC_OFFSET))


def replay_log_header(pending: int, maximum: int) -> bytes:
    """A fresh replay-log header (change tracking off): what our writer puts in a new file."""
    return ReplayLogHeaderFields(REPLAY_LOG_SIGNATURE, 0, pending, 0, maximum, 0, 0, 0, 0).pack()


def empty_replay_log(size: int) -> bytes:
    maximum = (REPLAY_LOG_HEADER_BYTES - REPLAY_LOG_HEADER.size) // REPLAY_LOG_ENTRY.size
    head = replay_log_header(0, maximum)
    return head + bytes(size - len(head))


def replay_log_entry(dest: int, size: int, inlog: int, data: bytes) -> bytes:
    raw = bytearray(REPLAY_LOG_ENTRY.pack(dest, size, inlog, 0, zlib.crc32(data)))
    return bytes(seal(raw, REPLAY_LOG_ENTRY_CRC_OFFSET))
