"""The cross-check engine (dll/verify.py) and ``vmssd verify``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from builders import add_journal_entries
from dllstates import build_states
from fakedll import FakeDll

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cli import main as cli_main
from volatility3_vmssd.cli import verify as cli_verify
from volatility3_vmssd.dll import provider as dll_provider
from volatility3_vmssd.errors import UnsupportedError
from volatility3_vmssd.storage import HyperVStorage
from volatility3_vmssd.verify import DEFAULT_SAMPLES, compare_providers, sample_pages, verify_files


@pytest.fixture(scope="session")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return build_states(tmp_path_factory)


def test_sample_covers_chunk_edges_and_is_seeded() -> None:
    chunks = [(0, 0xA0), (0x100, 0x200)]
    pages = sample_pages(chunks, 20, seed=1)
    assert {0, 0x50, 0x9F, 0x100, 0x200, 0x2FF} <= set(pages)
    assert pages == sample_pages(chunks, 20, seed=1) != sample_pages(chunks, 20, seed=2)
    assert all(0 <= p < 0xA0 or 0x100 <= p < 0x300 for p in pages)
    assert len(pages) <= 6 + 20
    assert sample_pages([(5, 1)], 100, seed=0) == [5]
    assert sample_pages([], 10, seed=0) == []


def _open(states: dict[str, list[Path]], name: str) -> SavedStateProvider:
    return SavedStateProvider.load_vmrs(states[name][0])


def test_two_identical_saved_states_have_no_differences(states: dict[str, list[Path]]) -> None:
    with _open(states, "base") as a, _open(states, "same") as b:
        assert compare_providers(a, b, samples=16, seed=3) == []


def test_a_changed_register_and_page_are_reported(states: dict[str, list[Path]]) -> None:
    with _open(states, "base") as a, _open(states, "changed") as b:
        diffs = compare_providers(a, b, samples=8, labels=("base", "changed"))
    real = [d for d in diffs if not d.informational]
    assert {(d.kind, d.where) for d in real} == {
        ("register", "VP 0 rip"),
        ("register", "VP 1 rip"),
        ("page", "GPA 0x200000"),
    }
    page = next(d for d in real if d.kind == "page")
    assert "first difference at +0x64" in page.message
    rip = next(d for d in real if d.where == "VP 0 rip")
    assert rip.message == "base 0xffff800000001000 != changed 0xffff800000001008"
    json.dumps([d.to_json() for d in diffs])  # serialisable as is


def test_another_chunk_map_is_reported(states: dict[str, list[Path]]) -> None:
    with _open(states, "base") as a, _open(states, "relaid") as b:
        diffs = compare_providers(a, b, samples=0)
    kinds = {d.kind for d in diffs if not d.informational}
    assert "chunks" in kinds and "page" in kinds  # pages 0xA0000-0xBFFFF are backed on one side only
    page = next(d for d in diffs if d.kind == "page" and d.where == "GPA 0xbf000")  # last page of relaid's chunk 0
    assert page.message.startswith("native unmapped != dll 4096 bytes (sha256 ")


def test_native_against_fake_dll_in_both_abis(states: dict[str, list[Path]]) -> None:
    for abi in ("new", "old"):
        report = verify_files(states["base"][0], samples=DEFAULT_SAMPLES, library=FakeDll(abi).library())
        assert report.identical, report.render()
        assert report.pages_compared >= 6 and report.registers_compared > 100
        assert report.dll is not None and report.dll["abi"] == abi
    pair = verify_files(states["pair"][0], vsv=states["pair"][1], library=FakeDll().library())
    assert pair.identical and pair.files[0].endswith("pair.bin")


def test_a_wrong_binding_would_be_caught(states: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Swap two fields in the register decoding: verify must see it."""
    real = dll_provider.DllSavedStateProvider._new_register

    def broken(self, vp, name):  # type: ignore[no-untyped-def]
        value = real(self, vp, name)
        if name == "gdtr":
            return type(value)(value.base & 0xFFFF, value.limit)
        return value

    monkeypatch.setattr(dll_provider.DllSavedStateProvider, "_new_register", broken)
    report = verify_files(states["base"][0], library=FakeDll().library())
    assert not report.identical
    assert {d.where for d in report.differences if not d.informational} == {"VP 0 gdtr", "VP 1 gdtr"}


def test_pending_journal_is_committed_in_a_temporary_copy_for_the_dll(
    states: dict[str, list[Path]], tmp_path: Path
) -> None:
    src = tmp_path / "journal.vmrs"
    shutil.copyfile(states["base"][0], src)
    with HyperVStorage.open(src) as s:
        loc = s.get("/savedstate/RamBlock2").data_location
    assert loc is not None
    add_journal_entries(src, pending=[(loc[0], bytes(4096))])
    before = src.read_bytes()
    fake = FakeDll()
    report = verify_files(src, library=fake.library())
    assert report.identical, report.render()
    assert any("pending journal" in n for n in report.notes)
    assert fake.applied and all(not p.startswith(str(src)) for p in fake.applied)
    assert src.read_bytes() == before


def test_bin_without_vsv_cannot_be_verified(states: dict[str, list[Path]], tmp_path: Path) -> None:
    lone = tmp_path / "lone.bin"
    shutil.copyfile(states["pair"][0], lone)
    with pytest.raises(UnsupportedError, match=r"needs the \.vsv"):
        verify_files(lone, library=FakeDll().library())


# --------------------------------------------------------------------------- the command
@pytest.fixture
def with_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the subcommand even before cli/main.py lists it."""
    if cli_verify not in cli_main.COMMANDS:
        monkeypatch.setattr(cli_main, "COMMANDS", [*cli_main.COMMANDS, cli_verify])


@pytest.mark.skipif(sys.platform == "win32", reason="checks the refusal off Windows")
@pytest.mark.usefixtures("with_verify")
def test_cli_off_windows_fails_with_one_line(states: dict[str, list[Path]], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main.main(["verify", str(states["base"][0])]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    expected = "the DLL backend is unavailable on Linux" if sys.platform.startswith("linux") else "unavailable on"
    assert expected in lines[0] and lines[0].startswith("vmssd verify: error:")


@pytest.mark.usefixtures("with_verify")
def test_cli_reports_as_text_and_json(
    states: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_verify, "is_windows", lambda: True)
    monkeypatch.setattr(dll_provider, "_library", lambda *a: FakeDll().library())
    assert cli_main.main(["verify", "--samples", "5", str(states["base"][0])]) == 0
    text = capsys.readouterr().out
    assert "Result               identical" in text and "fake/vmsavedstatedumpprovider.dll" in text
    assert cli_main.main(["verify", "--json", "--seed", "9", str(states["base"][0])]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["identical"] is True and doc["differences"] == [] and doc["seed"] == 9

    real = dll_provider.DllSavedStateProvider.read_guest_physical_address

    def corrupt(self, gpa, size):  # type: ignore[no-untyped-def]
        data = real(self, gpa, size)
        return data[:-1] + bytes([data[-1] ^ 1]) if gpa == 0x100000 else data

    monkeypatch.setattr(dll_provider.DllSavedStateProvider, "read_guest_physical_address", corrupt)
    assert cli_main.main(["verify", "--json", str(states["base"][0])]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["identical"] is False
    assert [(d["kind"], d["where"]) for d in doc["differences"]] == [("page", "GPA 0x100000")]
