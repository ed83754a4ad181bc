"""Both backends implement the whole provider interface, with one signature per method, and agree.

The DLL side is driven by the fake DLL (real ctypes calls through the binding), on a .vmrs and on a
legacy pair.  Every public method of :class:`SavedState` is called on both with the same arguments;
the answers (or the kind of failure) must be equal.  Where the DLL cannot answer, the interface says
so (UnsupportedError), and that is the only difference allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dllstates import build_states
from fakedll import FakeDll

from volatility3_vmssd.cpu.registers import REGISTER_IDS
from volatility3_vmssd.dll.provider import DllSavedStateProvider
from volatility3_vmssd.errors import UnsupportedError, VmssdError
from volatility3_vmssd.interface import SavedState
from volatility3_vmssd.native import SavedStateProvider

VA = 0xFFFF800000001000
#: what each method is asked, per call (every public method of the interface must appear here)
CALLS: dict[str, list[tuple[Any, ...]]] = {
    "vp_count": [()],
    "has_cpu_state": [()],
    "has_saved_memory": [()],
    "get_processor_vendor": [()],
    "get_guest_os_info": [(), (0,), (1,)],
    "get_guest_enabled_virtual_trust_levels": [()],
    "get_enabled_virtual_trust_levels": [(0,), (1,), (5,)],
    "get_virtual_trust_levels": [(0,), (1,)],
    "get_active_virtual_trust_level": [(0,), (1,)],
    "is_active_virtual_trust_level_enabled": [(0,)],
    "is_active_virtual_trust_level_forced": [(0,)],
    "is_higher_vtl_runnable": [(0,)],
    "get_registers": [(0,), (1, 0)],
    "get_register_value": [(0, "rip"), (1, "CR3"), (0, "no-such-register")],
    "get_architecture": [(0,), (1,)],
    "get_paging_mode": [(0,)],
    "get_paging_levels": [(0,)],
    "is_five_level_paging": [(0,)],
    "in_kernel_space": [(0,)],
    "guest_virtual_to_physical": [(0, VA + 0x10), (0, 0x1234)],
    "guest_virtual_to_physical_with_size": [(0, VA + 0x10)],
    "read_guest_physical_address": [(0x1000, 64), (0x9F800, 0x1000), (0xA0000, 16)],
    "read_guest_physical_address_padded": [(0x9E000, 0x64000)],
    "get_guest_physical_memory_chunks": [()],
    "guest_physical_address_to_raw_saved_memory_offset": [(0x100000,), (0xA0000,)],
    "read_guest_raw_saved_memory": [(0x1000, 64)],
    "get_guest_raw_saved_memory_size": [()],
    "get_memory_block_cache_limit": [()],
    "memory_map": [()],
    "backed_runs": [(0, 0x400000)],
    "is_backed": [(0x1000, 0x1000), (0x9F000, 0x2000)],
    "gpa_bounds": [()],
    "trust_levels": [()],
    "memory_absence": [()],
    "ramblock_damage": [()],
}
#: not compared value for value: they change state, differ by design, or are compared below
SKIP = {
    "close",
    "findings",
    "force_active_virtual_trust_level",
    "set_memory_block_cache_limit",
    "summary",
}
#: DLL queries outside the interface (no caller above the provider needs them) that both backends keep,
#: so that parity with the DLL is still checked value for value
PARITY_EXTRAS = {
    "get_guest_enabled_virtual_trust_levels",
    "get_enabled_virtual_trust_levels",
    "is_active_virtual_trust_level_enabled",
    "in_kernel_space",
    "guest_virtual_to_physical",
    "guest_physical_address_to_raw_saved_memory_offset",
}
#: answers the DLL cannot give; the interface documents each
DLL_CANNOT = {"get_processor_vendor", "is_higher_vtl_runnable"}


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return build_states(tmp_path_factory)


def public_methods() -> set[str]:
    return {n for n, v in inspect.getmembers(SavedState) if callable(v) and not n.startswith("_")}


def test_every_interface_method_is_exercised() -> None:
    assert public_methods() | PARITY_EXTRAS == set(CALLS) | SKIP
    assert not public_methods() & PARITY_EXTRAS


@pytest.mark.parametrize("name", sorted(PARITY_EXTRAS))
def test_parity_extras_have_one_signature_on_both_backends(name: str) -> None:
    native, dll = (
        inspect.signature(getattr(SavedStateProvider, name)),
        inspect.signature(getattr(DllSavedStateProvider, name)),
    )
    assert list(native.parameters) == list(dll.parameters)


@pytest.mark.parametrize("cls", [SavedStateProvider, DllSavedStateProvider])
def test_backends_implement_the_whole_interface_with_one_signature(cls: type) -> None:
    assert issubclass(cls, SavedState) and not inspect.isabstract(cls)
    for name in public_methods():
        ours, declared = inspect.signature(getattr(cls, name)), inspect.signature(getattr(SavedState, name))
        assert list(ours.parameters) == list(declared.parameters), f"{cls.__name__}.{name}{ours} != {declared}"


def _answer(call: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        result = call(*args)
        return list(result) if inspect.isgenerator(result) else result
    except VmssdError as exc:  # the kind of failure: the package's own error classes in its MRO
        return ("raised", {c.__name__ for c in type(exc).__mro__ if c.__module__ == "volatility3_vmssd.errors"})


def _open(kind: str, paths: list[Path]) -> tuple[SavedState, SavedState]:
    library = FakeDll().library()
    if kind == "pair":
        return (
            SavedStateProvider.load_bin_vsv(*paths),
            DllSavedStateProvider.load_bin_vsv(*paths, library=library),
        )
    return SavedStateProvider.load_vmrs(paths[0]), DllSavedStateProvider.load_vmrs(paths[0], library=library)


@pytest.mark.parametrize("kind", ["base", "relaid", "pair"])
def test_both_backends_give_the_same_answers(kind: str, states: dict[str, list[Path]]) -> None:
    native, dll = _open(kind, states[kind])
    with native, dll:
        for name, calls in CALLS.items():
            for args in calls:
                got_native = _answer(getattr(native, name), args)
                got_dll = _answer(getattr(dll, name), args)
                if name == "get_registers" and isinstance(got_dll, dict):
                    # The DLL reports the registers it has an id for (not CPL, XCR0...): the rest must agree.
                    assert set(got_native) - set(got_dll) <= set(got_native) - set(REGISTER_IDS), name
                    got_native = {k: v for k, v in got_native.items() if k in got_dll}
                if name == "guest_virtual_to_physical_with_size" and isinstance(got_dll, tuple):
                    # The DLL does not say how large the mapping page is: it answers up to the 4 KiB page end.
                    assert got_dll[0] == got_native[0] and 0 < got_dll[1] <= got_native[1], name
                    continue
                if name == "memory_map" and isinstance(got_dll, list):
                    # The DLL does not expose the RamMemoryBlock flags (None): everything else must agree.
                    assert all(row.flags is None for row in got_dll), name
                    got_native = [dataclasses.replace(row, flags=None) for row in got_native]
                if name in DLL_CANNOT:
                    assert got_dll[0] == "raised" and UnsupportedError.__name__ in got_dll[1], name
                    continue
                assert got_native == got_dll, f"{name}{args}: native {got_native!r} != dll {got_dll!r}"
        summary_n, summary_d = native.summary(), dll.summary()
        same = ("vp_count", "architecture", "paging_mode", "guest_os", "vtls", "ram_bytes", "chunk_count")
        assert {k: getattr(summary_n, k) for k in same} == {k: getattr(summary_d, k) for k in same}
        assert summary_d.backend == "dll" and summary_d.processor_vendor is None  # unknown, not invented


def test_forcing_a_vtl_agrees(states: dict[str, list[Path]]) -> None:
    native, dll = _open("base", states["base"])
    with native, dll:
        for p in (native, dll):
            p.force_active_virtual_trust_level(1, 0)
            assert p.get_active_virtual_trust_level(1) == 0
        assert native.is_active_virtual_trust_level_forced(1)
        for p in (native, dll):
            with pytest.raises(VmssdError):
                p.force_active_virtual_trust_level(0, 1)  # no VTL1 registers were saved
