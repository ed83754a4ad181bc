"""A VBS-shaped saved state through ``vol``: the Windows kernel is found through VTL0, never VTL1 by default.

On a VBS/HVCI guest every VP saves two register banks: VTL0 (the NT kernel) and VTL1 (the secure
kernel), and the VP VTL control page says ``VtlIsRunnable`` = 1, which means only that a higher VTL
can run (``docs/format.md``, "Which VTL is analysed").  Here VTL0's CR3 points at NT-like page tables
that map KUSER_SHARED_DATA; VTL1's tables map nothing.  The stacker must use VTL0 and say so; with
``--hyperv-vtl 1`` it tries VTL1 only and says why that fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vol_helpers import require_volatility, run_vol, vp_registers, windows_like_image, write_vmrs

require_volatility()

ROOT = 0x10000
SECURE_ROOT = ROOT + 0x28000  # zeroed by windows_like_image: empty tables, nothing mapped


@pytest.fixture(scope="module")
def vbs_vmrs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = windows_like_image("long", root=ROOT)
    assert image[SECURE_ROOT : SECURE_ROOT + 0x1000] == bytes(0x1000)
    vtl0 = vp_registers("long", ROOT)["0"]
    vtl1 = vp_registers("long", SECURE_ROOT, rip="0xfffff80000200000")["0"]
    doc = {
        "format": "vmssd-registers/1",
        "vps": [{"vp_index": i, "vtl_runnable": True, "vtls": {"0": vtl0, "1": vtl1}} for i in range(2)],
    }
    return write_vmrs(tmp_path_factory.mktemp("vbs") / "vbs.vmrs", image, doc)


def _json(args: list[str], cache: Path) -> list[dict]:
    r = run_vol(["-q", "-r", "json", *args], cache=cache)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _rows(info: list[dict]) -> dict[str, str]:
    return {row["Variable"]: row["Value"] for row in info}


@pytest.mark.slow
def test_vbs_guest_is_analysed_through_vtl0(vbs_vmrs: Path, tmp_path: Path) -> None:
    info = _rows(_json(["-f", str(vbs_vmrs), "hyperv.info"], tmp_path))
    assert info["VTLs"] == "VTL0 (used), VTL1 on every VP"
    assert info["Kernel DTB"].startswith(f"{ROOT:#x} from the saved CR3 of VP 0 VTL 0")
    rows = _json(["-f", str(vbs_vmrs), "hyperv.pagingmode"], tmp_path)
    verdicts = {(r["VP"], r["VTL"]): (r["Kernel page table"][:3], r["VTL used"]) for r in rows}
    assert verdicts == {
        (0, 0): ("yes", True),
        (1, 0): ("yes", True),
        (0, 1): ("no:", False),
        (1, 1): ("no:", False),
    }
    assert [(r["VP"], r["VTL"]) for r in rows][:2] == [(0, 0), (1, 0)]  # every VP's VTL0 first


@pytest.mark.slow
def test_forced_vtl1_is_tried_and_refused_with_the_reason(vbs_vmrs: Path, tmp_path: Path) -> None:
    info = _rows(_json(["-f", str(vbs_vmrs), "--hyperv-vtl", "1", "hyperv.info"], tmp_path))
    assert info["VTLs"] == "VTL0, VTL1 (used, forced) on every VP"
    assert "Kernel DTB" not in info  # VTL1's tables are empty: no self-reference, no kernel
    rows = _json(["-f", str(vbs_vmrs), "--hyperv-vtl", "1", "hyperv.pagingmode"], tmp_path)
    assert {(r["VP"], r["VTL"]) for r in rows} == {(0, 1), (1, 1)}
    assert all(r["Kernel page table"].startswith("no: no PML4 entry points back at the table") for r in rows)


def test_forcing_a_vtl_that_was_not_saved_fails_with_one_line(vbs_vmrs: Path, tmp_path: Path) -> None:
    r = run_vol(["-q", "-f", str(vbs_vmrs), "--hyperv-vtl", "2", "hyperv.info"], cache=tmp_path)
    assert "VTL 2 cannot be used: its registers were not saved (saved: VTL0, VTL1)" in r.stderr
    assert "Traceback" not in r.stderr
