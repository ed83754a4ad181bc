"""``--hyperv-backend dll`` through ``vol``: the DLL backend (driven by the fake DLL) serves every plugin.

The fake DLL answers from the native reader, so the outputs must be the same; what differs is only what
the DLL cannot tell (container and VM versions, RamBlock count, decoder) and the backend's own name.
"""

from __future__ import annotations

import json

import pytest
from vol_guest import BACKEND_PLUGINS, VolRuns
from vol_helpers import output_rows, require_volatility

from volatility3_vmssd.cpu.registers import REGISTER_IDS

require_volatility()

pytestmark = [pytest.mark.shared, pytest.mark.slow]

#: hyperv.info rows that name the backend or that only the native reader can fill in (docs/provider.md)
BACKEND_ROWS = {
    "Backend",
    "XPRESS decoder",
    "DLL",
    "Container version",
    "VM version",
    "Saved-state type",
    "Processor vendor",
    "RamBlocks",
    "Replay log",
}


def _json(runs: VolRuns, name: str) -> list[dict]:
    result = runs.get(name)
    assert result.returncode == 0, f"{name}: vol failed\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


@pytest.mark.parametrize("plugin", BACKEND_PLUGINS)
def test_dll_backend_gives_the_native_output(linux_vol: VolRuns, plugin: str) -> None:
    native, dll = _json(linux_vol, f"native:{plugin}"), _json(linux_vol, f"dll:{plugin}")
    assert native, f"{plugin}: no rows"
    if plugin == "hyperv.info":
        backend = {row["Variable"]: row["Value"] for row in dll}
        assert backend["Backend"] == "dll" and "vmsavedstatedumpprovider" in backend["XPRESS decoder"]
        native = [row for row in native if row["Variable"] not in BACKEND_ROWS]
        dll = [row for row in dll if row["Variable"] not in BACKEND_ROWS]
    if plugin == "hyperv.memmap":  # the DLL does not expose the RamMemoryBlock flags: "?" there
        assert {row["Flags"] for row in dll} == {"?"}
        native = [{**row, "Flags": "?"} for row in native]
    if plugin == "hyperv.registers":  # the DLL has no register id for CPL, XCR0 and the virtual MSRs
        native = [row for row in native if row["Register"] in REGISTER_IDS]
    assert dll == native


def test_linux_pslist_through_the_dll_backend(linux_vol: VolRuns) -> None:
    native, dll = linux_vol.get("vmrs:linux.pslist"), linux_vol.get("dll:linux.pslist")
    assert dll.returncode == 0, dll.stderr[-3000:]
    assert output_rows(dll.stdout) == output_rows(native.stdout) and len(output_rows(dll.stdout)) > 10
