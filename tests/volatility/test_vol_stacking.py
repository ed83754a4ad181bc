"""HyperVSavedStateStacker: what it stacks on, how it finds a legacy pair's partner, what it leaves alone.

In-process with ``contexts.Context()`` (a FileLayer from a ``Path.as_uri()`` location, as ``-f``
gives), which is much faster than running vol.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from vol_helpers import (
    MIB,
    REAL,
    file_context,
    long_mode_vp,
    mixed_image,
    need,
    require_volatility,
    stack,
    state_json,
    write_pair,
    write_vmrs,
)

from volatility3_vmssd.images.lime import LIME_HEADER, LIME_MAGIC

require_volatility()

from volatility3.framework.layers import physical  # noqa: E402

from volatility3_vmssd.files import find_partner, find_vmcx, path_to_url, url_to_path  # noqa: E402
from volatility3_vmssd.volatility import HyperVSavedStateLayer, HyperVSavedStateStacker  # noqa: E402
from volatility3_vmssd.volatility.plugin_impl import info_rows  # noqa: E402

SIZE = 2 * MIB


@pytest.fixture(scope="module")
def guest() -> bytearray:
    return mixed_image(SIZE, seed=5)


@pytest.fixture(scope="module")
def state() -> dict:
    return state_json([long_mode_vp(0x1000)])


@pytest.fixture(scope="module")
def pair(guest: bytearray, state: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return write_pair(root / "vm.bin", root / "vm.vsv", guest, state)


def copy_pair(pair: tuple[Path, Path], folder: Path, bin_name: str, vsv_name: str | None) -> tuple[Path, Path | None]:
    folder.mkdir(parents=True, exist_ok=True)
    bin_path = folder / bin_name
    shutil.copyfile(pair[0], bin_path)
    vsv_path = None
    if vsv_name is not None:
        vsv_path = folder / vsv_name
        shutil.copyfile(pair[1], vsv_path)
    return bin_path, vsv_path


def our_layer(path: Path, **options: object) -> HyperVSavedStateLayer | None:
    ctx, names = stack(path, [HyperVSavedStateStacker], options or None)
    layer = ctx.layers[names[0]]
    return layer if isinstance(layer, HyperVSavedStateLayer) else None


def dependency_paths(layer: HyperVSavedStateLayer) -> list[Path]:
    return [url_to_path(layer.context.layers[name].location) for name in layer.dependencies]


# ------------------------------------------------------------------------------------ locations


@pytest.mark.parametrize("name", ["plain.bin", "with space.bin", "nön-ÄSCII ✓.bin", "100%.bin", "a#b?.bin"])
def test_urls_round_trip(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"x")
    url = path.as_uri()
    assert url_to_path(url) == path
    assert path_to_url(path) == url
    assert url_to_path(str(path)) == path
    assert url_to_path("file://localhost" + url[len("file://") :]) == path
    assert url_to_path("https://example.com/vm.bin") is None


def test_find_partner_prefers_exact_name_and_reports_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "VM.BIN").write_bytes(b"")
    assert find_partner(tmp_path / "VM.BIN", [".vsv"]) == (None, [tmp_path / "VM.vsv"])
    (tmp_path / "vm.vsv").write_bytes(b"")
    assert find_partner(tmp_path / "VM.BIN", [".vsv"])[0] == tmp_path / "vm.vsv"  # case-insensitive fallback
    (tmp_path / "VM.VSV").write_bytes(b"")
    assert find_partner(tmp_path / "VM.BIN", [".vsv"])[0] == tmp_path / "VM.VSV"  # exact base name first


def test_find_vmcx_beside_and_in_virtual_machines(tmp_path: Path) -> None:
    snap = tmp_path / "Snapshots"
    snap.mkdir()
    (snap / "ABC.vmrs").write_bytes(b"")
    assert find_vmcx(snap / "ABC.vmrs") is None
    (tmp_path / "Virtual Machines").mkdir()
    (tmp_path / "Virtual Machines" / "ABC.VMCX").write_bytes(b"")
    assert find_vmcx(snap / "ABC.vmrs") == tmp_path / "Virtual Machines" / "ABC.VMCX"
    (snap / "abc.vmcx").write_bytes(b"")
    assert find_vmcx(snap / "ABC.vmrs") == snap / "abc.vmcx"


# ------------------------------------------------------------------------------------ pairs


@pytest.mark.parametrize(
    ("bin_name", "vsv_name"),
    [("vm.bin", "vm.vsv"), ("My VM ä.BIN", "My VM ä.vsv"), ("5F3C2A1E-0D4B.Bin", "5F3C2A1E-0D4B.VSV")],
)
def test_bin_finds_its_vsv(pair, guest, tmp_path: Path, bin_name: str, vsv_name: str) -> None:
    bin_path, vsv_path = copy_pair(pair, tmp_path / "dir with space", bin_name, vsv_name)
    layer = our_layer(bin_path)
    assert layer is not None and layer.provider.kind == "bin+vsv"
    assert dependency_paths(layer) == [bin_path, vsv_path]
    partner = layer.context.layers[layer.dependencies[1]]
    assert isinstance(partner, physical.FileLayer) and partner.location == vsv_path.as_uri()
    assert layer.read(0, SIZE) == guest


@pytest.mark.parametrize(
    ("bin_name", "vsv_name"),
    [("VM-GUID.bin", "vm-guid.VSV"), ("vm-guid.BIN", "VM-GUID.vsv"), ("a.bin", None)],
)
def test_vol_and_vmssd_pair_the_same_files(pair, tmp_path: Path, bin_name: str, vsv_name: str | None) -> None:
    """One rule (files.find_partner): case differences pair; a directory named like the partner never does."""
    from volatility3_vmssd.provider import open_saved_state

    bin_path, vsv_path = copy_pair(pair, tmp_path, bin_name, vsv_name)
    if vsv_name is None:
        (tmp_path / "a.VSV").mkdir()
    layer = our_layer(bin_path)
    assert layer is not None
    with open_saved_state(bin_path) as p:
        assert [Path(x) for x in p.paths] == dependency_paths(layer) == [bin_path, *([vsv_path] if vsv_path else [])]
        assert p.kind == layer.provider.kind == ("bin+vsv" if vsv_name else "bin")


@pytest.mark.parametrize(("bin_name", "vsv_name"), [("vm.bin", "vm.vsv"), ("Ünï cödé.BIN", "Ünï cödé.VSV")])
def test_vsv_given_with_f_finds_its_bin(pair, guest, tmp_path: Path, bin_name: str, vsv_name: str) -> None:
    bin_path, vsv_path = copy_pair(pair, tmp_path, bin_name, vsv_name)
    layer = our_layer(vsv_path)
    assert layer is not None and layer.provider.kind == "bin+vsv"
    assert dependency_paths(layer) == [bin_path, vsv_path]
    assert layer.read(0, SIZE) == guest
    assert layer.provider.get_register_value(0, "cr3") == 0x1000


def test_missing_vsv_warns_with_the_paths_and_reads_memory_only(pair, guest, tmp_path: Path, caplog) -> None:
    bin_path, _ = copy_pair(pair, tmp_path / "alone", "Lonely VM.bin", None)
    with caplog.at_level(logging.WARNING):
        layer = our_layer(bin_path)
    assert layer is not None and layer.provider.kind == "bin"
    assert str(tmp_path / "alone" / "Lonely VM.vsv") in caplog.text
    assert "--hyperv-vsv-location" in caplog.text
    assert layer.read(0, SIZE) == guest
    assert layer.dependencies == ["base"]


def test_missing_bin_warns_with_the_paths(pair, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "only-vsv"
    folder.mkdir()
    vsv = folder / "vm.vsv"
    shutil.copyfile(pair[1], vsv)
    with caplog.at_level(logging.WARNING):
        assert our_layer(vsv) is None
    assert str(folder / "vm.bin") in caplog.text


def test_vsv_location_option_overrides(pair, guest, tmp_path: Path) -> None:
    bin_path, _ = copy_pair(pair, tmp_path / "a", "memory.bin", None)
    elsewhere = tmp_path / "b" / "other name.vsv"
    elsewhere.parent.mkdir()
    shutil.copyfile(pair[1], elsewhere)
    decoy = tmp_path / "a" / "memory.vsv"
    decoy.write_bytes(b"not this one")
    layer = our_layer(bin_path, hyperv_vsv_location=elsewhere.as_uri())
    assert layer is not None and layer.provider.kind == "bin+vsv"
    assert dependency_paths(layer) == [bin_path, elsewhere]
    assert layer.read(0, SIZE) == guest


def test_vtl_option_is_kept_in_the_layer_config(tmp_path: Path, guest: bytearray) -> None:
    vtls = {"0": long_mode_vp(0x1000)["0"], "1": long_mode_vp(0x2000)["0"]}
    path = write_vmrs(tmp_path / "vtl.vmrs", guest, {"format": "vmssd-registers/1", "vps": [{"vtls": vtls}]})
    layer = our_layer(path, hyperv_vtl=1)
    assert layer is not None and layer.config["vtl"] == 1
    assert layer.provider.get_register_value(0, "cr3") == 0x2000
    assert layer.build_configuration()["vtl"] == 1


@pytest.mark.parametrize("blocks", [0, 3])
def test_cache_blocks_option_bounds_the_layers_block_cache(tmp_path: Path, state: dict, blocks: int) -> None:
    """--hyperv-cache-blocks reaches the provider the layer opens (vmssd triage bounds each worker with it)."""
    path = write_vmrs(tmp_path / "cache.vmrs", mixed_image(8 * MIB, seed=9), state)
    layer = our_layer(path, hyperv_cache_blocks=blocks)
    assert layer is not None
    assert layer.provider.get_memory_block_cache_limit() == blocks
    default = our_layer(path)
    assert default is not None and default.provider.get_memory_block_cache_limit() not in (0, 3)


# ------------------------------------------------------------------------------------ foreign files


def foreign_files(root: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    files = {}
    big = root / "big.raw"
    with open(big, "wb") as fh:
        fh.truncate(512 * MIB)  # sparse: costs nothing unless read
    files["raw"] = big
    files["random"] = root / "random.img"
    files["random"].write_bytes(os.urandom(64 * 1024))
    files["lime"] = root / "guest.lime"
    files["lime"].write_bytes(LIME_HEADER.pack(LIME_MAGIC, 1, 0, 0xFFF) + bytes(0x1000))
    files["elf"] = root / "core.elf"
    files["elf"].write_bytes(b"\x7fELF\x02\x01\x01" + bytes(0x2000))
    files["vmem"] = root / "vm.vmem"
    files["vmem"].write_bytes(mixed_image(MIB))
    files["tiny"] = root / "tiny.bin"
    files["tiny"].write_bytes(b"\x03\x20")
    files["bin-named"] = root / "fake.bin"
    files["bin-named"].write_bytes(bytes(0x3000))  # a .bin name is not enough, the signature decides
    files["vsv-named"] = root / "fake.vsv"
    files["vsv-named"].write_bytes(bytes(0x3000))  # a lone non-HyperVStorage .vsv: warn, stack nothing
    return files


def test_foreign_files_are_left_alone_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, int]] = []
    original = physical.FileLayer.read

    def counting_read(self, offset, length, pad=False):  # type: ignore[no-untyped-def]
        reads.append((offset, length))
        return original(self, offset, length, pad)

    monkeypatch.setattr(physical.FileLayer, "read", counting_read)
    for kind, path in foreign_files(tmp_path).items():
        ctx, base = file_context(path)
        reads.clear()
        assert HyperVSavedStateStacker.stack(ctx, base) is None, kind
        assert all(length <= 8 for _, length in reads), (kind, reads)
        assert len(reads) <= 1, (kind, reads)


@pytest.mark.parametrize("name", ["test.vmcx", "test.VMRS"])
def test_real_containers_without_saved_memory_are_not_stacked(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM's configuration and the runtime state of a running VM are HyperVStorage files without RAM."""
    source = need(REAL / name)  # from fox-it/dissect.hypervisor's test data (AGPL-3.0; test data only)
    path = tmp_path / name
    shutil.copyfile(source, path)
    ctx, base = file_context(path)
    reads: list[int] = []
    pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        reads.append(size)
        return pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert HyperVSavedStateStacker.stack(ctx, base) is None
    assert list(ctx.layers) == ["base"]
    # Only the container's metadata is looked at (header copies, object and key tables), in a few reads.
    print(f"{len(reads)} reads, {sum(reads):,} bytes of {path.stat().st_size:,}")
    assert len(reads) <= 64, reads


