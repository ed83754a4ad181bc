"""Framing of the ``partition_state`` blob and the layouts of its partition-level chunks (docs/format.md).

The blob is a 24-byte envelope followed by a stream of 16-byte-headed chunks.  Everything here is a
fact about bytes on disk, shared by the parser (:mod:`.chunkparser`) and the writer (:mod:`.chunkwriter`).
"""

from __future__ import annotations

import enum
import struct

from .registers import PrologVendor

VID_SAVED_STATE_DESCRIPTOR = struct.Struct("<QQQ")  # DescriptorSize, HeaderSize, TotalSize
DESCRIPTOR_SIZE = VID_SAVED_STATE_DESCRIPTOR.size  # openvmm writes DescriptorSize = HeaderSize = 24
CHUNK_STREAM_GAP = 16  # the chunk stream starts at HeaderSize + 16
VM_SAVE_CHUNK_HEADER = struct.Struct("<II8x")  # ChunkId, DataLength, 8 reserved


class ChunkId(enum.IntEnum):
    """Chunk ids (docs/format.md#chunk-ids).  Ids listed here but not decoded are skipped silently (they are known)."""

    PROLOG = 0x00000000
    PROCESSOR_CPUID = 0x20000000
    OS_ID = 0x20001000
    HYPERCALL_PAGE = 0x20002000
    REFERENCE_TSC = 0x20003000
    PARTITION_VTL = 0x20008000
    PARTITION_VSM_CONFIG = 0x2000A000
    VP_INDICES = 0x30000000
    VP = 0x30001000
    VP_CORE = 0x30003000
    GP_REGISTERS = 0x30005000
    FP_REGISTERS = 0x30006000
    CONTROL_REGISTERS = 0x30007000
    DEBUG_REGISTERS = 0x30008000
    SEGMENT_REGISTERS = 0x30009000
    TABLE_REGISTERS = 0x3000A000
    VIRTUAL_MSRS = 0x3000B000
    PAT_MTRRS = 0x3000C000
    XSAVE_CONTROL = 0x3000D000
    XSAVE_STATE = 0x3000E100
    SYNIC_APIC = 0x3000F000
    SYNIC_MSRS = 0x30010000
    SYNTHETIC_TIMERS = 0x30011000
    VP_VTL_CONTROL_PAGE = 0x30018000
    VP_VTL = 0x3001A000
    NESTED_BASE_VMCS = 0x30021000
    NESTED_CURRENT_VMCS = 0x30023000
    EPILOG = 0xF0000000


KNOWN_CHUNK_IDS: frozenset[int] = frozenset(int(c) for c in ChunkId)


def chunk_name(chunk_id: int) -> str:
    return ChunkId(chunk_id).name if chunk_id in KNOWN_CHUNK_IDS else f"{chunk_id:#010x}"


OB_SAVE_CHUNK_PROLOG = struct.Struct("<IB3xI")  # tag, IsSummarySaveState, ProcessorVendor @+8
PROLOG_DATA_LENGTH = 4064
PROLOG_TAG = 0x50546475
PT_SAVE_CHUNK_OS_ID = struct.Struct("<Q8x")  # HV_GUEST_OS_ID (docs/format.md#guest-os-id)
HYPERCALL_PAGE_MSR = struct.Struct("<Q")  # one source only (docs/format.md#chunk-ids)
REFERENCE_TSC_PAGE_MSR = struct.Struct("<8xQ")  # one source only: the MSR value is at +8
OB_SAVE_CHUNK_VTL = struct.Struct("<B")  # PartitionVtl and VP VTL marker: u8 VTL (written padded to 16)
VP_INDICES_BSP = struct.Struct("<I")  # then the present-VP bitmap (12 bytes in all up to 64 VPs)
VP_INDICES_MIN_BITMAP = 8  # bytes; openvmm: "must cover at least 64 VPs"
MAX_VP_BITMAP_BYTES = 1024  # 8192 VPs: far above Hyper-V's limits; caps the bitmap walk
OB_SAVE_CHUNK_VP = struct.Struct("<I")  # VP index (written padded to 16)
MARKER_DATA_LENGTH = 16  # PartitionVtl, VP and VP VTL markers: their value zero-padded to 16 bytes (openvmm)
VP_VTL_CONTROL_PAGE = struct.Struct("<24sB7x")  # VP-assist VTL control bytes, VtlIsRunnable (docs/format.md#vtls)
PROLOG_VENDORS: frozenset[int] = frozenset(int(v) for v in PrologVendor)
MAX_VTL = 15  # HV_VTL is a u8, but the enabled-VTL bitmaps are u32 and Hyper-V defines at most 16 (our bound)
