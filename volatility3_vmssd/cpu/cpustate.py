"""The decoded CPU state of a partition: :class:`PartitionState`, its :class:`VpState` list, the VTL rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..errors import NotFoundError
from .guestos import GuestOsInfo, decode_guest_os_id
from .registers import ProcessorVendor, PrologVendor, RegisterDict, sdk_vendor


def active_vtl_rule(register_vtls: Sequence[int]) -> int:
    """The VTL used to analyse a VP: VTL0 when it has registers, else the lowest VTL that has them.

    The saved state does not record which VTL was executing (docs/format.md#vtl-rule): VtlIsRunnable
    only says that a higher VTL can run.  VTL0 is where the OS kernel (NT, Linux) runs, so it is the
    default; a VTL without registers is never chosen.  ``register_vtls`` are the VTLs whose register
    bank is not empty; with none, 0 (there is nothing to analyse, and callers find the bank empty).
    """
    if 0 in register_vtls or not register_vtls:
        return 0
    return min(register_vtls)


@dataclasses.dataclass
class VpState:
    """One virtual processor: its register banks per VTL (a VP VTL marker alone gives an empty bank)."""

    index: int
    vtl_runnable: bool | None = None  # VP VTL control page +24 (a higher VTL can run); None when absent
    registers: dict[int, RegisterDict] = dataclasses.field(default_factory=dict)

    def saved_vtls(self) -> list[int]:
        """Every VTL this VP has a marker or a register bank for, lowest first."""
        return sorted(self.registers)

    def register_vtls(self) -> list[int]:
        """The VTLs whose register bank holds at least one register, lowest first."""
        return sorted(vtl for vtl, bank in self.registers.items() if bank)

    def active_vtl(self) -> int:
        """The VTL used for analysis (:func:`active_vtl_rule`), not a recorded "executing VTL"."""
        return active_vtl_rule(self.register_vtls())

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
    guest_os_ids: dict[int, int] = dataclasses.field(default_factory=dict)  # VTL -> HV_GUEST_OS_ID, first kept
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
    def guest_os_id(self) -> int | None:
        """VTL0's guest OS id (the one OsId chunk openvmm writes), or None when there is none."""
        return self.guest_os_ids.get(0)

    def guest_os_info_for(self, vtl: int = 0) -> GuestOsInfo | None:
        """The decoded guest OS id of ``vtl`` (what GetGuestOsInfo takes a VTL for); None when absent."""
        value = self.guest_os_ids.get(vtl)
        return None if value is None else decode_guest_os_id(value)

    @property
    def guest_os_info(self) -> GuestOsInfo | None:
        """VTL0's decoded guest OS id (see :meth:`guest_os_info_for`)."""
        return self.guest_os_info_for(0)

    def multi_vtl_vps(self) -> list[VpState]:
        """The VPs that hold more than one VTL: for them the VTL rule picked one (docs/format.md#vtl-rule)."""
        return [vp for vp in self.vps if len(vp.saved_vtls()) > 1]