def test_stacks_on_file_layers_only(tmp_path: Path, guest: bytearray, state: dict) -> None:
    path = write_vmrs(tmp_path / "g.vmrs", guest, state)
    ctx, names = stack(path, [HyperVSavedStateStacker])
    assert HyperVSavedStateStacker.stack(ctx, names[0]) is None  # not again on top of itself


# ------------------------------------------------------------------------------------ large files


def write_large_vmrs(path: Path, ram: int, state: dict) -> None:
    """A .vmrs describing ``ram`` bytes of zero RAM (below and above a 1 GiB gap): about a megabyte."""
    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.vmrs.writer import write_fill_vmrs

    write_fill_vmrs(path, ram, state_from_json(state))


def test_large_vmrs_stacks_and_summarises_without_decoding(tmp_path: Path, state: dict) -> None:
    path = tmp_path / "large.vmrs"
    write_large_vmrs(path, 16 << 30, state)
    layer = our_layer(path)
    assert layer is not None
    memory = layer.provider.memory
    assert memory.blocks_decoded == 0 and memory.blocks_indexed == 0
    assert layer.maximum_address == 0x100000000 + (16 << 30) - 0xC0000000 - 1
    rows = dict(info_rows(layer))
    assert rows["Guest RAM"].startswith("17,179,869,184 bytes")
    assert layer.is_valid(0xBFFFF000) and not layer.is_valid(0xC0000000)
    assert len(list(layer.mapping(0, layer.maximum_address + 1, ignore_errors=True))) == 2
    assert memory.blocks_decoded == 0 and memory.blocks_indexed == 0
    assert layer.read(0x400000000, 16) == bytes(16)  # reading works (and decodes one block)


