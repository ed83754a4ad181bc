"""DllSavedStateProvider through real ctypes marshalling into a fake DLL (see fakedll.py)."""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from builders import add_journal_entries
from dllstates import build_states
from fakedll import FakeDll

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.registers import REGISTER_IDS, SegmentRegister
from volatility3_vmssd.dll import binding as b
from volatility3_vmssd.dll import discovery
from volatility3_vmssd.dll import provider as dll_provider
from volatility3_vmssd.dll.provider import DllSavedStateProvider
from volatility3_vmssd.errors import BackendUnavailableError, NotFoundError, UnsupportedError, VmssdError
from volatility3_vmssd.storage import HyperVStorage

VA = 0xFFFF800000001000


@pytest.fixture(scope="session")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return build_states(tmp_path_factory)


@pytest.mark.skipif(sys.platform == "win32", reason="checks the refusal off Windows")
def test_load_off_windows_is_refused_clearly(states: dict[str, list[Path]]) -> None:
    expected = "the DLL backend is unavailable on Linux" if sys.platform.startswith("linux") else "unavailable on"
    with pytest.raises(BackendUnavailableError, match=expected):
        DllSavedStateProvider.load_vmrs(states["base"][0])
    with pytest.raises(BackendUnavailableError):
        DllSavedStateProvider.load_bin_vsv(*states["pair"])
    with pytest.raises(BackendUnavailableError):
        DllSavedStateProvider.apply_pending_replay_log(states["base"][0], "unused.vmrs")


def test_every_method_answers_like_the_native_provider(states: dict[str, list[Path]]) -> None:
    fake = FakeDll()
    path = states["base"][0]
    with (
        SavedStateProvider.load_vmrs(path) as n,
        DllSavedStateProvider.load_vmrs(path, library=fake.library(), cache_limit=7) as p,
    ):
        assert p.backend == "dll" and p.kind == "vmrs" and p.findings() == []
        assert p.vp_count() == n.vp_count() == 2
        for vp in range(2):
            assert p.get_architecture(vp) == n.get_architecture(vp)
            assert p.get_paging_mode(vp) == n.get_paging_mode(vp)
            assert p.get_active_virtual_trust_level(vp) == n.get_active_virtual_trust_level(vp)
            assert p.get_enabled_virtual_trust_levels(vp) == n.get_enabled_virtual_trust_levels(vp)
            assert p.is_active_virtual_trust_level_enabled(vp) and p.in_kernel_space(vp) == n.in_kernel_space(vp)
            expressible = {k: v for k, v in n.get_registers(vp).items() if k in REGISTER_IDS}  # no cpl/xcr0
            assert p.get_registers(vp) == expressible
            assert p.get_registers(vp, vtl=0) == expressible
            assert p.guest_virtual_to_physical(vp, VA) == n.guest_virtual_to_physical(vp, VA) == 0x1000
        assert p.get_register_value(0, "CS") == SegmentRegister(0, 0xFFFFFFFF, 0x10, 0xA09B)
        assert p.get_register_value(0, "xmm3") == 0x0123456789ABCDEFFEDCBA9876543210
        assert p.get_guest_enabled_virtual_trust_levels() == n.get_guest_enabled_virtual_trust_levels()
        assert p.get_guest_os_info() == n.get_guest_os_info()
        assert p.get_guest_physical_memory_chunks() == n.get_guest_physical_memory_chunks()
        assert p.get_guest_raw_saved_memory_size() == n.get_guest_raw_saved_memory_size()
        for gpa in (0, 0x9F000, 0x100000, 0x2FF000):
            assert p.read_guest_physical_address(gpa, 0x1800) == n.read_guest_physical_address(gpa, 0x1800)
            assert p.guest_physical_address_to_raw_saved_memory_offset(
                gpa
            ) == n.guest_physical_address_to_raw_saved_memory_offset(gpa)
        size = p.get_guest_raw_saved_memory_size()
        assert p.read_guest_raw_saved_memory(size - 10, 100) == n.read_guest_raw_saved_memory(size - 10, 100)
        assert p.read_guest_raw_saved_memory(size, 100) == b""
        assert p.get_memory_block_cache_limit() == 7  # passed through SetMemoryBlockCacheLimit
        p.set_memory_block_cache_limit(3)
        assert p.get_memory_block_cache_limit() == 3
        # the native-API conveniences built on the exports
        # The DLL does not expose the RamMemoryBlock flags: everything else agrees.
        assert [dataclasses.replace(m, flags=None) for m in n.memory_map()] == p.memory_map()
        assert p.read_guest_physical_address_padded(0x9E000, 0x64000) == n.read_guest_physical_address_padded(
            0x9E000, 0x64000
        )
        assert p.get_paging_levels(0) == n.get_paging_levels(0) == 4 and not p.is_five_level_paging(0)
        assert p.guest_virtual_to_physical_with_size(0, VA + 0x10) == (0x1010, 0xFF0)
        info = p.summary().as_dict()
        assert info["vp_count"] == 2 and info["architecture"] == "X64" and info["chunk_count"] == 2
        assert info["dll"]["abi"] == "new"
        with pytest.raises(UnsupportedError, match="processor-vendor"):
            p.get_processor_vendor()
    assert fake.providers == {}  # ReleaseSavedStateFiles was called
    with pytest.raises(VmssdError, match="closed"):
        p.vp_count()


