"""On-disk layouts of the HyperVStorage container, declared once (spec §1).

Every structure is little-endian and packed.  Confidence marks refer to
``shared/spec/hyperv-saved-state-format.md``: [V] means verified against a real Hyper-V file.
"""

from __future__ import annotations

import enum
import struct
import zlib

FILE_SIGNATURE = 0x01282014  # [V]
OBJECT_TABLE_SIGNATURE = 0x01110001  # [V]
KEY_TABLE_SIGNATURE = 0x0002  # [V]
REPLAY_LOG_SIGNATURE = 0x01110003  # [V]

FORMAT_VERSION_CURRENT = 0x0400  # [V] both real samples; older layouts are undocumented

HEADER_COPY_OFFSETS = (0x0000, 0x1000)
HEADER_PAGE_SIZE = 0x1000
ROOT_OBJECT_TABLE_OFFSET = 0x2000  # fixed, not taken from any header field [V]

MIN_ALIGNMENT = 0x1000
MAX_ALIGNMENT = 0x10000

# Values this large or larger live in a headerless file object; smaller ones are inline [3].
FILE_OBJECT_THRESHOLD = 2048

# Signature, Checksum, Sequence, FormatVersion, DataVersion, Flags, DataAlignmentInBytes,
# ReplayLogOffsetInBytes, ReplayLogSizeInBytes, ReplayLogHeaderSizeInBytes (46 bytes) [V]
FILE_HEADER = struct.Struct("<IIHIIIIQQI")
FILE_HEADER_CRC_OFFSET = 4

# Signature, EntriesCount [V]
OBJECT_TABLE_HEADER = struct.Struct("<II")
# ObjectType, Checksum, FileOffset, Size, Flags (18 bytes) [V]
OBJECT_ENTRY = struct.Struct("<BIQIB")
OBJECT_ENTRY_CRC_OFFSET = 1
OBJECT_FLAG_ALLOCATED = 0x01

# Signature, TableIndex, Sequence, Checksum (10 bytes); CRC covers these 10 bytes only [V]
KEY_TABLE_HEADER = struct.Struct("<HHHI")
KEY_TABLE_HEADER_CRC_OFFSET = 6

# Type, Flags, SizeInBytes, ParentNodeTable, ParentNodeOffset, Checksum, InsertionSequence,
# NameSize (21 bytes) [V]
KEY_ENTRY_HEADER = struct.Struct("<BBIHIIIB")
KEY_ENTRY_CRC_OFFSET = 12
KEY_FLAG_FILE_OBJECT = 0x01
KEY_FLAG_SUBCOMPONENT = 0x02  # [V] seen on some String keys; meaning from one source
KEY_FLAG_CHANGE_TRACKING = 0x04  # [1]

# u32 SizeInBytes + u64 FileOffset: the inline value of a key whose data is a file object [V]
FILE_OBJECT_POINTER = struct.Struct("<IQ")
# u64 ChangeTrackingSequence + u32 NextInsertionSequence [V]
NODE_VALUE = struct.Struct("<QI")
LENGTH_PREFIX = struct.Struct("<I")

# Signature, Checksum, CurrentEntriesCount, reserved, MaximumNumberOfEntries,
# ChangeTrackingEnabled, ChangeTrackingBufferOffset, ChangeTrackingBufferSize,
# ChangeTrackingBufferUsedSize (34 bytes) [V for the first five]
REPLAY_LOG_HEADER = struct.Struct("<IIIBIBQII")
REPLAY_LOG_HEADER_CRC_OFFSET = 4
# DestinationOffset, DestinationSize, OffsetInsideLog, EntryChecksum, DataChecksum (28 bytes).
# [V] on both samples; openvmm's struct (checksum first) is contradicted by the real files.
REPLAY_LOG_ENTRY = struct.Struct("<QIQII")
REPLAY_LOG_ENTRY_CRC_OFFSET = 20


class ObjectType(enum.IntEnum):
    EMPTY = 0
    OBJECT_TABLE = 1
    KEY_TABLE = 2
    FILE_OBJECT = 3
    FREE = 4
    HEADER = 5  # [1?] dissect
    REPLAY_LOG = 6  # [1?]
    CHANGE_TRACKING_BUFFER = 7  # [1?]


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


# Meaningful inline value size of the fixed-size types; String/Array add a u32 length prefix.
FIXED_VALUE_SIZES = {
    KeyType.INT: 8,
    KeyType.UINT: 8,
    KeyType.DOUBLE: 8,
    KeyType.BOOL: 4,
    KeyType.NODE: NODE_VALUE.size,
}


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
