"""The hyperv.* plugins, loaded from the checkout's shims exactly as ``vol -p`` loads them, run in-process.

(The real-guest tests run them through vol as well; here the inputs are small synthetic saved states.)
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from vol_helpers import (
    MIB,
    PLUGIN_DIR,
    REAL,
    ROOT_DEFAULT,
    grid_rows,
    need,
    require_volatility,
    stack,
    state_json,
    vp_registers,
    windows_like_image,
    write_pair,
    write_vmrs,
)

require_volatility()

import volatility3.plugins  # noqa: E402
from volatility3 import framework  # noqa: E402
from volatility3.cli import text_renderer  # noqa: E402
from volatility3.framework import interfaces, renderers  # noqa: E402

import volatility3_vmssd  # noqa: E402
from volatility3_vmssd.storage import HyperVStorageWriter  # noqa: E402

PLUGINS = {"info": "Info", "registers": "Registers", "pagingmode": "PagingMode", "memmap": "Memmap"}
HOLE = (0xA0000, 0x100000)


@pytest.fixture(scope="module")
def plugin_classes() -> dict[str, type]:
    """Import the shims the way vol does: our plugin dir first in ``volatility3.plugins.__path__``."""
    saved = list(volatility3.plugins.__path__)
    volatility3.plugins.__path__ = [str(PLUGIN_DIR), *saved]
    try:
        failures = framework.import_files(volatility3.plugins, True)
    finally:
        volatility3.plugins.__path__ = saved
    assert not [f for f in failures if "hyperv" in f], failures
    listed = framework.list_plugins()
    return {name: listed[f"hyperv.{name}.{cls}"] for name, cls in PLUGINS.items()}


@pytest.fixture(scope="module")
def windows_state() -> dict:
    vp1 = vp_registers("long", 0x30000)
    vp1["0"]["cs"] = {"selector": "0x10", "base": "0x0", "limit": "0xffffffff", "attributes": "0xa09b"}
    vp1["0"]["gdtr"] = {"base": "0xfffff80000001000", "limit": "0x7f"}
    return state_json([vp_registers("long", ROOT_DEFAULT | 0x3), vp1])


@pytest.fixture(scope="module")
def saved_states(windows_state: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plugins")
    image = windows_like_image()
    vm = root / "Virtual Machines"
    vm.mkdir()
    guid = "282874FC-59D6-4F30-BC04-5FDD909C82E0"
    vmrs = write_vmrs(vm / f"{guid}.vmrs", image, windows_state, holes=[HOLE])
    with HyperVStorageWriter(vm / f"{guid}.VMCX") as w:  # what Hyper-V keeps beside it (keys of a real .vmcx)
        w.set("/configuration/properties/name", "Test VM")
        w.set("/configuration/properties/global_id", guid)
        w.set("/configuration/properties/version", 0x0900)
        w.set("/configuration/settings/memory/bank/size", 4)
        w.set("/configuration/settings/memory/bank/dynamic_memory_enabled", False)
        w.set("/configuration/settings/processors/count", 2)
    bin_path, vsv_path = write_pair(root / "pair.bin", root / "pair.vsv", image, windows_state)
    return {"vmrs": vmrs, "bin": bin_path, "vsv": vsv_path}


def run_plugin(cls: type, path: Path, **config: Any) -> tuple[interfaces.plugins.PluginInterface, list[tuple]]:
    ctx, names = stack(path)
    config_path = f"plugins.{cls.__name__}"
    ctx.config[f"{config_path}.primary"] = names[0]
    for key, value in config.items():
        ctx.config[f"{config_path}.{key}"] = value
    plugin = cls(ctx, config_path)
    return plugin, grid_rows(plugin.run())


def as_json(plugin: interfaces.plugins.PluginInterface, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    text_renderer.JsonRenderer().render(plugin.run())
    monkeypatch.undo()
    return json.loads(out.getvalue())


def test_listed_once_under_short_names(plugin_classes: dict[str, type]) -> None:
    listed = framework.list_plugins()
    for name, cls in plugin_classes.items():
        assert cls.__module__ == f"volatility3.plugins.hyperv.{name}"
        assert cls._required_framework_version[0] == 2 and cls._version == (1, 0, 0)
    # No plugin class is defined inside our own package (the mixins are not plugins).
    assert not [n for n in listed if n.startswith("volatility3_vmssd")]
    assert not [n for n, c in listed.items() if c.__module__.startswith("volatility3_vmssd")]


def test_info(plugin_classes: dict[str, type], saved_states: dict[str, Path], monkeypatch) -> None:
    plugin, rows = run_plugin(plugin_classes["info"], saved_states["vmrs"])
    info = {r[0]: r[1] for r in rows}
    assert info["File kind"] == ".vmrs"
    assert info["Virtual processors"] == "2"
    assert info["VM version"] == "9.0"
    assert info["Guest RAM"].startswith(f"{4 * MIB - 0x60000:,} bytes")
    assert info["GPA chunks"] == "2"
    assert info["XPRESS decoder"] in ("pyfwnt", "ntdll", "python")
    assert info["Kernel DTB"].startswith(f"{ROOT_DEFAULT:#x} from the saved CR3 of VP 0")
    assert info["VM name"] == "Test VM"
    assert info["VM ID"] == "282874FC-59D6-4F30-BC04-5FDD909C82E0"
    assert info["VM memory (startup)"] == "4 MiB" and info["VM processors"] == "2"
    assert info["VM dynamic memory"] == "no"
    rendered = as_json(plugin, monkeypatch)
    assert {"Variable": "VM name", "Value": "Test VM", "Number": None, "__children": []} in rendered
    numbers = {row["Variable"]: row["Number"] for row in rendered}
    assert numbers["Virtual processors"] == 2 and numbers["GPA chunks"] == 2
    assert numbers["Guest RAM"] == 4 * MIB - 0x60000 and numbers["Kernel DTB"] == ROOT_DEFAULT
    assert info["Findings"] == "none" and numbers["Findings"] == 0


def test_info_on_legacy_pair(plugin_classes: dict[str, type], saved_states: dict[str, Path]) -> None:
    for given in ("bin", "vsv"):
        _, rows = run_plugin(plugin_classes["info"], saved_states[given])
        info = {r[0]: r[1] for r in rows}
        assert info["File kind"] == "legacy .bin + .vsv"
        assert [r[1] for r in rows if r[0] == "File"] == [str(saved_states["bin"]), str(saved_states["vsv"])]


def test_info_reads_the_real_vmcx(plugin_classes, saved_states, tmp_path: Path) -> None:
    source = need(REAL / "test.vmcx")  # fox-it/dissect.hypervisor test data (AGPL-3.0; used as data only)
    vmrs = tmp_path / "282874FC.vmrs"
    shutil.copyfile(saved_states["vmrs"], vmrs)
    shutil.copyfile(source, tmp_path / "282874FC.vmcx")
    _, rows = run_plugin(plugin_classes["info"], vmrs)
    info = {r[0]: r[1] for r in rows}
    assert info["VM name"] == "Other Location"
    assert info["VM ID"] == "282874FC-59D6-4F30-BC04-5FDD909C82E0"
    assert info["VM configuration version"] == "9.0"
    assert info["VM memory (startup)"] == "1024 MiB"
    assert info["VM processors"] == "1"


def test_registers(plugin_classes, saved_states, monkeypatch) -> None:
    plugin, rows = run_plugin(plugin_classes["registers"], saved_states["vsv"], vp=1)
    assert {r[0] for r in rows} == {1}
    regs = {r[3]: r for r in rows}
    assert regs["cr3"][4] == 0x30000 and regs["cr3"][1] == 0 and regs["cr3"][2] is True
    assert regs["cs"][4] == 0x10 and regs["cs"][5] == "base=0x0 limit=0xffffffff attributes=0xa09b"
    assert regs["gdtr"][4] == 0xFFFFF80000001000 and regs["gdtr"][5] == "limit=0x7f"
    _, all_rows = run_plugin(plugin_classes["registers"], saved_states["vmrs"])
    assert {r[0] for r in all_rows} == {0, 1}
    rendered = as_json(plugin, monkeypatch)
    assert {row["Register"]: row["Value"] for row in rendered}["cr3"] == 0x30000


def test_pagingmode(plugin_classes, saved_states, monkeypatch) -> None:
    plugin, rows = run_plugin(plugin_classes["pagingmode"], saved_states["vmrs"])
    assert [r[0] for r in rows] == [0, 1]
    vp0, vp1 = rows
    assert vp0[2:4] == ("X64", "LONG (4-level)")
    assert vp0[5] == ROOT_DEFAULT | 0x3 and vp0[8] == ROOT_DEFAULT
    assert vp0[9].startswith("yes")
    assert vp1[9].startswith("no: no PML4 entry points back at the table")
    assert [row["Kernel page table"][:3] for row in as_json(plugin, monkeypatch)] == ["yes", "no:"]


def test_memmap(plugin_classes, saved_states, monkeypatch) -> None:
    plugin, rows = run_plugin(plugin_classes["memmap"], saved_states["vmrs"])
    assert rows == [
        (0, 0x9FFFF, 0xA0000, 0, 0, 0, "1/1", ""),  # no RamMemoryBlock flags set
        (0x100000, 4 * MIB - 1, 3 * MIB, MIB, 1, 3, "3/3", ""),
    ]
    assert len(as_json(plugin, monkeypatch)) == 2


def unmet(cls: type, path: Path, **config: Any) -> dict[str, str]:
    """What Volatility would print for ``cls`` on ``path``: unsatisfied config paths and their descriptions."""
    ctx, names = stack(path)
    config_path = f"plugins.{cls.__name__}"
    ctx.config["automagic.LayerStacker.single_location"] = path.resolve().as_uri()
    for name in names:  # as LayerStacker.find_suitable_requirements: the first layer (top first) that satisfies it
        ctx.config[f"{config_path}.primary"] = name
        if not cls.get_requirements()[0].unsatisfied(ctx, config_path):
            break
    else:
        del ctx.config[f"{config_path}.primary"]
    for key, value in config.items():
        ctx.config[f"{config_path}.{key}"] = value
    return {k: v.description for k, v in cls.unsatisfied(ctx, config_path).items()}


def test_not_a_saved_state_is_an_unmet_requirement_saying_why(plugin_classes, tmp_path: Path) -> None:
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\x11" * MIB)
    assert unmet(plugin_classes["info"], raw) == {
        "plugins.Info.primary": f"{raw} is not a Hyper-V saved state: it begins with 11111111, not the signature of"
        " a HyperVStorage file (.vmrs, .vmcx, .vsv: 0x01282014) or of a legacy .bin (0x02182003)"
    }


def test_bin_alone_has_no_registers(plugin_classes, saved_states, tmp_path: Path) -> None:
    alone = tmp_path / "alone.bin"
    shutil.copyfile(saved_states["bin"], alone)
    for name in ("registers", "pagingmode"):
        (why,) = unmet(plugin_classes[name], alone).values()
        assert why.startswith(f"{alone} has no CPU state (a legacy .bin without its .vsv)")
    assert unmet(plugin_classes["info"], alone) == {}
    _, info = run_plugin(plugin_classes["info"], alone)
    assert info[0][:2] == ("File kind", "legacy .bin alone (memory only, no CPU state)")


def test_a_vp_that_does_not_exist_is_an_unmet_requirement(plugin_classes, saved_states) -> None:
    assert unmet(plugin_classes["registers"], saved_states["vmrs"], vp=1) == {}
    assert unmet(plugin_classes["registers"], saved_states["vmrs"], vp=7) == {
        "plugins.Registers.saved_state": "--vp 7: this saved state has 2 VP(s) (VPs 0-1)"
    }


def test_plugin_dir_helper() -> None:
    from volatility3_vmssd.volatility import plugin_dir

    assert plugin_dir() == PLUGIN_DIR
    assert (PLUGIN_DIR / "hyperv" / "__init__.py").is_file()
    assert not (Path(volatility3_vmssd.__file__).parent / "volatility_plugins" / "__init__.py").exists()


def test_grid_types_are_renderable(plugin_classes) -> None:
    """Every column type is one the renderers know (no custom objects leak into TreeGrid)."""
    allowed = {str, int, bool, renderers.format_hints.Hex}
    for cls in plugin_classes.values():
        columns = _columns(cls)
        assert columns and all(t in allowed for _, t in columns), columns


def _columns(cls: type) -> list[tuple[str, type]]:
    # Build a TreeGrid with an empty generator to read its declared columns.
    instance = cls.__new__(cls)
    instance._saved_state_layer = lambda: None  # type: ignore[method-assign]
    return [(c.name, c.type) for c in instance.run().columns]
