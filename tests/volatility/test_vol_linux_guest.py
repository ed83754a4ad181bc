"""End to end: a real Linux guest saved as .vmrs (plain and split around a hole) and as a .bin/.vsv pair.

vol runs as a subprocess with the checkout's plugin shims (``-p volatility3_vmssd/volatility_plugins``),
the shared ISF (``-s``) and a fresh cache, and must print what it prints for the guest's ELF core
(``expected/``, produced by volatility3 2.28.2 from ``memory/guest.elf``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from vol_guest import HOLE, LINUX_PLUGINS, LinuxGuest, VolRuns
from vol_helpers import output_rows, require_volatility

require_volatility()

pytestmark = [pytest.mark.shared, pytest.mark.slow]


def expected_rows(guest: LinuxGuest, plugin: str) -> list[str]:
    return output_rows((guest.expected / f"{plugin}.txt").read_text())


def check(runs: VolRuns, name: str, plugin: str) -> None:
    result = runs.get(name)
    assert result.returncode == 0, f"{name}: vol failed\n{result.stderr[-3000:]}"
    assert output_rows(result.stdout) == expected_rows(runs.guest, plugin), f"{name}: output differs\n{result.stdout}"


@pytest.mark.parametrize("plugin", LINUX_PLUGINS)
def test_plain_vmrs_matches_elf_core(linux_vol: VolRuns, plugin: str) -> None:
    check(linux_vol, f"vmrs:{plugin}", plugin)


@pytest.mark.parametrize("plugin", ["linux.pslist", "banners.Banners"])
def test_split_vmrs_matches_elf_core(linux_vol: VolRuns, plugin: str) -> None:
    """Nothing the plugins print lives in 0xA0000-0xFFFFF, so the hole changes no row."""
    check(linux_vol, f"split:{plugin}", plugin)


@pytest.mark.parametrize("plugin", ["linux.pslist", "banners.Banners"])
def test_legacy_pair_matches_elf_core(linux_vol: VolRuns, plugin: str) -> None:
    check(linux_vol, f"bin:{plugin}", plugin)


def test_legacy_pair_stacking_log(linux_vol: VolRuns) -> None:
    log = linux_vol.get("bin:linux.pslist").stderr
    assert "Stacked HyperVSavedStateLayer using HyperVSavedStateStacker" in log
    assert "with its .vsv" in log


def test_vsv_given_with_f_works_like_the_bin(linux_vol: VolRuns) -> None:
    check(linux_vol, "vsv:linux.pslist", "linux.pslist")


def test_vsv_location_option_on_the_command_line(linux_vol: VolRuns) -> None:
    result = linux_vol.get("override:hyperv.info")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {v[0]: v[1] for v in (line.split("\t") for line in output_rows(result.stdout)) if len(v) > 1}
    assert rows["File kind"] == "legacy .bin + .vsv"
    assert rows["Virtual processors"] == "2"
    assert "No .vsv found" not in result.stderr


def test_registers_json_on_the_pair(linux_vol: VolRuns) -> None:
    result = linux_vol.get("vsv:hyperv.registers")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    by_name = {row["Register"]: row for row in rows}
    assert {row["VP"] for row in rows} == {1}
    assert by_name["cr3"]["Value"] == 0x2A56000  # VP 1's saved CR3 (registers.json)
    assert by_name["cs"]["Value"] == 0x10 and "attributes=0xa09b" in by_name["cs"]["Details"]


def _layerwriter_output(runs: VolRuns, name: str) -> Path:
    result = runs.get(name)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(runs.outdir(name.split(":")[0]).glob("*.raw"))
    assert len(written) == 1, result.stdout
    return written[0]


def _ram_chunks(guest: LinuxGuest, chunk: int = 4 << 20):
    from volatility3_vmssd.images.memoryimage import MemoryImage

    with MemoryImage.open(guest.elf) as image:
        for gpa in range(0, guest.ram_size, chunk):
            yield gpa, image.read(gpa, chunk)


def test_layerwriter_plain_equals_guest_ram(linux_vol: VolRuns) -> None:
    out = _layerwriter_output(linux_vol, "vmrs:layerwriter")
    assert out.stat().st_size == linux_vol.guest.ram_size
    want = hashlib.sha256()
    for _, data in _ram_chunks(linux_vol.guest):
        want.update(data)
    got = hashlib.sha256()
    with open(out, "rb") as fh:
        for block in iter(lambda: fh.read(4 << 20), b""):
            got.update(block)
    assert got.hexdigest() == want.hexdigest()


def test_layerwriter_split_is_ram_outside_the_hole_and_zero_inside(linux_vol: VolRuns) -> None:
    out = _layerwriter_output(linux_vol, "split:layerwriter")
    assert out.stat().st_size == linux_vol.guest.ram_size
    start, end = HOLE
    with open(out, "rb") as fh:
        for gpa, data in _ram_chunks(linux_vol.guest):
            written = fh.read(len(data))
            lo, hi = max(start, gpa), min(end, gpa + len(data))
            if lo < hi:
                assert written[lo - gpa : hi - gpa] == bytes(hi - lo)
                expect = data[: lo - gpa] + bytes(hi - lo) + data[hi - gpa :]
            else:
                expect = data
            assert written == expect, f"layerwriter output differs in the 4 MiB at {gpa:#x}"
