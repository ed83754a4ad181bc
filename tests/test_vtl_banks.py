"""Saved states with several VTL banks per VP, written by ``vmssd create``: the VTL rule and its finding.

Each VTL of a VP has its own page tables mapping one kernel VA to a page that names the VTL, so every
answer says which bank was used.  The rule (docs/format.md#vtl-rule): VTL0 when VTL0 has registers,
else the lowest VTL that has them; VtlIsRunnable plays no part; a VP holding several VTLs gets a
finding that the executing VTL is not recorded and which one is used.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from shared_data import REPO

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.chunkparser import parse_partition_state
from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.errors import Findings
from volatility3_vmssd.storage import HyperVStorage

CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
MIB = 1 << 20
RAM = 8 * MIB
VA = 0xFFFF_F800_1234_5000  # one kernel VA, mapped differently by every VTL's tables
# Per VTL: (CR3, the page VA maps to).  Table pages sit below 4 MiB, the named pages above.
VTL_LAYOUT = {0: (0x100000, 0x400000), 1: (0x140000, 0x500000), 2: (0x180000, 0x600000)}
LOW_OS_ID = 0x0001_040A_0000_4A61  # Windows 10 build 19041 (closed-source layout)
SECURE_OS_ID = 0x0001_0A0A_0000_4A61  # another closed-source id, so VTL1's can be told apart


def marker(vtl: int) -> bytes:
    return f"page of VTL {vtl}".encode().ljust(32, b".")


def map_va(ram: bytearray, cr3: int, va: int, pa: int) -> None:
    """4-level tables at cr3, cr3+4K, +8K, +12K mapping the 4 KiB page ``va`` -> ``pa`` (present, writable)."""
    tables = [cr3 + i * 0x1000 for i in range(4)]
    for level, table in enumerate(tables):
        index = va >> (39 - 9 * level) & 0x1FF
        target = tables[level + 1] if level < 3 else pa
        struct.pack_into("<Q", ram, table + 8 * index, target | 0x3)


def image(path: Path) -> Path:
    ram = bytearray(RAM)
    for vtl, (cr3, page) in VTL_LAYOUT.items():
        map_va(ram, cr3, VA, page)
        ram[page : page + 32] = marker(vtl)
    path.write_bytes(ram)
    return path


def bank(vtl: int) -> dict[str, Any]:
    """A long-mode kernel bank of ``vtl``: its own CR3 and RIP."""
    cr3 = VTL_LAYOUT[vtl][0]
    cs = {"selector": "0x10", "base": "0x0", "limit": "0xffffffff", "attributes": "0xa09b"}
    return {"rip": hex(VA + vtl), "cr0": "0x80050033", "cr3": hex(cr3), "cr4": "0x6f8", "efer": "0xd01", "cs": cs}


def create(tmp_path: Path, name: str, vps: list[dict[str, Any]], **extra: Any) -> Path:
    regs = tmp_path / f"{name}.json"
    regs.write_text(json.dumps({"format": "vmssd-registers/1", "vendor": "intel", "vps": vps, **extra}))
    out = tmp_path / f"{name}.vmrs"
    run = vmssd("create", "--memory", image(tmp_path / f"{name}.raw"), "--registers", regs, "-o", out, "--jobs", "1")
    assert run.returncode == 0, run.stderr
    return out


def vmssd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def vtl_findings(p: SavedStateProvider) -> list[str]:
    return [f.message for f in p.findings() if f.kind == "vtl-not-recorded"]


def check_reads(path: Path, p: SavedStateProvider, used: dict[int, int]) -> None:
    """Provider and ``vmssd read --virtual`` on every VP go through the bank of the VTL the rule picked."""
    for vp, vtl in used.items():
        assert p.get_active_virtual_trust_level(vp) == vtl
        assert p.get_registers(vp)["cr3"] == VTL_LAYOUT[vtl][0]
        assert p.guest_virtual_to_physical(vp, VA) == VTL_LAYOUT[vtl][1]
        run = vmssd("read", path, hex(VA), "32", "--virtual", "--vp", str(vp), "-o", path.with_suffix(f".vp{vp}"))
        assert run.returncode == 0, run.stderr
        assert path.with_suffix(f".vp{vp}").read_bytes() == marker(vtl)


@pytest.mark.slow
def test_vtl0_and_vtl1_use_vtl0_whatever_vtl_is_runnable_says(tmp_path: Path) -> None:
    vps = [
        {"vp_index": 0, "vtls": {"0": bank(0), "1": bank(1)}},  # VtlIsRunnable written as 1, as openvmm does
        {"vp_index": 1, "vtl_runnable": True, "vtls": {"0": bank(0), "1": bank(1)}},
        {"vp_index": 2, "vtl_runnable": False, "vtls": {"0": bank(0), "1": bank(1)}},
    ]
    path = create(tmp_path, "vbs", vps, guest_os_id=hex(LOW_OS_ID), guest_os_ids={"1": hex(SECURE_OS_ID)})
    with SavedStateProvider.load_vmrs(path) as p:
        assert [p.get_virtual_trust_levels(vp) for vp in range(3)] == [[0, 1]] * 3
        check_reads(path, p, {0: 0, 1: 0, 2: 0})
        (message,) = vtl_findings(p)
        assert "VPs 0, 1, 2 hold VTLs 0, 1" in message and "not record which VTL was executing" in message
        assert message.endswith("VTL 0 is used")
        # A forced VTL that was saved is honoured: VTL1's tables, VTL1's page.
        p.force_active_virtual_trust_level(1, 1)
        assert p.guest_virtual_to_physical(1, VA) == VTL_LAYOUT[1][1]
        assert p.read_guest_physical_address(p.guest_virtual_to_physical(1, VA), 32) == marker(1)
        assert p.get_active_virtual_trust_level(0) == 0
    with HyperVStorage.open(path) as storage:
        findings = Findings()
        state = parse_partition_state(
            storage.get("/savedstate/savedVM/partition_state").read(), path=str(path), findings=findings
        )
    assert [vp.vtl_runnable for vp in state.vps] == [True, True, False]
    assert state.partition_vtls == [0, 1]
    # One OsId per VTL, VTL0's by default; neither overwrites the other.
    assert state.guest_os_ids == {0: LOW_OS_ID, 1: SECURE_OS_ID}
    assert state.guest_os_info is not None and state.guest_os_info.value == LOW_OS_ID
    assert state.guest_os_info_for(1).value == SECURE_OS_ID  # type: ignore[union-attr]
    assert state.guest_os_info_for(2) is None
    assert [f.kind for f in findings] == ["os-id", "vtl-not-recorded"]
    # vmssd registers --json gives both ids back, in the form vmssd create reads.
    run = vmssd("registers", "--json", path)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert (int(doc["guest_os_id"], 16), int(doc["guest_os_ids"]["1"], 16)) == (LOW_OS_ID, SECURE_OS_ID)
    assert [vp["vtl_runnable"] for vp in doc["vps"]] == [True, True, False]
    assert state_from_json(doc).guest_os_ids == state.guest_os_ids


def test_vtl0_and_vtl2_paravisor_never_picks_a_vtl_without_registers(tmp_path: Path) -> None:
    vps = [
        {"vp_index": 0, "vtls": {"0": bank(0), "2": bank(2)}},
        {"vp_index": 1, "vtls": {"0": bank(0), "2": bank(2)}},
        {"vp_index": 2, "vtls": {"0": {}, "2": bank(2)}},  # VTL0 present, but no registers saved for it
    ]
    path = create(tmp_path, "paravisor", vps)
    with SavedStateProvider.load_vmrs(path) as p:
        assert p.get_guest_enabled_virtual_trust_levels() == 0b101
        assert [p.get_virtual_trust_levels(vp) for vp in range(3)] == [[0, 2]] * 3
        check_reads(path, p, {0: 0, 1: 0, 2: 2})
        for vp in range(3):  # architecture and paging mode answer on every VP (they raised before)
            assert p.get_architecture(vp).name == "X64" and p.get_paging_mode(vp).name == "LONG"
        messages = vtl_findings(p)
        assert len(messages) == 2
        assert "VPs 0, 1 hold VTLs 0, 2" in messages[0] and messages[0].endswith("VTL 0 is used")
        assert "VP 2 holds VTLs 0, 2" in messages[1]
        assert messages[1].endswith("VTL 2 is used (no registers saved for VTL 0)")


def test_one_vtl_per_vp_has_no_finding(tmp_path: Path) -> None:
    path = create(tmp_path, "plain", [{"vp_index": 0, "vtls": {"0": bank(0)}}, {"vp_index": 1, "vtls": {"1": bank(1)}}])
    with SavedStateProvider.load_vmrs(path) as p:
        assert vtl_findings(p) == []
        check_reads(path, p, {0: 0, 1: 1})


@pytest.mark.parametrize("vtls", [{"0": {}, "1": {}}, {"1": {}}])
def test_a_vp_without_any_registers_is_reported_not_invented(tmp_path: Path, vtls: dict[str, Any]) -> None:
    path = create(tmp_path, "empty", [{"vp_index": 0, "vtls": {"0": bank(0)}}, {"vp_index": 1, "vtls": vtls}])
    with SavedStateProvider.load_vmrs(path) as p:
        assert p.get_virtual_trust_levels(1) == sorted(map(int, vtls))
        assert p.get_registers(1, int(min(vtls))) == {}  # the markers were written, no zeros invented
        messages = vtl_findings(p)
        if len(vtls) > 1:
            assert len(messages) == 1 and messages[0].endswith("none of them has saved registers")
        else:
            assert messages == []


@pytest.mark.slow
def test_vmssd_read_virtual_with_a_forced_vtl(tmp_path: Path) -> None:
    """`vmssd read --virtual --vtl N` uses that VTL's page tables when it was saved, and refuses one that was not."""
    vps = [{"vp_index": 0, "vtls": {"0": bank(0), "2": bank(2)}}]
    path = create(tmp_path, "forced", vps)
    with SavedStateProvider.load_vmrs(path) as p:
        va = p.get_registers(0, 2)["rip"]
        p.force_active_virtual_trust_level(0, 2)
        expected = p.read_guest_physical_address(p.guest_virtual_to_physical(0, va), 16)
    out = tmp_path / "va.bin"
    r = vmssd("read", path, hex(va), "16", "--virtual", "--vp", "0", "--vtl", "2", "-o", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == expected
    r = vmssd("read", path, hex(va), "16", "--virtual", "--vtl", "1")
    assert r.returncode == 1 and "VTL 1 cannot be used: its registers were not saved (saved: VTL0, VTL2)" in r.stderr
    assert "Traceback" not in r.stderr
    r = vmssd("read", path, "0x1000", "16", "--vtl", "0")
    assert r.returncode == 2 and "--vtl only applies with --virtual" in r.stderr
