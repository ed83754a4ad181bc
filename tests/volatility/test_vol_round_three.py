"""Issue 26 from vol's side: ``vol -f FOLDER`` in one line, the one word for the VTL analysis uses, and the
one ``.vsv`` rule (``files.vsv_problem``) that ``vmssd --vsv`` applies too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from vol_helpers import MIB, REPO, require_volatility, run_vol, state_json, vp_registers, write_pair

from volatility3_vmssd.files import vsv_problem
from volatility3_vmssd.storage import HyperVStorageWriter

require_volatility()
pytestmark = [pytest.mark.slow]  # every vol start costs seconds

SAMPLE = REPO / "tests" / "data" / "sample.vmrs"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vol-cache")


def test_a_folder_given_to_vol_is_one_line(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "inside.vmrs").write_bytes(SAMPLE.read_bytes())
    for plugin in ("hyperv.info", "windows.pslist"):
        proc = run_vol(["-q", "-f", str(tmp_path), plugin], cache=cache)
        assert proc.returncode == 1, proc.stderr
        out = proc.stdout + proc.stderr
        assert "URLError" not in out and "Traceback" not in out and "Automagic exception" not in out, out
        assert proc.stderr.splitlines() == [
            f"vol: error: {tmp_path} is a directory, not a memory image: give one file with -f (a .vmrs, or a legacy"
            f" .bin with its .vsv beside it); 'vmssd triage {tmp_path}' finds every saved state in a folder"
        ], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inside.vmrs"]


def test_the_vtl_in_use_is_called_used_in_vol_and_vmssd(cache: Path) -> None:
    proc = run_vol(["-q", "-f", str(SAMPLE), "hyperv.registers"], cache=cache)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("VP\t"))
    assert header.split("\t")[:3] == ["VP", "VTL", "Used"], header
    assert "ctive" not in header
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
    registers = subprocess.run([*cli, "registers", str(SAMPLE)], capture_output=True, text=True, env=env, check=False)
    assert "VTL 0 (used)" in registers.stdout or "(used)" in registers.stdout
    info = subprocess.run([*cli, "info", str(SAMPLE)], capture_output=True, text=True, env=env, check=False)
    assert "(used)" in info.stdout


def test_one_vsv_rule_for_vmssd_and_vol(tmp_path: Path, cache: Path) -> None:
    state = state_json([vp_registers("long", 0x10000)])
    bin_path, vsv_path = write_pair(tmp_path / "p.bin", tmp_path / "p.vsv", bytes(2 * MIB), state)
    random_file = tmp_path / "random.vsv"
    random_file.write_bytes(bytes([0x5A, 0x17, 0x99, 0x03]) * 1024)
    vmcx = tmp_path / "vm.vmcx"
    with HyperVStorageWriter(vmcx) as w:
        w.set("/configuration/properties/name", "Test VM")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
    for wrong in (random_file, vmcx, SAMPLE):
        problem = vsv_problem(bin_path, wrong)
        assert problem is not None
        mine = subprocess.run(
            [*cli, "memmap", str(bin_path), "--vsv", str(wrong)], capture_output=True, text=True, env=env, check=False
        )
        assert (mine.returncode, mine.stderr) == (1, f"vmssd memmap: error: --vsv: {problem}\n")
        proc = run_vol(["-q", "-f", str(bin_path), "--hyperv-vsv-location", str(wrong), "hyperv.memmap"], cache=cache)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert f"--hyperv-vsv-location: {problem}" in proc.stdout, proc.stdout
    assert vsv_problem(bin_path, vsv_path) is None
