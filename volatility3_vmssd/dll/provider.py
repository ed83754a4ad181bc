"""``DllSavedStateProvider``: Microsoft's DLL behind the provider interface (``interface.SavedState``).

Two uses: a second backend on Windows (``backend="dll"``), and the reference side of
``vmssd verify``, which checks our native reader against Microsoft's on the same file.  Return
types match the native provider (lower-case register names, ``SegmentRegister``/``TableRegister``,
the SDK enums, ``GpaMemoryChunk``), so the two can be compared value for value.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Iterator
from ctypes import byref
from typing import Any

from ..cpu.guestos import GuestOsInfo, decode_guest_os_id
from ..cpu.register_chunks import register_sort_key
from ..cpu.registers import (
    REGISTER_IDS,
    WIDE_REGISTER_NAMES,
    X64_REGISTER_MAX,
    X64_SEGMENT_REGISTER_NAMES,
    X64_TABLE_REGISTER_NAMES,
    Architecture,
    PagingMode,
    ProcessorVendor,
    RegisterValue,
    SegmentRegister,
    TableRegister,
)
from ..errors import BackendUnavailableError, Finding, NotFoundError, UnmappedAddressError, UnsupportedError, VmssdError
from ..interface import GpaMemoryChunk, MemoryMapRow, SavedState
from ..memory.geometry import BLOCK_SIZE, PAGE_SIZE
from ..outputs import partial_paths
from . import binding as b
from .binding import DumpProviderLibrary, is_windows, unavailable_message
from .discovery import DllInfo, find_dll

_READ_CHUNK = 1 << 26  # the DLL's read size is a UINT32; stay far below it

X64_ID_NAMES: tuple[str, ...] = tuple(n for n, i in REGISTER_IDS.items() if i < X64_REGISTER_MAX)
ARM64_ID_NAMES: tuple[str, ...] = tuple(n for n, i in REGISTER_IDS.items() if i > X64_REGISTER_MAX)
# The old API reports segments as a selector (plus a separate FS/GS base) and nothing else.
_OLD_SEGMENT_UNREPORTED: dict[str, frozenset[str]] = {
    name: frozenset({"limit", "attributes"} if name in ("fs", "gs") else {"base", "limit", "attributes"})
    for name in X64_SEGMENT_REGISTER_NAMES
}
_OLD_NAMES: tuple[str, ...] = (
    *(n for n in b.OLD_REGISTER_IDS_X64 if "." not in n and n != "count"),
    *(f"xmm{i}" for i in range(16)),
    "xmmcontrolstatus",
    "fpcontrolstatus",
    "idtr",
    "gdtr",
)


def _library(
    dll_path: str | os.PathLike[str] | None, library: DumpProviderLibrary | None, abi: str | None
) -> DumpProviderLibrary:
    """The injected library (tests), or the discovered DLL on Windows; BackendUnavailableError elsewhere."""
    if library is not None:
        return library
    if not is_windows():
        raise BackendUnavailableError(unavailable_message())
    return DumpProviderLibrary.load(find_dll(dll_path), abi=abi)


class DllSavedStateProvider(SavedState):
    """A saved state opened by vmsavedstatedumpprovider.dll. Close it or use ``with``."""

    backend = "dll"

    def __init__(self, library: DumpProviderLibrary, handle: int, kind: str, paths: list[str]) -> None:
        self.library = library
        self.kind = kind
        self.paths = paths
        self._handle: int | None = handle
        self._arch_cache: dict[int, Architecture] = {}
        self._chunk_cache: list[GpaMemoryChunk] | None = None
        self._runs: list[tuple[int, int, int]] | None = None
        self._vp_count: int | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_vmrs(cls, path: str | os.PathLike[str], **options: Any) -> DllSavedStateProvider:
        """LoadSavedStateFile; ``options`` as :meth:`_load` takes them."""
        return cls._load("LoadSavedStateFile", "vmrs", [path], **options)

    @classmethod
    def load_bin_vsv(
        cls, bin_path: str | os.PathLike[str], vsv_path: str | os.PathLike[str], **options: Any
    ) -> DllSavedStateProvider:
        """LoadSavedStateFiles on a legacy pair; ``options`` as :meth:`_load` takes them."""
        return cls._load("LoadSavedStateFiles", "bin+vsv", [bin_path, vsv_path], **options)

    @classmethod
    def _load(
        cls,
        function: str,
        kind: str,
        files: list[str | os.PathLike[str]],
        *,
        dll_path: str | os.PathLike[str] | None = None,
        library: DumpProviderLibrary | None = None,
        abi: str | None = None,
        strict: bool = False,
        cache_limit: int | None = None,
    ) -> DllSavedStateProvider:
        """Open ``files`` with the DLL's ``function``.  ``strict`` is accepted for signature parity with the
        native backend; the DLL has no such mode.  ``cache_limit`` (1 MiB blocks) is passed to
        SetMemoryBlockCacheLimit; None keeps the DLL's 0."""
        lib = _library(dll_path, library, abi)
        paths = [os.path.abspath(os.fspath(p)) for p in files]
        for p in paths:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such file")
        handle = b.VM_SAVED_STATE_DUMP_HANDLE()
        lib.call(function, *paths, byref(handle), context=" + ".join(paths))
        return cls._opened(lib, handle, kind, paths, cache_limit)

    @classmethod
    def _opened(
        cls, lib: DumpProviderLibrary, handle: Any, kind: str, paths: list[str], cache_limit: int | None
    ) -> DllSavedStateProvider:
        if not handle.value:
            raise VmssdError(f"{paths[0]}: the DLL returned success but no handle")
        provider = cls(lib, handle.value, kind, paths)
        if cache_limit is not None and lib.has("SetMemoryBlockCacheLimit"):
            try:
                provider.set_memory_block_cache_limit(cache_limit)
            except BaseException:
                provider.close()
                raise
        return provider

    @staticmethod
    def apply_pending_replay_log(
        src: str | os.PathLike[str],
        dst: str | os.PathLike[str],
        *,
        dll_path: str | os.PathLike[str] | None = None,
        library: DumpProviderLibrary | None = None,
    ) -> int:
        """Copy ``src`` to ``dst`` and let the DLL commit the journal **in the copy**.

        ApplyPendingSavedStateFileReplayLog rewrites its argument in place, so it is never given the
        input.  Returns the number of pending entries the native reader saw in ``src`` (the DLL does
        not say), or -1 when it could not tell.
        """
        lib = _library(dll_path, library, None)
        ssrc, sdst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
        if os.path.exists(sdst) and os.path.samefile(ssrc, sdst):
            raise VmssdError(f"refusing to apply the replay log over its input {ssrc}")
        pending = -1
        try:
            from ..storage import HyperVStorage

            with HyperVStorage.open(ssrc) as storage:
                log = storage.replay_log
                pending = log.pending_count if log is not None else 0
        except VmssdError:
            pass
        with partial_paths(sdst, force=True) as (tmp,):
            shutil.copyfile(ssrc, tmp)
            lib.call("ApplyPendingSavedStateFileReplayLog", tmp, context=sdst)
        return pending

    # ------------------------------------------------------------------ lifetime
    @property
    def handle(self) -> int:
        if self._handle is None:
            raise VmssdError(f"{self.paths[0]}: this DLL provider is closed")
        return self._handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self.library.call("ReleaseSavedStateFiles", handle, context=self.paths[0])

    def __del__(self) -> None:  # a forgotten close() must not keep the evidence file locked
        with contextlib.suppress(Exception):  # best effort, also at interpreter shutdown
            self.close()

    def findings(self) -> list[Finding]:
        """The DLL reports no workarounds."""
        return []

    def _call(self, name: str, *args: Any, context: str = "", accept: frozenset[int] = frozenset()) -> int:
        return self.library.call(name, self.handle, *args, context=context or self.paths[0], accept=accept)

    # ------------------------------------------------------------------ CPU state
    def vp_count(self) -> int:
        if self._vp_count is None or self._handle is None:  # fixed once loaded; a closed handle still fails
            out = b.UINT32()
            self._call("GetVpCount", byref(out))
            self._vp_count = out.value
        return self._vp_count

    def _check_vp(self, vp: int) -> None:
        """NotFoundError for a VP that does not exist, as the native backend says (the DLL: E_INVALIDARG)."""
        if not 0 <= vp < self.vp_count():
            raise NotFoundError(f"VP {vp} does not exist (this saved state has {self.vp_count()} VPs)")

    def get_architecture(self, vp: int) -> Architecture:
        self._check_vp(vp)
        out = b.ENUM()
        self._call("GetArchitecture", vp, byref(out), context=f"VP {vp}")
        try:
            return Architecture(out.value)
        except ValueError:
            return Architecture.UNKNOWN

    def get_paging_mode(self, vp: int) -> PagingMode:
        self._check_vp(vp)
        out = b.ENUM()
        self._call("GetPagingMode", vp, byref(out), context=f"VP {vp}")
        try:
            return PagingMode(out.value)
        except ValueError:
            return PagingMode.INVALID

    def get_processor_vendor(self) -> ProcessorVendor:
        """Not answerable: the DLL exports no processor-vendor query (VIRTUAL_PROCESSOR_VENDOR is only a type)."""
        raise UnsupportedError("vmsavedstatedumpprovider.dll exports no processor-vendor query")

    def get_guest_os_info(self, vtl: int = 0) -> GuestOsInfo | None:
        """GetGuestOsInfo decoded like the native reader; None when the DLL has nothing for that VTL."""
        out = b.GUEST_OS_INFO()
        try:
            self._call("GetGuestOsInfo", vtl, byref(out), context=f"VTL {vtl}")
        except NotFoundError:
            return None
        return decode_guest_os_id(out.AsUINT64)

    def get_guest_enabled_virtual_trust_levels(self) -> int:
        out = b.UINT32()
        self._call("GetGuestEnabledVirtualTrustLevels", byref(out))
        return out.value

    def get_enabled_virtual_trust_levels(self, vp: int) -> int:
        self._check_vp(vp)
        out = b.UINT32()
        self._call("GetEnabledVirtualTrustLevels", vp, byref(out), context=f"VP {vp}")
        return out.value

    def get_virtual_trust_levels(self, vp: int) -> list[int]:
        """The DLL reports enabled VTLs as a bitmap; every enabled VTL has a register bank."""
        self._check_vp(vp)
        bitmap = self.get_enabled_virtual_trust_levels(vp)
        return [vtl for vtl in range(16) if bitmap >> vtl & 1]

    def has_saved_memory(self) -> bool:
        return bool(self.get_guest_physical_memory_chunks()[1])

    def get_active_virtual_trust_level(self, vp: int) -> int:
        self._check_vp(vp)
        out = b.UINT8()
        self._call("GetActiveVirtualTrustLevel", vp, byref(out), context=f"VP {vp}")
        return out.value

    def force_active_virtual_trust_level(self, vp: int, vtl: int) -> None:
        self._check_vp(vp)
        if not 0 <= vtl <= 15:
            raise ValueError(f"VTL {vtl} is out of range 0..15")
        self._call("ForceActiveVirtualTrustLevel", vp, vtl, context=f"VP {vp} VTL {vtl}")

    def is_active_virtual_trust_level_enabled(self, vp: int) -> bool:
        self._check_vp(vp)
        out = b.BOOL()
        self._call("IsActiveVirtualTrustLevelEnabled", vp, byref(out), context=f"VP {vp}")
        return bool(out.value)

    def is_higher_vtl_runnable(self, vp: int) -> bool | None:
        """Not answerable: the DLL exports no query for the VP VTL control page."""
        self._check_vp(vp)
        raise UnsupportedError("vmsavedstatedumpprovider.dll exports no VtlIsRunnable query")

    def in_kernel_space(self, vp: int) -> bool:
        self._check_vp(vp)
        out = b.BOOL()
        self._call("InKernelSpace", vp, byref(out), context=f"VP {vp}")
        return bool(out.value)

    # registers ---------------------------------------------------------
    @property
    def unreported_fields(self) -> dict[str, frozenset[str]]:
        """Segment fields this ABI cannot report (old ABI: only selectors, plus the FS/GS bases)."""
        return _OLD_SEGMENT_UNREPORTED if self.library.abi == "old" else {}

    def expressible_registers(self, vp: int) -> frozenset[str]:
        """Names GetRegisterValue can answer for this VP's architecture under this ABI."""
        self._check_vp(vp)
        arch = self._architecture(vp)
        if self.library.abi == "old":
            return frozenset(_OLD_NAMES)
        return frozenset(ARM64_ID_NAMES if arch == Architecture.ARMV8 else X64_ID_NAMES)

    def _architecture(self, vp: int) -> Architecture:
        self._check_vp(vp)
        arch = self._arch_cache.get(vp)
        if arch is None:
            arch = self._arch_cache[vp] = self.get_architecture(vp)
        return arch

    def _new_register(self, vp: int, name: str) -> RegisterValue:
        self._check_vp(vp)
        reg_id = REGISTER_IDS.get(name)
        if reg_id is None:
            raise NotFoundError(f"VP {vp}: {name!r} has no SDK REGISTER_ID")
        out = b.VIRTUAL_PROCESSOR_REGISTER()
        self._call("GetRegisterValue", vp, reg_id, byref(out), context=f"VP {vp} {name}")
        if name in X64_SEGMENT_REGISTER_NAMES:
            s = out.X64.Segment
            return SegmentRegister(s.Base, s.Limit, s.Selector, s.Attributes)
        if name in X64_TABLE_REGISTER_NAMES:
            return TableRegister(out.X64.Table.Limit, out.X64.Table.Base)
        if name in WIDE_REGISTER_NAMES:
            return out.Reg128.Low64 | out.Reg128.High64 << 64
        return out.Reg64

    def _old_raw(self, vp: int, part: str) -> int:
        self._check_vp(vp)
        arch = self._architecture(vp)
        table = b.OLD_REGISTER_IDS_X86 if arch == Architecture.X86 else b.OLD_REGISTER_IDS_X64
        reg_id = table.get(part)
        if reg_id is None:
            raise NotFoundError(f"VP {vp}: {part!r} has no id in the old REGISTER_ID enums")
        reg = b.VIRTUAL_PROCESSOR_REGISTER_OLD()
        reg.Architecture = int(arch) if arch in (Architecture.X86, Architecture.X64) else int(Architecture.X64)
        reg.RegisterId.RegisterId = reg_id
        self._call("GetRegisterValue", vp, byref(reg), context=f"VP {vp} {part}")
        return reg.RegisterValue

    def _old_register(self, vp: int, name: str) -> RegisterValue:
        self._check_vp(vp)
        if name in X64_SEGMENT_REGISTER_NAMES:
            base = self._old_raw(vp, f"{name}.base") if name in ("fs", "gs") else 0
            return SegmentRegister(base, 0, self._old_raw(vp, name) & 0xFFFF, 0)
        if name in X64_TABLE_REGISTER_NAMES:
            return TableRegister(self._old_raw(vp, f"{name}.limit") & 0xFFFF, self._old_raw(vp, f"{name}.base"))
        if name in ("xmmcontrolstatus", "fpcontrolstatus") or name.startswith("xmm"):
            return self._old_raw(vp, f"{name}.low") | self._old_raw(vp, f"{name}.high") << 64
        return self._old_raw(vp, name)

    def get_register_value(self, vp: int, name: str) -> RegisterValue:
        """One register of the VP's active VTL, by the SDK name lower-cased (``rip``, ``cs``, ``xmm0``)."""
        self._check_vp(vp)
        name = name.lower()
        if self.library.abi == "old":
            return self._old_register(vp, name)
        return self._new_register(vp, name)

    def get_registers(self, vp: int, vtl: int | None = None) -> dict[str, RegisterValue]:
        """Every register id of the VP's architecture that the DLL answers; ids it refuses are left out.

        With ``vtl`` the VP is forced to that VTL for the reads and forced back afterwards (the DLL
        has no per-call VTL argument).
        """
        self._check_vp(vp)
        previous = None
        if vtl is not None:
            previous = self.get_active_virtual_trust_level(vp)
            if previous != vtl:
                self.force_active_virtual_trust_level(vp, vtl)
        try:
            out: dict[str, RegisterValue] = {}
            for name in sorted(self.expressible_registers(vp), key=register_sort_key):
                try:
                    out[name] = self.get_register_value(vp, name)
                except (b.DllCallError, NotFoundError):
                    continue
            return out
        finally:
            if previous is not None and previous != vtl:
                self.force_active_virtual_trust_level(vp, previous)

    # ------------------------------------------------------------------ memory
    def read_guest_physical_address(self, gpa: int, size: int) -> bytes:
        """Bytes at ``gpa``; a short read means the end of backed memory; a read starting in a hole raises."""
        out = bytearray()
        while len(out) < size:
            want = min(size - len(out), _READ_CHUNK)
            buf = ctypes.create_string_buffer(want)
            got = b.UINT32()
            addr = gpa + len(out)
            self._call("ReadGuestPhysicalAddress", addr, buf, want, byref(got), context=f"GPA {addr:#x}")
            n = min(got.value, want)
            out += buf.raw[:n]
            if n < want:
                break
        if size and not out:
            raise UnmappedAddressError(f"GPA {gpa:#x} is not backed by saved memory", gpa)
        return bytes(out)

    def guest_virtual_to_physical(self, vp: int, va: int) -> int:
        self._check_vp(vp)
        gpa = b.GUEST_PHYSICAL_ADDRESS()
        unmapped = b.GUEST_VIRTUAL_ADDRESS()
        args: tuple[Any, ...] = (byref(gpa), byref(unmapped)) if self.library.abi == "new" else (byref(gpa),)
        try:
            self._call("GuestVirtualAddressToPhysicalAddress", vp, va, *args, context=f"VP {vp} VA {va:#x}")
        except b.DllUnmappedAddressError as exc:
            exc.address = va
            exc.unmapped_size = unmapped.value if self.library.abi == "new" else None
            raise
        except b.DllCallError as exc:
            if exc.hresult in (b.VM_SAVED_STATE_DUMP_E_INVALID_VP_STATE,) and self.library.abi == "old":
                # 0xC0370506 was PDPTE_NOT_PRESENT before the code was reused.
                err = b.DllUnmappedAddressError.make(str(exc), exc.hresult, exc.function, "PDPTE_NOT_PRESENT")
                err.address = va
                raise err from None
            raise
        return gpa.value

    def get_guest_physical_memory_chunks(self) -> tuple[int, list[GpaMemoryChunk]]:
        """Two-call protocol: ask with count 0, get E_OUTOFMEMORY/ERROR_INSUFFICIENT_BUFFER and the count."""
        page_size = b.UINT64()
        count = b.UINT64(0)
        too_small = frozenset({b.E_OUTOFMEMORY, b.HRESULT_INSUFFICIENT_BUFFER})
        self._call("GetGuestPhysicalMemoryChunks", byref(page_size), None, byref(count), accept=too_small)
        for _ in range(4):  # the count cannot change on a loaded file; bounded anyway
            n = count.value
            if n == 0:
                return page_size.value or PAGE_SIZE, []
            array = (b.GPA_MEMORY_CHUNK * n)()
            hr = self._call("GetGuestPhysicalMemoryChunks", byref(page_size), array, byref(count), accept=too_small)
            if not b.failed(hr):
                got = min(count.value, n)
                return page_size.value, [
                    GpaMemoryChunk(c.GuestPhysicalStartPageIndex, c.PageCount) for c in array[:got]
                ]
        raise VmssdError("GetGuestPhysicalMemoryChunks kept asking for a larger buffer")

    def guest_physical_address_to_raw_saved_memory_offset(self, gpa: int) -> int:
        page = gpa // PAGE_SIZE
        if gpa < 0 or not any(  # as natively: NotFoundError, whatever the DLL would return
            c.guest_physical_start_page_index <= page < c.guest_physical_start_page_index + c.page_count
            for c in self._chunks()
        ):
            raise NotFoundError(f"GPA {gpa:#x} is not backed by saved memory")
        out = b.UINT64()
        self._call("GuestPhysicalAddressToRawSavedMemoryOffset", gpa, byref(out), context=f"GPA {gpa:#x}")
        return out.value

    def read_guest_raw_saved_memory(self, offset: int, size: int) -> bytes:
        """Raw saved memory as one flat stream; a short (or empty) read marks its end."""
        out = bytearray()
        while len(out) < size:
            want = min(size - len(out), _READ_CHUNK)
            buf = ctypes.create_string_buffer(want)
            got = b.UINT32()
            at = offset + len(out)
            try:
                self._call("ReadGuestRawSavedMemory", at, buf, want, byref(got), context=f"raw offset {at:#x}")
            except (b.DllInvalidArgumentError, b.DllNotFoundError):
                if at >= self.get_guest_raw_saved_memory_size():
                    break  # past the end: the native reader returns b"" here
                raise
            n = min(got.value, want)
            out += buf.raw[:n]
            if n < want:
                break
        return bytes(out)

    def get_guest_raw_saved_memory_size(self) -> int:
        out = b.UINT64()
        self._call("GetGuestRawSavedMemorySize", byref(out))
        return out.value

    def set_memory_block_cache_limit(self, blocks: int) -> None:
        if blocks < 0:
            raise ValueError(f"cache limit {blocks} is negative")
        self._call("SetMemoryBlockCacheLimit", blocks)

    def get_memory_block_cache_limit(self) -> int:
        out = b.UINT64()
        self._call("GetMemoryBlockCacheLimit", byref(out))
        return out.value

    # ------------------------------------------------------------------ native-API conveniences
    # Not DLL exports: built from the calls above so that code written against the native provider
    # (the Volatility layer, ``vmssd read``/``memmap``) also runs on this backend.
    def _chunks(self) -> list[GpaMemoryChunk]:
        if self._chunk_cache is None:
            self._chunk_cache = self.get_guest_physical_memory_chunks()[1]
        return self._chunk_cache

    def read_guest_physical_address_padded(self, gpa: int, size: int) -> bytes:
        """Like :meth:`read_guest_physical_address`, with holes (and short reads) zero-filled."""
        out = bytearray(size)
        end = gpa + size
        for chunk in self._chunks():
            lo = max(gpa, chunk.guest_physical_start_page_index * PAGE_SIZE)
            hi = min(end, (chunk.guest_physical_start_page_index + chunk.page_count) * PAGE_SIZE)
            if lo < hi:
                data = self.read_guest_physical_address(lo, hi - lo)
                out[lo - gpa : lo - gpa + len(data)] = data
        return bytes(out)

    def guest_virtual_to_physical_with_size(self, vp: int, va: int) -> tuple[int, int]:
        """(GPA, bytes to the end of the 4 KiB page).  The DLL does not say how large the mapping page
        is, so this is the conservative size: correct for large pages too, only shorter."""
        self._check_vp(vp)
        return self.guest_virtual_to_physical(vp, va), PAGE_SIZE - (va & (PAGE_SIZE - 1))

    def _raw_runs(self, page: int, count: int) -> list[tuple[int, int, int]]:
        """Split a GPA chunk into runs stored contiguously in raw saved memory: (page, count, raw offset).

        Only GPA -> raw is exported, so breaks are found by bisection: raw offsets increase with the
        GPA in every layout we know, so equal (raw - GPA) at both ends means one contiguous run.
        """
        first = self.guest_physical_address_to_raw_saved_memory_offset(page * PAGE_SIZE)
        last_page = page + count - 1
        last = self.guest_physical_address_to_raw_saved_memory_offset(last_page * PAGE_SIZE)
        if count == 1 or last - first == (count - 1) * PAGE_SIZE:
            return [(page, count, first)]
        half = count // 2
        runs = self._raw_runs(page, half) + self._raw_runs(page + half, count - half)
        merged: list[tuple[int, int, int]] = []
        for run in runs:
            if merged and merged[-1][2] + merged[-1][1] * PAGE_SIZE == run[2]:
                p, n, r = merged.pop()
                run = (p, n + run[1], r)
            merged.append(run)
        return merged

    def _all_runs(self) -> list[tuple[int, int, int]]:
        """(GPA, raw offset, size) of every run stored contiguously, in GPA order."""
        if self._runs is None:
            self._runs = [
                (page * PAGE_SIZE, raw, count * PAGE_SIZE)
                for chunk in self._chunks()
                for page, count, raw in self._raw_runs(chunk.guest_physical_start_page_index, chunk.page_count)
            ]
        return self._runs

    def memory_map(self) -> list[MemoryMapRow]:
        """Per GPA run: start, size, raw saved-memory offset and the 1 MiB RamBlock numbers it uses.

        The DLL does not say which RamBlocks a file holds; every block it maps counts as present.
        """
        out = []
        for gpa, raw, size in self._all_runs():
            first, last = raw // BLOCK_SIZE, (raw + size - 1) // BLOCK_SIZE
            out.append(
                MemoryMapRow(
                    gpa_start=gpa,
                    size=size,
                    raw_offset=raw,
                    first_ramblock=first,
                    last_ramblock=last,
                    ramblocks_present=last - first + 1,
                    flags=None,  # the DLL does not expose the RamMemoryBlock flags
                )
            )
        return out

    def backed_runs(self, gpa: int, length: int) -> Iterator[tuple[int, int, int]]:
        end = gpa + length
        for start, raw, size in self._all_runs():
            lo, hi = max(gpa, start), min(end, start + size)
            if lo < hi:
                yield lo, raw + lo - start, hi - lo

    def is_backed(self, gpa: int, length: int = 1) -> bool:
        if length <= 0 or gpa < 0:
            return False
        covered = gpa
        for start, _raw, size in self.backed_runs(gpa, length):
            if start != covered:
                return False
            covered = start + size
        return covered == gpa + length

    def has_cpu_state(self) -> bool:
        """The DLL opens only files with CPU state (a .vmrs, or a .bin with its .vsv)."""
        return True

    # ------------------------------------------------------------------ summary
    @property
    def dll_info(self) -> dict[str, Any]:
        lib = self.library
        return {
            "path": lib.path,
            "version": ".".join(map(str, lib.version)) if lib.version else None,
            "abi": lib.abi,
        }

    def _summary_facts(self) -> dict[str, Any]:
        return {"decoder": "vmsavedstatedumpprovider.dll", "dll": self.dll_info}


__all__ = ["DllInfo", "DllSavedStateProvider"]
