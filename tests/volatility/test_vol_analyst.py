"""``vol`` driven as an analyst drives it: the ``hyperv.*`` plugins on the wrong inputs fail the way
Volatility plugins fail (exit code 1, one "Unsatisfied requirement" line saying why, no traceback), and
run only the Hyper-V stackers (no OS scanner: that is what makes them fast)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from vol_helpers import MIB, REAL, need, require_volatility, run_vol, state_json, vp_registers, write_pair, write_vmrs

require_volatility()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vol-cache")


@pytest.fixture(scope="module")
def states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyst")
    state = state_json([vp_registers("long", 0x10000), vp_registers("long", 0x20000)])
    image = bytes(range(256)) * (2 * MIB // 256)
    vmrs = write_vmrs(root / "vm.vmrs", image, state)
    (root / "pair").mkdir()
    bin_path, _ = write_pair(root / "pair" / "p.bin", root / "pair" / "p.vsv", image, state)
    alone = root / "alone.bin"
    shutil.copyfile(bin_path, alone)
    (root / "empty.vmrs").write_bytes(b"")
    (root / "random.vmrs").write_bytes(bytes([0x5A, 0x17, 0x99, 0x03]) * 4096)
    return {"vmrs": vmrs, "alone": alone, "empty": root / "empty.vmrs", "random": root / "random.vmrs"}


def unmet_line(proc) -> str:
    """The one line vol prints for the unmet requirement; the run must have failed cleanly."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("Unsatisfied requirement")]
    assert len(lines) == 1, proc.stdout
    return lines[0]


@pytest.mark.parametrize("renderer", ["quick", "json"])
def test_not_a_saved_state_exits_1_saying_why(states, cache: Path, renderer: str) -> None:
    proc = run_vol(["-q", "-r", renderer, "-f", str(states["random"]), "hyperv.info"], cache=cache)
    line = unmet_line(proc)
    assert line == (
        f"Unsatisfied requirement plugins.Info.primary: {states['random']} is not a Hyper-V saved state: it begins"
        " with 5a179903, not the signature of a HyperVStorage file (.vmrs, .vmcx, .vsv: 0x01282014) or of a legacy"
        " .bin (0x02182003)"
    )
    assert "[]" not in proc.stdout


def test_empty_file(states, cache: Path) -> None:
    line = unmet_line(run_vol(["-q", "-f", str(states["empty"]), "hyperv.memmap"], cache=cache))
    assert line.endswith(f"{states['empty']} is empty (0 bytes): not a Hyper-V saved state")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["test.VMRS", "test.vmcx"])
def test_files_without_saved_memory_say_what_they_are_and_what_to_collect(name: str, cache: Path) -> None:
    path = need(REAL / name)  # fox-it/dissect.hypervisor test data (AGPL-3.0; used as data only)
    what = f"{path}: the file holds no saved guest memory: a .vmcx (VM configuration), the runtime state of a"
    proc = run_vol(["-q", "-f", str(path), "hyperv.info"], cache=cache)
    line = unmet_line(proc)
    assert f"plugins.Info.primary: {what}" in line
    assert "save the VM (Save-VM) or take a standard checkpoint" in line and "a production checkpoint" in line
    # windows.* plugins get the same sentence at normal verbosity, from the stacker
    proc = run_vol(["-q", "-f", str(path), "windows.info"], cache=cache)
    assert proc.returncode == 1 and f"WARNING  volatility3_vmssd.volatility.stackers: {what}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_registers_of_a_bin_without_its_vsv(states, cache: Path) -> None:
    line = unmet_line(run_vol(["-q", "-f", str(states["alone"]), "hyperv.registers"], cache=cache))
    assert line.startswith(f"Unsatisfied requirement plugins.Registers.saved_state: {states['alone']} has no CPU state")
    assert "--hyperv-vsv-location" in line


@pytest.mark.slow
def test_registers_of_a_vp_that_does_not_exist(states, cache: Path) -> None:
    line = unmet_line(run_vol(["-q", "-f", str(states["vmrs"]), "hyperv.registers", "--vp", "7"], cache=cache))
    assert (
        line == "Unsatisfied requirement plugins.Registers.saved_state: --vp 7: this saved state has 2 VP(s) (VPs 0-1)"
    )
    proc = run_vol(["-q", "-f", str(states["vmrs"]), "hyperv.registers", "--vp", "1"], cache=cache)
    assert proc.returncode == 0 and "\n1\t0\tTrue\tcr3\t0x20000\t" in proc.stdout


