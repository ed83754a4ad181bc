"""HyperVSavedStateLayer semantics on a small synthetic guest: Volatility's read/mapping/is_valid contract.

The guest has RAM at 0-0x9FFFF and 0x100000-end (a hole at 0xA0000-0xFFFFF, as on a real PC), and
holds zero pages (fill records), text (XPRESS) and random bytes (raw pages).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from vol_helpers import MIB, long_mode_vp, mixed_image, require_volatility, stack, state_json, write_pair, write_vmrs

require_volatility()

from volatility3.framework import contexts, exceptions, interfaces  # noqa: E402
from volatility3.framework.automagic import construct_layers  # noqa: E402
from volatility3.framework.configuration import requirements  # noqa: E402
from volatility3.framework.layers import linear, physical, scanners  # noqa: E402

from volatility3_vmssd.volatility import HyperVSavedStateLayer, HyperVSavedStateStacker  # noqa: E402

SIZE = 3 * MIB + 0x5000
HOLE = (0xA0000, 0x100000)
NEEDLE = b"HYPERV-LAYER-NEEDLE-0123456789"
NEEDLE_AT = (0x1234, 0x2FFFF0)  # one in each range; the second straddles a RamBlock boundary


@pytest.fixture(scope="module")
def guest() -> bytearray:
    data = mixed_image(SIZE, seed=3)
    for at in NEEDLE_AT:
        data[at : at + len(NEEDLE)] = NEEDLE
    return data


@pytest.fixture(scope="module")
def files(guest: bytearray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layer")
    state = state_json([long_mode_vp(0x1000), long_mode_vp(0x2000)])
    vmrs = write_vmrs(root / "guest.vmrs", guest, state, holes=[HOLE])
    bin_path, vsv_path = write_pair(root / "pair.bin", root / "pair.vsv", guest, state, holes=[HOLE])
    return {"vmrs": vmrs, "bin": bin_path, "vsv": vsv_path}


@pytest.fixture
def layer(files: dict[str, Path]) -> HyperVSavedStateLayer:
    ctx, names = stack(files["vmrs"], [HyperVSavedStateStacker])
    layer = ctx.layers[names[0]]
    assert isinstance(layer, HyperVSavedStateLayer)
    return layer


def expected(guest: bytearray, offset: int, length: int) -> bytes:
    data = bytearray(guest[offset : offset + length])
    data += bytes(length - len(data))
    lo, hi = max(HOLE[0], offset), min(HOLE[1], offset + length)
    if lo < hi:
        data[lo - offset : hi - offset] = bytes(hi - lo)
    return bytes(data)


def test_bounds_and_kind(layer: HyperVSavedStateLayer) -> None:
    assert layer.minimum_address == 0
    assert layer.maximum_address == SIZE - 1  # inclusive, as layerwriter expects
    assert not isinstance(layer, linear.LinearlyMappedLayer)
    assert "mapped" not in layer.metadata
    assert layer.metadata["os"] == "Unknown"
    assert layer.metadata["hyperv_file_kind"] == "vmrs" and layer.metadata["hyperv_vp_count"] == 2
    assert layer.dependencies == ["base"]


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 0x9F000), (0x1230, 0x40), (0x9FFF0, 0x10), (0x100000, 0x200000), (0x2FF000, 0x2000), (SIZE - 0x10, 0x10)],
)
def test_reads_inside_ram(layer: HyperVSavedStateLayer, guest: bytearray, offset: int, length: int) -> None:
    assert layer.read(offset, length) == guest[offset : offset + length]
    assert layer.read(offset, length, pad=True) == guest[offset : offset + length]


@pytest.mark.parametrize(
    ("offset", "length"), [(0xA0000, 0x10), (0x9FFF0, 0x20), (0xFFFF0, 0x20), (SIZE - 8, 0x10), (SIZE + 0x1000, 1)]
)
def test_holes_raise_or_pad(layer: HyperVSavedStateLayer, guest: bytearray, offset: int, length: int) -> None:
    with pytest.raises(exceptions.InvalidAddressException):
        layer.read(offset, length)
    assert layer.read(offset, length, pad=True) == expected(guest, offset, length)


def test_whole_layer_padded(layer: HyperVSavedStateLayer, guest: bytearray) -> None:
    assert layer.read(0, SIZE, pad=True) == expected(guest, 0, SIZE)


def test_mapping_is_one_tuple_per_backed_run(layer: HyperVSavedStateLayer) -> None:
    runs = list(layer.mapping(0, SIZE, ignore_errors=True))
    assert [(o, n) for o, n, *_ in runs] == [(0, HOLE[0]), (HOLE[1], SIZE - HOLE[1])]
    assert all(name == "base" for *_, name in runs)
    assert list(layer.mapping(0x1000, 0x2000)) == [(0x1000, 0x2000, 0x1000, 0x2000, "base")]
    with pytest.raises(exceptions.InvalidAddressException):
        list(layer.mapping(0, SIZE))
    assert list(layer.mapping(0xA0000, 0x1000, ignore_errors=True)) == []


def test_is_valid_reads_nothing(layer: HyperVSavedStateLayer, monkeypatch: pytest.MonkeyPatch) -> None:
    memory = layer.provider.memory

    def no_reads(*_args: object) -> bytes:
        raise AssertionError("is_valid must not read saved memory")

    monkeypatch.setattr(memory.source, "read_block_value", no_reads)
    assert layer.is_valid(0)
    assert layer.is_valid(0x9F000, 0x1000)
    assert not layer.is_valid(0x9F000, 0x2000)
    assert not layer.is_valid(0xA0000)
    assert layer.is_valid(0x100000, SIZE - 0x100000)
    assert not layer.is_valid(SIZE - 1, 2)
    assert not layer.is_valid(-1)
    assert memory.blocks_decoded == 0


def test_reads_go_to_the_provider_whole(layer: HyperVSavedStateLayer, monkeypatch: pytest.MonkeyPatch) -> None:
    """One provider call per read, not one per page: the provider walks its decoded-block cache."""
    provider = layer.provider
    calls: list[tuple[str, int, int]] = []
    for name in ("read_guest_physical_address", "read_guest_physical_address_padded"):
        original = getattr(provider, name)

        def spy(gpa: int, size: int, _original=original, _name=name) -> bytes:
            calls.append((_name, gpa, size))
            return _original(gpa, size)

        monkeypatch.setattr(provider, name, spy)
    layer.read(0x100000, 0x200000)
    layer.read(0, SIZE, pad=True)
    assert [c[0] for c in calls] == ["read_guest_physical_address", "read_guest_physical_address_padded"]


def test_small_reads_are_cached(layer: HyperVSavedStateLayer, monkeypatch: pytest.MonkeyPatch) -> None:
    first = layer.read(0x5008, 8)
    monkeypatch.setattr(layer.provider, "read_guest_physical_address", None)  # any provider call would fail
    assert layer.read(0x5008, 8) == first


def test_scanning_finds_needles_in_both_ranges(layer: HyperVSavedStateLayer) -> None:
    hits = list(layer.scan(layer.context, scanners.BytesScanner(NEEDLE)))
    assert sorted(hits) == list(NEEDLE_AT)


def test_read_only(layer: HyperVSavedStateLayer) -> None:
    with pytest.raises(exceptions.LayerException):
        layer.write(0, b"x")


def test_pickles_without_open_handles(layer: HyperVSavedStateLayer, guest: bytearray) -> None:
    layer.read(0x2000, 0x100)
    clone = pickle.loads(pickle.dumps(layer))
    assert clone._provider is None  # reopened on first use
    assert clone.read(0x2FFFF0, len(NEEDLE)) == NEEDLE
    assert clone.read(0, SIZE, pad=True) == expected(guest, 0, SIZE)


def rebuild(layer: interfaces.layers.DataLayerInterface) -> interfaces.layers.DataLayerInterface:
    """Serialise a layer's configuration and rebuild it in a fresh context, as Volatility does."""
    fresh = contexts.Context()
    fresh.config.splice("plugins.Test.primary", layer.build_configuration())
    requirement = requirements.TranslationLayerRequirement(name="primary")
    construct_layers.ConstructionMagic(fresh, "automagic.ConstructionMagic")(fresh, "plugins.Test", requirement)
    return fresh.layers[fresh.config["plugins.Test.primary"]]


