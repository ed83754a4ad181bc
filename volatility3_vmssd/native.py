"""The native backend: saved states read by this package's own parsers, on any OS.

A ``.vmrs`` (:meth:`SavedStateProvider.load_vmrs`), a legacy ``.bin`` + ``.vsv`` pair
(:meth:`~SavedStateProvider.load_bin_vsv`) or a ``.bin`` alone (:meth:`~SavedStateProvider.load_bin`:
memory only).  Opening builds indexes only; no RamBlock is read or decoded until memory is asked for.
Everything the reader worked around is listed by :meth:`~SavedStateProvider.findings`.  Open files
through :func:`volatility3_vmssd.open_saved_state`, which also picks the backend.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Iterator
from functools import partial
from typing import Any

from .codecs import xpress
from .cpu.cpumode import CR4_PSE, architecture, paging_levels, paging_mode
from .cpu.cpustate import PartitionState, VpState
from .cpu.guestos import GuestOsInfo
from .cpu.register_chunks import register_sort_key
from .cpu.registers import Architecture, PagingMode, ProcessorVendor, RegisterValue
from .cpu.translate import translate_with_size
from .errors import Finding, Findings, NotFoundError
from .files import signature_kind
from .interface import GpaMemoryChunk, MemoryMapRow, RamBlockDamage, SavedState
from .memory.geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from .memory.guestmemory import DEFAULT_CACHE_LIMIT, GuestMemory
from .memory.legacy_bin import BinFile
from .sources import open_binary, redact
from .storage import HyperVStorage, commit_replay_log
from .vmrs import reader as vmrs

_new_chunk = partial(tuple.__new__, GpaMemoryChunk)

__all__ = ["SavedStateProvider"]


class SavedStateProvider(SavedState):
    """A saved state opened by the native reader. Use the ``load_*`` class methods; close it or use ``with``."""

    backend = "native"

    def __init__(
        self,
        kind: str,
        paths: list[str],
        memory: GuestMemory,
        state: PartitionState | None,
        findings: list[Findings],
        *,
        containers: tuple[HyperVStorage, ...] = (),
        bin_file: BinFile | None = None,
        facts: vmrs.ContainerFacts | None = None,
    ) -> None:
        self.kind = kind
        self.paths = paths
        self._memory = memory
        self._state = state
        self._findings = findings
        self._containers = containers
        self._bin_file = bin_file
        self._facts = facts
        self._forced_vtl: dict[int, int] = {}
        self._present: list[int] | None = None
        self._damage: RamBlockDamage | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_vmrs(
        cls, path: str | os.PathLike[str], *, strict: bool = False, cache_limit: int = DEFAULT_CACHE_LIMIT
    ) -> SavedStateProvider:
        """Open a ``.vmrs`` (LoadSavedStateFile). A pending journal is applied in memory only."""
        storage = HyperVStorage.open(path, strict=strict)
        try:
            findings = storage.findings
            blocks = vmrs.ram_block_keys(storage)
            ram_map = vmrs.ram_map(storage, findings, blocks.keys())
            memory = GuestMemory(
                ram_map, vmrs.VmrsBlockSource(storage, blocks), findings=findings, cache_limit=cache_limit
            )
            state = vmrs.partition_state(storage, findings)
            facts = vmrs.container_facts(storage)
            return cls("vmrs", [storage.path], memory, state, [findings], containers=(storage,), facts=facts)
        except BaseException:
            storage.close()
            raise

    @classmethod
    def load_bin_vsv(
        cls,
        bin_path: str | os.PathLike[str],
        vsv_path: str | os.PathLike[str],
        *,
        strict: bool = False,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> SavedStateProvider:
        """Open a legacy pair (LoadSavedStateFiles): memory from the ``.bin``, CPU state and map from the ``.vsv``."""
        vsv = redact(vsv_path)  # shown in paths and findings; vsv_path is what is opened
        bin_findings = Findings(strict=strict)
        bin_file = BinFile.open(bin_path, findings=bin_findings)
        vsv_storage: HyperVStorage | None = None
        try:
            with open_binary(vsv_path) as fh:
                head = fh.read(8)
            if signature_kind(head) != "storage":
                bin_findings.add(
                    vsv,
                    0,
                    "unsupported",
                    f"unsupported legacy .vsv container (signature {head[:4].hex() or 'none'}, not HyperVStorage):"
                    " CPU state is unavailable; memory is served from the .bin with an identity map",
                )
                memory = bin_file.guest_memory(cache_limit=cache_limit)
                return cls("bin+vsv", [bin_file.path, vsv], memory, None, [bin_findings], bin_file=bin_file)
            vsv_storage = HyperVStorage.open(vsv_path, strict=strict)
            findings = vsv_storage.findings
            ram_map = vmrs.ram_map(vsv_storage, findings, bin_file.block_numbers())
            memory = GuestMemory(ram_map, bin_file, findings=bin_findings, cache_limit=cache_limit)
            state = vmrs.partition_state(vsv_storage, findings)
            facts = vmrs.container_facts(vsv_storage)
            if bin_file.vm_version is not None:
                facts = dataclasses.replace(facts, vm_version=bin_file.vm_version)
            return cls(
                "bin+vsv",
                [bin_file.path, vsv],
                memory,
                state,
                [bin_findings, findings],
                containers=(vsv_storage,),
                bin_file=bin_file,
                facts=facts,
            )
        except BaseException:
            bin_file.close()
            if vsv_storage is not None:
                vsv_storage.close()
            raise

    @classmethod
    def load_bin(
        cls, bin_path: str | os.PathLike[str], *, strict: bool = False, cache_limit: int = DEFAULT_CACHE_LIMIT
    ) -> SavedStateProvider:
        """Open a ``.bin`` without its ``.vsv``: memory only (one chunk over its RamBlocks)."""
        findings = Findings(strict=strict)
        bin_file = BinFile.open(bin_path, findings=findings)
        findings.add(
            bin_file.path,
            None,
            "no-cpu-state",
            "opened without its .vsv: CPU state (registers, paging mode) is unavailable and the GPA layout"
            " is assumed to be one chunk from GPA 0 over the RamBlocks",
        )
        try:
            memory = bin_file.guest_memory(cache_limit=cache_limit)
        except BaseException:
            bin_file.close()
            raise
        facts = vmrs.ContainerFacts(bin_file.vm_version, None, False, bool(bin_file.block_numbers()), True)
        return cls("bin", [bin_file.path], memory, None, [findings], bin_file=bin_file, facts=facts)

    @staticmethod
    def apply_pending_replay_log(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
        """Write a committed **copy** of ``src`` to ``dst`` (ApplyPendingSavedStateFileReplayLog, never in
        place).  Returns the number of replay-log entries applied."""
        return commit_replay_log(src, dst)

    def add_finding(self, path: str, offset: int | None, kind: str, message: str) -> None:
        """Record something the caller found while opening (a missing partner file, say)."""
        self._findings[0].add(path, offset, kind, message)

    @property
    def memory(self) -> GuestMemory:
        """The native reader's memory engine, for diagnostics (``blocks_decoded``, the cache); not part of
        the provider interface, so code that must run on both backends does not use it."""
        return self._memory

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the files and drop the decoded-block cache now (up to the cache limit in MiB), not at
        the next cyclic garbage collection."""
        self._memory.clear_cache()
        for res in (*self._containers, self._bin_file):
            if res is not None:
                res.close()

    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        for f in self._findings:
            out.extend(f)
        return out

    # ------------------------------------------------------------------ CPU state
    def _require_state(self) -> PartitionState:
        if self._state is None:
            raise NotFoundError(f"{self.paths[0]}: no CPU state in this saved state ({self.kind})")
        return self._state

    def _vp(self, vp: int) -> VpState:
        state = self._require_state()
        if not 0 <= vp < len(state.vps):
            raise NotFoundError(f"VP {vp} does not exist (this saved state has {len(state.vps)} VPs)")
        return state.vps[vp]

    def has_cpu_state(self) -> bool:
        return self._state is not None

    def vp_count(self) -> int:
        return 0 if self._state is None else len(self._state.vps)

    def get_processor_vendor(self) -> ProcessorVendor:
        return self._require_state().vendor

    def get_guest_os_info(self, vtl: int = 0) -> GuestOsInfo | None:
        """Decoded HV_GUEST_OS_ID of ``vtl`` (closed- or open-source layout); None when none was saved."""
        return self._require_state().guest_os_info_for(vtl)

    def get_guest_enabled_virtual_trust_levels(self) -> int:
        return self._require_state().enabled_vtls_bitmap()

    def get_enabled_virtual_trust_levels(self, vp: int) -> int:
        return self._vp(vp).enabled_vtls_bitmap()

    def get_virtual_trust_levels(self, vp: int) -> list[int]:
        return self._vp(vp).saved_vtls()

    def get_active_virtual_trust_level(self, vp: int) -> int:
        forced = self._forced_vtl.get(vp)
        if forced is not None:
            return forced
        return self._vp(vp).active_vtl()

    def is_higher_vtl_runnable(self, vp: int) -> bool | None:
        return self._vp(vp).vtl_runnable

    def is_active_virtual_trust_level_forced(self, vp: int) -> bool:
        return vp in self._forced_vtl

    def force_active_virtual_trust_level(self, vp: int, vtl: int) -> None:
        v = self._vp(vp)
        if not 0 <= vtl <= 15:
            raise ValueError(f"VTL {vtl} is out of range 0..15")
        if vtl not in v.register_vtls():
            raise NotFoundError(
                f"VP {vp}: VTL {vtl} cannot be used: its registers were not saved"
                f" (saved: {', '.join(f'VTL{x}' for x in v.register_vtls()) or 'none'})"
            )
        self._forced_vtl[vp] = vtl

    def is_active_virtual_trust_level_enabled(self, vp: int) -> bool:
        return bool(self.get_enabled_virtual_trust_levels(vp) >> self.get_active_virtual_trust_level(vp) & 1)

    def get_registers(self, vp: int, vtl: int | None = None) -> dict[str, RegisterValue]:
        v = self._vp(vp)
        vtl = self.get_active_virtual_trust_level(vp) if vtl is None else vtl
        bank = v.registers.get(vtl)
        if bank is None:
            raise NotFoundError(f"VP {vp} has no register bank for VTL {vtl} (saved: {sorted(v.registers)})")
        return {name: bank[name] for name in sorted(bank, key=register_sort_key)}

    def get_register_value(self, vp: int, name: str) -> RegisterValue:
        regs = self.get_registers(vp)
        try:
            return regs[name.lower()]
        except KeyError:
            raise NotFoundError(
                f"VP {vp}: no saved register {name!r} (saved: {', '.join(sorted(regs)) or 'none'})"
            ) from None

    def get_architecture(self, vp: int) -> Architecture:
        return architecture(self.get_registers(vp), self._require_state().processor_vendor)

    def get_paging_mode(self, vp: int) -> PagingMode:
        return paging_mode(self.get_registers(vp), self._require_state().processor_vendor)

    def in_kernel_space(self, vp: int) -> bool:
        regs = self.get_registers(vp)
        cs = regs.get("cs")
        cpl = regs.get("cpl")
        if isinstance(cpl, int):
            return cpl == 0
        return getattr(cs, "selector", 0) & 3 == 0

    def guest_virtual_to_physical(self, vp: int, va: int) -> int:
        return self.guest_virtual_to_physical_with_size(vp, va)[0]

    def guest_virtual_to_physical_with_size(self, vp: int, va: int) -> tuple[int, int]:
        regs = self.get_registers(vp)
        vendor = self._require_state().processor_vendor
        mode = paging_mode(regs, vendor)
        levels = paging_levels(regs, vendor)
        cr3, cr4 = regs.get("cr3", 0), regs.get("cr4", 0)
        assert isinstance(cr3, int) and isinstance(cr4, int)
        return translate_with_size(
            self._memory.read_gpa, va, mode=mode, cr3=cr3, levels=levels, pse=bool(cr4 & CR4_PSE)
        )

    # ------------------------------------------------------------------ memory
    def has_saved_memory(self) -> bool:
        return self._memory.ram_map.maximum_gpa >= 0 and bool(self._memory.source.block_numbers())

    def read_guest_physical_address(self, gpa: int, size: int) -> bytes:
        return self._memory.read_gpa(gpa, size)

    def read_guest_physical_address_padded(self, gpa: int, size: int) -> bytes:
        return self._memory.read_gpa_padded(gpa, size)

    def get_guest_physical_memory_chunks(self) -> tuple[int, list[GpaMemoryChunk]]:
        # tuple.__new__ over the (start, count) pairs: C-level, for maps of 100,000 ranges
        return PAGE_SIZE, list(map(_new_chunk, self._memory.ram_map.chunks()))

    def guest_physical_address_to_raw_saved_memory_offset(self, gpa: int) -> int:
        off = self._memory.ram_map.raw_offset(gpa)
        if off is None:
            raise NotFoundError(f"GPA {gpa:#x} is not backed by saved memory")
        return off

    def read_guest_raw_saved_memory(self, offset: int, size: int) -> bytes:
        return self._memory.read_raw(offset, size)

    def get_guest_raw_saved_memory_size(self) -> int:
        return self._memory.ram_map.raw_size

    def set_memory_block_cache_limit(self, blocks: int) -> None:
        self._memory.set_cache_limit(blocks)

    def get_memory_block_cache_limit(self) -> int:
        return self._memory.cache_limit

    def backed_runs(self, gpa: int, length: int) -> Iterator[tuple[int, int, int]]:
        return self._memory.ram_map.runs(gpa, length)

    def is_backed(self, gpa: int, length: int = 1) -> bool:
        if length <= 0 or gpa < 0:
            return False
        covered = gpa
        for start, raw, size in self._memory.ram_map.runs(gpa, length):
            if start != covered:
                return False
            # One presence check per RamBlock the run touches (raw memory is 1 MiB blocks).
            pos, end = raw, raw + size
            while pos < end:
                if not self._memory.is_backed(start + pos - raw):
                    return False
                pos = (pos // BLOCK_SIZE + 1) * BLOCK_SIZE
            covered = start + size
        return covered == gpa + length

    def _present_blocks(self) -> list[int]:
        """The RamBlock numbers the file holds, sorted once (a membership test per block costs seconds at
        a million blocks; two bisections per range do not)."""
        if self._present is None:
            self._present = sorted(self._memory.source.block_numbers())
        return self._present

    def memory_map(self) -> list[MemoryMapRow]:
        present = self._present_blocks()
        out = []
        for rec in sorted(self._memory.ram_map.records, key=lambda r: r.gpa_index_start):
            first = rec.mbp_index_start // PAGES_PER_BLOCK
            last = (rec.mbp_index_start + rec.page_count_total - 1) // PAGES_PER_BLOCK
            out.append(
                MemoryMapRow(
                    gpa_start=rec.gpa_index_start * PAGE_SIZE,
                    size=rec.page_count_total * PAGE_SIZE,
                    raw_offset=rec.mbp_index_start * PAGE_SIZE,
                    first_ramblock=first,
                    last_ramblock=last,
                    ramblocks_present=bisect.bisect_right(present, last) - bisect.bisect_left(present, first),
                    flags=rec.flags,
                )
            )
        return out

    def ramblock_damage(self) -> RamBlockDamage:
        """As the interface's, plus the present RamBlocks whose value the file cuts short (computed once)."""
        if self._damage is None:
            self._damage = self._count_damage()
        return self._damage

    def _count_damage(self) -> RamBlockDamage:
        base = super().ramblock_damage()
        source = self._memory.source
        try:
            file_size: int | None = os.path.getsize(source.path)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            file_size = None
        if file_size is None:
            return base
        spans = [(r.first_ramblock, r.last_ramblock) for r in self.memory_map()]
        cut = 0
        for n in source.block_numbers():
            loc = source.block_location(n)
            if loc is not None and loc[0] + loc[1] > file_size and any(a <= n <= b for a, b in spans):
                cut += 1
        return base._replace(cut=cut)

    # ------------------------------------------------------------------ summary
    def memory_absence(self) -> str | None:
        """Why this file has no saved RAM and what to collect instead (None when it has saved RAM)."""
        if self.has_saved_memory():
            return None
        facts = self._facts or vmrs.ContainerFacts(None, None, False, False, False)
        return vmrs.memory_absence(facts, named_vsv=self.paths[0].lower().endswith(".vsv"))

    def replay_log(self) -> dict[str, int] | None:
        """Pending / applied / stale entry counts of the container's replay log (applied in memory only)."""
        for container in self._containers:
            log = container.replay_log
            if log is not None:
                return {"pending": log.pending_count, "applied": log.applied_count, "stale": log.stale_count}
        return None

    def _summary_facts(self) -> dict[str, Any]:
        facts = self._facts
        out: dict[str, Any] = {
            "decoder": xpress.active_decoder(),
            "ramblock_count": len(self._memory.source.block_numbers()),
            "journal": self.replay_log(),
        }
        if self._containers:
            v = self._containers[0].header.format_version
            out["container_version"] = f"{v >> 8}.{v & 0xFF}"
        if facts is not None:
            out["vm_version"] = (
                None if facts.vm_version is None else f"{facts.vm_version >> 8}.{facts.vm_version & 0xFF}"
            )
            out["saved_state_type"] = facts.saved_state_type
        return out
