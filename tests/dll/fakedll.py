"""A stand-in for vmsavedstatedumpprovider.dll that runs anywhere.

Every export is a real ``ctypes.CFUNCTYPE`` callback built from the binding's own prototype table,
so a call from :class:`DllSavedStateProvider` goes through libffi exactly as it would into the
DLL: handles through ``VM_SAVED_STATE_DUMP_HANDLE*``, registers through the 16-byte union (or the
old 24-byte in/out struct), buffers through ``LPVOID``.  The answers come from our native provider,
so native-vs-fake must agree; a wrong offset or type in the binding shows up as a difference.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable
from typing import Any

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.registers import (
    REGISTER_NAMES_BY_ID,
    Architecture,
    SegmentRegister,
    TableRegister,
)
from volatility3_vmssd.dll import binding as b
from volatility3_vmssd.errors import NotFoundError, UnmappedAddressError
from volatility3_vmssd.storage import commit_replay_log


def _signed(hr: int) -> int:
    hr &= 0xFFFFFFFF
    return hr - (1 << 32) if hr & 0x80000000 else hr


class FakeDll:
    """Exports named like the DLL's; ``missing`` leaves some out (an older DLL)."""

    def __init__(self, abi: str = "new", *, too_small: int = b.E_OUTOFMEMORY, missing: Iterable[str] = ()) -> None:
        self.abi = abi
        self.too_small = too_small
        self.providers: dict[int, SavedStateProvider] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.applied: list[str] = []
        self._next = 0x5000
        self._keep: list[Any] = []
        skip = set(missing)
        for name, argtypes in b.PROTOTYPES[abi].items():
            impl = getattr(self, f"_{name}", None)
            if impl is None or name in skip:
                continue
            fn = ctypes.CFUNCTYPE(b.HRESULT, *argtypes)(self._wrap(name, impl))
            self._keep.append(fn)
            setattr(self, name, fn)

    def library(self) -> b.DumpProviderLibrary:
        version = (10, 0, 18362, 1) if self.abi == "old" else (10, 0, 22621, 1)
        return b.DumpProviderLibrary(self, abi=self.abi, path="fake/vmsavedstatedumpprovider.dll", version=version)

    def _wrap(self, name: str, impl: Callable[..., int | None]) -> Callable[..., int]:
        def call(*args: Any) -> int:
            self.calls.append((name, args))
            try:
                return _signed(impl(*args) or 0)
            except UnmappedAddressError:
                return _signed(b.VM_SAVED_STATE_DUMP_E_VA_NOT_MAPPED)
            except (NotFoundError, KeyError, ValueError):
                return _signed(b.E_INVALIDARG)
            except FileNotFoundError:
                return _signed(b.hresult_from_win32(b.ERROR_FILE_NOT_FOUND))
            except Exception:  # the callback must never raise into ctypes
                return _signed(b.E_FAIL)

        return call

    def _p(self, handle: int | None) -> SavedStateProvider:
        if handle not in self.providers:
            raise ValueError(f"bad handle {handle!r}")
        return self.providers[handle]  # type: ignore[index]

    # ---------------------------------------------------------------- lifetime
    def _open(self, provider: SavedStateProvider, out: Any) -> None:
        self._next += 0x10
        self.providers[self._next] = provider
        out[0] = self._next

    def _LoadSavedStateFile(self, path: str, out: Any) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        self._open(SavedStateProvider.load_vmrs(path), out)

    def _LoadSavedStateFiles(self, bin_path: str, vsv_path: str, out: Any) -> None:
        self._open(SavedStateProvider.load_bin_vsv(bin_path, vsv_path), out)

    def _ReleaseSavedStateFiles(self, handle: int) -> None:
        self._p(handle).close()
        del self.providers[handle]

    def _ApplyPendingSavedStateFileReplayLog(self, path: str) -> None:
        """In place, like the DLL: the wrapper must only ever hand it a copy."""
        self.applied.append(path)
        commit_replay_log(path, path + ".fake-commit")
        os.replace(path + ".fake-commit", path)

    # ---------------------------------------------------------------- CPU
    def _GetVpCount(self, h: int, out: Any) -> None:
        out[0] = self._p(h).vp_count()

    def _GetArchitecture(self, h: int, vp: int, out: Any) -> None:
        out[0] = int(self._p(h).get_architecture(vp))

    def _GetPagingMode(self, h: int, vp: int, out: Any) -> None:
        out[0] = int(self._p(h).get_paging_mode(vp))

    def _GetActiveVirtualTrustLevel(self, h: int, vp: int, out: Any) -> None:
        out[0] = self._p(h).get_active_virtual_trust_level(vp)

    def _GetEnabledVirtualTrustLevels(self, h: int, vp: int, out: Any) -> None:
        out[0] = self._p(h).get_enabled_virtual_trust_levels(vp)

    def _GetGuestEnabledVirtualTrustLevels(self, h: int, out: Any) -> None:
        out[0] = self._p(h).get_guest_enabled_virtual_trust_levels()

    def _ForceActiveVirtualTrustLevel(self, h: int, vp: int, vtl: int) -> int | None:
        p = self._p(h)
        if not p.get_enabled_virtual_trust_levels(vp) >> vtl & 1:
            return b.VM_SAVED_STATE_DUMP_E_VP_VTL_NOT_ENABLED
        p.force_active_virtual_trust_level(vp, vtl)
        return None

    def _IsActiveVirtualTrustLevelEnabled(self, h: int, vp: int, out: Any) -> None:
        out[0] = int(self._p(h).is_active_virtual_trust_level_enabled(vp))

    def _InKernelSpace(self, h: int, vp: int, out: Any) -> None:
        out[0] = int(self._p(h).in_kernel_space(vp))

    def _GetGuestOsInfo(self, h: int, vtl: int, out: Any) -> int | None:
        info = self._p(h).get_guest_os_info(vtl)
        if info is None:  # nothing saved for that VTL (the provider maps "not found" to None)
            return _signed(b.VM_SAVED_STATE_DUMP_E_VP_VTL_NOT_ENABLED)
        out.contents.AsUINT64 = info.value
        return None

    def _register(self, h: int, vp: int, name: str) -> Any:
        p = self._p(h)
        if not 0 <= vp < p.vp_count():
            raise ValueError(vp)
        return p.get_registers(vp)[name]  # KeyError -> E_INVALIDARG, as for an id the VP lacks

    def _GetRegisterValue(self, h: int, vp: int, *rest: Any) -> None:
        if self.abi == "old":
            return self._get_register_old(h, vp, rest[0])
        reg_id, out = rest
        value = self._register(h, vp, REGISTER_NAMES_BY_ID[reg_id])
        reg = out.contents
        ctypes.memset(ctypes.addressof(reg), 0, ctypes.sizeof(reg))
        if isinstance(value, SegmentRegister):
            s = reg.X64.Segment
            s.Base, s.Limit, s.Selector, s.Attributes = value.base, value.limit, value.selector, value.attributes
        elif isinstance(value, TableRegister):
            reg.X64.Table.Limit, reg.X64.Table.Base = value.limit, value.base
        else:
            reg.Reg128.Low64 = value & 0xFFFF_FFFF_FFFF_FFFF
            reg.Reg128.High64 = value >> 64
        return None

    def _get_register_old(self, h: int, vp: int, ptr: Any) -> None:
        reg = ptr.contents
        table = b.OLD_REGISTER_IDS_X86 if reg.Architecture == Architecture.X86 else b.OLD_REGISTER_IDS_X64
        part = {v: k for k, v in table.items()}[reg.RegisterId.RegisterId]
        name, _, piece = part.partition(".")
        value = self._register(h, vp, name)
        if isinstance(value, SegmentRegister):
            reg.RegisterValue = value.base if piece == "base" else value.selector
        elif isinstance(value, TableRegister):
            reg.RegisterValue = value.base if piece == "base" else value.limit
        elif piece == "high":
            reg.RegisterValue = value >> 64
        else:
            reg.RegisterValue = value & 0xFFFF_FFFF_FFFF_FFFF

    # ---------------------------------------------------------------- memory
    def _ReadGuestPhysicalAddress(self, h: int, gpa: int, buf: int, size: int, got: Any) -> None:
        data = self._p(h).read_guest_physical_address(gpa, size)
        ctypes.memmove(buf, data, len(data))
        if got:
            got[0] = len(data)

    def _GuestVirtualAddressToPhysicalAddress(self, h: int, vp: int, va: int, out: Any, *rest: Any) -> int | None:
        try:
            out[0] = self._p(h).guest_virtual_to_physical(vp, va)
        except UnmappedAddressError:
            if rest and rest[0]:
                rest[0][0] = 0x1000 - (va & 0xFFF)
            return b.VM_SAVED_STATE_DUMP_E_VA_NOT_MAPPED
        return None

    def _GetGuestPhysicalMemoryChunks(self, h: int, page_size: Any, chunks: Any, count: Any) -> int | None:
        size, have = self._p(h).get_guest_physical_memory_chunks()
        page_size[0] = size
        if count[0] < len(have):
            count[0] = len(have)
            return self.too_small
        for i, c in enumerate(have):
            chunks[i].GuestPhysicalStartPageIndex = c.guest_physical_start_page_index
            chunks[i].PageCount = c.page_count
        count[0] = len(have)
        return None

    def _GuestPhysicalAddressToRawSavedMemoryOffset(self, h: int, gpa: int, out: Any) -> None:
        out[0] = self._p(h).guest_physical_address_to_raw_saved_memory_offset(gpa)

    def _ReadGuestRawSavedMemory(self, h: int, offset: int, buf: int, size: int, got: Any) -> None:
        data = self._p(h).read_guest_raw_saved_memory(offset, size)
        ctypes.memmove(buf, data, len(data))
        if got:
            got[0] = len(data)

    def _GetGuestRawSavedMemorySize(self, h: int, out: Any) -> None:
        out[0] = self._p(h).get_guest_raw_saved_memory_size()

    def _SetMemoryBlockCacheLimit(self, h: int, limit: int) -> None:
        self._p(h).set_memory_block_cache_limit(limit)

    def _GetMemoryBlockCacheLimit(self, h: int, out: Any) -> None:
        out[0] = self._p(h).get_memory_block_cache_limit()
