"""The CR3 fast path: a Windows kernel layer straight from a VP's saved CR3, validated, without scanning.

The guest is synthetic: page tables with the mode's self-reference, a kernel PE header that LSTAR
points into (what ``cpu/kernel_dtb.py`` proves) and a KUSER_SHARED_DATA page at its kernel and user
addresses (what Volatility's own ``Intel64LayerCheck``/``Intel32LayerCheck`` look at).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from vol_helpers import (
    KUSER_KERNEL_32,
    KUSER_KERNEL_64,
    KUSER_PAGE,
    NT_MAJOR_OFFSET,
    require_volatility,
    stack,
    state_json,
    vp_registers,
    windows_like_image,
    write_vmrs,
)

require_volatility()

from volatility3.framework import contexts, interfaces  # noqa: E402
from volatility3.framework.automagic import construct_layers, windows  # noqa: E402
from volatility3.framework.automagic import stacker as upstream_stacker  # noqa: E402
from volatility3.framework.configuration import requirements  # noqa: E402
from volatility3.framework.layers import intel  # noqa: E402

from volatility3_vmssd.volatility import (  # noqa: E402
    HyperVIntelStacker,
    HyperVSavedStateLayer,
    HyperVSavedStateStacker,
)

ROOT = 0x10000
PCID = 0x5


def windows_vmrs(tmp_path: Path, vps: list[dict], mode: str = "long") -> Path:
    return write_vmrs(tmp_path / "win.vmrs", windows_like_image(mode, root=ROOT), state_json(vps))


def all_stackers() -> list[type]:
    """Every stacker Volatility would try, in its order (ours included: the package is imported)."""
    import volatility3.framework.automagic
    import volatility3.framework.layers
    from volatility3 import framework

    framework.import_files(volatility3.framework.layers)
    framework.import_files(volatility3.framework.automagic)
    return sorted(framework.class_subclasses(interfaces.automagic.StackerLayerInterface), key=lambda s: s.stack_order)


def test_long_mode_cr3_stacks_windows_layer_without_scanning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = windows_vmrs(tmp_path, [vp_registers("long", ROOT | PCID, cr4=hex(0x6F0 | 0x20000))])
    scans: list[str] = []
    original = HyperVSavedStateLayer.scan

    def counting_scan(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        scans.append(type(args[1]).__name__ if len(args) > 1 else "?")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HyperVSavedStateLayer, "scan", counting_scan)
    ctx, names = stack(path, all_stackers())
    top = ctx.layers[names[0]]
    assert isinstance(top, intel.WindowsIntel32e)
    assert top.config["page_map_offset"] == ROOT  # PCID bits masked off
    assert scans == []  # no PageMapScanner, no banner scan: the saved CR3 was enough
    assert top.translate(KUSER_KERNEL_64)[0] == KUSER_PAGE
    assert int.from_bytes(top.read(KUSER_KERNEL_64 + NT_MAJOR_OFFSET, 4), "little") == 10
    base = ctx.layers[names[1]]
    assert isinstance(base, HyperVSavedStateLayer)
    meta = base.metadata
    assert (meta["os"], meta["architecture"], meta["pae"], meta["page_map_offset"]) == (
        "Windows",
        "Intel64",
        False,
        ROOT,
    )
    assert meta["hyperv_kernel_vp"] == 0
    assert "mapped" not in meta


@pytest.mark.parametrize(
    ("mode", "layer_class", "kernel_va", "cr3"),
    [
        ("pae", intel.WindowsIntelPAE, KUSER_KERNEL_32, ROOT | 0x18),  # PWT/PCD bits masked off
        ("32bit", intel.WindowsIntel, KUSER_KERNEL_32, ROOT | 0x18),
    ],
)
def test_32bit_paging_modes(tmp_path: Path, mode: str, layer_class: type, kernel_va: int, cr3: int) -> None:
    path = windows_vmrs(tmp_path, [vp_registers(mode, cr3)], mode=mode)
    ctx, names = stack(path)
    top = ctx.layers[names[0]]
    assert type(top) is layer_class
    assert top.config["page_map_offset"] == ROOT
    assert top.translate(kernel_va)[0] == KUSER_PAGE
    meta = ctx.layers[names[1]].metadata
    assert meta["architecture"] == "Intel32" and meta["pae"] is (mode == "pae")


def test_other_vps_are_tried(tmp_path: Path) -> None:
    """VP 0 runs with a CR3 that maps nothing useful (a user or foreign page table); VP 1 is fine."""
    path = windows_vmrs(tmp_path, [vp_registers("long", 0x30000), vp_registers("long", ROOT)])
    ctx, names = stack(path)
    assert isinstance(ctx.layers[names[0]], intel.WindowsIntel32e)
    assert ctx.layers[names[1]].metadata["hyperv_kernel_vp"] == 1


def test_cr3_that_does_not_validate_falls_through(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = windows_vmrs(tmp_path, [vp_registers("long", 0x30000), vp_registers("long", 0x7FFFF000)])
    ctx, names = stack(path, [HyperVSavedStateStacker])
    assert HyperVIntelStacker.stack(ctx, names[0]) is None
    base = ctx.layers[names[0]]
    assert base.metadata["os"] == "Unknown" and "page_map_offset" not in base.metadata
    ctx2, names2 = stack(path)
    assert isinstance(ctx2.layers[names2[0]], HyperVSavedStateLayer)  # nothing stacked above ours


def test_five_level_paging_is_refused_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = windows_vmrs(tmp_path, [vp_registers("long5", ROOT)])
    ctx, names = stack(path, [HyperVSavedStateStacker])
    with caplog.at_level(logging.WARNING):
        assert HyperVIntelStacker.stack(ctx, names[0]) is None
    assert "5-level" in caplog.text


def test_forced_vtl_chooses_the_cr3(tmp_path: Path) -> None:
    """Two saved VTLs, VtlIsRunnable set: every VTL's CR3 is a candidate (VTL0 first); a forced VTL is the only one."""
    vtls = {"0": vp_registers("long", ROOT)["0"], "1": vp_registers("long", 0x30000)["0"]}
    path = write_vmrs(
        tmp_path / "vtl.vmrs",
        windows_like_image(root=ROOT),
        {"format": "vmssd-registers/1", "vps": [{"vp_index": 0, "vtl_runnable": True, "vtls": vtls}]},
    )
    ctx, names = stack(path)
    assert isinstance(ctx.layers[names[0]], intel.WindowsIntel32e)
    assert ctx.layers[names[1]].metadata["hyperv_kernel_vtl"] == 0  # VtlIsRunnable does not mean "VTL1 ran"
    ctx, names = stack(path, options={"hyperv_vtl": 0})
    assert isinstance(ctx.layers[names[0]], intel.WindowsIntel32e)
    assert ctx.layers[names[1]].config["vtl"] == 0
    ctx, names = stack(path, options={"hyperv_vtl": 1})  # the secure kernel's tables map no KUSER_SHARED_DATA
    assert isinstance(ctx.layers[names[0]], HyperVSavedStateLayer) and HyperVIntelStacker.stack(ctx, names[0]) is None


