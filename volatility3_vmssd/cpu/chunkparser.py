"""Parser of the ``partition_state`` chunk stream into a :class:`PartitionState` (docs/format.md).

Real Hyper-V files have not been seen here, so the parser treats every length as hostile, skips what it
does not know by length, and records what it had to work around as findings.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from collections.abc import Callable

from ..errors import Findings, FormatError, TruncatedError
from .chunks import (
    CHUNK_STREAM_GAP,
    DESCRIPTOR_SIZE,
    HYPERCALL_PAGE_MSR,
    KNOWN_CHUNK_IDS,
    MAX_VP_BITMAP_BYTES,
    MAX_VTL,
    OB_SAVE_CHUNK_PROLOG,
    OB_SAVE_CHUNK_VP,
    OB_SAVE_CHUNK_VTL,
    PROLOG_TAG,
    PROLOG_VENDORS,
    PT_SAVE_CHUNK_OS_ID,
    REFERENCE_TSC_PAGE_MSR,
    VID_SAVED_STATE_DESCRIPTOR,
    VM_SAVE_CHUNK_HEADER,
    VP_INDICES_BSP,
    VP_VTL_CONTROL_PAGE,
    ChunkId,
    chunk_name,
)
from .cpustate import PartitionState, VpState
from .register_chunks import ARM64_CHUNKS_BY_ID, X64_CHUNKS_BY_ID, RegisterChunk

#: Distinct (kind, id) notes and chunk ids counted one by one; further ones share one bucket (id -1),
#: so a stream of 2,000,000 distinct unknown ids costs a counter, not a dict entry each.
MAX_DISTINCT_IDS = 256


@dataclasses.dataclass
class _Note:
    offset: int
    message: str
    count: int = 1


class _Parser:
    """One pass over the chunk stream.  Every read is bounded by the chunk's DataLength."""

    def __init__(self, data: memoryview, path: str, base_offset: int, findings: Findings) -> None:
        self.data = data
        self.path = path
        self.base = base_offset
        self.findings = findings
        self.state = PartitionState(processor_vendor=None)
        self.vp: VpState | None = None
        self.vtl = 0
        self.partition_vtl = 0  # the VTL of the last PartitionVtl chunk: the owner of later OsId chunks
        self.os_id_chunks = 0
        self.vps_by_index: dict[int, VpState] = {}
        self.implicit_vp0 = False
        # (kind, key) -> [first offset, count, message]; reported once each at the end
        self.notes: dict[tuple[str, int], _Note] = {}
        self.handlers: dict[int, tuple[struct.Struct, Callable[[memoryview, int], None]]] = {
            ChunkId.PROLOG: (OB_SAVE_CHUNK_PROLOG, self._prolog),
            ChunkId.OS_ID: (PT_SAVE_CHUNK_OS_ID, self._os_id),
            ChunkId.HYPERCALL_PAGE: (HYPERCALL_PAGE_MSR, self._hypercall_page),
            ChunkId.REFERENCE_TSC: (REFERENCE_TSC_PAGE_MSR, self._reference_tsc),
            ChunkId.PARTITION_VTL: (OB_SAVE_CHUNK_VTL, self._partition_vtl),
            ChunkId.VP_INDICES: (VP_INDICES_BSP, self._vp_indices),
            ChunkId.VP: (OB_SAVE_CHUNK_VP, self._vp_marker),
            ChunkId.VP_VTL_CONTROL_PAGE: (VP_VTL_CONTROL_PAGE, self._vtl_control_page),
            ChunkId.VP_VTL: (OB_SAVE_CHUNK_VTL, self._vp_vtl_marker),
        }

    # -- findings ---------------------------------------------------------------------------

    def note(self, kind: str, key: int, offset: int, message: str, error: type[FormatError] | None = None) -> None:
        """Record a repeatable finding once per (kind, key) with its first offset and a count."""
        entry = self.notes.get((kind, key))
        if entry is None and len(self.notes) >= MAX_DISTINCT_IDS:
            key, message = -1, f"{message} (and others of this kind with further ids)"
            entry = self.notes.get((kind, key))
        if entry is None:
            if error is not None and self.findings.strict:
                self.findings.add(self.path, self.base + offset, kind, message, error=error)
            self.notes[(kind, key)] = _Note(offset, message)
        else:
            entry.count += 1

    def flush_notes(self) -> None:
        for (kind, key), note in self.notes.items():
            suffix = f" ({note.count} occurrences; first offset shown)" if note.count != 1 else ""
            group = "further-ids" if key == -1 else None  # never folded into the per-id findings' summary
            self.findings.add(self.path, self.base + note.offset, kind, f"{note.message}{suffix}", group=group)

    # -- driver -----------------------------------------------------------------------------

    def run(self) -> PartitionState:
        data = self.data
        size = len(data)
        if size < DESCRIPTOR_SIZE:
            raise TruncatedError(
                self.path, self.base, f"partition_state of {size} bytes cannot hold its 24-byte descriptor"
            )
        _descriptor_size, header_size, total_size = VID_SAVED_STATE_DESCRIPTOR.unpack_from(data, 0)
        start = header_size + CHUNK_STREAM_GAP
        if start > size:
            raise FormatError(
                self.path,
                self.base + 8,
                f"HeaderSize {header_size:#x} puts the chunk stream at {start:#x}, past the {size:#x}-byte blob",
            )
        if header_size < DESCRIPTOR_SIZE:
            self.findings.add(
                self.path,
                self.base + 8,
                "header-size",
                f"HeaderSize {header_size:#x} is smaller than the {DESCRIPTOR_SIZE}-byte descriptor",
                error=FormatError,
            )
        end = total_size
        if total_size > size:
            self.findings.add(
                self.path,
                self.base + 16,
                "truncated",
                f"TotalSize {total_size:#x} exceeds the {size:#x}-byte blob; reading only what is present",
                error=TruncatedError,
            )
            end = size
        if end < start:
            raise FormatError(
                self.path,
                self.base + 16,
                f"TotalSize {total_size:#x} ends before the chunk stream starts at {start:#x}",
            )

        pos = start
        saw_epilog = False
        while pos + VM_SAVE_CHUNK_HEADER.size <= end:
            chunk_id, length = VM_SAVE_CHUNK_HEADER.unpack_from(data, pos)
            counts = self.state.chunk_counts
            if chunk_id not in counts and len(counts) >= MAX_DISTINCT_IDS:
                counts[-1] = counts.get(-1, 0) + 1  # further distinct ids are counted together
            else:
                counts[chunk_id] = counts.get(chunk_id, 0) + 1
            if chunk_id == ChunkId.EPILOG:
                saw_epilog = True
                break
            data_start = pos + VM_SAVE_CHUNK_HEADER.size
            data_end = data_start + length
            if data_end > end:
                error = TruncatedError if data_end > size else FormatError
                limit = "blob" if data_end > size else "TotalSize"
                raise error(
                    self.path,
                    self.base + pos,
                    f"chunk {chunk_name(chunk_id)} DataLength {length:#x} runs to {data_end:#x},"
                    f" past the end of the {limit} at {end:#x}",
                )
            self.dispatch(chunk_id, data[data_start:data_end], pos)
            pos = data_end
        if not saw_epilog and 0 < end - pos < VM_SAVE_CHUNK_HEADER.size:
            self.findings.add(
                self.path, self.base + pos, "trailing-bytes", f"{end - pos} bytes too short for a chunk header"
            )

        self.flush_notes()
        if not saw_epilog:
            self.findings.add(
                self.path,
                self.base + pos,
                "no-epilog",
                "chunk stream ends without an Epilog chunk",
                error=TruncatedError,
            )
        if self.state.processor_vendor is None:
            self.findings.add(self.path, self.base + start, "no-prolog", "no Prolog chunk: vendor unknown")
        if not self.state.vps:
            self.findings.add(
                self.path, self.base + start, "no-vps", "no VP marker chunks: zero VPs", error=FormatError
            )
        present = self.state.present_vp_indices
        if present is not None and self.state.vps and sorted(present) != sorted(self.vps_by_index):
            self.findings.add(
                self.path,
                self.base + start,
                "vp-indices",
                f"VpIndices bitmap lists VPs {present[:16]} but VP markers give {sorted(self.vps_by_index)[:16]}",
            )
        self.report_vtl_rule(start)
        return self.state

    def report_vtl_rule(self, offset: int) -> None:
        """One finding per VTL layout: the executing VTL is not recorded, and which VTL the rule uses."""
        groups: dict[tuple[tuple[int, ...], tuple[int, ...], int], list[int]] = {}
        for vp in self.state.multi_vtl_vps():
            key = (tuple(vp.saved_vtls()), tuple(vp.register_vtls()), vp.active_vtl())
            groups.setdefault(key, []).append(vp.index)
        for (vtls, with_registers, used), indices in groups.items():
            many = len(indices) > 1
            shown = ", ".join(map(str, indices[:16])) + (f" and {len(indices) - 16} more" if len(indices) > 16 else "")
            empty = [vtl for vtl in vtls if vtl not in with_registers]
            self.findings.add(
                self.path,
                self.base + offset,
                "vtl-not-recorded",
                f"VP{'s' if many else ''} {shown} hold{'' if many else 's'} VTLs {', '.join(map(str, vtls))}:"
                " the saved state does not record which VTL was executing (VtlIsRunnable only says that a"
                " higher VTL can run); "
                + (f"VTL {used} is used" if with_registers else "none of them has saved registers")
                + (f" (no registers saved for VTL {', '.join(map(str, empty))})" if empty and with_registers else ""),
            )

    def dispatch(self, chunk_id: int, payload: memoryview, offset: int) -> None:
        register_chunk = (ARM64_CHUNKS_BY_ID if self.state.is_arm else X64_CHUNKS_BY_ID).get(chunk_id)
        entry = self.handlers.get(chunk_id)
        if entry is not None:
            layout, handler = entry
        elif register_chunk is not None:
            layout, handler = register_chunk.layout, functools.partial(self._registers, register_chunk)
        else:
            if chunk_id not in KNOWN_CHUNK_IDS:
                self.note("unknown-chunk", chunk_id, offset, f"unknown chunk id {chunk_id:#010x} skipped by length")
            return  # known but not decoded (CPUID, SynIC, ...): skipped silently
        if len(payload) < layout.size:
            self.note(
                "short-chunk",
                chunk_id,
                offset,
                f"{chunk_name(chunk_id)} chunk has DataLength {len(payload)}, its layout needs {layout.size}; skipped",
                error=FormatError,
            )
            return
        handler(payload, offset)

    # -- VP bookkeeping ---------------------------------------------------------------------

    def current_vp(self, offset: int) -> VpState:
        if self.vp is None:
            self.findings.add(
                self.path,
                self.base + offset,
                "orphan-chunk",
                "per-VP chunk before any VP marker; attributed to VP 0",
                error=FormatError,
            )
            self.vp = VpState(0)
            self.vps_by_index[0] = self.vp
            self.state.vps.append(self.vp)
            self.implicit_vp0 = True
            self.vtl = 0
        return self.vp

    # -- chunk handlers ---------------------------------------------------------------------

    def _prolog(self, payload: memoryview, offset: int) -> None:
        tag, summary, vendor = OB_SAVE_CHUNK_PROLOG.unpack_from(payload)
        if tag != PROLOG_TAG:
            self.note("prolog-tag", 0, offset, f"Prolog tag {tag:#010x}, expected {PROLOG_TAG:#010x}")
        if vendor not in PROLOG_VENDORS:
            self.note("unknown-vendor", vendor, offset, f"processor vendor {vendor:#x} unknown; read as x86")
        self.state.processor_vendor = vendor
        self.state.is_summary_save_state = bool(summary)

    def _os_id(self, payload: memoryview, offset: int) -> None:
        """Keep one guest OS id per VTL (docs/format.md#guest-os-id); a second one for a VTL is reported."""
        (value,) = PT_SAVE_CHUNK_OS_ID.unpack_from(payload)
        self.os_id_chunks += 1
        vtl = self.partition_vtl
        kept = self.state.guest_os_ids.setdefault(vtl, value)
        if kept != value or self.os_id_chunks > 1:
            self.note(
                "os-id",
                vtl,
                offset,
                f"OsId chunk {self.os_id_chunks} ({value:#018x}) read as VTL {vtl}'s: the VTL of an OsId chunk is"
                " inferred from the PartitionVtl chunk before it"
                + (f"; VTL {vtl} already has {kept:#018x}, which is kept" if kept != value else ""),
            )

    def _hypercall_page(self, payload: memoryview, offset: int) -> None:
        (self.state.partition_msrs["hypercall"],) = HYPERCALL_PAGE_MSR.unpack_from(payload)

    def _reference_tsc(self, payload: memoryview, offset: int) -> None:
        (self.state.partition_msrs["referencetsc"],) = REFERENCE_TSC_PAGE_MSR.unpack_from(payload)

    def _partition_vtl(self, payload: memoryview, offset: int) -> None:
        (vtl,) = OB_SAVE_CHUNK_VTL.unpack_from(payload)
        if vtl > MAX_VTL:
            self.note("bad-vtl", ChunkId.PARTITION_VTL, offset, f"PartitionVtl {vtl} is above {MAX_VTL}")
        if vtl not in self.state.partition_vtls:
            self.state.partition_vtls.append(vtl)
        self.partition_vtl = vtl

    def _vp_indices(self, payload: memoryview, offset: int) -> None:
        (self.state.bsp_index,) = VP_INDICES_BSP.unpack_from(payload)
        bitmap = payload[VP_INDICES_BSP.size :]
        if len(bitmap) > MAX_VP_BITMAP_BYTES:
            tail = bitmap[MAX_VP_BITMAP_BYTES:].tobytes()
            if tail.count(0) != len(tail):
                self.note("vp-indices", 1, offset, f"VpIndices bitmap has VPs beyond index {MAX_VP_BITMAP_BYTES * 8}")
            bitmap = bitmap[:MAX_VP_BITMAP_BYTES]
        bits = int.from_bytes(bitmap, "little")
        present: list[int] = []
        while bits:
            low = bits & -bits
            present.append(low.bit_length() - 1)
            bits ^= low
        self.state.present_vp_indices = present

    def _vp_marker(self, payload: memoryview, offset: int) -> None:
        (index,) = OB_SAVE_CHUNK_VP.unpack_from(payload)
        if index >= MAX_VP_BITMAP_BYTES * 8:
            limit = MAX_VP_BITMAP_BYTES * 8
            self.note("vp-indices", -2, offset, f"VP marker {index} is beyond {limit} VPs; its chunks are not read")
            self.vp, self.vtl = VpState(index), 0  # a sink, not part of the state: freed with the next marker
            return
        vp = self.vps_by_index.get(index)
        if vp is None:
            vp = VpState(index)
            self.vps_by_index[index] = vp
            self.state.vps.append(vp)
        elif index == 0 and self.implicit_vp0:
            self.implicit_vp0 = False  # the orphan chunks' VP 0 now has its marker
        else:
            self.note("duplicate-vp", index, offset, f"second marker for VP {index}; its chunks are merged")
        self.vp = vp
        self.vtl = 0  # register chunks before a VTL marker belong to VTL 0

    def _vtl_control_page(self, payload: memoryview, offset: int) -> None:
        _control, runnable = VP_VTL_CONTROL_PAGE.unpack_from(payload)
        self.current_vp(offset).vtl_runnable = bool(runnable)

    def _vp_vtl_marker(self, payload: memoryview, offset: int) -> None:
        (vtl,) = OB_SAVE_CHUNK_VTL.unpack_from(payload)
        if vtl > MAX_VTL:
            self.note("bad-vtl", ChunkId.VP_VTL, offset, f"VP VTL marker {vtl} is above {MAX_VTL}")
        self.current_vp(offset).registers.setdefault(vtl, {})
        self.vtl = vtl

    def _registers(self, chunk: RegisterChunk, payload: memoryview, offset: int) -> None:
        values = chunk.layout.unpack_from(payload)
        self.current_vp(offset).registers.setdefault(self.vtl, {}).update(chunk.decode(values))


def parse_partition_state(
    blob: bytes | bytearray | memoryview, *, path: str, base_offset: int = 0, findings: Findings
) -> PartitionState:
    """Decode a partition_state blob.

    Raises :class:`FormatError` (or its :class:`TruncatedError` subclass) when the envelope or the chunk
    framing cannot be followed; everything else (unknown or short chunks, a clamped TotalSize, a missing
    Epilog or VP marker) becomes a finding.  ``base_offset`` is added to every reported offset.
    """
    data = memoryview(blob)
    if data.ndim != 1 or data.itemsize != 1:
        data = data.cast("B")
    return _Parser(data, path, base_offset, findings).run()
