"""The real Linux guest as saved states, and named vol runs over it (used by conftest.py and the tests)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from vol_helpers import run_vol

HOLE = (0xA0000, 0x100000)  # legacy VGA/BIOS area: RAM in the guest, an MMIO hole on Hyper-V
BIOS_ROM = (0xFFFC0000, 0x100000000)  # the ELF's second PT_LOAD: ROM, not RAM
FAKE_DLL_DIR = Path(__file__).resolve().parent.parent / "dll" / "vol_fake"
BACKEND_PLUGINS: Sequence[str] = ("hyperv.info", "hyperv.registers", "hyperv.pagingmode", "hyperv.memmap")


@dataclasses.dataclass
class LinuxGuest:
    elf: Path
    vmrs: Path
    split: Path
    bin: Path
    vsv: Path
    symbols: Path
    expected: Path
    ram_size: int = 0x10000000


LINUX_PLUGINS: Sequence[str] = (
    "linux.pslist",
    "linux.pstree",
    "linux.psaux",
    "linux.lsmod",
    "linux.bash",
    "banners.Banners",
)


class VolRuns:
    """Named vol runs over the Linux guest, started together on first use and kept for the session."""

    def __init__(self, guest: LinuxGuest, cache: Path, workdir: Path) -> None:
        self.guest = guest
        self.cache = cache
        self.workdir = workdir
        self._lock = threading.Lock()
        self._futures: dict[str, concurrent.futures.Future[subprocess.CompletedProcess[str]]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        s = ["-s", str(guest.symbols)]
        only = ["--stackers", "HyperVSavedStateStacker"]
        g = guest
        self.plan: dict[str, list[str]] = {
            **{f"vmrs:{p}": [*s, "-f", str(g.vmrs), p] for p in LINUX_PLUGINS},
            "split:linux.pslist": [*s, "-f", str(g.split), "linux.pslist"],
            "split:banners.Banners": [*s, "-f", str(g.split), "banners.Banners"],
            "bin:linux.pslist": ["-vvvv", *s, "-f", str(g.bin), "linux.pslist"],
            "bin:banners.Banners": [*s, "-f", str(g.bin), "banners.Banners"],
            "vsv:linux.pslist": [*s, "-f", str(g.vsv), "linux.pslist"],
            # -s everywhere: vol prunes its identifier cache to the symbol paths of the run, so a run
            # without -s would hide the ISF from one that is scanning for banners at the same time.
            # Runs that need no OS layer skip the Linux stackers (loading the 38 MB ISF costs seconds).
            "vsv:hyperv.registers": [*s, *only, "-r", "json", "-f", str(g.vsv), "hyperv.registers", "--vp", "1"],
            "override:hyperv.info": [
                *s,
                *only,
                "--hyperv-vsv-location",
                str(g.vsv),
                "-f",
                str(self.lone_bin()),
                "hyperv.info",
            ],
            "vmrs:layerwriter": [*s, *only, "-f", str(g.vmrs), "-o", str(self.outdir("vmrs")), "layerwriter"],
            "split:layerwriter": [*s, *only, "-f", str(g.split), "-o", str(self.outdir("split")), "layerwriter"],
            # The DLL backend, driven by the fake DLL (tests/dll/vol_fake), against the native one.
            "dll:linux.pslist": [*s, "--hyperv-backend", "dll", "-f", str(g.vmrs), "linux.pslist"],
        }
        for plugin in BACKEND_PLUGINS:
            for backend in ("native", "dll"):
                args = [*s, *only, "-r", "json", "--hyperv-backend", backend, "-f", str(g.vmrs), plugin]
                self.plan[f"{backend}:{plugin}"] = args
        fake = {"VMSSD_FAKE_DLL": "1", "PYTHONPATH": str(FAKE_DLL_DIR)}
        self.env = {name: fake for name in self.plan if name.startswith("dll:")}

    def lone_bin(self) -> Path:
        """The pair's .bin under another name in another folder: its .vsv is not beside it."""
        lone = self.workdir / "elsewhere" / "renamed memory.bin"
        if not lone.exists():
            lone.parent.mkdir(exist_ok=True)
            try:
                lone.symlink_to(self.guest.bin)
            except OSError:
                shutil.copyfile(self.guest.bin, lone)
        return lone

    def outdir(self, name: str) -> Path:
        path = self.workdir / f"out-{name}"
        path.mkdir(exist_ok=True)
        return path

    def _run(self, name: str) -> subprocess.CompletedProcess[str]:
        return run_vol(["-q", *self.plan[name]], cache=self.cache, env=self.env.get(name))

    def get(self, name: str) -> subprocess.CompletedProcess[str]:
        with self._lock:
            if self._pool is None:
                # One run alone first: it builds the identifier cache the others then only read.
                first = next(iter(self.plan))
                done: concurrent.futures.Future[subprocess.CompletedProcess[str]] = concurrent.futures.Future()
                done.set_result(self._run(first))
                self._futures[first] = done
                self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)))
                for other in self.plan:
                    if other not in self._futures:
                        self._futures[other] = self._pool.submit(self._run, other)
        return self._futures[name].result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
