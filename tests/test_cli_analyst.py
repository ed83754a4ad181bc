"""``vmssd convert`` and ``vmssd create`` driven as an analyst drives them (subprocesses): no silent
zeros for RAM a cut copy lacks, one-line errors, and nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import REPO

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.errors import VmssdError

CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
MIB = 1 << 20


def vmssd(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, check=False)


@pytest.fixture(scope="module")
def half_guest(guest_vmrs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real guest's .vmrs cut to half its size (what an interrupted copy leaves)."""
    cut = tmp_path_factory.mktemp("cut") / "half.vmrs"
    with open(guest_vmrs, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(guest_vmrs) // 2))
    return cut


def test_convert_of_a_cut_copy_fails_naming_the_missing_ranges(half_guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.raw"
    r = vmssd("convert", half_guest, "-o", out, "--format", "raw")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    error = r.stderr.splitlines()[-1]
    assert error.startswith(f"vmssd convert: error: {half_guest}: ") and "could not be read" in error
    assert f"{out} not written (--allow-missing" in error
    assert "  missing GPA 0x" in r.stderr and "is missing or does not decode" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no image, no .partial, no sidecar


@pytest.mark.parametrize("fmt", ["raw", "elf"])
def test_convert_allow_missing_writes_and_records_the_ranges(half_guest: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"half.{fmt}"
    r = vmssd("convert", half_guest, "-o", out, "--format", fmt, "--allow-missing")
    assert r.returncode == 0, r.stderr
    assert "vmssd convert: warning:" in r.stderr and f"listed in {out}.missing.json" in r.stderr
    doc = json.loads(Path(f"{out}.missing.json").read_text())
    assert doc["format"] == "vmssd-missing/1" and doc["image"] == out.name and doc["image_format"] == fmt
    ranges = doc["ranges"]
    assert ranges and doc["missing_bytes"] == sum(m["size"] for m in ranges)
    with SavedStateProvider.load_vmrs(half_guest) as p:
        page, chunks = p.get_guest_physical_memory_chunks()
        ends = {c.guest_physical_start_page_index * page + c.page_count * page for c in chunks}
        readable = 0
        for m in ranges:  # every recorded range starts on data that cannot be read, right after data that can
            with pytest.raises(VmssdError):
                p.read_guest_physical_address(m["gpa"], 1)
            with pytest.raises(VmssdError):
                p.read_guest_physical_address(m["gpa"] + m["size"] - 1, 1)
            assert len(p.read_guest_physical_address(m["gpa"] - 1, 1)) == 1
            if m["gpa"] + m["size"] not in ends:
                assert len(p.read_guest_physical_address(m["gpa"] + m["size"], 1)) == 1
        for c in chunks:  # and nothing else is missing: every page outside the ranges reads
            for gpa in range(
                c.guest_physical_start_page_index * page, (c.guest_physical_start_page_index + c.page_count) * page, MIB
            ):
                if not any(m["gpa"] <= gpa < m["gpa"] + m["size"] for m in ranges):
                    p.read_guest_physical_address(gpa, page)
                    readable += page
    assert readable > 0
    if fmt == "raw":
        with open(out, "rb") as fh:
            first = ranges[0]
            fh.seek(first["gpa"])
            assert fh.read(first["size"]) == bytes(first["size"])
