"""The decoded CPU state of a partition: :class:`PartitionState`, its :class:`VpState` list, the VTL rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..errors import NotFoundError
from .guestos import GuestOsInfo, decode_guest_os_id
from .registers import ProcessorVendor, PrologVendor, RegisterDict, sdk_vendor


def active_vtl_rule(vtls: Sequence[int], vtl_runnable: bool | None) -> int:
    """The VTL a VP was executing when saved.  **Our unconfirmed reading** (spec §4.3, [inf]).

    With two or more VTLs, a set VtlIsRunnable byte in the VP VTL control page means VTL1 was
    running, otherwise VTL0.  With one VTL, that VTL.  Kept in this one function so it is easy to
    change once a real multi-VTL save is seen.
    """
    if len(vtls) >= 2:
        return 1 if vtl_runnable else 0
    return vtls[0] if vtls else 0


@dataclasses.dataclass
class VpState:
    """One virtual processor: its register banks per VTL."""

    index: int
    vtl_runnable: bool | None = None  # VP VTL control page +24; None when the chunk is absent
    registers: dict[int, RegisterDict] = dataclasses.field(default_factory=dict)

    def active_vtl(self) -> int:
        return active_vtl_rule(sorted(self.registers), self.vtl_runnable)

    def active_registers(self) -> RegisterDict:
        """The register bank of :meth:`active_vtl` (empty if the VP has none)."""
        return self.registers.get(self.active_vtl(), {})

    def enabled_vtls_bitmap(self) -> int:
        """Bit n set for every VTL this VP has a bank (or marker) for; VTL0 when there is none."""
        bitmap = 0
        for vtl in self.registers:
            bitmap |= 1 << vtl
        return bitmap or 1


@dataclasses.dataclass
class PartitionState:
    """Everything decoded from one partition_state blob."""

    processor_vendor: int | None = PrologVendor.INTEL  # on-disk prolog value; None if no prolog
    guest_os_id: int | None = None
    partition_vtls: list[int] = dataclasses.field(default_factory=list)
    bsp_index: int | None = None
    vps: list[VpState] = dataclasses.field(default_factory=list)
    present_vp_indices: list[int] | None = None  # VpIndices bitmap (parse only; the writer derives it)
    is_summary_save_state: bool = False
    partition_msrs: dict[str, int] = dataclasses.field(default_factory=dict)  # "hypercall", "referencetsc"
    chunk_counts: dict[int, int] = dataclasses.field(default_factory=dict)  # parse only: chunks seen by id

    @property
    def vendor(self) -> ProcessorVendor:
        return sdk_vendor(self.processor_vendor)

    @property
    def is_arm(self) -> bool:
        return self.processor_vendor == PrologVendor.ARM

    @property
    def vp_count(self) -> int:
        return len(self.vps)

    def get_vp(self, index: int) -> VpState:
        for vp in self.vps:
            if vp.index == index:
                return vp
        raise NotFoundError(f"no VP with index {index} (VPs: {[vp.index for vp in self.vps]})")

    def enabled_vtls_bitmap(self) -> int:
        """Partition-wide enabled VTLs (GetGuestEnabledVirtualTrustLevels): PartitionVtl chunks, else VPs."""
        bitmap = 0
        for vtl in self.partition_vtls:
            bitmap |= 1 << vtl
        if not bitmap:
            for vp in self.vps:
                bitmap |= vp.enabled_vtls_bitmap()
        return bitmap or 1

    @property
    def guest_os_info(self) -> GuestOsInfo | None:
        return None if self.guest_os_id is None else decode_guest_os_id(self.guest_os_id)
