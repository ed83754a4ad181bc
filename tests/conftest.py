"""Shared fixtures: where ../shared lives, and clean skips when it does not; the slow tier's rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import BIOS_ROM, LINUX_GUEST, REAL, REPO, SHARED, need  # noqa: F401

#: Fixtures that decompress and re-encode the real 268 MB Linux guest (seconds each, minutes with vol runs):
#: every test that uses one belongs to the slow tier (``pytest -m slow``), whatever it checks.
REAL_GUEST_FIXTURES = frozenset({"guest_elf", "guest_vmrs", "linux_guest", "linux_vol"})


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_GUEST_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def real_dir() -> Path:
    return need(REAL)


# ----------------------------------------------------------------------------- the real Linux guest
# Decompressing the 268 MB core and writing it as a saved state costs seconds: do it once per session
# and share it between test files.
@pytest.fixture(scope="session")
def guest_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import lzma
    import shutil

    src = need(LINUX_GUEST / "memory" / "guest.elf.xz")
    out = tmp_path_factory.mktemp("guest") / "guest.elf"
    with lzma.open(src) as fin, open(out, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    return out


@pytest.fixture(scope="session")
def guest_registers() -> dict:
    import json

    return json.loads(need(LINUX_GUEST / "registers.json").read_text())


@pytest.fixture(scope="session")
def guest_vmrs(guest_elf: Path, guest_registers: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real guest's RAM (BIOS ROM left out) and registers as a plain .vmrs."""
    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.images.memoryimage import MemoryImage
    from volatility3_vmssd.vmrs.writer import write_vmrs

    out = tmp_path_factory.mktemp("guest-vmrs") / "guest.vmrs"
    with MemoryImage.open(guest_elf) as image:
        write_vmrs(out, image, state_from_json(guest_registers), holes=[BIOS_ROM], jobs=2)
    return out


# ----------------------------------------------------------------------------- a real S3 endpoint
@pytest.fixture(scope="module")
def s3():  # type: ignore[no-untyped-def]
    """moto's S3 server on loopback for one test module (moto keeps one set of buckets per process)."""
    from remote_store import S3

    store = S3()
    yield store
    store.close()
