"""Byte-level helpers for building damaged containers in tests (never used on evidence)."""

from __future__ import annotations

import struct
import zlib

from volatility3_vmssd.storage.defs import KEY_ENTRY_CRC_OFFSET, KEY_ENTRY_HEADER, crc32_skipping
from volatility3_vmssd.storage.reader import HyperVStorage


def entry_meaningful_size(buf: bytes | bytearray, off: int) -> int:
    """Header + name + meaningful value bytes of the key entry at ``off`` (as the reader splits it)."""
    ktype, kflags, _size, _pt, _po, _crc, _seq, nsize = KEY_ENTRY_HEADER.unpack_from(buf, off)
    body = KEY_ENTRY_HEADER.size + nsize
    if kflags & 1:
        return body + 12
    fixed = {3: 8, 4: 8, 5: 8, 8: 4, 9: 12}
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
    n = entry_meaningful_size(buf, off)
    crc = crc32_skipping(buf[off : off + KEY_ENTRY_HEADER.size], KEY_ENTRY_CRC_OFFSET)
    crc = zlib.crc32(buf[off + KEY_ENTRY_HEADER.size : off + n], crc)
    struct.pack_into("<I", buf, off + KEY_ENTRY_CRC_OFFSET, crc)


def key_offsets(path: str) -> dict[str, int]:
    with HyperVStorage.open(path) as s:
        return {k.path: k.file_offset for k in s.walk()}
