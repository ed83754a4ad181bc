"""The public API: a Pythonic mirror of Microsoft's VM Saved State Dump Provider (spec §8).

>>> from volatility3_vmssd import SavedStateProvider
>>> with SavedStateProvider.load_vmrs("vm.vmrs") as p:                    # doctest: +SKIP
...     p.vp_count(), p.get_paging_mode(0), hex(p.get_register_value(0, "cr3"))
...     p.read_guest_physical_address(0x1000, 16)

Three kinds of input: a ``.vmrs`` (:meth:`SavedStateProvider.load_vmrs`), a legacy ``.bin`` +
``.vsv`` pair (:meth:`~SavedStateProvider.load_bin_vsv`) and a ``.bin`` alone
(:meth:`~SavedStateProvider.load_bin`: memory only).  Opening builds indexes only; no RamBlock is
read or decoded until memory is asked for.  Everything the reader worked around is listed by
:meth:`~SavedStateProvider.findings`.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .codecs import xpress
from .errors import Finding, Findings, NotFoundError, UnsupportedError, VmssdError
from .savedstate.guestmemory import DEFAULT_CACHE_LIMIT, GuestMemory
from .savedstate.legacy_bin import BinFile
from .savedstate.partition_state import (
    CR4_PSE,
    PartitionState,
    VpState,
    architecture,
    is_la57,
    paging_levels,
    paging_mode,
    parse_partition_state,
)
from .savedstate.rammap import PAGE_SIZE, PAGES_PER_BLOCK, RamMap, RamMemoryBlockRecord
from .savedstate.registers import Architecture, PagingMode, ProcessorVendor, RegisterValue
from .savedstate.translate import translate_with_size
from .storage import HyperVStorage, Key, commit_replay_log
from .storage.reader import is_hyperv_storage

if TYPE_CHECKING:
    from .dll.provider import DllSavedStateProvider

BACKENDS = ("native", "dll", "auto")
_RAM_MEMORY_BLOCK = re.compile(r"^RamMemoryBlock/?(\d+)/?$")
_RAM_BLOCK = re.compile(r"^RamBlock/?(\d+)/?$")
_NUMBER = re.compile(r"^(\d+)/?$")
PARTITION_STATE_PATHS = (
    "/savedstate/savedVM/partition_state",
    "/savedVM/partition_state",
    "/savedstate/partition_state",
)


class GpaMemoryChunk(NamedTuple):
    """GPA_MEMORY_CHUNK: a run of backed guest-physical pages."""

    guest_physical_start_page_index: int
    page_count: int


class GuestOsSummary(NamedTuple):
    raw: int | None
    description: str


class VmrsBlockSource:
    """RamBlock values held as keys of a container (inline or file objects); read on demand."""

    def __init__(self, storage: HyperVStorage, keys: dict[int, Key]) -> None:
        self.path = storage.path
        self._keys = keys

    def block_numbers(self) -> Collection[int]:
        return self._keys.keys()

    def block_location(self, n: int) -> tuple[int, int] | None:
        key = self._keys.get(n)
        return key.data_location if key is not None else None

    def read_block_value(self, n: int) -> bytes:
        key = self._keys.get(n)
        if key is None:
            raise NotFoundError(f"{self.path}: RamBlock {n} is not present")
        return key.read(allow_partial=True)


def _children(storage: HyperVStorage, *paths: str) -> list[Key]:
    out: list[Key] = []
    for p in paths:
        node = storage.root if p == "/" else storage.find(p)
        if node is not None:
            out.extend(node.children)
    return out


def _numbered(storage: HyperVStorage, stem: str, pattern: re.Pattern[str]) -> dict[int, Key]:
    """Keys ``<stem><n>`` under /savedstate, a node ``<stem>`` with children ``n``, or literal names.

    Microsoft's legacy path format is ``RamMemoryBlock/%d/``; we do not know whether that is a
    node with numbered children or a literal name with slashes, so both are accepted (§5.2).
    """
    found: dict[int, Key] = {}
    for key in _children(storage, "/savedstate", "/"):
        m = pattern.match(key.name)
        if m and not key.is_node:
            found.setdefault(int(m[1]), key)
    for key in _children(storage, f"/{stem}", f"/savedstate/{stem}", f"/savedVM/{stem}"):
        m = _NUMBER.match(key.name)
        if m and not key.is_node:
            found.setdefault(int(m[1]), key)
        elif m and key.is_node and key.children:  # RamBlock/<n>/ written as a node with one value
            found.setdefault(int(m[1]), key.children[0])
    return found


class SavedStateProvider:
    """An opened saved state. Use the ``load_*`` class methods; close it or use ``with``."""

    def __init__(
        self,
        kind: str,
        paths: list[str],
        memory: GuestMemory,
        state: PartitionState | None,
        findings: list[Findings],
        *,
        storage: HyperVStorage | None = None,
        bin_file: BinFile | None = None,
        vsv_storage: HyperVStorage | None = None,
        vm_version: int | None = None,
        saved_state_type: str | None = None,
        block_keys: dict[int, Key] | None = None,
    ) -> None:
        self.kind = kind
        self.paths = paths
        self.memory = memory
        self.state = state
        self._findings = findings
        self.storage = storage
        self.bin_file = bin_file
        self.vsv_storage = vsv_storage
        self.vm_version = vm_version
        self.saved_state_type = saved_state_type
        self.backend = "native"
        self._block_keys = block_keys or {}
        self._forced_vtl: dict[int, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _use_dll(backend: str) -> bool:
        """True for "dll" (which raises BackendUnavailableError off Windows) and for "auto" when an
        acceptable DLL is found; False for "native" and for "auto" without one."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if backend == "auto":
            from .dll import dll_available

            return dll_available()
        return backend == "dll"

    @classmethod
    def load_vmrs(
        cls,
        path: str | os.PathLike[str],
        *,
        backend: str = "native",
        strict: bool = False,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        dll_path: str | os.PathLike[str] | None = None,
    ) -> SavedStateProvider | DllSavedStateProvider:
        """Open a ``.vmrs`` (LoadSavedStateFile). A pending journal is applied in memory only.

        ``backend="dll"`` opens it with Microsoft's DLL instead (Windows; ``dll_path`` or discovery),
        ``"auto"`` does so when an acceptable DLL is found and falls back to the native reader.
        """
        if cls._use_dll(backend):
            from .dll.provider import DllSavedStateProvider

            return DllSavedStateProvider.load_vmrs(path, dll_path=dll_path, strict=strict, cache_limit=cache_limit)
        storage = HyperVStorage.open(path, strict=strict)
        try:
            findings = storage.findings
            memory, block_keys = cls._memory_from_container(storage, storage, findings, cache_limit)
            state = cls._state_from_container(storage, findings)
            vm_version = _int_value(storage, "/savedstate/VmVersion", "/configuration/properties/version")
            kind = "vmrs"
            sstype = _str_value(storage, "/savedstate/type")
            return cls(
                kind,
                [storage.path],
                memory,
                state,
                [findings],
                storage=storage,
                vm_version=vm_version,
                saved_state_type=sstype,
                block_keys=block_keys,
            )
        except BaseException:
            storage.close()
            raise

    @classmethod
    def load_bin_vsv(
        cls,
        bin_path: str | os.PathLike[str],
        vsv_path: str | os.PathLike[str],
        *,
        backend: str = "native",
        strict: bool = False,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
        dll_path: str | os.PathLike[str] | None = None,
    ) -> SavedStateProvider | DllSavedStateProvider:
        """Open a legacy pair (LoadSavedStateFiles): memory from the ``.bin``, CPU state and map from the ``.vsv``.

        ``backend`` and ``dll_path`` as for :meth:`load_vmrs`.
        """
        if cls._use_dll(backend):
            from .dll.provider import DllSavedStateProvider

            return DllSavedStateProvider.load_bin_vsv(
                bin_path, vsv_path, dll_path=dll_path, strict=strict, cache_limit=cache_limit
            )
        vsv = os.fspath(vsv_path)
        bin_findings = Findings(strict=strict)
        bin_file = BinFile.open(bin_path, findings=bin_findings)
        vsv_storage: HyperVStorage | None = None
        try:
            with open(vsv, "rb") as fh:
                head = fh.read(8)
            if not is_hyperv_storage(head):
                bin_findings.add(
                    vsv,
                    0,
                    "unsupported",
                    f"unsupported legacy .vsv container (signature {head[:4].hex() or 'none'}, not HyperVStorage):"
                    " CPU state is unavailable; memory is served from the .bin with an identity map",
                )
                memory = bin_file.guest_memory(cache_limit=cache_limit)
                return cls("bin+vsv", [bin_file.path, vsv], memory, None, [bin_findings], bin_file=bin_file)
            vsv_storage = HyperVStorage.open(vsv, strict=strict)
            findings = vsv_storage.findings
            ram_map = cls._ram_map(vsv_storage, findings, bin_file.block_numbers())
            memory = GuestMemory(ram_map, bin_file, findings=bin_findings, cache_limit=cache_limit)
            state = cls._state_from_container(vsv_storage, findings)
            vm_version = getattr(bin_file, "vm_version", None) or _int_value(
                vsv_storage, "/savedstate/VmVersion", "/configuration/properties/version"
            )
            return cls(
                "bin+vsv",
                [bin_file.path, vsv],
                memory,
                state,
                [bin_findings, findings],
                bin_file=bin_file,
                vsv_storage=vsv_storage,
                vm_version=vm_version,
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
        return cls("bin", [bin_file.path], memory, None, [findings], bin_file=bin_file, vm_version=bin_file.vm_version)

    @classmethod
    def _memory_from_container(
        cls, storage: HyperVStorage, _source: HyperVStorage, findings: Findings, cache_limit: int
    ) -> tuple[GuestMemory, dict[int, Key]]:
        blocks = _numbered(storage, "RamBlock", _RAM_BLOCK)
        ram_map = cls._ram_map(storage, findings, blocks.keys())
        source = VmrsBlockSource(storage, blocks)
        return GuestMemory(ram_map, source, findings=findings, cache_limit=cache_limit), blocks

    @staticmethod
    def _ram_map(storage: HyperVStorage, findings: Findings, block_numbers: Iterable[int]) -> RamMap:
        keys = _numbered(storage, "RamMemoryBlock", _RAM_MEMORY_BLOCK)
        numbers = sorted(block_numbers)
        identity_pages = (numbers[-1] + 1) * PAGES_PER_BLOCK if numbers else 0
        if not keys:
            if numbers:
                findings.add(
                    storage.path,
                    None,
                    "no-ram-map",
                    "no RamMemoryBlock records: assuming one chunk from GPA 0 over the RamBlocks",
                )
                return RamMap.identity(identity_pages, findings=findings, path=storage.path)
            findings.add(
                storage.path,
                None,
                "no-memory",
                "no saved memory (no RamMemoryBlock or RamBlock keys): a runtime-state or configuration file,"
                " not a saved state",
            )
            return RamMap([], findings=findings, path=storage.path)
        expected = list(range(len(keys)))
        if sorted(keys) != expected:
            findings.add(
                storage.path,
                None,
                "ram-map",
                f"RamMemoryBlock numbers are not 0..{len(keys) - 1}: {sorted(keys)[:16]}; all of them are used",
            )
        records: list[RamMemoryBlockRecord] = []
        for n in sorted(keys):
            key = keys[n]
            try:
                records.append(
                    RamMemoryBlockRecord.parse(key.read(), path=storage.path, offset=key.file_offset, key=key.path)
                )
            except UnsupportedError as exc:
                findings.add(
                    storage.path,
                    key.file_offset,
                    "ram-map",
                    f"{exc}; falling back to one identity chunk over the RamBlocks",
                )
                return RamMap.identity(identity_pages, findings=findings, path=storage.path)
        return RamMap(records, findings=findings, path=storage.path)

    @staticmethod
    def _state_from_container(storage: HyperVStorage, findings: Findings) -> PartitionState | None:
        for path in PARTITION_STATE_PATHS:
            key = storage.find(path)
            if key is not None and not key.is_node:
                blob = key.read(allow_partial=True)
                loc = key.data_location
                base = loc[0] if loc else key.file_offset
                try:
                    return parse_partition_state(blob, path=storage.path, base_offset=base, findings=findings)
                except VmssdError as exc:
                    # A copy cut right after its key tables has no partition_state bytes left: its
                    # memory is still readable, so say why CPU state is missing instead of failing.
                    if findings.strict:
                        raise
                    findings.add(storage.path, base, "no-cpu-state", f"partition_state is unreadable: {exc}")
                    return None
        if storage.find("/savedstate") is not None or storage.find("/savedVM") is not None:
            findings.add(storage.path, None, "no-cpu-state", "no partition_state key: CPU state is unavailable")
        return None

    @staticmethod
    def apply_pending_replay_log(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
        """Write a committed **copy** of ``src`` to ``dst`` (ApplyPendingSavedStateFileReplayLog, but never
        in place). Returns the number of journal entries applied."""
        return commit_replay_log(src, dst)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close the files and drop the decoded-block cache now (up to the cache limit in MiB), not at
        the next cyclic garbage collection."""
        self.memory.clear_cache()
        for res in (self.storage, self.bin_file, self.vsv_storage):
            if res is not None:
                res.close()

    def __enter__(self) -> SavedStateProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def findings(self) -> list[Finding]:
        out: list[Finding] = []
        for f in self._findings:
            out.extend(f)
        return out

    # ------------------------------------------------------------------ CPU state
    def _require_state(self) -> PartitionState:
        if self.state is None:
            raise NotFoundError(f"{self.paths[0]}: no CPU state in this saved state ({self.kind})")
        return self.state

    def _vp(self, vp: int) -> VpState:
        state = self._require_state()
        if not 0 <= vp < len(state.vps):
            raise NotFoundError(f"VP {vp} does not exist (this saved state has {len(state.vps)} VPs)")
        return state.vps[vp]

    def vp_count(self) -> int:
        return 0 if self.state is None else len(self.state.vps)

    def get_processor_vendor(self) -> ProcessorVendor:
        return self._require_state().vendor

    def get_guest_os_info(self) -> Any:
        """Decoded HV_GUEST_OS_ID (closed- or open-source layout), or None when the OsId chunk is absent."""
        return self._require_state().guest_os_info

    def get_guest_enabled_virtual_trust_levels(self) -> int:
        return self._require_state().enabled_vtls_bitmap()

    def get_enabled_virtual_trust_levels(self, vp: int) -> int:
        return self._vp(vp).enabled_vtls_bitmap()

    def get_virtual_trust_levels(self, vp: int) -> list[int]:
        """The VTLs this VP has a saved register bank for, lowest first."""
        return sorted(self._vp(vp).registers)

    def get_active_virtual_trust_level(self, vp: int) -> int:
        forced = self._forced_vtl.get(vp)
        return forced if forced is not None else self._vp(vp).active_vtl()

    def force_active_virtual_trust_level(self, vp: int, vtl: int) -> None:
        """Read registers and translate with ``vtl`` on this VP (the saved-state rule is a guess, §4.3)."""
        self._vp(vp)
        if not 0 <= vtl <= 15:
            raise ValueError(f"VTL {vtl} is out of range 0..15")
        self._forced_vtl[vp] = vtl

    def is_active_virtual_trust_level_enabled(self, vp: int) -> bool:
        return bool(self.get_enabled_virtual_trust_levels(vp) >> self.get_active_virtual_trust_level(vp) & 1)

    def get_registers(self, vp: int, vtl: int | None = None) -> dict[str, RegisterValue]:
        """All saved registers of the VP's active (or the given) VTL, by lower-case name."""
        v = self._vp(vp)
        vtl = self.get_active_virtual_trust_level(vp) if vtl is None else vtl
        bank = v.registers.get(vtl)
        if bank is None:
            raise NotFoundError(f"VP {vp} has no register bank for VTL {vtl} (enabled: {sorted(v.registers)})")
        return dict(bank)

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

    def get_paging_levels(self, vp: int) -> int:
        """0 (no paging), 2, 3, 4 or 5; 5 when CR4.LA57 is set, which PAGING_MODE cannot express."""
        return paging_levels(self.get_registers(vp), self._require_state().processor_vendor)

    def is_five_level_paging(self, vp: int) -> bool:
        return is_la57(self.get_registers(vp))

    def in_kernel_space(self, vp: int) -> bool:
        regs = self.get_registers(vp)
        cs = regs.get("cs")
        cpl = regs.get("cpl")
        if isinstance(cpl, int):
            return cpl == 0
        return getattr(cs, "selector", 0) & 3 == 0

    # ------------------------------------------------------------------ memory
    def has_saved_memory(self) -> bool:
        """False for runtime-state and configuration files: no GPA range or no RamBlock at all."""
        return self.memory.ram_map.maximum_gpa >= 0 and bool(self.memory.source.block_numbers())

    def read_guest_physical_address(self, gpa: int, size: int) -> bytes:
        """Bytes at ``gpa``; a read into a hole returns the bytes before it; one starting in a hole raises."""
        return self.memory.read_gpa(gpa, size)

    def read_guest_physical_address_padded(self, gpa: int, size: int) -> bytes:
        """Like :meth:`read_guest_physical_address`, with holes and missing pages zero-filled."""
        return self.memory.read_gpa_padded(gpa, size)

    def guest_virtual_to_physical(self, vp: int, va: int) -> int:
        return self.guest_virtual_to_physical_with_size(vp, va)[0]

    def guest_virtual_to_physical_with_size(self, vp: int, va: int) -> tuple[int, int]:
        """(GPA, bytes left in that page) using the VP's active-VTL CR3 and paging mode."""
        regs = self.get_registers(vp)
        vendor = self._require_state().processor_vendor
        mode = paging_mode(regs, vendor)
        levels = paging_levels(regs, vendor)
        cr3, cr4 = regs.get("cr3", 0), regs.get("cr4", 0)
        assert isinstance(cr3, int) and isinstance(cr4, int)
        return translate_with_size(self.memory.read_gpa, va, mode=mode, cr3=cr3, levels=levels, pse=bool(cr4 & CR4_PSE))

    def get_guest_physical_memory_chunks(self) -> tuple[int, list[GpaMemoryChunk]]:
        return PAGE_SIZE, [GpaMemoryChunk(s, n) for s, n in self.memory.ram_map.chunks()]

    def guest_physical_address_to_raw_saved_memory_offset(self, gpa: int) -> int:
        off = self.memory.ram_map.raw_offset(gpa)
        if off is None:
            raise NotFoundError(f"GPA {gpa:#x} is not backed by saved memory")
        return off

    def read_guest_raw_saved_memory(self, offset: int, size: int) -> bytes:
        return self.memory.read_raw(offset, size)

    def get_guest_raw_saved_memory_size(self) -> int:
        return self.memory.ram_map.raw_size

    def set_memory_block_cache_limit(self, blocks: int) -> None:
        self.memory.set_cache_limit(blocks)

    def get_memory_block_cache_limit(self) -> int:
        return self.memory.cache_limit

    # ------------------------------------------------------------------ summary
    def block_number_of(self, gpa: int) -> int | None:
        off = self.memory.ram_map.raw_offset(gpa)
        return None if off is None else off // (PAGE_SIZE * PAGES_PER_BLOCK)

    def memory_map(self) -> list[dict[str, int]]:
        """Per GPA range: start, size, raw saved-memory offset and the RamBlock numbers it uses."""
        out = []
        for rec in sorted(self.memory.ram_map.records, key=lambda r: r.gpa_index_start):
            first = rec.mbp_index_start // PAGES_PER_BLOCK
            last = (rec.mbp_index_start + rec.page_count_total - 1) // PAGES_PER_BLOCK
            out.append(
                {
                    "gpa_start": rec.gpa_index_start * PAGE_SIZE,
                    "size": rec.page_count_total * PAGE_SIZE,
                    "raw_offset": rec.mbp_index_start * PAGE_SIZE,
                    "first_ramblock": first,
                    "last_ramblock": last,
                }
            )
        return out

    def describe(self) -> dict[str, Any]:
        """What ``vmssd info`` and ``hyperv.info`` show; reads no RAM."""
        page_size, chunks = self.get_guest_physical_memory_chunks()
        info: dict[str, Any] = {
            "file_kind": self.kind,
            "files": list(self.paths),
            "backend": self.backend,
            "container_version": None,
            "vm_version": _version_text(self.vm_version),
            "saved_state_type": self.saved_state_type,
            "vp_count": self.vp_count(),
            "processor_vendor": None,
            "architecture": None,
            "paging_mode": None,
            "guest_os": None,
            "ram_bytes": sum(c.page_count for c in chunks) * page_size,
            "chunk_count": len(chunks),
            "raw_saved_memory_bytes": self.get_guest_raw_saved_memory_size(),
            "ramblock_count": len(self.memory.source.block_numbers()),
            "decoder": xpress.active_decoder(),
            "cache_limit_blocks": self.get_memory_block_cache_limit(),
            "journal": None,
        }
        container = self.storage or self.vsv_storage
        if container is not None:
            info["container_version"] = (
                f"{container.header.format_version >> 8}.{container.header.format_version & 0xFF}"
            )
            log = container.replay_log
            if log is not None:
                info["journal"] = {"pending": log.pending_count, "applied": log.applied_count, "stale": log.stale_count}
        if self.state is not None:
            info["processor_vendor"] = self.state.vendor.name
            if self.state.vps:
                try:
                    info["architecture"] = self.get_architecture(0).name
                    info["paging_mode"] = self.get_paging_mode(0).name
                    if self.is_five_level_paging(0):
                        info["paging_mode"] += " (5-level, CR4.LA57)"
                except VmssdError:
                    pass
            os_info = self.state.guest_os_info
            info["guest_os"] = None if os_info is None else os_info.description
        info["findings"] = [str(f) for f in self.findings()]
        return info


def _int_value(storage: HyperVStorage, *paths: str) -> int | None:
    for p in paths:
        key = storage.find(p)
        if key is not None and isinstance(key.value, int):
            return int(key.value)
    return None


def _str_value(storage: HyperVStorage, path: str) -> str | None:
    key = storage.find(path)
    return key.value if key is not None and isinstance(key.value, str) else None


def _version_text(v: int | None) -> str | None:
    return None if v is None else f"{v >> 8}.{v & 0xFF}"