@pytest.mark.parametrize("too_small", [b.E_OUTOFMEMORY, b.HRESULT_INSUFFICIENT_BUFFER])
def test_chunks_use_the_two_call_size_protocol(states: dict[str, list[Path]], too_small: int) -> None:
    fake = FakeDll(too_small=too_small)
    with DllSavedStateProvider.load_vmrs(states["base"][0], library=fake.library()) as p:
        page_size, chunks = p.get_guest_physical_memory_chunks()
    assert page_size == 4096 and [tuple(c) for c in chunks] == [(0, 0xA0), (0x100, 0x200)]
    calls = [args for name, args in fake.calls if name == "GetGuestPhysicalMemoryChunks"]
    assert len(calls) == 2
    assert not calls[0][2]  # first call: NULL buffer ...
    assert calls[0][3][0] == 2  # ... (its in/out count came back as the count needed)
    assert calls[1][2]


def test_old_abi_registers_and_four_argument_translation(states: dict[str, list[Path]]) -> None:
    fake = FakeDll("old")
    path = states["base"][0]
    with SavedStateProvider.load_vmrs(path) as n, DllSavedStateProvider.load_vmrs(path, library=fake.library()) as p:
        regs, native = p.get_registers(0), n.get_registers(0)
        for name in ("rax", "rip", "rflags", "cr3", "efer", "dr7", "xmm3", "gdtr", "idtr", "xmmcontrolstatus"):
            assert regs[name] == native[name], name
        assert "fpmmx0" not in regs  # the old enum has no x87 registers
        assert regs["fs"] == SegmentRegister(native["fs"].base, 0, native["fs"].selector, 0)
        assert regs["cs"] == SegmentRegister(0, 0, 0x10, 0)
        assert p.unreported_fields["cs"] == {"base", "limit", "attributes"}
        assert p.guest_virtual_to_physical(0, VA) == 0x1000
    translate = [args for name, args in fake.calls if name == "GuestVirtualAddressToPhysicalAddress"]
    assert translate and all(len(args) == 4 for args in translate)
    register_calls = [args for name, args in fake.calls if name == "GetRegisterValue"]
    assert register_calls and all(len(args) == 3 for args in register_calls)


def test_unmapped_va_reports_the_address_and_region_size(states: dict[str, list[Path]]) -> None:
    with (
        DllSavedStateProvider.load_vmrs(states["base"][0], library=FakeDll().library()) as p,
        pytest.raises(b.DllUnmappedAddressError) as exc,
    ):
        p.guest_virtual_to_physical(0, 0x1234_5678)
    assert exc.value.address == 0x1234_5678 and exc.value.unmapped_size == 0x1000 - 0x678
    assert "VM_SAVED_STATE_DUMP_E_VA_NOT_MAPPED" in str(exc.value)


def test_errors_from_the_dll_are_mapped(states: dict[str, list[Path]], tmp_path: Path) -> None:
    lib = FakeDll(missing=["GetGuestEnabledVirtualTrustLevels"]).library()
    with pytest.raises(FileNotFoundError):
        DllSavedStateProvider.load_vmrs(tmp_path / "absent.vmrs", library=lib)
    with DllSavedStateProvider.load_vmrs(states["base"][0], library=lib) as p:
        with pytest.raises(UnsupportedError, match="GetGuestEnabledVirtualTrustLevels"):
            p.get_guest_enabled_virtual_trust_levels()
        with pytest.raises(NotFoundError, match="VP 9 does not exist"):  # as natively, not the DLL's E_INVALIDARG
            p.get_architecture(9)
        with pytest.raises(b.DllNotFoundError, match="VP_VTL_NOT_ENABLED"):
            p.force_active_virtual_trust_level(0, 1)


