"""Recompute every CRC-32 of a (mutated) HyperVStorage file, so the fuzzer gets past the checksums.

A blind mutator almost never produces a matching CRC, so without this pass it would mostly test
"bad CRC -> finding" and seldom what a *consistent* hostile file does to the parser (a pending
journal with absurd destinations, key tables that overlap, value sizes of 4 GiB).  Best effort and
bounded: it only follows structures that are where the file says, and gives up quietly otherwise.
"""

from __future__ import annotations

import struct
import zlib

from volatility3_vmssd.storage.defs import (
    FILE_HEADER,
    FILE_HEADER_CRC_OFFSET,
    FILE_SIGNATURE,
    FIXED_VALUE_SIZES,
    HEADER_COPY_OFFSETS,
    KEY_ENTRY_CRC_OFFSET,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    KEY_TABLE_HEADER,
    KEY_TABLE_HEADER_CRC_OFFSET,
    KEY_TABLE_SIGNATURE,
    OBJECT_ENTRY,
    OBJECT_ENTRY_CRC_OFFSET,
    OBJECT_TABLE_HEADER,
    OBJECT_TABLE_SIGNATURE,
    REPLAY_LOG_ENTRY,
    REPLAY_LOG_ENTRY_CRC_OFFSET,
    REPLAY_LOG_HEADER,
    REPLAY_LOG_HEADER_CRC_OFFSET,
    REPLAY_LOG_SIGNATURE,
    ROOT_OBJECT_TABLE_OFFSET,
    KeyType,
    ObjectType,
    crc32_skipping,
)

_U32 = struct.Struct("<I")
MAX_TABLES = 64
MAX_LOG_ENTRIES = 512


def _set_crc(buf: bytearray, start: int, size: int, field: int) -> None:
    _U32.pack_into(buf, start + field, crc32_skipping(buf[start : start + size], field))


def fix_crcs(data: bytes) -> bytes:
    """``data`` with header, replay-log, object-table and key-entry CRCs made to verify."""
    buf = bytearray(data)
    n = len(buf)
    if n < FILE_HEADER.size or _U32.unpack_from(buf)[0] != FILE_SIGNATURE:
        return data
    log = None
    for off in HEADER_COPY_OFFSETS:
        if off + FILE_HEADER.size <= n and _U32.unpack_from(buf, off)[0] == FILE_SIGNATURE:
            _set_crc(buf, off, FILE_HEADER.size, FILE_HEADER_CRC_OFFSET)
            if log is None:
                fields = FILE_HEADER.unpack_from(buf, off)
                log = (fields[7], fields[8], fields[9])
    if log is not None:
        _fix_log(buf, *log)
    for offset, size in _fix_object_tables(buf):
        _fix_key_table(buf, offset, size)
    return bytes(buf)


def _fix_log(buf: bytearray, off: int, size: int, hdr_size: int) -> None:
    n = len(buf)
    if not off or off + REPLAY_LOG_HEADER.size > n or _U32.unpack_from(buf, off)[0] != REPLAY_LOG_SIGNATURE:
        return
    _set_crc(buf, off, REPLAY_LOG_HEADER.size, REPLAY_LOG_HEADER_CRC_OFFSET)
    slots = max(0, (min(hdr_size, size) - REPLAY_LOG_HEADER.size) // REPLAY_LOG_ENTRY.size)
    for i in range(min(slots, MAX_LOG_ENTRIES)):
        at = off + REPLAY_LOG_HEADER.size + i * REPLAY_LOG_ENTRY.size
        if at + REPLAY_LOG_ENTRY.size > n:
            return
        _dst, dsize, inlog, _ecrc, _dcrc = REPLAY_LOG_ENTRY.unpack_from(buf, at)
        if not any(buf[at : at + REPLAY_LOG_ENTRY.size]):
            return
        if off + inlog + dsize <= n:
            _U32.pack_into(buf, at + 24, zlib.crc32(buf[off + inlog : off + inlog + dsize]))
        _set_crc(buf, at, REPLAY_LOG_ENTRY.size, REPLAY_LOG_ENTRY_CRC_OFFSET)


def _fix_object_tables(buf: bytearray) -> list[tuple[int, int]]:
    """Fix object entries along the chain; return the (offset, size) of the key tables."""
    n = len(buf)
    queue = [ROOT_OBJECT_TABLE_OFFSET]
    seen: set[int] = set()
    key_tables: list[tuple[int, int]] = []
    while queue and len(seen) < MAX_TABLES:
        table = queue.pop(0)
        if table in seen or table + OBJECT_TABLE_HEADER.size > n:
            continue
        seen.add(table)
        sig, count = OBJECT_TABLE_HEADER.unpack_from(buf, table)
        if sig != OBJECT_TABLE_SIGNATURE:
            continue
        count = min(count, (n - table - OBJECT_TABLE_HEADER.size) // OBJECT_ENTRY.size)
        for slot in range(count):
            at = table + OBJECT_TABLE_HEADER.size + slot * OBJECT_ENTRY.size
            _set_crc(buf, at, OBJECT_ENTRY.size, OBJECT_ENTRY_CRC_OFFSET)
            otype, _crc, ooff, osize, _flags = OBJECT_ENTRY.unpack_from(buf, at)
            if otype == ObjectType.OBJECT_TABLE:
                queue.append(ooff)
            elif otype == ObjectType.KEY_TABLE and ooff < n:
                key_tables.append((ooff, min(osize, n - ooff)))
    return key_tables[:MAX_TABLES]


def _meaningful(buf: bytearray, pos: int, end: int, ktype: int, kflags: int, nsize: int) -> int | None:
    """End of the bytes the entry CRC covers (header + name + value), as the reader splits them."""
    body = pos + KEY_ENTRY_HEADER.size + nsize
    if kflags & KEY_FLAG_FILE_OBJECT:
        stop = body + 12
    elif ktype in FIXED_VALUE_SIZES:
        stop = body + FIXED_VALUE_SIZES[KeyType(ktype)]
    elif ktype in (KeyType.STRING, KeyType.ARRAY):
        if body + 4 > end:
            return None
        stop = body + 4 + _U32.unpack_from(buf, body)[0]
    else:
        stop = end
    return stop if stop <= end else None


def _fix_key_table(buf: bytearray, offset: int, size: int) -> None:
    if size < KEY_TABLE_HEADER.size or struct.unpack_from("<H", buf, offset)[0] != KEY_TABLE_SIGNATURE:
        return
    _set_crc(buf, offset, KEY_TABLE_HEADER.size, KEY_TABLE_HEADER_CRC_OFFSET)
    end = offset + size
    pos = offset + KEY_TABLE_HEADER.size
    while pos + KEY_ENTRY_HEADER.size <= end:
        ktype, kflags, ksize, _pt, _po, _crc, _seq, nsize = KEY_ENTRY_HEADER.unpack_from(buf, pos)
        if ksize < KEY_ENTRY_HEADER.size or pos + ksize > end:
            return
        if ktype != KeyType.FREE and nsize:
            stop = _meaningful(buf, pos, pos + ksize, ktype, kflags, nsize)
            if stop is not None:
                _set_crc(buf, pos, stop - pos, KEY_ENTRY_CRC_OFFSET)
        pos += ksize
