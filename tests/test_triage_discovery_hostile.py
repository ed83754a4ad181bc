"""Discovery against trees a host (or an attacker) can produce: huge folders, names that are not UTF-8,
FIFOs and devices, paths too long to open, folders that cannot be listed, one VM ID in two configurations.

Fast and in-process (no Dask); the command-line runs over the same trees are in tests/test_triage_cli.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from triage_tree import VM_A, vmcx

from volatility3_vmssd.triage import discovery
from volatility3_vmssd.triage.discovery import discover, list_folder, shown


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every os.scandir call from now on, by folder."""
    calls: list[str] = []
    real = os.scandir

    def counting(path=".", *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", counting)
    return calls


@pytest.mark.slow  # ~4 s, most of it creating the files
def test_a_folder_of_10000_saved_states_is_listed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vms = tmp_path / "Hyper-V" / "Virtual Machines"
    vms.mkdir(parents=True)
    names = [f"{i:08X}-0000-4000-8000-000000000000.vmrs" for i in range(10_000)]
    for name in names:
        (vms / name).touch()
    vmcx(vms / names[7].replace(".vmrs", ".VMCX"), names[7][:-5], "seventh")
    calls = count_listings(monkeypatch)
    found = discover([tmp_path])
    folders = {os.path.abspath(p) for p in (tmp_path, tmp_path / "Hyper-V", vms)}
    # Each folder of the tree once, and nothing else (no listing per file for partners or .vmcx).
    assert sorted(map(os.path.abspath, calls)) == sorted(folders)
    assert found.listings == len(folders)
    got = {Path(f.path).name: f for f in found.files}
    assert len(got) == len(names) + 1 and found.problems == []
    assert got[names[7]].vm_name == "seventh" and got[names[8]].vm_name is None


def test_names_that_are_not_utf8_are_found_and_shown_safely(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9-\xff.vmrs"
    with open(raw, "wb") as fh:
        fh.write(b"x" * 16)
    found = discover([tmp_path])
    (f,) = found.files
    assert os.fsencode(f.path) == raw  # the real name, usable to open the file
    text = shown(f.path)
    assert text.endswith("caf\\xe9-\\xff.vmrs")
    text.encode("utf-8")  # printable and writable as UTF-8


def test_fifos_devices_long_paths_and_unreadable_entries_are_reported(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    os.mkfifo(tree / "pipe.vmrs")  # named like a saved state: reported, never opened (it would block)
    os.mkfifo(tree / "other-pipe")  # not named like one: counted as skipped
    fifo = tmp_path / "given.fifo"
    os.mkfifo(fifo)
    long_path = tmp_path / ("x" * 200) / ("y" * 200) / "z.vmrs"
    for _ in range(20):  # past PATH_MAX (4096)
        long_path = long_path.parent / ("d" * 250) / long_path.name
    found = discover([tree, fifo, "/dev/null", long_path])
    why = dict(found.problems)
    assert why[os.fspath(tree / "pipe.vmrs")].startswith("named like a Hyper-V file but not a regular file")
    assert why[os.fspath(fifo)] == "not a regular file (a FIFO): not read"
    assert why["/dev/null"] == "not a regular file (a device): not read"
    assert why[os.fspath(long_path)] == f"cannot be read: {os.strerror(errno.ENAMETOOLONG)}"
    assert found.files == [] and found.skipped == 1 and found.missing == []


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "open" / "a.vmrs").write_bytes(b"\0" * 8)

    def lister(folder: str) -> list[discovery.FolderEntry]:
        if folder.endswith("locked"):  # what an unreadable folder does (root reads everything: simulated here)
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), folder)
        return list_folder(folder)

    found = discover([tmp_path], lister=lister)
    assert found.problems == [(os.fspath(tmp_path / "locked"), "folder cannot be listed: Permission denied")]
    assert [Path(f.path).name for f in found.files] == ["a.vmrs"]


def test_one_vm_id_in_two_configuration_stores_stays_two_vms(tmp_path: Path) -> None:
    ckpt = "1A2B3C4D-0000-4000-8000-0000000000C9"
    for host, name in (("host1", "web01"), ("host2", "web01-copy")):
        store = tmp_path / host / "Hyper-V"
        vmcx(store / "Virtual Machines" / f"{VM_A}.vmcx", VM_A, name)
        vmcx(store / "Snapshots" / f"{ckpt}.vmcx", ckpt, f"{name} checkpoint", logical_id=VM_A)
        (store / "Snapshots" / f"{ckpt}.vmrs").write_bytes(b"\0" * 8)
    found = discover([tmp_path])
    rows = {Path(f.path).relative_to(tmp_path).as_posix(): f for f in found.files}
    for host, name in (("host1", "web01"), ("host2", "web01-copy")):
        current = rows[f"{host}/Hyper-V/Virtual Machines/{VM_A}.vmcx"]
        checkpoint = rows[f"{host}/Hyper-V/Snapshots/{ckpt}.vmrs"]
        assert (current.vm_id, current.vm_name) == (VM_A, name)
        # The checkpoint is named after the VM of its own store, not whichever configuration came last.
        assert (checkpoint.vm_id, checkpoint.vm_name, checkpoint.checkpoint_name) == (VM_A, name, f"{name} checkpoint")
        assert checkpoint.vm_home == current.vm_home == os.fspath(tmp_path / host / "Hyper-V")
    (warning,) = found.warnings
    assert warning.startswith(f"VM ID {VM_A} is claimed by 2 VM configurations") and "kept apart" in warning
