"""The ``partition_state`` blob (the saved CPU state of every VP): one import for its public names.

The code lives in modules named after what they hold: :mod:`.chunks` (framing, chunk ids, partition-level
layouts), :mod:`.register_chunks` (register chunk layouts), :mod:`.cpustate` (the decoded model and the VTL
rule), :mod:`.cpumode` (architecture and paging mode), :mod:`.guestos` (HV_GUEST_OS_ID), :mod:`.chunkparser`
and :mod:`.chunkwriter`.  The format is described in docs/format.md.
"""

from __future__ import annotations

from .chunkparser import parse_partition_state
from .chunks import ChunkId
from .chunkwriter import build_partition_state
from .cpumode import CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA, architecture, is_la57, paging_levels, paging_mode
from .cpustate import PartitionState, VpState, active_vtl_rule
from .guestos import (
    GuestOsInfo,
    GuestOsMicrosoftId,
    GuestOsOpenSourceId,
    GuestOsVendor,
    decode_guest_os_id,
    encode_guest_os_id,
)

__all__ = [
    "CR0_PG",
    "CR4_LA57",
    "CR4_PAE",
    "CR4_PSE",
    "EFER_LMA",
    "ChunkId",
    "GuestOsInfo",
    "GuestOsMicrosoftId",
    "GuestOsOpenSourceId",
    "GuestOsVendor",
    "PartitionState",
    "VpState",
    "active_vtl_rule",
    "architecture",
    "build_partition_state",
    "decode_guest_os_id",
    "encode_guest_os_id",
    "is_la57",
    "paging_levels",
    "paging_mode",
    "parse_partition_state",
]
