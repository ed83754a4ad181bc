"""The provider interface: what every backend offers, and nothing the callers may reach past.

Two backends implement :class:`SavedState`: the native reader (:class:`~volatility3_vmssd.native.SavedStateProvider`)
and Microsoft's DLL (:class:`~volatility3_vmssd.dll.provider.DllSavedStateProvider`).  The Volatility
glue, the CLI, the exporters and triage use only these methods, so either backend serves all of them.
The method names mirror the DLL's exports (``GetVpCount`` -> :meth:`SavedState.vp_count` ...); a few
conveniences that the DLL does not export (padded reads, backed runs, the memory map, the summary) are
built from those answers so that both backends agree by construction.  DLL queries that no caller
above the provider needs (``InKernelSpace``, the VTL bitmaps, GVA->GPA without a size, GPA->raw offset)
are not part of this interface: both backends keep them, and ``vmssd verify`` and the parity tests
compare them.

Where a backend cannot answer, the method raises :class:`~volatility3_vmssd.errors.UnsupportedError`
and says why; it never returns a made-up value.

The VTL rule (``docs/format.md``, "Which VTL is analysed"): a saved state does not record which VTL a
VP was executing when it was saved.  Analysis uses VTL0 when VTL0's registers were saved, else the
lowest VTL whose registers were saved; a VTL whose registers were not saved is never used.
:meth:`SavedState.force_active_virtual_trust_level` overrides that for one VP, for a VTL that was saved.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

from .cpu.cpumode import CR4_LA57, arm64_paging_levels, x86_levels
from .cpu.guestos import GuestOsInfo
from .cpu.registers import Architecture, PagingMode, ProcessorVendor, RegisterValue
from .errors import Finding, NotFoundError, VmssdError
from .summary import Summary, VpTrustLevels

__all__ = ["GpaMemoryChunk", "MemoryMapRow", "RamBlockDamage", "SavedState"]


class GpaMemoryChunk(NamedTuple):
    """GPA_MEMORY_CHUNK: a run of backed guest-physical pages."""

    guest_physical_start_page_index: int
    page_count: int


@dataclasses.dataclass(frozen=True)
class MemoryMapRow:
    """One GPA run stored contiguously in raw saved memory: a row of ``vmssd memmap`` and ``hyperv.memmap``.

    ``ramblocks_present`` counts how many of the RamBlocks ``first_ramblock..last_ramblock`` the file
    holds; ``flags`` are the RamMemoryBlock Flags (IsHotAdded 1, IsSgx 2, IsVtl2Mb 4, IsSpecificPurpose
    8), None when the backend cannot see them (the DLL).
    """

    gpa_start: int
    size: int
    raw_offset: int
    first_ramblock: int
    last_ramblock: int
    ramblocks_present: int
    flags: int | None

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


class RamBlockDamage(NamedTuple):
    """RamBlocks (1 MiB of raw saved memory each) the RAM map uses, and how many the file cannot provide."""

    used: int
    absent: int  # no RamBlock at all
    cut: int  # present, but its value reaches past the end of its file

    @property
    def missing(self) -> int:
        return self.absent + self.cut


class SavedState(abc.ABC):
    """An opened saved state, whichever backend reads it.  Close it, or use ``with``."""

    #: "native" or "dll"
    backend: str
    #: "vmrs", "bin+vsv" or "bin"
    kind: str
    #: the files opened, memory file first
    paths: list[str]

    # ------------------------------------------------------------------ lifetime
    @abc.abstractmethod
    def close(self) -> None:
        """Close the files and drop cached memory now."""

    def __enter__(self) -> SavedState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def findings(self) -> list[Finding]:
        """Everything the reader noticed and worked around (empty from the DLL, which reports nothing)."""

    # ------------------------------------------------------------------ CPU state
    @abc.abstractmethod
    def has_cpu_state(self) -> bool:
        """False for a legacy ``.bin`` opened without its ``.vsv``, or a file whose partition_state is unreadable."""

    @abc.abstractmethod
    def vp_count(self) -> int: ...

    @abc.abstractmethod
    def get_processor_vendor(self) -> ProcessorVendor:
        """The CPU vendor of the partition.  The DLL exports no such query: UnsupportedError there."""

    @abc.abstractmethod
    def get_guest_os_info(self, vtl: int = 0) -> GuestOsInfo | None:
        """The guest OS id that ``vtl``'s kernel registered (HV_GUEST_OS_ID), or None when none was saved."""

    @abc.abstractmethod
    def get_virtual_trust_levels(self, vp: int) -> list[int]:
        """The VTLs this VP saved (a VP-VTL marker, with or without registers), lowest first."""

    @abc.abstractmethod
    def get_active_virtual_trust_level(self, vp: int) -> int:
        """The VTL analysis uses on this VP: the forced one, else VTL0 when saved, else the lowest saved.

        The saved state does not record which VTL was executing (``VtlIsRunnable`` says only that a
        higher VTL can run), so this is a rule, not a reading; a finding says so when a VP saved more
        than one VTL.
        """

    @abc.abstractmethod
    def force_active_virtual_trust_level(self, vp: int, vtl: int) -> None:
        """Use ``vtl`` on this VP; NotFoundError when that VTL's registers were not saved."""

    @abc.abstractmethod
    def is_higher_vtl_runnable(self, vp: int) -> bool | None:
        """The VP's saved ``VtlIsRunnable``: a higher VTL is enabled and can run (None when not saved).

        It does not say which VTL was executing.  The DLL exports no such query: UnsupportedError there.
        """

    def is_active_virtual_trust_level_forced(self, vp: int) -> bool:
        """Whether :meth:`force_active_virtual_trust_level` chose the VTL of this VP."""
        return False

    @abc.abstractmethod
    def get_registers(self, vp: int, vtl: int | None = None) -> dict[str, RegisterValue]:
        """Every register saved for the VP's used (or the given) VTL, by lower-case name."""

    @abc.abstractmethod
    def get_register_value(self, vp: int, name: str) -> RegisterValue:
        """One register of the VP's used VTL (NotFoundError when it was not saved)."""

    @abc.abstractmethod
    def get_architecture(self, vp: int) -> Architecture: ...

    @abc.abstractmethod
    def get_paging_mode(self, vp: int) -> PagingMode: ...

    def is_five_level_paging(self, vp: int) -> bool:
        """CR4.LA57 on an x86 VP, which PAGING_MODE cannot express."""
        if self.get_architecture(vp) not in (Architecture.X64, Architecture.X86):
            return False
        try:
            cr4 = self.get_register_value(vp, "cr4")
        except NotFoundError:
            return False
        return isinstance(cr4, int) and bool(cr4 & CR4_LA57)

    def get_paging_levels(self, vp: int) -> int:
        """Page-table depth the translation walks: 0 (paging off), 2, 3, 4 or 5 (CR4.LA57); ARMv8 from TCR_EL1.

        One rule for both backends (``docs/format.md#arm64`` for ARMv8).
        """
        mode = self.get_paging_mode(vp)
        if mode == PagingMode.ARMV8:
            regs = self.get_registers(vp)
            return arm64_paging_levels({n: regs[n] for n in ("sctlr_el1", "tcr_el1") if n in regs})
        return x86_levels(mode, mode == PagingMode.LONG and self.is_five_level_paging(vp))

    @abc.abstractmethod
    def guest_virtual_to_physical_with_size(self, vp: int, va: int) -> tuple[int, int]:
        """(GPA, bytes left in the mapping page) - possibly fewer than the page holds, never more."""

    # ------------------------------------------------------------------ memory
    @abc.abstractmethod
    def has_saved_memory(self) -> bool:
        """False for runtime-state and configuration files (no saved guest RAM at all)."""

    @abc.abstractmethod
    def read_guest_physical_address(self, gpa: int, size: int) -> bytes:
        """Bytes at ``gpa``; a read into a hole returns the bytes before it; one starting in a hole raises."""

    @abc.abstractmethod
    def read_guest_physical_address_padded(self, gpa: int, size: int) -> bytes:
        """Like :meth:`read_guest_physical_address`, with holes and missing pages zero-filled (say so!)."""

    @abc.abstractmethod
    def get_guest_physical_memory_chunks(self) -> tuple[int, list[GpaMemoryChunk]]:
        """(page size, backed GPA runs in GPA order)."""

    @abc.abstractmethod
    def read_guest_raw_saved_memory(self, offset: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def get_guest_raw_saved_memory_size(self) -> int: ...

    @abc.abstractmethod
    def set_memory_block_cache_limit(self, blocks: int) -> None: ...

    @abc.abstractmethod
    def get_memory_block_cache_limit(self) -> int: ...

    @abc.abstractmethod
    def memory_map(self) -> list[MemoryMapRow]:
        """Per GPA run stored contiguously, in GPA order."""

    @abc.abstractmethod
    def backed_runs(self, gpa: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(gpa, raw offset, size)`` of each backed run that overlaps ``[gpa, gpa + length)``, clipped to it."""

    @abc.abstractmethod
    def is_backed(self, gpa: int, length: int = 1) -> bool:
        """Whether every byte of the range is backed by saved RAM that the file holds; reads no RAM."""

    def ramblock_damage(self) -> RamBlockDamage:
        """What a cut or damaged copy lacks, from the index alone (nothing is read or decoded).

        Pages of an absent RamBlock cannot be read; those of a cut one may be, up to the cut.  This
        counts absent ones from :meth:`memory_map`; a backend that sees the file counts cut ones too.
        """
        used = absent = 0
        for run in self.memory_map():
            blocks = run.last_ramblock - run.first_ramblock + 1
            used += blocks
            absent += max(0, blocks - run.ramblocks_present)
        return RamBlockDamage(used, absent, 0)

    def memory_absence(self) -> str | None:
        """Why :meth:`has_saved_memory` is False, and what to collect instead (None when it is True)."""
        return None if self.has_saved_memory() else "the file holds no saved guest memory"

    def gpa_bounds(self) -> tuple[int, int] | None:
        """(lowest, highest) backed guest-physical byte, inclusive; None without saved memory."""
        page_size, chunks = self.get_guest_physical_memory_chunks()
        if not chunks:
            return None
        first, last = chunks[0], chunks[-1]
        return (
            first.guest_physical_start_page_index * page_size,
            (last.guest_physical_start_page_index + last.page_count) * page_size - 1,
        )

    # ------------------------------------------------------------------ summary
    def trust_levels(self) -> list[VpTrustLevels]:
        """Every VP's saved VTLs and the one used (empty without CPU state)."""
        out = []
        if not self.has_cpu_state():
            return out
        for vp in range(self.vp_count()):
            saved = tuple(self.get_virtual_trust_levels(vp))
            try:
                used: int | None = self.get_active_virtual_trust_level(vp)
            except VmssdError:
                used = None
            out.append(VpTrustLevels(vp, saved, used, self.is_active_virtual_trust_level_forced(vp)))
        return out

    def _summary_facts(self) -> dict[str, Any]:
        """Backend-specific :class:`Summary` fields (versions, journal, decoder...)."""
        return {}

    def summary(self) -> Summary:
        """What this saved state holds, without reading guest RAM."""
        page_size, chunks = self.get_guest_physical_memory_chunks()
        facts: dict[str, Any] = {
            "file_kind": self.kind,
            "files": tuple(self.paths),
            "backend": self.backend,
            "vp_count": self.vp_count() if self.has_cpu_state() else 0,
            "ram_bytes": sum(c.page_count for c in chunks) * page_size,
            "chunk_count": len(chunks),
            "raw_saved_memory_bytes": self.get_guest_raw_saved_memory_size(),
            "decoder": "",
            "memory": self.memory_absence(),
        }
        if self.has_cpu_state():
            facts["vtls"] = tuple(self.trust_levels())
            for key, ask in (
                ("processor_vendor", lambda: self.get_processor_vendor().name),
                ("architecture", lambda: self.get_architecture(0).name),
                ("paging_mode", lambda: self._paging_text(0)),
                ("guest_os", lambda: getattr(self.get_guest_os_info(0), "description", None)),
            ):
                if key in ("architecture", "paging_mode") and not facts["vp_count"]:
                    continue
                try:
                    facts[key] = ask()
                except VmssdError:
                    facts[key] = None
        try:
            facts["cache_limit_blocks"] = self.get_memory_block_cache_limit()
        except VmssdError:
            facts["cache_limit_blocks"] = None
        facts.update(self._summary_facts())
        facts["findings"] = tuple(self.findings())
        return Summary(**facts)

    def _paging_text(self, vp: int) -> str:
        text = self.get_paging_mode(vp).name
        if self.is_five_level_paging(vp):
            text += " (5-level, CR4.LA57)"
        return text
