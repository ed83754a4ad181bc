"""One pairing rule for `vmssd` and `vol`: which files belong together (files.py).

Hyper-V names a legacy pair ``<GUID>.bin`` + ``<GUID>.vsv``; copies change the case of the name or the
extension.  The CLI (through ``open_saved_state``) and the Volatility stacker must pair the same files,
and a directory named like a partner must never be taken for one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from shared_data import REPO

from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.errors import FormatError
from volatility3_vmssd.files import find_partner, signature_kind, sniff
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.provider import open_saved_state
from volatility3_vmssd.vmrs.writer import write_bin_vsv

GUID = "5F3C2A1E-0D4B-4C6A-9E1F-2B3A4C5D6E7F"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    raw = d / "ram.raw"
    raw.write_bytes(bytes(range(256)) * 4096 * 2)  # 2 MiB
    regs = {"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rax": 7}}}]}
    with MemoryImage.open(raw) as image:
        write_bin_vsv(d / "p.bin", d / "p.vsv", image, state_from_json(regs))
    return d / "p.bin", d / "p.vsv"


def _place(pair: tuple[Path, Path], folder: Path, bin_name: str, vsv_name: str | None) -> Path:
    folder.mkdir()
    shutil.copyfile(pair[0], folder / bin_name)
    if vsv_name is not None:
        shutil.copyfile(pair[1], folder / vsv_name)
    return folder / bin_name


def _stacker_partner(path: Path) -> Path | None:
    """What the Volatility stacker pairs: the same files.find_partner call it makes."""
    return find_partner(path, [".vsv"])[0]


@pytest.mark.parametrize(
    ("bin_name", "vsv_name"),
    [
        (f"{GUID}.bin", f"{GUID}.vsv"),
        (f"{GUID}.BIN", f"{GUID}.VSV"),
        (f"{GUID}.bin", f"{GUID.lower()}.VSV"),  # the name differs in case too
        (f"{GUID.lower()}.Bin", f"{GUID}.vsv"),
    ],
)
def test_mixed_case_pairs_open_the_same_under_vmssd_and_vol(
    pair: tuple[Path, Path], tmp_path: Path, bin_name: str, vsv_name: str
) -> None:
    memory = _place(pair, tmp_path / "vm", bin_name, vsv_name)
    assert _stacker_partner(memory) == memory.parent / vsv_name
    with open_saved_state(memory) as p:
        assert p.kind == "bin+vsv" and p.paths == [str(memory), str(memory.parent / vsv_name)]
        assert p.get_register_value(0, "rax") == 7


def test_exact_name_wins_over_a_case_variant(pair: tuple[Path, Path], tmp_path: Path) -> None:
    memory = _place(pair, tmp_path / "vm", f"{GUID}.bin", f"{GUID}.vsv")
    shutil.copyfile(pair[1], memory.parent / f"{GUID.lower()}.vsv")
    assert _stacker_partner(memory) == memory.parent / f"{GUID}.vsv"
    with open_saved_state(memory) as p:
        assert p.paths[1] == str(memory.parent / f"{GUID}.vsv")


def test_a_directory_named_like_the_partner_never_pairs(pair: tuple[Path, Path], tmp_path: Path) -> None:
    memory = _place(pair, tmp_path / "vm", "a.bin", None)
    (memory.parent / "a.VSV").mkdir()
    assert _stacker_partner(memory) is None
    with open_saved_state(memory) as p:
        assert p.kind == "bin"  # memory only, and a finding says where the .vsv was looked for
        assert any(f.kind == "no-partner" for f in p.findings())
    vsv_dir = tmp_path / "other"
    vsv_dir.mkdir()
    shutil.copyfile(pair[1], vsv_dir / "b.vsv")
    (vsv_dir / "b.bin").mkdir()
    with pytest.raises(FormatError, match=r"a \.vsv needs its \.bin"):
        open_saved_state(vsv_dir / "b.vsv")


def test_signatures_are_recognised_once() -> None:
    sample = REPO / "tests" / "data" / "sample.vmrs"
    assert sniff(sample) == "storage" == signature_kind(sample.read_bytes()[:8])
    assert signature_kind(b"\x03\x20\x18\x02") == "bin"
    assert signature_kind(b"MZ\x90\x00") is None and signature_kind(b"") is None
