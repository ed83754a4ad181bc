"""The ctypes binding checked against the C declarations (spec §8): layouts, prototypes, HRESULTs."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from ctypes import POINTER, c_int32, c_uint8, c_uint32, c_uint64, c_void_p, c_wchar_p
from pathlib import Path

import pytest
from fakedll import FakeDll

from volatility3_vmssd.dll import binding as b
from volatility3_vmssd.errors import (
    FormatError,
    NotFoundError,
    UnmappedAddressError,
    UnsupportedError,
    VmssdError,
)

REPO = Path(__file__).resolve().parents[2]
PTR64 = ctypes.sizeof(ctypes.c_void_p) == 8

# --------------------------------------------------------------------------- structure layouts
# (size, {field: offset}) from VmSavedStateDumpDefs.h with MSVC natural alignment.
LAYOUTS: dict[type, tuple[int, dict[str, int]]] = {
    b.GPA_MEMORY_CHUNK: (16, {"GuestPhysicalStartPageIndex": 0, "PageCount": 8}),
    b.GUEST_OS_INFO: (8, {"AsUINT64": 0, "ClosedSource": 0, "OpenSource": 0}),
    b.REG128: (16, {"Low64": 0, "High64": 8}),
    b.VIRTUAL_PROCESSOR_REGISTER: (16, {"Reg64": 0, "Reg32": 0, "Reg16": 0, "Reg8": 0, "Reg128": 0, "X64": 0}),
    b.X64_SEGMENT_REGISTER: (16, {"Base": 0, "Limit": 8, "Selector": 12, "Attributes": 14}),
    b.X64_TABLE_REGISTER: (16, {"Limit": 0, "Base": 8}),
    b.X64_FP_CONTROL_STATUS_REGISTER: (
        16,
        {"FpControl": 0, "FpStatus": 2, "FpTag": 4, "Reserved": 5, "LastFpOp": 6, "LastFpRip": 8},
    ),
    b.X64_XMM_CONTROL_STATUS_REGISTER: (16, {"LastFpRdp": 0, "XmmStatusControl": 8, "XmmStatusControlMask": 12}),
    # Old ABI: {enum Architecture; UINT64 RegisterValue; union {DWORD ...} RegisterId} -> padding after the enum.
    b.VIRTUAL_PROCESSOR_REGISTER_OLD: (24, {"Architecture": 0, "RegisterValue": 8, "RegisterId": 16}),
}
LAYOUTS_64: dict[type, tuple[int, dict[str, int]]] = {
    b.DOS_IMAGE_INFO: (24, {"PdbName": 0, "ImageBaseAddress": 8, "ImageSize": 16, "Timestamp": 20}),
    b.MODULE_INFO: (32, {"ProcessImageName": 0, "Image": 8}),
}


def _offset(struct: type, field: str) -> int:
    return getattr(struct, field).offset


@pytest.mark.parametrize("struct", list(LAYOUTS), ids=lambda s: s.__name__)
def test_structure_sizes_and_offsets(struct: type) -> None:
    size, fields = LAYOUTS[struct]
    assert ctypes.sizeof(struct) == size
    assert {f: _offset(struct, f) for f in fields} == fields


@pytest.mark.skipif(not PTR64, reason="pointer-bearing structures are laid out for 64-bit here")
@pytest.mark.parametrize("struct", list(LAYOUTS_64), ids=lambda s: s.__name__)
def test_pointer_structure_layouts(struct: type) -> None:
    size, fields = LAYOUTS_64[struct]
    assert ctypes.sizeof(struct) == size
    assert {f: _offset(struct, f) for f in fields} == fields


def test_nested_union_members_overlay_as_in_the_header() -> None:
    reg = b.VIRTUAL_PROCESSOR_REGISTER()
    reg.Reg128.Low64, reg.Reg128.High64 = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888
    assert reg.Reg64 == 0x1111_2222_3333_4444 and reg.Reg32 == 0x3333_4444 and reg.Reg8 == 0x44
    assert reg.X64.Segment.Base == 0x1111_2222_3333_4444
    assert (reg.X64.Segment.Limit, reg.X64.Segment.Selector, reg.X64.Segment.Attributes) == (
        0x7777_8888,
        0x6666,
        0x5555,
    )
    assert (reg.X64.Table.Limit, reg.X64.Table.Base) == (0x4444, 0x5555_6666_7777_8888)
    fp = reg.X64.FpControlStatus
    assert (fp.FpControl, fp.FpStatus, fp.FpTag, fp.LastFpOp) == (0x4444, 0x3333, 0x22, 0x1111)
    assert fp.LastFpRip == 0x5555_6666_7777_8888 and (fp.LastFpEip, fp.LastFpCs) == (0x7777_8888, 0x6666)
    xmm = reg.X64.XmmControlStatus
    assert (xmm.LastFpDp, xmm.LastFpDs) == (0x3333_4444, 0x2222)
    assert (xmm.XmmStatusControl, xmm.XmmStatusControlMask) == (0x7777_8888, 0x5555_6666)


def test_guest_os_info_bitfields() -> None:
    info = b.GUEST_OS_INFO()
    info.AsUINT64 = 0x0001_040A_0000_4F7C  # Microsoft Windows NT 10.0 build 20348
    c = info.ClosedSource
    assert (c.VendorId, c.OsId, c.MajorVersion, c.MinorVersion, c.ServiceVersion, c.BuildNumber) == (
        1,
        4,
        10,
        0,
        0,
        0x4F7C,
    )
    info.AsUINT64 = 1 << 63 | 1 << 56 | 0x0006_0100 << 16 | 0xBEEF
    o = info.OpenSource
    assert (o.IsOpenSource, o.OsId, o.Version, o.VendorSpecific1) == (1, 1, 0x0006_0100, 0xBEEF)


# --------------------------------------------------------------------------- prototypes
# Written from the spec's parameter lists (§8) and the header, independently of the binding.
T = {
    "HANDLE": c_void_p,
    "HANDLE*": POINTER(c_void_p),
    "LPCWSTR": c_wchar_p,
    "LPWSTR*": POINTER(c_void_p),
    "UINT8": c_uint8,
    "UINT8*": POINTER(c_uint8),
    "UINT32": c_uint32,
    "UINT32*": POINTER(c_uint32),
    "DWORD": c_uint32,
    "UINT64": c_uint64,
    "UINT64*": POINTER(c_uint64),
    "BOOL": c_int32,
    "BOOL*": POINTER(c_int32),
    "ENUM": c_int32,
    "ENUM*": POINTER(c_int32),
    "LPVOID": c_void_p,
    "GUEST_OS_INFO*": POINTER(b.GUEST_OS_INFO),
    "VPR*": POINTER(b.VIRTUAL_PROCESSOR_REGISTER),
    "VPR_OLD*": POINTER(b.VIRTUAL_PROCESSOR_REGISTER_OLD),
    "GPA_MEMORY_CHUNK*": POINTER(b.GPA_MEMORY_CHUNK),
}
SPEC_NEW: dict[str, tuple[str, ...]] = {
    "LocateSavedStateFiles": ("LPCWSTR", "LPCWSTR", "LPWSTR*", "LPWSTR*", "LPWSTR*"),
    "LoadSavedStateFile": ("LPCWSTR", "HANDLE*"),
    "ApplyPendingSavedStateFileReplayLog": ("LPCWSTR",),
    "LoadSavedStateFiles": ("LPCWSTR", "LPCWSTR", "HANDLE*"),
    "ReleaseSavedStateFiles": ("HANDLE",),
    "GetGuestEnabledVirtualTrustLevels": ("HANDLE", "UINT32*"),
    "GetGuestOsInfo": ("HANDLE", "UINT8", "GUEST_OS_INFO*"),
    "GetVpCount": ("HANDLE", "UINT32*"),
    "GetArchitecture": ("HANDLE", "UINT32", "ENUM*"),
    "ForceArchitecture": ("HANDLE", "UINT32", "ENUM"),
    "GetActiveVirtualTrustLevel": ("HANDLE", "UINT32", "UINT8*"),
    "GetEnabledVirtualTrustLevels": ("HANDLE", "UINT32", "UINT32*"),
    "ForceActiveVirtualTrustLevel": ("HANDLE", "UINT32", "UINT8"),
    "IsActiveVirtualTrustLevelEnabled": ("HANDLE", "UINT32", "BOOL*"),
    "IsNestedVirtualizationEnabled": ("HANDLE", "BOOL*"),
    "GetNestedVirtualizationMode": ("HANDLE", "UINT32", "BOOL*"),
    "ForceNestedHostMode": ("HANDLE", "UINT32", "BOOL", "BOOL*"),
    "InKernelSpace": ("HANDLE", "UINT32", "BOOL*"),
    "GetRegisterValue": ("HANDLE", "UINT32", "DWORD", "VPR*"),
    "GetPagingMode": ("HANDLE", "UINT32", "ENUM*"),
    "ForcePagingMode": ("HANDLE", "UINT32", "ENUM"),
    "ReadGuestPhysicalAddress": ("HANDLE", "UINT64", "LPVOID", "UINT32", "UINT32*"),
    "GuestVirtualAddressToPhysicalAddress": ("HANDLE", "UINT32", "UINT64", "UINT64*", "UINT64*"),
    "GetGuestPhysicalMemoryChunks": ("HANDLE", "UINT64*", "GPA_MEMORY_CHUNK*", "UINT64*"),
    "GuestPhysicalAddressToRawSavedMemoryOffset": ("HANDLE", "UINT64", "UINT64*"),
    "ReadGuestRawSavedMemory": ("HANDLE", "UINT64", "LPVOID", "UINT32", "UINT32*"),
    "GetGuestRawSavedMemorySize": ("HANDLE", "UINT64*"),
    "SetMemoryBlockCacheLimit": ("HANDLE", "UINT64"),
    "GetMemoryBlockCacheLimit": ("HANDLE", "UINT64*"),
    "ApplyGuestMemoryFix": ("HANDLE", "UINT32", "UINT64", "LPVOID", "UINT32"),
}
SPEC_OLD = {
    **SPEC_NEW,
    "GetRegisterValue": ("HANDLE", "UINT32", "VPR_OLD*"),
    "GuestVirtualAddressToPhysicalAddress": ("HANDLE", "UINT32", "UINT64", "UINT64*"),
}


@pytest.mark.parametrize(("abi", "spec"), [("new", SPEC_NEW), ("old", SPEC_OLD)])
def test_prototype_tables_match_the_header(abi: str, spec: dict[str, tuple[str, ...]]) -> None:
    table = b.PROTOTYPES[abi]
    assert set(table) == set(spec)
    for name, params in spec.items():
        assert list(table[name]) == [T[p] for p in params], name


@pytest.mark.parametrize(("abi", "spec"), [("new", SPEC_NEW), ("old", SPEC_OLD)])
def test_library_sets_argtypes_and_hresult_restype_on_every_export(abi: str, spec: dict[str, tuple[str, ...]]) -> None:
    fake = FakeDll(abi)
    lib = fake.library()
    for name, params in spec.items():
        if not hasattr(fake, name):
            assert not lib.has(name)
            continue
        fn = lib.function(name)
        assert list(fn.argtypes) == [T[p] for p in params], name
        assert fn.restype is ctypes.c_int32, name


def test_missing_export_is_unsupported_and_names_the_function() -> None:
    lib = FakeDll(missing=["GetGuestOsInfo"]).library()
    with pytest.raises(UnsupportedError, match="GetGuestOsInfo is not exported"):
        lib.function("GetGuestOsInfo")
    with pytest.raises(UnsupportedError, match="not bound"):
        lib.function("CallStackUnwind")
    with pytest.raises(ValueError, match="abi"):
        b.DumpProviderLibrary(object(), abi="middle")


def test_old_register_enums_have_the_sdk_numbers() -> None:
    x64, x86 = b.OLD_REGISTER_IDS_X64, b.OLD_REGISTER_IDS_X86
    assert (x64["rax"], x64["rflags"], x64["xmm0.low"], x64["xmm15.high"]) == (0, 17, 18, 49)
    assert (x64["xmmcontrolstatus.low"], x64["fpcontrolstatus.high"], x64["cr0"], x64["efer"]) == (50, 53, 54, 59)
    assert (x64["dr0"], x64["dr7"], x64["gs.base"], x64["fs.base"], x64["cs"], x64["ldtr"]) == (60, 65, 66, 67, 68, 75)
    assert (x64["idtr.base"], x64["idtr.limit"], x64["gdtr.base"], x64["gdtr.limit"], x64["count"]) == (
        76,
        77,
        78,
        79,
        80,
    )
    assert (x86["rip"], x86["rflags"], x86["xmm0.low"], x86["cr0"], x86["count"]) == (8, 9, 10, 46, 72)


@pytest.mark.parametrize(
    ("version", "abi"),
    [((10, 0, 18362, 1), "old"), ((10, 0, 18363, 0), "old"), ((10, 0, 19041, 0), "new"), ((10, 0, 22621, 1), "new")],
)
def test_abi_is_chosen_by_file_version(version: tuple[int, int, int, int], abi: str) -> None:
    assert b.abi_for_version(version) == abi


# --------------------------------------------------------------------------- HRESULTs
@pytest.mark.parametrize(
    ("code", "bases"),
    [
        (0xC0370500, (NotFoundError,)),
        (0xC0370502, (NotFoundError,)),
        (0xC0370503, (UnsupportedError,)),
        (0xC0370505, (UnmappedAddressError,)),
        (0xC0370507, (UnmappedAddressError,)),
        (0xC0370508, (UnmappedAddressError,)),
        (0xC0370509, (NotFoundError,)),
        (0x80070057, (ValueError,)),  # E_INVALIDARG
        (0x8007000E, (MemoryError,)),  # E_OUTOFMEMORY
        (0x8007007A, (MemoryError,)),  # HRESULT_FROM_WIN32(ERROR_INSUFFICIENT_BUFFER)
        (0x80070002, (FileNotFoundError, OSError)),  # ERROR_FILE_NOT_FOUND
        (0x80070003, (FileNotFoundError,)),
        (0x80070005, (PermissionError,)),
        (0x80070020, (PermissionError,)),  # sharing violation: the VM is running
        (0x80070570, (FormatError,)),  # ERROR_FILE_CORRUPT
        (0x80004001, (UnsupportedError,)),
        (0x80004005, ()),
    ],
)
def test_hresults_map_to_package_exceptions(code: int, bases: tuple[type, ...]) -> None:
    err = b.hresult_error(code, "GetVpCount", "x.vmrs")
    assert isinstance(err, b.DllCallError) and isinstance(err, VmssdError)
    for base in bases:
        assert isinstance(err, base)
    assert err.hresult == code and err.function == "GetVpCount"
    assert f"{code:#010x}" in str(err) and "GetVpCount [x.vmrs]" in str(err)
    signed = code - (1 << 32)
    with pytest.raises(type(err)):
        b.check(signed, "GetVpCount")


def test_unknown_hresult_is_a_plain_error_with_the_hex_code() -> None:
    err = b.hresult_error(0x80071234, "LoadSavedStateFile")
    assert type(err) is b.DllCallError and "HRESULT 0x80071234" in str(err) and err.code_name == ""


def test_success_codes_do_not_raise() -> None:
    assert b.check(0, "GetVpCount") == 0
    assert b.check(1, "GetVpCount") == 1  # S_FALSE
    assert b.hresult_from_win32(b.ERROR_INSUFFICIENT_BUFFER) == 0x8007007A


# --------------------------------------------------------------------------- import hygiene
def test_importing_never_touches_windows_only_modules() -> None:
    code = textwrap.dedent(
        """
        import ctypes, sys
        def boom(*a, **k):
            raise SystemExit("WinDLL called at import time")
        ctypes.WinDLL = boom
        ctypes.windll = None
        import volatility3_vmssd.dll, volatility3_vmssd.dll.binding, volatility3_vmssd.dll.discovery
        import volatility3_vmssd.dll.provider, volatility3_vmssd.verify, volatility3_vmssd.cli.verify
        bad = [m for m in ("winreg", "_winapi", "msvcrt", "ctypes.wintypes", "_overlapped") if m in sys.modules]
        print("BAD" if bad and sys.platform != "win32" else "OK", bad)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK"), out.stdout