def test_damaged_or_unusable_saved_states_warn(tmp_path: Path, guest: bytearray, state: dict, caplog) -> None:
    """The signature matched, so the user is told why the file is not used (not only at -vvvv)."""
    good = write_vmrs(tmp_path / "good.vmrs", guest, state)
    cut = tmp_path / "cut.vmrs"
    cut.write_bytes(good.read_bytes()[:0x1800])  # headers only: no object tables
    with caplog.at_level(logging.WARNING):
        assert our_layer(cut) is None
    assert "cut.vmrs is a Hyper-V saved-state file but cannot be used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert our_layer(good, hyperv_vtl=20) is None
    assert "cannot force VTL 20" in caplog.text


def test_backend_option_reaches_the_layer_and_dll_fails_clearly_off_windows(tmp_path: Path) -> None:
    """--hyperv-backend dll: on Linux the stacker says why it cannot use the file instead of crashing."""
    import sys

    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    from volatility3_vmssd.volatility.options import OPTIONS_PATH
    from volatility3_vmssd.volatility.stackers import HyperVSavedStateStacker

    sample = Path(__file__).resolve().parents[1] / "data" / "sample.vmrs"
    for backend, works in (("native", True), ("dll", sys.platform == "win32")):
        ctx = contexts.Context()
        ctx.config["base.location"] = sample.as_uri()
        ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
        ctx.config[f"{OPTIONS_PATH}.hyperv_backend"] = backend
        layer = HyperVSavedStateStacker.stack(ctx, "base")
        if works:
            assert layer is not None and layer.provider.backend == backend
        else:
            assert layer is None
