"""vmssd triage without Dask: discovery groups a host's files by VM, classification reads no RAM.

The host tree comes from tests/triage_tree.py (every saved state written by the project's writer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from triage_tree import CKPT_A, NAMES, VM_A, VM_B, VM_D, VM_E, VM_F, build_host

from volatility3_vmssd.triage import plugins
from volatility3_vmssd.triage.classify import CLASSES, classify
from volatility3_vmssd.triage.discovery import discover
from volatility3_vmssd.triage.outputs import OutDir, atomic_write, task_id


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    root = tmp_path_factory.mktemp("host")
    return root, build_host(root)


def by_rel(root: Path, files: list) -> dict:
    return {Path(f.path).relative_to(root).as_posix(): f for f in files}


def test_every_file_is_found_once_and_pairs_match_whatever_the_case(host) -> None:
    root, expected = host
    found = discover([root])
    got = by_rel(root, found.files)
    assert sorted(got) == sorted(expected)
    for rel, (_, partner) in expected.items():
        p = got[rel].partner
        assert (None if p is None else Path(p).relative_to(root).as_posix()) == partner, rel
    assert found.skipped == 1  # notes.txt: neither named nor shaped like a Hyper-V file
    assert found.missing == []


def test_classification_of_every_file(host) -> None:
    root, expected = host
    got = {rel: classify(f).cls for rel, f in by_rel(root, discover([root]).files).items()}
    assert got == {rel: cls for rel, (cls, _) in expected.items()}
    assert set(got.values()) <= set(CLASSES)


def test_vm_name_id_and_checkpoint_come_from_the_vmcx(host) -> None:
    root, _ = host
    files = by_rel(root, discover([root]).files)
    current = files[f"Hyper-V/Virtual Machines/{VM_A}.vmrs"]
    assert (current.vm_id, current.vm_name, current.state) == (VM_A, NAMES[VM_A], "current")
    checkpoint = files[f"Hyper-V/Snapshots/{CKPT_A}.vmrs"]
    # A checkpoint belongs to its VM: the VM's ID and name, the checkpoint's own name beside them.
    assert (checkpoint.vm_id, checkpoint.vm_name, checkpoint.state) == (VM_A, NAMES[VM_A], "checkpoint")
    assert checkpoint.checkpoint_name == NAMES[CKPT_A]
    assert files[f"Hyper-V/Virtual Machines/{VM_B}.vmcx"].vm_name == NAMES[VM_B]
    # No .vmcx: the legacy folder's GUID still names the VM.
    legacy = next(f for rel, f in files.items() if rel.endswith(".BIN"))
    assert (legacy.vm_id, legacy.vm_name, legacy.state) == (VM_E, None, "current")
    assert files[f"Legacy/Virtual Machines/{VM_F}/{VM_F}.vsv"].vm_id == VM_F


def test_classification_details_without_reading_ram(host) -> None:
    root, _ = host
    files = by_rel(root, discover([root]).files)
    a = classify(files[f"Hyper-V/Virtual Machines/{VM_A}.vmrs"])
    assert (a.analyse, a.vp_count, a.ram_bytes, a.os_family) == (True, 2, 2 << 20, "windows")
    assert "Windows NT 10.0 build 20348" in a.guest_os
    legacy = classify(next(f for rel, f in files.items() if rel.endswith(".BIN")))
    assert (legacy.analyse, legacy.os_family, legacy.kind) == (True, "linux", "bin+vsv")
    alone = classify(files["loose/memory.bin"])
    assert (alone.analyse, alone.os_family, alone.vp_count) == (True, None, 0)
    cut = classify(files[f"Hyper-V/Virtual Machines/{VM_D}.vmrs"])
    assert cut.cls == "damaged" and cut.content == "saved-memory"
    assert any("[truncated]" in f for f in cut.findings)
    gs = classify(files[f"Hyper-V/Virtual Machines/{VM_A}.vmgs"])
    assert not gs.analyse and "TPM" in gs.note
    for rel in ("loose/random.vmrs", f"Legacy/Virtual Machines/{VM_F}/{VM_F}.vsv"):
        assert not classify(files[rel]).analyse, rel


def test_a_file_given_by_name_is_always_listed(tmp_path: Path) -> None:
    junk = tmp_path / "readme.txt"
    junk.write_text("hello")
    found = discover([junk, tmp_path / "absent.vmrs"])
    assert [Path(f.path) for f in found.files] == [junk]
    assert classify(found.files[0]).cls == "not-hyperv"
    assert found.missing == [os.fspath(tmp_path / "absent.vmrs")]


def test_default_plugins_follow_the_guest_os() -> None:
    assert plugins.initial_plugins("windows", None) == ["hyperv.info", *plugins.WINDOWS]
    assert plugins.initial_plugins("linux", None) == ["hyperv.info", *plugins.LINUX]
    # Unknown OS: banners first; a Linux banner picks the Linux set, none the Windows set.
    assert plugins.initial_plugins(None, None) == ["hyperv.info", "banners.Banners"]
    done = ["hyperv.info", "banners.Banners"]
    assert plugins.after_probe("banners.Banners", True, done) == (["linux.pslist", "linux.sockstat"], "linux")
    # No Linux banner: windows.info looks for a Windows kernel, and only then do the other Windows plugins run.
    assert plugins.after_probe("banners.Banners", False, done) == (["windows.info"], None)
    done.append("windows.info")
    assert plugins.after_probe("windows.info", True, done) == ([p for p in plugins.WINDOWS if p not in done], "windows")
    assert plugins.after_probe("windows.info", False, done) == ([], None)  # unknown OS: nothing more
    assert plugins.initial_plugins("windows", ["a.b", "a.b", "c.d"]) == ["a.b", "c.d"]


def test_task_ids_change_with_the_file_and_results_are_written_whole(tmp_path: Path) -> None:
    f = tmp_path / "vm.vmrs"
    f.write_bytes(b"x" * 10)
    first = task_id([str(f)], "hyperv.info")
    assert first == task_id([str(f)], "hyperv.info") != task_id([str(f)], "windows.info")
    f.write_bytes(b"x" * 11)
    assert task_id([str(f)], "hyperv.info") != first
    out = OutDir(tmp_path / "out")
    assert out.load(first, "hyperv.info") is None
    result = {"status": "ok", "columns": ["a"], "rows": [{"a": 1}], "error": None}
    out.save(first, "hyperv.info", result)
    assert out.load(first, "hyperv.info") == {**result, "task": first, "plugin": "hyperv.info"}
    atomic_write(tmp_path / "out" / "x.txt", "whole")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tasks", "x.txt"]  # no temporary left


def test_without_dask_a_scheduler_run_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from volatility3_vmssd.cli.main import main

    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    (tmp_path / "in").mkdir()
    args = ["triage", "--out", str(tmp_path / "out"), "--scheduler", "tcp://127.0.0.1:9", str(tmp_path / "in")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "pip install '.[triage]'" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_the_single_file_path_does_not_import_dask() -> None:
    code = (
        "import sys; from volatility3_vmssd.cli.main import main; rc = main(['info', sys.argv[1]]);"
        " assert rc == 0; bad = [m for m in ('dask', 'distributed') if m in sys.modules]; assert not bad, bad"
    )
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))  # this checkout's code, not an installed copy
    sample = repo / "tests" / "data" / "sample.vmrs"
    cmd = [sys.executable, "-c", code, str(sample)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=repo, env=env)
    assert done.returncode == 0, done.stderr


def test_progress_counts_tasks_by_status_and_draws_only_when_asked() -> None:
    import io

    from volatility3_vmssd.triage.progress import TaskProgress

    stream = io.StringIO()
    bar = TaskProgress(stream=stream, enabled=True, interval=0)
    bar.add(3)
    bar.done("ok")
    bar.done("failed")
    assert "2/3 tasks (failed 1, ok 1)" in bar.line()
    bar.close()
    assert stream.getvalue().endswith("\n") and "\r" in stream.getvalue()
    quiet = io.StringIO()
    muted = TaskProgress(stream=quiet)  # a StringIO is not a terminal
    muted.add(1)
    muted.done("ok")
    muted.close()
    assert quiet.getvalue() == ""
