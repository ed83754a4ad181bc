"""Writer of a :class:`PartitionState` as a ``partition_state`` blob in openvmm's chunk order (docs/format.md).

Tests and the synthetic ``.vmrs`` writer use it to produce blobs the parser must read back exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .chunks import (
    CHUNK_STREAM_GAP,
    DESCRIPTOR_SIZE,
    HYPERCALL_PAGE_MSR,
    MARKER_DATA_LENGTH,
    MAX_VP_BITMAP_BYTES,
    OB_SAVE_CHUNK_PROLOG,
    OB_SAVE_CHUNK_VP,
    OB_SAVE_CHUNK_VTL,
    PROLOG_DATA_LENGTH,
    PROLOG_TAG,
    PT_SAVE_CHUNK_OS_ID,
    REFERENCE_TSC_PAGE_MSR,
    VID_SAVED_STATE_DESCRIPTOR,
    VM_SAVE_CHUNK_HEADER,
    VP_INDICES_BSP,
    VP_INDICES_MIN_BITMAP,
    VP_VTL_CONTROL_PAGE,
    ChunkId,
)
from .cpustate import PartitionState
from .register_chunks import ARM64_REGISTER_CHUNKS, X64_REGISTER_CHUNKS
from .registers import PrologVendor


def _chunk(chunk_id: int, data: bytes, data_length: int | None = None) -> bytes:
    """A chunk with its data zero-padded to ``data_length`` (default: the data's own length)."""
    if data_length is None:
        data_length = len(data)
    return VM_SAVE_CHUNK_HEADER.pack(chunk_id, data_length) + data.ljust(data_length, b"\0")


def _vtls_of(state: PartitionState) -> list[int]:
    """Every VTL present: the PartitionVtl list and every VP's VTLs (VTL0 when there is none)."""
    vtls: set[int] = set(state.partition_vtls)
    for vp in state.vps:
        vtls.update(vp.registers)
    return sorted(vtls) or [0]


def vp_indices_payload(indices: Sequence[int], bsp: int) -> bytes:
    """u32 BSP index, then the present-VP bitmap: at least 8 bytes, a multiple of 4 (12 bytes up to 64 VPs)."""
    if any(not 0 <= i < MAX_VP_BITMAP_BYTES * 8 for i in indices):
        raise ValueError(f"VP indices must be below {MAX_VP_BITMAP_BYTES * 8}")
    bitmap_len = max(VP_INDICES_MIN_BITMAP, max(indices, default=0) // 8 + 1)
    bitmap = bytearray(-(-bitmap_len // 4) * 4)
    for i in indices:
        bitmap[i // 8] |= 1 << (i % 8)
    return VP_INDICES_BSP.pack(bsp) + bytes(bitmap)


def build_partition_state(state: PartitionState) -> bytes:
    """Serialise ``state`` the way Microsoft's openvmm writer does (docs/format.md#stream-order).

    Prolog, VTL0's OsId, a PartitionVtl chunk per VTL present (another VTL's OsId right after its own),
    a 12-byte VpIndices chunk, then per VP its marker, a VP VTL control page when it holds more than
    one VTL (VtlIsRunnable 1 unless the state says otherwise, as openvmm writes it), and per VTL a VP
    VTL marker followed by the register chunks in openvmm's order.  Chunks are not padded.  Names
    missing from a bank are written as 0, an empty bank as its marker alone; names the layout cannot
    hold raise ValueError.
    """
    try:
        return _build(state)
    except struct.error as exc:  # an out-of-range VTL, VP index, vendor or MSR value from the caller
        raise ValueError(f"cannot write partition_state: {exc}") from exc


def _build(state: PartitionState) -> bytes:
    vendor = state.processor_vendor
    if vendor is None:
        raise ValueError("processor_vendor is required to write a Prolog")
    chunks = ARM64_REGISTER_CHUNKS if vendor == PrologVendor.ARM else X64_REGISTER_CHUNKS
    allowed = {name for chunk in chunks for name in chunk.names}
    vtls = _vtls_of(state)
    orphan_os_ids = sorted(set(state.guest_os_ids) - set(vtls) - {0})
    if orphan_os_ids:
        raise ValueError(f"guest OS ids given for VTL {orphan_os_ids}, which no VP and no PartitionVtl has")

    out = bytearray(DESCRIPTOR_SIZE + CHUNK_STREAM_GAP)
    out += _chunk(
        ChunkId.PROLOG,
        OB_SAVE_CHUNK_PROLOG.pack(PROLOG_TAG, int(state.is_summary_save_state), vendor),
        PROLOG_DATA_LENGTH,
    )
    out += _chunk(ChunkId.OS_ID, PT_SAVE_CHUNK_OS_ID.pack(state.guest_os_ids.get(0, 0)))
    if "hypercall" in state.partition_msrs:
        out += _chunk(ChunkId.HYPERCALL_PAGE, HYPERCALL_PAGE_MSR.pack(state.partition_msrs["hypercall"]))
    if "referencetsc" in state.partition_msrs:
        out += _chunk(ChunkId.REFERENCE_TSC, REFERENCE_TSC_PAGE_MSR.pack(state.partition_msrs["referencetsc"]))
    for vtl in vtls:
        out += _chunk(ChunkId.PARTITION_VTL, OB_SAVE_CHUNK_VTL.pack(vtl), MARKER_DATA_LENGTH)
        if vtl != 0 and vtl in state.guest_os_ids:
            out += _chunk(ChunkId.OS_ID, PT_SAVE_CHUNK_OS_ID.pack(state.guest_os_ids[vtl]))

    indices = [vp.index for vp in state.vps]
    bsp = state.bsp_index if state.bsp_index is not None else (indices[0] if indices else 0)
    out += _chunk(ChunkId.VP_INDICES, vp_indices_payload(indices, bsp))

    for vp in state.vps:
        out += _chunk(ChunkId.VP, OB_SAVE_CHUNK_VP.pack(vp.index), MARKER_DATA_LENGTH)
        vp_vtls = vp.saved_vtls()
        if len(vp_vtls) > 1:
            runnable = 1 if vp.vtl_runnable is None else int(vp.vtl_runnable)
            out += _chunk(ChunkId.VP_VTL_CONTROL_PAGE, VP_VTL_CONTROL_PAGE.pack(bytes(24), runnable))
        for vtl in vp_vtls:
            regs = vp.registers[vtl]
            unknown = sorted(set(regs) - allowed)
            if unknown:
                raise ValueError(f"VP {vp.index} VTL {vtl}: the chunk layouts have no slot for {unknown}")
            out += _chunk(ChunkId.VP_VTL, OB_SAVE_CHUNK_VTL.pack(vtl), MARKER_DATA_LENGTH)
            if not regs:
                continue  # a VTL present without saved registers: its marker only, nothing invented
            for chunk in chunks:
                if chunk.optional and not any(name in regs for name in chunk.names):
                    continue
                out += _chunk(chunk.chunk_id, chunk.layout.pack(*chunk.encode(regs)))
    out += _chunk(ChunkId.EPILOG, b"")
    VID_SAVED_STATE_DESCRIPTOR.pack_into(out, 0, DESCRIPTOR_SIZE, DESCRIPTOR_SIZE, len(out))
    return bytes(out)