@pytest.mark.parametrize("given", ["vmrs", "bin", "vsv"])
def test_rebuilt_from_config_alone(files: dict[str, Path], guest: bytearray, given: str) -> None:
    ctx, names = stack(files[given], [HyperVSavedStateStacker])
    layer = ctx.layers[names[0]]
    rebuilt = rebuild(layer)
    assert isinstance(rebuilt, HyperVSavedStateLayer)
    assert rebuilt.read(0, SIZE, pad=True) == expected(guest, 0, SIZE)
    assert rebuilt.provider.kind == ("vmrs" if given == "vmrs" else "bin+vsv")


@pytest.mark.parametrize("given", ["bin", "vsv"])
def test_legacy_pair_depends_on_both_files(files: dict[str, Path], guest: bytearray, given: str) -> None:
    ctx, names = stack(files[given], [HyperVSavedStateStacker])
    layer = ctx.layers[names[0]]
    assert layer.provider.kind == "bin+vsv"
    deps = [ctx.layers[name] for name in layer.dependencies]
    assert all(isinstance(d, physical.FileLayer) for d in deps)
    assert [d.location for d in deps] == [files["bin"].resolve().as_uri(), files["vsv"].resolve().as_uri()]
    assert layer.read(0x100000, 0x200000) == guest[0x100000:0x300000]
    with pytest.raises(exceptions.InvalidAddressException):
        layer.read(0xA0000, 1)
