"""ctypes binding of Microsoft's ``vmsavedstatedumpprovider.dll`` (docs/format.md#dll-api), both ABI generations.

Nothing here touches Windows at import time: the structures and prototype tables are plain ctypes
declarations (so their layout can be unit-tested on any OS), and ``ctypes.WinDLL`` is looked up
only inside :meth:`DumpProviderLibrary.load`.

Two ABI generations exist and cannot be told apart from the exports, only from the file version:

* **old** (SDK 10.0.18362 and earlier): ``GetRegisterValue(handle, vpId, VIRTUAL_PROCESSOR_REGISTER_OLD*)``
  where the caller fills ``Architecture`` and ``RegisterId`` (per-architecture enums with
  Low/High halves of 128-bit registers) and the DLL fills ``RegisterValue``;
  ``GuestVirtualAddressToPhysicalAddress`` has four parameters.
* **new**: ``GetRegisterValue(handle, vpId, DWORD registerId, VIRTUAL_PROCESSOR_REGISTER*)`` with the
  single ``REGISTER_ID`` enum and a 16-byte union; ``GuestVirtualAddressToPhysicalAddress`` gains an
  optional ``unmappedRegionSize`` out parameter.

HRESULT is declared as a signed 32-bit int (not ``ctypes.HRESULT``, which exists only on Windows and
would raise ``OSError`` itself) and mapped to this package's exceptions by :func:`hresult_error`.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from ctypes import (
    POINTER,
    Structure,
    Union,
    c_char_p,
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
    c_wchar_p,
)
from typing import Any

from ..errors import (
    BackendUnavailableError,
    FormatError,
    NotFoundError,
    UnmappedAddressError,
    UnsupportedError,
    VmssdError,
)

# ---------------------------------------------------------------------------------------------
# Scalar types (Windows LLP64 sizes, spelled out so they are right on any host)
# ---------------------------------------------------------------------------------------------

HRESULT = c_int32
BOOL = c_int32  # Win32 BOOL is a 32-bit int (c_long is 64-bit on Linux, so not that)
DWORD = c_uint32
UINT8 = c_uint8
UINT16 = c_uint16
UINT32 = c_uint32
UINT64 = c_uint64
ENUM = c_int32  # MSVC enums are int
VM_SAVED_STATE_DUMP_HANDLE = c_void_p
GUEST_VIRTUAL_ADDRESS = c_uint64
GUEST_PHYSICAL_ADDRESS = c_uint64
LPCWSTR = c_wchar_p
LPWSTR_OUT = c_void_p  # an LPWSTR the DLL allocates; kept raw so that it can be LocalFree'd
LPVOID = c_void_p
LPCSTR = c_char_p

DLL_NAME = "vmsavedstatedumpprovider.dll"

# ---------------------------------------------------------------------------------------------
# Structures (VmSavedStateDumpDefs.h)
# ---------------------------------------------------------------------------------------------


class GPA_MEMORY_CHUNK(Structure):
    _fields_ = [("GuestPhysicalStartPageIndex", UINT64), ("PageCount", UINT64)]


class _GuestOsInfoClosedSource(Structure):
    _fields_ = [
        ("BuildNumber", UINT64, 16),
        ("ServiceVersion", UINT64, 8),
        ("MinorVersion", UINT64, 8),
        ("MajorVersion", UINT64, 8),
        ("OsId", UINT64, 8),
        ("VendorId", UINT64, 16),
    ]


class _GuestOsInfoOpenSource(Structure):
    _fields_ = [
        ("VendorSpecific1", UINT64, 16),
        ("Version", UINT64, 32),
        ("VendorSpecific2", UINT64, 8),
        ("OsId", UINT64, 7),
        ("IsOpenSource", UINT64, 1),
    ]


class GUEST_OS_INFO(Union):
    """HV_GUEST_OS_ID as a union; we decode ``AsUINT64`` with the native decoder."""

    _fields_ = [
        ("AsUINT64", UINT64),
        ("ClosedSource", _GuestOsInfoClosedSource),
        ("OpenSource", _GuestOsInfoOpenSource),
    ]


class REG128(Structure):
    _fields_ = [("Low64", UINT64), ("High64", UINT64)]


class X64_SEGMENT_REGISTER(Structure):
    """Segment with hidden state; ``Attributes`` bits are decoded by ``SegmentRegister``."""

    _fields_ = [("Base", UINT64), ("Limit", UINT32), ("Selector", UINT16), ("Attributes", UINT16)]


class X64_TABLE_REGISTER(Structure):
    """Not packed in the header: natural alignment puts ``Base`` at 8, not 2."""

    _fields_ = [("Limit", UINT16), ("Base", UINT64)]


class _FpEipCs(Structure):
    _fields_ = [("LastFpEip", UINT32), ("LastFpCs", UINT16)]


class _FpLastIp(Union):
    _anonymous_ = ("_eip",)
    _fields_ = [("LastFpRip", UINT64), ("_eip", _FpEipCs)]


class X64_FP_CONTROL_STATUS_REGISTER(Structure):
    _anonymous_ = ("_ip",)
    _fields_ = [
        ("FpControl", UINT16),
        ("FpStatus", UINT16),
        ("FpTag", UINT8),
        ("Reserved", UINT8),
        ("LastFpOp", UINT16),
        ("_ip", _FpLastIp),
    ]


class _FpDpDs(Structure):
    _fields_ = [("LastFpDp", UINT32), ("LastFpDs", UINT16)]


class _FpLastDp(Union):
    _anonymous_ = ("_dp",)
    _fields_ = [("LastFpRdp", UINT64), ("_dp", _FpDpDs)]


class X64_XMM_CONTROL_STATUS_REGISTER(Structure):
    _anonymous_ = ("_dp",)
    _fields_ = [("_dp", _FpLastDp), ("XmmStatusControl", UINT32), ("XmmStatusControlMask", UINT32)]


class _X64Register(Union):
    _fields_ = [
        ("Segment", X64_SEGMENT_REGISTER),
        ("Table", X64_TABLE_REGISTER),
        ("FpControlStatus", X64_FP_CONTROL_STATUS_REGISTER),
        ("XmmControlStatus", X64_XMM_CONTROL_STATUS_REGISTER),
    ]


class VIRTUAL_PROCESSOR_REGISTER(Union):
    """The new-ABI 16-byte register value union."""

    _fields_ = [
        ("Reg64", UINT64),
        ("Reg32", UINT32),
        ("Reg16", UINT16),
        ("Reg8", UINT8),
        ("Reg128", REG128),
        ("X64", _X64Register),
    ]


class _RegisterRawId(Union):
    _fields_ = [("RegisterId", DWORD), ("RegisterIdX86", ENUM), ("RegisterIdX64", ENUM)]


class VIRTUAL_PROCESSOR_REGISTER_OLD(Structure):
    """The old-ABI in/out register: caller sets Architecture and RegisterId, the DLL RegisterValue."""

    _fields_ = [("Architecture", ENUM), ("RegisterValue", UINT64), ("RegisterId", _RegisterRawId)]


class DOS_IMAGE_INFO(Structure):
    _fields_ = [("PdbName", LPCSTR), ("ImageBaseAddress", UINT64), ("ImageSize", DWORD), ("Timestamp", UINT32)]


class MODULE_INFO(Structure):
    _fields_ = [("ProcessImageName", LPCSTR), ("Image", DOS_IMAGE_INFO)]


# ---------------------------------------------------------------------------------------------
# Old REGISTER_ID_X64 / REGISTER_ID_X86 (SDK 10.0.18362 and earlier; docs/format.md#dll-api)
# ---------------------------------------------------------------------------------------------


def _old_register_ids(gprs: tuple[str, ...]) -> dict[str, int]:
    """Raw ids of one old per-architecture enum, keyed by our names plus ``.low``/``.high``/``.base``
    /``.limit`` suffixes for the parts the old API splits."""
    ids: dict[str, int] = {name: i for i, name in enumerate(gprs)}
    n = len(gprs)
    for i in range(16):
        ids[f"xmm{i}.low"] = n + 2 * i
        ids[f"xmm{i}.high"] = n + 2 * i + 1
    n += 32
    for name in ("xmmcontrolstatus", "fpcontrolstatus"):
        ids[f"{name}.low"] = n
        ids[f"{name}.high"] = n + 1
        n += 2
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7"):
        ids[name] = n
        n += 1
    for name in ("gs.base", "fs.base", "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"):
        ids[name] = n
        n += 1
    for name in ("idtr.base", "idtr.limit", "gdtr.base", "gdtr.limit"):
        ids[name] = n
        n += 1
    ids["count"] = n
    return ids


OLD_REGISTER_IDS_X64: dict[str, int] = _old_register_ids(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)), "rip", "rflags")
)
# x86 has ten GPRs (Eax..Edi, Eip, EFlags); our register dicts use the 64-bit names for them.
OLD_REGISTER_IDS_X86: dict[str, int] = _old_register_ids(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "rip", "rflags")
)

# ---------------------------------------------------------------------------------------------
# Prototypes: parameter types exactly as in VmSavedStateDump.h (restype is HRESULT for all)
# ---------------------------------------------------------------------------------------------

_P = POINTER
PROTOTYPES_NEW: dict[str, tuple[Any, ...]] = {
    "LocateSavedStateFiles": (LPCWSTR, LPCWSTR, _P(LPWSTR_OUT), _P(LPWSTR_OUT), _P(LPWSTR_OUT)),
    "LoadSavedStateFile": (LPCWSTR, _P(VM_SAVED_STATE_DUMP_HANDLE)),
    "ApplyPendingSavedStateFileReplayLog": (LPCWSTR,),
    "LoadSavedStateFiles": (LPCWSTR, LPCWSTR, _P(VM_SAVED_STATE_DUMP_HANDLE)),
    "ReleaseSavedStateFiles": (VM_SAVED_STATE_DUMP_HANDLE,),
    "GetGuestEnabledVirtualTrustLevels": (VM_SAVED_STATE_DUMP_HANDLE, _P(UINT32)),
    "GetGuestOsInfo": (VM_SAVED_STATE_DUMP_HANDLE, UINT8, _P(GUEST_OS_INFO)),
    "GetVpCount": (VM_SAVED_STATE_DUMP_HANDLE, _P(UINT32)),
    "GetArchitecture": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(ENUM)),
    "ForceArchitecture": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, ENUM),
    "GetActiveVirtualTrustLevel": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(UINT8)),
    "GetEnabledVirtualTrustLevels": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(UINT32)),
    "ForceActiveVirtualTrustLevel": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, UINT8),
    "IsActiveVirtualTrustLevelEnabled": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(BOOL)),
    "IsNestedVirtualizationEnabled": (VM_SAVED_STATE_DUMP_HANDLE, _P(BOOL)),
    "GetNestedVirtualizationMode": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(BOOL)),
    "ForceNestedHostMode": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, BOOL, _P(BOOL)),
    "InKernelSpace": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(BOOL)),
    "GetRegisterValue": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, DWORD, _P(VIRTUAL_PROCESSOR_REGISTER)),
    "GetPagingMode": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(ENUM)),
    "ForcePagingMode": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, ENUM),
    "ReadGuestPhysicalAddress": (VM_SAVED_STATE_DUMP_HANDLE, GUEST_PHYSICAL_ADDRESS, LPVOID, UINT32, _P(UINT32)),
    "GuestVirtualAddressToPhysicalAddress": (
        VM_SAVED_STATE_DUMP_HANDLE,
        UINT32,
        GUEST_VIRTUAL_ADDRESS,
        _P(GUEST_PHYSICAL_ADDRESS),
        _P(GUEST_VIRTUAL_ADDRESS),
    ),
    "GetGuestPhysicalMemoryChunks": (VM_SAVED_STATE_DUMP_HANDLE, _P(UINT64), _P(GPA_MEMORY_CHUNK), _P(UINT64)),
    "GuestPhysicalAddressToRawSavedMemoryOffset": (VM_SAVED_STATE_DUMP_HANDLE, GUEST_PHYSICAL_ADDRESS, _P(UINT64)),
    "ReadGuestRawSavedMemory": (VM_SAVED_STATE_DUMP_HANDLE, UINT64, LPVOID, UINT32, _P(UINT32)),
    "GetGuestRawSavedMemorySize": (VM_SAVED_STATE_DUMP_HANDLE, _P(UINT64)),
    "SetMemoryBlockCacheLimit": (VM_SAVED_STATE_DUMP_HANDLE, UINT64),
    "GetMemoryBlockCacheLimit": (VM_SAVED_STATE_DUMP_HANDLE, _P(UINT64)),
    "ApplyGuestMemoryFix": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, GUEST_VIRTUAL_ADDRESS, LPVOID, UINT32),
}
PROTOTYPES_OLD: dict[str, tuple[Any, ...]] = {
    **PROTOTYPES_NEW,
    "GetRegisterValue": (VM_SAVED_STATE_DUMP_HANDLE, UINT32, _P(VIRTUAL_PROCESSOR_REGISTER_OLD)),
    "GuestVirtualAddressToPhysicalAddress": (
        VM_SAVED_STATE_DUMP_HANDLE,
        UINT32,
        GUEST_VIRTUAL_ADDRESS,
        _P(GUEST_PHYSICAL_ADDRESS),
    ),
}
PROTOTYPES: dict[str, dict[str, tuple[Any, ...]]] = {"new": PROTOTYPES_NEW, "old": PROTOTYPES_OLD}
# Declared without WINAPI in the header, i.e. __cdecl; only differs from WINAPI on 32-bit x86.
CDECL_FUNCTIONS = frozenset({"GetMemoryBlockCacheLimit"})

# The 10.0.18362 header is old (rafawo/vmsavedstatetodump-rs builds against it); the next SDK is
# 10.0.19041 and the header copies of the new ABI are undated, so this boundary is inferred, not seen.  It can be
# overridden with abi="old"/"new" or the environment variable below.
NEW_ABI_FIRST_BUILD = 19041
ABI_ENV = "VMSSD_DUMP_PROVIDER_ABI"


def abi_for_version(version: tuple[int, int, int, int] | None) -> str:
    """'old' for a 10.0.18362/18363 DLL, 'new' for anything later (or unknown)."""
    if version is not None and version[:2] == (10, 0) and version[2] < NEW_ABI_FIRST_BUILD:
        return "old"
    return "new"


# ---------------------------------------------------------------------------------------------
# HRESULTs
# ---------------------------------------------------------------------------------------------

S_OK = 0
E_NOTIMPL = 0x80004001
E_POINTER = 0x80004003
E_FAIL = 0x80004005
E_UNEXPECTED = 0x8000FFFF
E_OUTOFMEMORY = 0x8007000E
E_INVALIDARG = 0x80070057
E_ACCESSDENIED = 0x80070005


def hresult_from_win32(code: int) -> int:
    return code if code <= 0 else (code & 0xFFFF) | 0x80070000


ERROR_FILE_NOT_FOUND = 2
ERROR_PATH_NOT_FOUND = 3
ERROR_ACCESS_DENIED = 5
ERROR_BAD_FORMAT = 11
ERROR_INVALID_DATA = 13
ERROR_SHARING_VIOLATION = 32
ERROR_INSUFFICIENT_BUFFER = 122
ERROR_FILE_CORRUPT = 1392
HRESULT_INSUFFICIENT_BUFFER = hresult_from_win32(ERROR_INSUFFICIENT_BUFFER)

# winerror.h (the SDK's VM_SAVED_STATE_DUMP_E_* facility 0x37; values confirmed against the
# TerraFX port of the 10.0.22621 winerror.h).  0x505-0x508 were *_NOT_PRESENT page-walk failures in
# older headers; 0x505 was reused for VA_NOT_MAPPED and 0x506 for INVALID_VP_STATE.
VM_SAVED_STATE_DUMP_E_PARTITION_STATE_NOT_FOUND = 0xC0370500
VM_SAVED_STATE_DUMP_E_GUEST_MEMORY_NOT_FOUND = 0xC0370501
VM_SAVED_STATE_DUMP_E_NO_VP_FOUND_IN_PARTITION_STATE = 0xC0370502
VM_SAVED_STATE_DUMP_E_NESTED_VIRTUALIZATION_NOT_SUPPORTED = 0xC0370503
VM_SAVED_STATE_DUMP_E_WINDOWS_KERNEL_IMAGE_NOT_FOUND = 0xC0370504
VM_SAVED_STATE_DUMP_E_VA_NOT_MAPPED = 0xC0370505
VM_SAVED_STATE_DUMP_E_INVALID_VP_STATE = 0xC0370506
VM_SAVED_STATE_DUMP_E_PDE_NOT_PRESENT = 0xC0370507
VM_SAVED_STATE_DUMP_E_PTE_NOT_PRESENT = 0xC0370508
VM_SAVED_STATE_DUMP_E_VP_VTL_NOT_ENABLED = 0xC0370509


class DllCallError(VmssdError):
    """A DLL function returned a failure HRESULT. ``hresult`` is unsigned; ``function`` names the call."""

    hresult: int = 0
    function: str = ""
    code_name: str = ""

    @classmethod
    def make(cls, message: str, hresult: int, function: str, code_name: str) -> DllCallError:
        # Built this way because OSError-derived subclasses reject keyword arguments.
        err = cls(message)
        err.hresult, err.function, err.code_name = hresult, function, code_name
        return err


class DllNotFoundError(DllCallError, NotFoundError):
    pass


class DllUnmappedAddressError(DllCallError, UnmappedAddressError):
    address: int | None = None
    unmapped_size: int | None = None

    def __init__(self, message: str) -> None:  # UnmappedAddressError wants an address; set later
        Exception.__init__(self, message)


class DllUnsupportedError(DllCallError, UnsupportedError):
    pass


class DllInvalidArgumentError(DllCallError, ValueError):
    pass


class DllOutOfMemoryError(DllCallError, MemoryError):
    pass


class DllFileNotFoundError(DllCallError, FileNotFoundError):
    pass


class DllAccessDeniedError(DllCallError, PermissionError):
    pass


class DllFormatError(DllCallError, FormatError):
    def __init__(self, message: str) -> None:  # FormatError wants (path, offset, expected)
        Exception.__init__(self, message)
        self.path, self.offset, self.expected = None, None, message


# code -> (symbolic name, exception class, what it means to a user)
HRESULT_TABLE: dict[int, tuple[str, type[DllCallError], str]] = {
    VM_SAVED_STATE_DUMP_E_PARTITION_STATE_NOT_FOUND: (
        "VM_SAVED_STATE_DUMP_E_PARTITION_STATE_NOT_FOUND",
        DllNotFoundError,
        "no partition state: not a saved state (a runtime-state or configuration file?)",
    ),
    VM_SAVED_STATE_DUMP_E_GUEST_MEMORY_NOT_FOUND: (
        "VM_SAVED_STATE_DUMP_E_GUEST_MEMORY_NOT_FOUND",
        DllNotFoundError,
        "no saved guest memory",
    ),
    VM_SAVED_STATE_DUMP_E_NO_VP_FOUND_IN_PARTITION_STATE: (
        "VM_SAVED_STATE_DUMP_E_NO_VP_FOUND_IN_PARTITION_STATE",
        DllNotFoundError,
        "the partition state holds no virtual processor",
    ),
    VM_SAVED_STATE_DUMP_E_NESTED_VIRTUALIZATION_NOT_SUPPORTED: (
        "VM_SAVED_STATE_DUMP_E_NESTED_VIRTUALIZATION_NOT_SUPPORTED",
        DllUnsupportedError,
        "nested virtualization is not supported for this request",
    ),
    VM_SAVED_STATE_DUMP_E_WINDOWS_KERNEL_IMAGE_NOT_FOUND: (
        "VM_SAVED_STATE_DUMP_E_WINDOWS_KERNEL_IMAGE_NOT_FOUND",
        DllNotFoundError,
        "the Windows kernel image was not found in guest memory",
    ),
    VM_SAVED_STATE_DUMP_E_VA_NOT_MAPPED: (
        "VM_SAVED_STATE_DUMP_E_VA_NOT_MAPPED",
        DllUnmappedAddressError,
        "the virtual address is not mapped",
    ),
    VM_SAVED_STATE_DUMP_E_INVALID_VP_STATE: (
        "VM_SAVED_STATE_DUMP_E_INVALID_VP_STATE",
        DllCallError,
        "the virtual processor state is invalid for this request",
    ),
    VM_SAVED_STATE_DUMP_E_PDE_NOT_PRESENT: (
        "VM_SAVED_STATE_DUMP_E_PDE_NOT_PRESENT",
        DllUnmappedAddressError,
        "page directory entry not present",
    ),
    VM_SAVED_STATE_DUMP_E_PTE_NOT_PRESENT: (
        "VM_SAVED_STATE_DUMP_E_PTE_NOT_PRESENT",
        DllUnmappedAddressError,
        "page table entry not present",
    ),
    VM_SAVED_STATE_DUMP_E_VP_VTL_NOT_ENABLED: (
        "VM_SAVED_STATE_DUMP_E_VP_VTL_NOT_ENABLED",
        DllNotFoundError,
        "that virtual trust level is not enabled on the virtual processor",
    ),
    E_INVALIDARG: ("E_INVALIDARG", DllInvalidArgumentError, "invalid argument"),
    E_POINTER: ("E_POINTER", DllInvalidArgumentError, "invalid pointer"),
    E_OUTOFMEMORY: ("E_OUTOFMEMORY", DllOutOfMemoryError, "out of memory (or a buffer too small)"),
    HRESULT_INSUFFICIENT_BUFFER: ("ERROR_INSUFFICIENT_BUFFER", DllOutOfMemoryError, "buffer too small"),
    E_NOTIMPL: ("E_NOTIMPL", DllUnsupportedError, "not implemented by this DLL"),
    E_ACCESSDENIED: ("E_ACCESSDENIED", DllAccessDeniedError, "access denied"),
    hresult_from_win32(ERROR_FILE_NOT_FOUND): ("ERROR_FILE_NOT_FOUND", DllFileNotFoundError, "file not found"),
    hresult_from_win32(ERROR_PATH_NOT_FOUND): ("ERROR_PATH_NOT_FOUND", DllFileNotFoundError, "path not found"),
    hresult_from_win32(ERROR_SHARING_VIOLATION): (
        "ERROR_SHARING_VIOLATION",
        DllAccessDeniedError,
        "the file is in use (a running VM or another open handle holds it)",
    ),
    hresult_from_win32(ERROR_FILE_CORRUPT): ("ERROR_FILE_CORRUPT", DllFormatError, "the file is corrupt"),
    hresult_from_win32(ERROR_BAD_FORMAT): ("ERROR_BAD_FORMAT", DllFormatError, "not a format the DLL reads"),
    hresult_from_win32(ERROR_INVALID_DATA): ("ERROR_INVALID_DATA", DllFormatError, "invalid data"),
    E_FAIL: ("E_FAIL", DllCallError, "unspecified failure"),
    E_UNEXPECTED: ("E_UNEXPECTED", DllCallError, "unexpected failure"),
}


def failed(hr: int) -> bool:
    return bool(hr & 0x80000000)


def hresult_error(hr: int, function: str, context: str = "") -> DllCallError:
    """The exception for a failure HRESULT; unknown codes become a plain DllCallError with the hex code."""
    code = hr & 0xFFFFFFFF
    name, cls, meaning = HRESULT_TABLE.get(code, ("", DllCallError, "unknown HRESULT"))
    label = f"{name} ({code:#010x})" if name else f"HRESULT {code:#010x}"
    where = f" [{context}]" if context else ""
    return cls.make(f"{function}{where} failed: {label}: {meaning}", code, function, name)


def check(hr: int, function: str, context: str = "") -> int:
    if failed(hr):
        raise hresult_error(hr, function, context)
    return hr


# ---------------------------------------------------------------------------------------------
# The loaded library
# ---------------------------------------------------------------------------------------------


def is_windows() -> bool:
    return sys.platform == "win32"


def platform_name() -> str:
    return {"linux": "Linux", "darwin": "macOS", "win32": "Windows", "cygwin": "Cygwin"}.get(sys.platform, sys.platform)


def unavailable_message() -> str:
    return (
        f"the DLL backend is unavailable on {platform_name()}: vmsavedstatedumpprovider.dll is a Windows DLL"
        " (use the native backend, or run on Windows with the Windows SDK installed; see docs/windows-dll.md)"
    )


class DumpProviderLibrary:
    """The DLL with its prototypes set, plus the ABI generation to call it with.

    ``dll`` is anything whose attributes are ctypes function pointers: a ``ctypes.WinDLL`` on
    Windows, or (in tests) an object of ``CFUNCTYPE`` callbacks, which exercises the same
    marshalling through libffi on any OS.
    """

    def __init__(self, dll: Any, *, abi: str, path: str | None = None, version: tuple[int, ...] | None = None) -> None:
        if abi not in PROTOTYPES:
            raise ValueError(f"abi must be 'old' or 'new', not {abi!r}")
        self.dll = dll
        self.abi = abi
        self.path = path
        self.version = version
        self._cdecl: Any = None
        self._functions: dict[str, Callable[..., int]] = {}
        self.lock = threading.RLock()  # the DLL's thread safety is undocumented: serialise calls

    @classmethod
    def load(cls, info: Any, *, abi: str | None = None) -> DumpProviderLibrary:
        """Load a vetted DLL (a :class:`~.discovery.DllInfo`). Windows only; refused elsewhere."""
        if not is_windows():
            raise BackendUnavailableError(unavailable_message())
        with _CACHE_LOCK:
            key = (os.path.normcase(os.fspath(info.path)), abi)
            cached = _LIBRARY_CACHE.get(key)
            if cached is not None:
                return cached
            win_dll = getattr(ctypes, "WinDLL")  # noqa: B009 - only exists on Windows; looked up here, never at import
            try:
                dll = win_dll(os.fspath(info.path))
            except OSError as exc:
                raise BackendUnavailableError(f"cannot load {info.path}: {exc}") from exc
            chosen = abi or os.environ.get(ABI_ENV) or getattr(info, "abi", None) or abi_for_version(info.version)
            lib = cls(dll, abi=chosen, path=os.fspath(info.path), version=info.version)
            if ctypes.sizeof(ctypes.c_void_p) == 4:  # x86: WINAPI (stdcall) and cdecl differ
                lib._cdecl = ctypes.CDLL(os.fspath(info.path), handle=dll._handle)
            _LIBRARY_CACHE[key] = lib
            return lib

    def has(self, name: str) -> bool:
        try:
            self.function(name)
        except UnsupportedError:
            return False
        return True

    def function(self, name: str) -> Callable[..., int]:
        """The export with argtypes/restype set for this ABI; UnsupportedError if the DLL lacks it."""
        fn = self._functions.get(name)
        if fn is not None:
            return fn
        argtypes = PROTOTYPES[self.abi].get(name)
        if argtypes is None:
            raise UnsupportedError(f"{name} is not bound by volatility3_vmssd.dll.binding")
        source = self._cdecl if (self._cdecl is not None and name in CDECL_FUNCTIONS) else self.dll
        try:
            fn = getattr(source, name)
        except AttributeError:
            version = ".".join(map(str, self.version)) if self.version else "unknown version"
            raise UnsupportedError(
                f"{name} is not exported by {self.path or DLL_NAME} ({version}); a newer Windows SDK has it"
            ) from None
        fn.argtypes = list(argtypes)
        fn.restype = HRESULT
        self._functions[name] = fn
        return fn

    def call(self, name: str, *args: Any, context: str = "", accept: frozenset[int] = frozenset()) -> int:
        """Call ``name``; a failure HRESULT not in ``accept`` raises the mapped exception."""
        fn = self.function(name)
        with self.lock:
            hr = int(fn(*args)) & 0xFFFFFFFF
        if failed(hr) and hr not in accept:
            raise hresult_error(hr, name, context)
        return hr


_LIBRARY_CACHE: dict[tuple[str, str | None], DumpProviderLibrary] = {}
_CACHE_LOCK = threading.Lock()
