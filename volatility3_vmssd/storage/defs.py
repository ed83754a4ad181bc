"""On-disk layouts of the HyperVStorage container, declared once (docs/container-format.md).

Every structure is little-endian and packed.  Confidence marks refer to
docs/format.md#evidence: "verified" means seen in a real Hyper-V file, "one source" means one reader says so.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib

FILE_SIGNATURE = 0x01282014  # verified
OBJECT_TABLE_SIGNATURE = 0x01110001  # verified
KEY_TABLE_SIGNATURE = 0x0002  # verified
REPLAY_LOG_SIGNATURE = 0x01110003  # verified

FORMAT_VERSION_CURRENT = 0x0400  # verified on both real samples; older layouts are undocumented

HEADER_COPY_OFFSETS = (0x0000, 0x1000)
HEADER_PAGE_SIZE = 0x1000
ROOT_OBJECT_TABLE_OFFSET = 0x2000  # fixed, not taken from any header field (verified)
#: the two header copies and the root object table (one page in every known file): what every open reads
#: first, fetched in one request from a remote object (docs/remote.md)
OPEN_REGION = ROOT_OBJECT_TABLE_OFFSET + HEADER_PAGE_SIZE

MIN_ALIGNMENT = 0x1000
MAX_ALIGNMENT = 0x10000

# Values this large or larger live in a headerless file object; smaller ones are inline [3].
FILE_OBJECT_THRESHOLD = 2048

# Signature, Checksum, Sequence, FormatVersion, DataVersion, Flags, DataAlignmentInBytes,
# ReplayLogOffsetInBytes, ReplayLogSizeInBytes, ReplayLogHeaderSizeInBytes (46 bytes) (verified)
FILE_HEADER = struct.Struct("<IIHIIIIQQI")
FILE_HEADER_CRC_OFFSET = 4

# Signature, EntriesCount (verified)
OBJECT_TABLE_HEADER = struct.Struct("<II")
# ObjectType, Checksum, FileOffset, Size, Flags (18 bytes) (verified)
OBJECT_ENTRY = struct.Struct("<BIQIB")
OBJECT_ENTRY_CRC_OFFSET = 1
OBJECT_FLAG_ALLOCATED = 0x01

# Signature, TableIndex, Sequence, Checksum (10 bytes); CRC covers these 10 bytes only (verified)
KEY_TABLE_HEADER = struct.Struct("<HHHI")
KEY_TABLE_HEADER_CRC_OFFSET = 6

# Type, Flags, SizeInBytes, ParentNodeTable, ParentNodeOffset, Checksum, InsertionSequence,
# NameSize (21 bytes) (verified)
KEY_ENTRY_HEADER = struct.Struct("<BBIHIIIB")
KEY_ENTRY_CRC_OFFSET = 12
KEY_FLAG_FILE_OBJECT = 0x01
KEY_FLAG_SUBCOMPONENT = 0x02  # verified: seen on some String keys; meaning from one source
KEY_FLAG_CHANGE_TRACKING = 0x04  # one source

# u32 SizeInBytes + u64 FileOffset: the inline value of a key whose data is a file object (verified)
FILE_OBJECT_POINTER = struct.Struct("<IQ")
# u64 ChangeTrackingSequence + u32 NextInsertionSequence (verified)
NODE_VALUE = struct.Struct("<QI")
LENGTH_PREFIX = struct.Struct("<I")

# Signature, Checksum, CurrentEntriesCount, reserved, MaximumNumberOfEntries,
# ChangeTrackingEnabled, ChangeTrackingBufferOffset, ChangeTrackingBufferSize,
# ChangeTrackingBufferUsedSize (34 bytes) [V for the first five]
REPLAY_LOG_HEADER = struct.Struct("<IIIBIBQII")
REPLAY_LOG_HEADER_CRC_OFFSET = 4
# DestinationOffset, DestinationSize, OffsetInsideLog, EntryChecksum, DataChecksum (28 bytes).
# Verified on both samples; openvmm's struct (checksum first) is contradicted by the real files.
REPLAY_LOG_ENTRY = struct.Struct("<QIQII")
REPLAY_LOG_ENTRY_CRC_OFFSET = 20


class ObjectType(enum.IntEnum):
    EMPTY = 0
    OBJECT_TABLE = 1
    KEY_TABLE = 2
    FILE_OBJECT = 3
    FREE = 4
    HEADER = 5  # one source (dissect)
    REPLAY_LOG = 6  # one source
    CHANGE_TRACKING_BUFFER = 7  # one source


class KeyType(enum.IntEnum):
    FREE = 1
    UNKNOWN = 2
    INT = 3
    UINT = 4
    DOUBLE = 5
    STRING = 6
    ARRAY = 7
    BOOL = 8
    NODE = 9

    @property
    def label(self) -> str:
        """The spelling used by ``vmssd keys`` and the reference key listings (``Int``, ``Node``)."""
        return {KeyType.UINT: "UInt"}.get(self, self.name.capitalize())


# The one binary form of each scalar key type, used by the reader and the writer.
SCALAR_FORMATS: dict[KeyType, struct.Struct] = {
    KeyType.INT: struct.Struct("<q"),
    KeyType.UINT: struct.Struct("<Q"),
    KeyType.DOUBLE: struct.Struct("<d"),
    KeyType.BOOL: struct.Struct("<i"),
}

# Meaningful inline value size of the fixed-size types; String/Array add a u32 length prefix.
FIXED_VALUE_SIZES = {
    KeyType.INT: 8,
    KeyType.UINT: 8,
    KeyType.DOUBLE: 8,
    KeyType.BOOL: 4,
    KeyType.NODE: NODE_VALUE.size,
}


def seal(buf: bytearray, crc_offset: int, start: int = 0, end: int | None = None) -> bytearray:
    """Store the CRC-32 of ``buf[start:end]`` (its checksum field read as zeros) at ``start + crc_offset``.

    Every structure of the format is sealed this way: file header, object and key-table entries,
    key-table header, replay-log header and entries.
    """
    view = memoryview(buf)[start:end]
    struct.pack_into("<I", buf, start + crc_offset, crc32_skipping(view, crc_offset))
    return buf


@dataclasses.dataclass(frozen=True)
class FileHeaderFields:
    """One copy of the file header by name (the reader and the writer read fields by name, not position)."""

    signature: int
    checksum: int
    sequence: int
    format_version: int
    data_version: int
    flags: int
    data_alignment: int
    replay_log_offset: int
    replay_log_size: int
    replay_log_header_size: int

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> FileHeaderFields:
        return cls(*FILE_HEADER.unpack_from(raw, offset))


@dataclasses.dataclass(frozen=True)
class ReplayLogHeaderFields:
    """The replay-log header by name; a commit changes only ``pending_count`` and ``checksum``."""

    signature: int
    checksum: int
    pending_count: int
    reserved: int
    maximum_entries: int
    change_tracking_enabled: int
    change_tracking_buffer_offset: int
    change_tracking_buffer_size: int
    change_tracking_buffer_used_size: int

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> ReplayLogHeaderFields:
        return cls(*REPLAY_LOG_HEADER.unpack_from(raw, offset))

    def pack(self) -> bytes:
        """The header with its CRC recomputed (the stored ``checksum`` is ignored)."""
        raw = bytearray(REPLAY_LOG_HEADER.pack(*dataclasses.astuple(self)))
        return bytes(seal(raw, REPLAY_LOG_HEADER_CRC_OFFSET))


def crc32_skipping(buf: bytes | bytearray | memoryview, field_offset: int, crc: int = 0) -> int:
    """CRC-32 of ``buf`` with the 4-byte checksum field at ``field_offset`` read as zeros.

    Every checksum in the format is computed this way; doing it without copying keeps the
    check cheap on the hot path of a large file.
    """
    view = memoryview(buf)
    crc = zlib.crc32(view[:field_offset], crc)
    crc = zlib.crc32(b"\0\0\0\0", crc)
    return zlib.crc32(view[field_offset + 4 :], crc)


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def sequence_newer(a: int, b: int) -> bool:
    """True when u16 sequence ``a`` is newer than ``b``, allowing for wrap-around (0 follows 0xFFFF)."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000