def test_stack_is_rebuilt_from_config_alone(tmp_path: Path) -> None:
    """What LayerStacker does: serialise the top layer, rebuild everything in a fresh context."""
    path = windows_vmrs(tmp_path, [vp_registers("long", ROOT)])
    ctx, names = stack(path)
    config = ctx.layers[names[0]].build_configuration()
    fresh = contexts.Context()
    fresh.config.splice("plugins.Test.primary", config)
    requirement = requirements.TranslationLayerRequirement(name="primary")
    construct_layers.ConstructionMagic(fresh, "automagic.ConstructionMagic")(fresh, "plugins.Test", requirement)
    top = fresh.layers[fresh.config["plugins.Test.primary"]]
    assert isinstance(top, intel.WindowsIntel32e)
    assert top.translate(KUSER_KERNEL_64)[0] == KUSER_PAGE
    base = next(fresh.layers[n] for n in top.dependencies if isinstance(fresh.layers[n], HyperVSavedStateLayer))
    assert base.metadata["page_map_offset"] == ROOT


def test_published_metadata_feeds_upstream_fast_path(tmp_path: Path) -> None:
    """With our Intel stacker filtered out (--stackers), upstream's WindowsIntelStacker uses our metadata."""
    path = windows_vmrs(tmp_path, [vp_registers("long", ROOT)])
    ctx, names = stack(path)
    base_name = names[1]
    layer = windows.WindowsIntelStacker.stack(ctx, base_name)
    assert isinstance(layer, intel.WindowsIntel32e) and layer.config["page_map_offset"] == ROOT
    ctx2, names2 = stack(path, [HyperVSavedStateStacker])
    assert "page_map_offset" not in ctx2.layers[names2[0]].metadata  # nothing published without validation


