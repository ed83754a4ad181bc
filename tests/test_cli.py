"""``vmssd`` driven as a user would: subprocesses, exit codes, JSON parsed back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import REAL, REPO, need

SAMPLE = REPO / "tests" / "data" / "sample.vmrs"


def vmssd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "volatility3_vmssd.cli.main", *args], capture_output=True, text=True, cwd=REPO
    )


def test_readme_main_job_on_the_sample() -> None:
    r = vmssd("info", str(SAMPLE))
    assert r.returncode == 0, r.stderr
    assert "Virtual processors     2" in r.stdout and "GPA chunks             2" in r.stdout


def test_info_json_parses_back() -> None:
    info = json.loads(vmssd("info", "--json", str(SAMPLE)).stdout)
    assert info["file_kind"] == "vmrs" and info["vp_count"] == 2 and info["findings"] == []
    assert info["ram_bytes"] == (8 << 20) - 0x60000


def test_keys_json_lists_the_saved_state_keys() -> None:
    keys = {k["path"]: k for k in json.loads(vmssd("keys", "--json", str(SAMPLE)).stdout)}
    assert keys["/savedstate/RamMemoryBlock1"]["size"] == 48
    assert keys["/savedstate/VmVersion"]["value"] == 0x900


def test_bad_paths_and_usage_errors() -> None:
    r = vmssd("info", "/nonexistent/vm.vmrs")
    assert r.returncode == 1 and "No such file" in r.stderr and r.stderr.count("\n") == 1
    r = vmssd("info")
    assert r.returncode == 2
    r = vmssd("frobnicate")
    assert r.returncode == 2


def test_garbage_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.vmrs"
    junk.write_bytes(b"\0" * 5000)
    r = vmssd("info", str(junk))
    assert r.returncode == 1 and str(junk) in r.stderr and "Traceback" not in r.stderr
    r = vmssd("-v", "info", str(junk))
    assert "Traceback" in r.stderr


@pytest.mark.slow
def test_create_refuses_to_overwrite_and_writes_a_pair(tmp_path: Path) -> None:
    raw = tmp_path / "ram.raw"
    raw.write_bytes(bytes(range(256)) * 4096 * 2)  # 2 MiB
    regs = tmp_path / "regs.json"
    regs.write_text(json.dumps({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rip": "0x1234"}}}]}))
    out = tmp_path / "vm.bin"
    r = vmssd("create", "--memory", str(raw), "--registers", str(regs), "--legacy", "-o", str(out), "--jobs", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "vm.vsv").exists()
    info = json.loads(vmssd("info", "--json", str(tmp_path / "vm.vsv")).stdout)
    assert info["file_kind"] == "bin+vsv" and info["vp_count"] == 1
    r = vmssd("create", "--memory", str(raw), "--registers", str(regs), "--legacy", "-o", str(out))
    assert r.returncode == 1 and "exists" in r.stderr
    r = vmssd("create", "--memory", str(raw), "--registers", str(regs), "-o", str(raw))
    assert r.returncode == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = vmssd("create", "--memory", str(raw), "--registers", str(bad), "-o", str(tmp_path / "x.vmrs"))
    assert r.returncode == 1 and "not valid JSON" in r.stderr


def test_info_on_a_vmcx_says_what_it_is_and_shows_its_settings() -> None:
    """A .vmcx is not called a .vmrs, and its own VM settings are shown (what hyperv.info shows of a .vmcx)."""
    vmcx = need(REAL / "test.vmcx")
    r = vmssd("info", str(vmcx))
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    col = len(first) - len(first[len("File kind") :].lstrip())  # the label column fits the longest label
    rows = {line[:col].strip(): line[col:] for line in r.stdout.splitlines() if not line.startswith(" ")}
    assert rows["File kind"] == "HyperVStorage container without saved memory"
    assert rows["Saved memory"].startswith("the file holds no saved guest memory")
    assert rows["VM configuration"] == str(vmcx) and rows["VM name"] == "Other Location"
    doc = json.loads(vmssd("info", "--json", str(vmcx)).stdout)
    assert doc["file_kind"] == "vmrs" and doc["vm_configuration"]["VM name"] == "Other Location"