@pytest.mark.slow
def test_hyperv_plugins_run_only_the_hyperv_stackers(states, cache: Path) -> None:
    proc = run_vol(["-vvvv", "-f", str(states["vmrs"]), "hyperv.info"], cache=cache)
    assert proc.returncode == 0, proc.stderr
    tried = {line.rsplit(" ", 1)[-1] for line in proc.stderr.splitlines() if "Attempting to stack using" in line}
    assert tried == {"HyperVSavedStateStacker", "HyperVIntelStacker"}, tried
    assert "Findings\tnone\t0" in proc.stdout
    # other plugins still get every stacker
    proc = run_vol(["-vvvv", "-f", str(states["vmrs"]), "banners.Banners"], cache=cache)
    tried = {line.rsplit(" ", 1)[-1] for line in proc.stderr.splitlines() if "Attempting to stack using" in line}
    assert {"HyperVSavedStateStacker", "WindowsIntelStacker", "LinuxIntelStacker"} <= tried, tried


@pytest.mark.slow
def test_a_cut_copy_is_reported_once_at_normal_verbosity(tmp_path: Path, cache: Path) -> None:
    import random

    state = state_json([vp_registers("long", 0x10000)])
    full = write_vmrs(tmp_path / "full.vmrs", random.Random(3).randbytes(8 * MIB), state)  # raw pages: 1 MiB values
    cut = tmp_path / "cut.vmrs"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size * 6 // 10])
    from volatility3_vmssd import open_saved_state

    with open_saved_state(cut) as p:
        damage = p.ramblock_damage()
    assert damage.used == 8 and damage.missing >= 3, damage
    proc = run_vol(["-q", "-f", str(cut), "banners.Banners"], cache=cache)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "is truncated or damaged" in line]
    assert len(warnings) == 1, proc.stderr
    assert f"{cut} is truncated or damaged: {damage.missing} of the 8 RamBlocks" in warnings[0]
    assert f"up to {damage.missing} MiB of guest RAM cannot be read" in warnings[0]
    proc = run_vol(["-q", "-f", str(full), "banners.Banners"], cache=cache)
    assert proc.returncode == 0 and "truncated" not in proc.stderr


@pytest.mark.slow
def test_vsv_location_that_is_wrong_is_refused_in_one_line(states, cache: Path, tmp_path: Path) -> None:
    pair_bin = states["alone"].parent / "pair" / "p.bin"
    vmcx = tmp_path / "vm.vmcx"
    from volatility3_vmssd.storage import HyperVStorageWriter

    with HyperVStorageWriter(vmcx) as w:
        w.set("/configuration/properties/name", "Test VM")
    cases = {
        tmp_path / "nowhere.vsv": f"{tmp_path / 'nowhere.vsv'} does not exist",
        states["random"]: f"{states['random']} is not the .vsv of {pair_bin}: it is not a HyperVStorage file",
        vmcx: f"{vmcx} is not the .vsv of {pair_bin}: it is a VM configuration (.vmcx)",
    }
    for vsv, why in cases.items():
        proc = run_vol(["-q", "-f", str(pair_bin), "--hyperv-vsv-location", str(vsv), "hyperv.registers"], cache=cache)
        line = unmet_line(proc)
        assert line.startswith(f"Unsatisfied requirement plugins.Registers.primary: --hyperv-vsv-location: {why}"), line
        assert f"ERROR    volatility3_vmssd.volatility.stackers: --hyperv-vsv-location: {why}" in proc.stderr
    renamed = tmp_path / "renamed.vsv"
    shutil.copyfile(pair_bin.with_suffix(".vsv"), renamed)
    proc = run_vol(
        ["-q", "-f", str(pair_bin), "--hyperv-vsv-location", renamed.as_uri(), "hyperv.registers", "--vp", "1"],
        cache=cache,
    )
    assert proc.returncode == 0 and "\n1\t0\tTrue\tcr3\t0x20000\t" in proc.stdout, proc.stderr
