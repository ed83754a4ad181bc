"""The openvmm files (``../shared/data/openvmm``) through the DLL backend (fake DLL): the same answers.

The ARM64 file is the one case where the DLL backend's page-table depth used to differ (a fixed 4):
both backends now take it from TCR_EL1 (docs/format.md#arm64).
"""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import pytest
from fakedll import FakeDll
from shared_data import SHARED, need

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.registers import REGISTER_IDS
from volatility3_vmssd.dll.provider import DllSavedStateProvider

OPENVMM = SHARED / "data" / "openvmm"


@pytest.fixture(scope="module", params=["arm64", "x64_2vp"])
def vmrs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = need(OPENVMM / f"{request.param}.vmrs.xz")
    out = tmp_path_factory.mktemp("openvmm-dll") / f"{request.param}.vmrs"
    with lzma.open(src) as fin, open(out, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return out


def test_architecture_paging_and_registers_agree_with_native(vmrs: Path) -> None:
    with (
        SavedStateProvider.load_vmrs(vmrs) as n,
        DllSavedStateProvider.load_vmrs(vmrs, library=FakeDll().library()) as p,
    ):
        assert p.vp_count() == n.vp_count()
        for vp in range(n.vp_count()):
            assert p.get_architecture(vp) == n.get_architecture(vp)
            assert p.get_paging_mode(vp) == n.get_paging_mode(vp)
            assert p.get_paging_levels(vp) == n.get_paging_levels(vp) == 4  # 48-bit, 4 KiB granule / 4-level
            expressible = {k: v for k, v in n.get_registers(vp).items() if k in REGISTER_IDS}
            assert p.get_registers(vp) == expressible
            assert "pc" not in expressible and "cpsr" not in expressible
