"""Session fixtures for the Volatility tests: the real Linux guest as saved states, and vol runs over it.

The guest (256 MiB of RAM, from ``shared/data/linux-guest``) is decompressed and written as a plain
.vmrs, a .vmrs split around 0xA0000-0xFFFFF and a legacy .bin + .vsv pair once per session.  The vol
runs the tests compare are started together the first time one is needed, two at a time (each is a
separate ~10 s process; the suite must stay short on two cores).
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pytest
from vol_guest import BIOS_ROM, HOLE, LinuxGuest, VolRuns
from vol_helpers import LINUX_GUEST, need, preseed_isf_validation


@pytest.fixture(scope="session")
def linux_guest(tmp_path_factory: pytest.TempPathFactory) -> LinuxGuest:
    pytest.importorskip("volatility3", reason="volatility3 is not installed")
    need(LINUX_GUEST / "memory" / "guest.elf.xz")
    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.images.memoryimage import MemoryImage
    from volatility3_vmssd.vmrs.writer import write_bin_vsv, write_vmrs

    root = tmp_path_factory.mktemp("linux-guest")
    elf = root / "guest.elf"
    with lzma.open(LINUX_GUEST / "memory" / "guest.elf.xz") as src, open(elf, "wb") as dst:
        shutil.copyfileobj(src, dst, 4 << 20)
    state = state_from_json(json.loads((LINUX_GUEST / "registers.json").read_text()))
    guest = LinuxGuest(
        elf=elf,
        vmrs=root / "plain" / "guest.vmrs",
        split=root / "split" / "guest.vmrs",
        bin=root / "pair" / "5F3C2A1E-0D4B-4C6A-9E1F-2B3A4C5D6E7F.bin",
        vsv=root / "pair" / "5F3C2A1E-0D4B-4C6A-9E1F-2B3A4C5D6E7F.vsv",
        symbols=LINUX_GUEST / "symbols",
        expected=LINUX_GUEST / "expected",
    )
    for p in (guest.vmrs, guest.split, guest.bin):
        p.parent.mkdir()
    with MemoryImage.open(elf) as image:
        write_vmrs(guest.vmrs, image, state, holes=[BIOS_ROM], jobs=2)
        write_vmrs(guest.split, image, state, holes=[HOLE, BIOS_ROM], jobs=2)
        write_bin_vsv(guest.bin, guest.vsv, image, state, holes=[BIOS_ROM], jobs=2)
    return guest


@pytest.fixture(scope="session")
def vol_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh XDG_CACHE_HOME for every vol run of the session, with the shared ISF pre-validated."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed")
    cache = tmp_path_factory.mktemp("xdg-cache")
    isfs = sorted((LINUX_GUEST / "symbols").rglob("*.json*")) if LINUX_GUEST.exists() else []
    preseed_isf_validation(cache, isfs)
    return cache


@pytest.fixture(scope="session")
def linux_vol(linux_guest: LinuxGuest, vol_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    runs = VolRuns(linux_guest, vol_cache, tmp_path_factory.mktemp("vol-runs"))
    yield runs
    runs.close()