def test_bin_vsv_pair(states: dict[str, list[Path]]) -> None:
    bin_path, vsv_path = states["pair"]
    with (
        SavedStateProvider.load_bin_vsv(bin_path, vsv_path) as n,
        DllSavedStateProvider.load_bin_vsv(bin_path, vsv_path, library=FakeDll().library()) as p,
    ):
        assert p.kind == "bin+vsv" and p.paths == [str(bin_path.resolve()), str(vsv_path.resolve())]
        assert p.get_guest_physical_memory_chunks() == n.get_guest_physical_memory_chunks()
        assert p.read_guest_physical_address(0x200000, 64) == n.read_guest_physical_address(0x200000, 64)


def test_replay_log_is_applied_to_a_copy_never_to_the_input(states: dict[str, list[Path]], tmp_path: Path) -> None:
    src = tmp_path / "journal.vmrs"
    shutil.copyfile(states["base"][0], src)
    with HyperVStorage.open(src) as s:
        loc = s.get("/savedstate/RamBlock1").data_location
    assert loc is not None
    add_journal_entries(src, pending=[(loc[0], bytes(4096))])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    fake = FakeDll()
    dst = tmp_path / "committed.vmrs"
    assert DllSavedStateProvider.apply_pending_replay_log(src, dst, library=fake.library()) == 1
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # input untouched
    assert fake.applied == [str(dst) + ".partial"]  # the DLL only ever saw the copy
    assert not (tmp_path / "committed.vmrs.partial").exists()
    with SavedStateProvider.load_vmrs(dst) as p:
        assert not [f for f in p.findings() if f.kind == "journal"]
    with pytest.raises(VmssdError, match="over its input"):
        DllSavedStateProvider.apply_pending_replay_log(src, src, library=fake.library())


def test_the_windows_load_path_end_to_end(states: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """What runs on Windows, with ctypes.WinDLL replaced: discovery, pefile vetting, ABI choice, cache."""
    fixture = Path(__file__).resolve().parent / "fixtures" / "fake-10.0.22621.1-x64.dll"
    if not fixture.is_file() or discovery.python_machine() != discovery.IMAGE_FILE_MACHINE_AMD64:
        pytest.skip("needs the x64 PE fixture and an x64 Python")
    loaded: list[str] = []

    def win_dll(path: str) -> FakeDll:
        loaded.append(path)
        return FakeDll("new")

    monkeypatch.setattr(ctypes, "WinDLL", win_dll, raising=False)
    monkeypatch.setattr(b, "is_windows", lambda: True)
    monkeypatch.setattr(dll_provider, "is_windows", lambda: True)
    monkeypatch.setattr(b, "_LIBRARY_CACHE", {})
    monkeypatch.delenv(b.ABI_ENV, raising=False)
    with DllSavedStateProvider.load_vmrs(states["base"][0], dll_path=fixture) as p:
        assert p.vp_count() == 2 and p.library.abi == "new" and p.library.version == (10, 0, 22621, 1)
    with DllSavedStateProvider.load_vmrs(states["base"][0], dll_path=fixture) as p:
        assert p.vp_count() == 2
    assert loaded == [str(fixture)]  # loaded once, then cached
    old = Path(__file__).resolve().parent / "fixtures" / "fake-10.0.17763.1-x64.dll"
    with pytest.raises(BackendUnavailableError, match="17763"):
        DllSavedStateProvider.load_vmrs(states["base"][0], dll_path=old)
    assert loaded == [str(fixture)]  # the refused DLL was never loaded


def test_memory_map_for_the_volatility_layer_matches_native(states: dict[str, list[Path]]) -> None:
    """The layer walks the provider's backed runs; the DLL backend builds them from its chunk list."""
    path = states["base"][0]
    with (
        SavedStateProvider.load_vmrs(path) as n,
        DllSavedStateProvider.load_vmrs(path, library=FakeDll().library()) as p,
    ):
        assert p.get_guest_physical_memory_chunks() == n.get_guest_physical_memory_chunks()
        assert p.gpa_bounds() == n.gpa_bounds()
        span = n.gpa_bounds()[1] + 1
        assert list(p.backed_runs(0, span)) == list(n.backed_runs(0, span))
        assert p.has_saved_memory() and n.memory.blocks_decoded == 0
