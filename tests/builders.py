"""Test-only writers: containers from nested dicts, journals added to files we wrote, key patches.

Never used on evidence, and not shipped in the package: they write files in place.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Mapping

from volatility3_vmssd.errors import VmssdError
from volatility3_vmssd.storage.defs import (
    FILE_HEADER,
    FILE_SIGNATURE,
    FIXED_VALUE_SIZES,
    KEY_ENTRY_CRC_OFFSET,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    REPLAY_LOG_ENTRY,
    REPLAY_LOG_HEADER,
    FileHeaderFields,
    seal,
)
from volatility3_vmssd.storage.reader import HyperVStorage
from volatility3_vmssd.storage.writer import HyperVStorageWriter, replay_log_entry, replay_log_header


def write_storage(path: str | os.PathLike[str], tree: Mapping[str, object], **options: object) -> None:
    """Write a nested mapping (dict = Node) as a container."""
    with HyperVStorageWriter(path, **options) as w:  # type: ignore[arg-type]

        def visit(prefix: str, mapping: Mapping[str, object]) -> None:
            if not mapping and prefix:
                w.mkdir(prefix)
            for name, value in mapping.items():
                child = f"{prefix}/{name}"
                if isinstance(value, Mapping):
                    visit(child, value)
                else:
                    w.set(child, value)

        visit("", tree)


def add_journal_entries(
    path: str | os.PathLike[str],
    pending: Iterable[tuple[int, bytes]] = (),
    stale: Iterable[tuple[int, bytes]] = (),
) -> None:
    """Turn a file *we wrote* into one with an uncommitted journal.

    For each ``(offset, old)`` in ``pending`` the current bytes at ``offset`` move into the replay
    log and ``old`` is written in their place: a correct reader must see the journal's (current)
    bytes.  ``stale`` entries are written after the pending ones with data that must be ignored.
    """
    spath = os.fspath(path)
    with open(spath, "r+b") as fh:
        raw = fh.read(FILE_HEADER.size)
        if len(raw) < FILE_HEADER.size or struct.unpack_from("<I", raw)[0] != FILE_SIGNATURE:
            raise VmssdError(f"{spath}: expected a HyperVStorage file header")
        header = FileHeaderFields.parse(raw)
        log_off, log_size, hdr_size = header.replay_log_offset, header.replay_log_size, header.replay_log_header_size
        entries: list[bytes] = []
        data_pos = hdr_size
        pend = list(pending)
        for dest, old in pend:
            fh.seek(dest)
            current = fh.read(len(old))
            if len(current) != len(old):
                raise VmssdError(f"{spath}: pending entry at {dest:#x} runs past the end of the file")
            entries.append(replay_log_entry(dest, len(current), data_pos, current))
            fh.seek(log_off + data_pos)
            fh.write(current)
            fh.seek(dest)
            fh.write(old)
            data_pos += len(current)
        for dest, data in stale:
            entries.append(replay_log_entry(dest, len(data), data_pos, data))
            fh.seek(log_off + data_pos)
            fh.write(data)
            data_pos += len(data)
        maximum = (hdr_size - REPLAY_LOG_HEADER.size) // REPLAY_LOG_ENTRY.size
        if data_pos > log_size or len(entries) > maximum:
            raise VmssdError(f"{spath}: the journal entries do not fit in the replay log ({log_size:#x} bytes)")
        fh.seek(log_off)
        fh.write(replay_log_header(len(pend), maximum) + b"".join(entries))


def entry_meaningful_size(buf: bytes | bytearray, off: int) -> int:
    """Header + name + meaningful value bytes of the key entry at ``off`` (as the reader splits it)."""
    ktype, kflags, _size, _pt, _po, _crc, _seq, nsize = KEY_ENTRY_HEADER.unpack_from(buf, off)
    body = KEY_ENTRY_HEADER.size + nsize
    if kflags & KEY_FLAG_FILE_OBJECT:
        return body + 12
    fixed = {int(k): v for k, v in FIXED_VALUE_SIZES.items()}
    if ktype in fixed:
        return body + fixed[ktype]
    (length,) = struct.unpack_from("<I", buf, off + body)
    return body + 4 + length


def patch_key_entry(buf: bytearray, off: int, **fields: int) -> None:
    """Rewrite header fields of the key entry at absolute ``off`` and fix its CRC."""
    names = ["type", "flags", "size", "parent_table", "parent_offset", "checksum", "sequence", "name_size"]
    values = list(KEY_ENTRY_HEADER.unpack_from(buf, off))
    for k, v in fields.items():
        values[names.index(k)] = v
    KEY_ENTRY_HEADER.pack_into(buf, off, *values)
    seal(buf, KEY_ENTRY_CRC_OFFSET, off, off + entry_meaningful_size(buf, off))


def key_offsets(path: str) -> dict[str, int]:
    with HyperVStorage.open(path) as s:
        return {k.path: k.file_offset for k in s.walk()}