def test_upstream_stacker_list_includes_ours() -> None:
    names = [s.__name__ for s in all_stackers()]
    assert names.index("HyperVSavedStateStacker") < names.index("VmwareStacker")
    assert names.index("HyperVIntelStacker") < names.index("LinuxIntelVMCOREINFOStacker")
    assert names.index("HyperVIntelStacker") < names.index("WindowsIntelStacker")
    assert "HyperVIntelStacker" not in upstream_stacker.choose_os_stackers(_FakeLinuxPlugin)


class _FakeLinuxPlugin:
    __module__ = "volatility3.plugins.linux.fake"


def test_kva_shadow_cr3_on_every_vp_is_refused_and_hyperv_info_says_why(tmp_path: Path) -> None:
    """User-mode VPs on a shadow table (user half + KUSER_SHARED_DATA, which Volatility's own check
    accepts, but no self-reference and no kernel image): nothing is stacked, and hyperv.info says so."""
    from vol_helpers import KUSER_USER, PageTables

    from volatility3_vmssd.volatility.plugin_impl import info_rows

    image = windows_like_image(root=ROOT)
    shadow = 0x38000  # in the zeroed table area, above what the kernel's tables use
    tables = PageTables(image, "long", shadow, shadow + 0x1000)
    tables.map(KUSER_KERNEL_64, KUSER_PAGE)
    tables.map(KUSER_USER, KUSER_PAGE, user=True)
    user = {"cpl": 3, "cs": {"selector": "0x33", "attributes": "0xa0fb"}}
    windows_nt = hex(1 << 48 | 4 << 40 | 10 << 32 | 19041)
    state = state_json([vp_registers("long", shadow | 1, **user) for _ in range(2)], guest_os_id=windows_nt)
    path = write_vmrs(tmp_path / "kva.vmrs", image, state)
    ctx, names = stack(path)
    layer = ctx.layers[names[0]]
    assert isinstance(layer, HyperVSavedStateLayer)  # the shadow CR3 was not stacked
    probe = build_probe(ctx, names[0], shadow)
    assert windows.Intel64LayerCheck.check(probe)  # ... although Volatility's own check accepts it
    rows = dict(info_rows(layer))
    # the kernel's DTB (0x10000) lies outside Volatility's scan windows, so the scan finds none either
    assert rows["Kernel DTB"] == (
        "none: no saved CR3 maps the kernel (user-mode shadow tables on every VP), and Volatility's DTB scan found none"
    )


def build_probe(ctx: interfaces.context.ContextInterface, memory: str, dtb: int) -> intel.Intel:
    from volatility3_vmssd.volatility.kernel import KernelCandidate, build_kernel_layer

    candidate = KernelCandidate(0, 0, 4, dtb, dtb, intel.WindowsIntel32e, windows.Intel64LayerCheck, "Intel64")
    return build_kernel_layer(ctx, memory, candidate)
