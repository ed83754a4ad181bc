"""Against the real vmsavedstatedumpprovider.dll: Windows with the Windows SDK only.

Run with ``python -m pytest -m windows tests/dll`` (see docs/windows-dll.md).  Everything here is
skipped elsewhere, and on Windows when no acceptable DLL is found.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from builders import add_journal_entries
from dllstates import build_states

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cli import main as cli_main
from volatility3_vmssd.cli import verify as cli_verify
from volatility3_vmssd.dll.discovery import DllInfo, find_dll
from volatility3_vmssd.dll.provider import DllSavedStateProvider
from volatility3_vmssd.errors import BackendUnavailableError, UnmappedAddressError
from volatility3_vmssd.storage import HyperVStorage
from volatility3_vmssd.verify import compare_providers, verify_files

pytestmark = [
    pytest.mark.windows,
    pytest.mark.skipif(sys.platform != "win32", reason="needs Windows and the SDK's vmsavedstatedumpprovider.dll"),
]
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample.vmrs"


@pytest.fixture(scope="session")
def dll() -> DllInfo:
    try:
        return find_dll()
    except BackendUnavailableError as exc:
        pytest.skip(f"no usable vmsavedstatedumpprovider.dll: {exc}")


@pytest.fixture(scope="session")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return build_states(tmp_path_factory)


def _real(diffs: list) -> list:
    return [d for d in diffs if not d.informational]


def test_the_dll_is_vetted_before_loading(dll: DllInfo) -> None:
    assert dll.version >= (10, 0, 18362, 0)
    assert dll.abi in ("old", "new")


@pytest.mark.parametrize("name", ["sample", "base"])
def test_native_and_dll_agree_on_vmrs(dll: DllInfo, states: dict[str, list[Path]], name: str) -> None:
    path = SAMPLE if name == "sample" else states["base"][0]
    with SavedStateProvider.load_vmrs(path) as native, DllSavedStateProvider.load_vmrs(path, dll_path=dll.path) as p:
        diffs = compare_providers(native, p, samples=64, seed=1)
    assert not _real(diffs), "\n".join(map(str, diffs))


def test_native_and_dll_agree_on_a_bin_vsv_pair(dll: DllInfo, states: dict[str, list[Path]]) -> None:
    report = verify_files(states["pair"][0], vsv=states["pair"][1], dll_path=dll.path, samples=64)
    assert report.identical, report.render()


def test_several_files_load_in_sequence(dll: DllInfo, states: dict[str, list[Path]]) -> None:
    """The pre-18362 bug: the second load on a reused handle failed."""
    for path in (states["base"][0], states["same"][0], states["relaid"][0], states["base"][0]):
        with DllSavedStateProvider.load_vmrs(path, dll_path=dll.path) as p:
            assert p.vp_count() == 2


def test_unmapped_va_and_chunk_protocol(dll: DllInfo, states: dict[str, list[Path]]) -> None:
    with DllSavedStateProvider.load_vmrs(states["base"][0], dll_path=dll.path) as p:
        assert [tuple(c) for c in p.get_guest_physical_memory_chunks()[1]] == [(0, 0xA0), (0x100, 0x200)]
        with pytest.raises(UnmappedAddressError):
            p.guest_virtual_to_physical(0, 0x1234_5000)


def test_replay_log_is_applied_to_a_copy(dll: DllInfo, states: dict[str, list[Path]], tmp_path: Path) -> None:
    src = tmp_path / "journal.vmrs"
    shutil.copyfile(states["base"][0], src)
    with HyperVStorage.open(src) as s:
        loc = s.get("/savedstate/RamBlock1").data_location
    assert loc is not None
    add_journal_entries(src, pending=[(loc[0], bytes(4096))])
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / "committed.vmrs"
    DllSavedStateProvider.apply_pending_replay_log(src, dst, dll_path=dll.path)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    with SavedStateProvider.load_vmrs(src) as native, DllSavedStateProvider.load_vmrs(dst, dll_path=dll.path) as p:
        assert _real(compare_providers(native, p, samples=16)) == []


def test_cli_verify_on_the_sample(dll: DllInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    if cli_verify not in cli_main.COMMANDS:
        monkeypatch.setattr(cli_main, "COMMANDS", [*cli_main.COMMANDS, cli_verify])
    assert cli_main.main(["verify", "--dll", dll.path, str(SAMPLE)]) == 0
