"""Shared fixtures: where ../shared lives, and clean skips when it does not; the slow tier's rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import BIOS_ROM, LINUX_GUEST, REAL, REPO, SHARED, need  # noqa: F401

#: Fixtures that decompress and re-encode the real 268 MB Linux guest (seconds each, minutes with vol runs):
#: every test that uses one belongs to the slow tier (``pytest -m slow``), whatever it checks.
REAL_GUEST_FIXTURES = frozenset({"guest_elf", "guest_vmrs", "linux_guest", "linux_vol"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads -n
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The developer loop (the whole fast tier, nothing named) runs on every usable core, a file per worker.

    Only that run: the slow tier measures speed and memory (the harness, the fuzz runs' RSS) and starts
    clusters of its own, so it stays in one process; so does a run of named files or tests, and any run
    given ``-n`` (``-n 0``: one process). Without pytest-xdist everything runs in one process.
    """
    opt = config.option
    if getattr(opt, "numprocesses", 0) is not None or hasattr(config, "workerinput"):  # no xdist, -n, a worker
        return
    if opt.markexpr != "not slow" or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    from volatility3_vmssd.host import usable_cores

    workers = min(usable_cores(), 4)
    if workers > 1:
        opt.numprocesses = workers
        opt.dist = "loadfile"  # module- and session-scoped fixtures (builders, moto servers) made once per file


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
