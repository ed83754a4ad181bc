"""``vol -f out.dmp windows.pslist`` equals the ``.vmrs`` rows: the crash dump ``vmssd convert --format dmp``
writes of a Windows-shaped guest (``tests/windows_guest.py``, built from a real kernel ISF), and its header's
DTB and kernel fields as kdmp-parser reads them."""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vol_helpers import REPO, SHARED, output_rows, preseed_isf_validation, require_volatility, run_vol
from windows_guest import build_windows_guest, shared_isfs, wrap

require_volatility()

SYMBOLS = SHARED / "data" / "windows-symbols"
ISFS = shared_isfs(SHARED)
SEED = 31

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ISFS, reason=f"needs the Windows symbol tables under {SYMBOLS}; not present"),
]


@pytest.fixture(scope="module")
def win_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("xdg-cache-dmp")
    preseed_isf_validation(cache, ISFS)
    return cache


def vol_rows(path: Path, plugin: str, cache: Path) -> list[str]:
    done = run_vol(["-q", "--offline", "-s", str(SYMBOLS), "-f", str(path), plugin], cache=cache)
    assert done.returncode == 0, f"vol -f {path} {plugin}:\n{done.stderr[-3000:]}"
    return output_rows(done.stdout)


def convert(vmrs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "convert", str(vmrs), "-o", str(out), "--format", "dmp"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=REPO, env=env, check=False)


@pytest.mark.parametrize("context", ["kernel", "kvashadow", "vbs"])
@pytest.mark.parametrize("isf", ISFS, ids=lambda p: p.name[:8])
def test_pslist_of_the_dump_equals_the_vmrs(tmp_path: Path, win_cache: Path, isf: Path, context: str) -> None:
    kdmp_parser = pytest.importorskip("kdmp_parser")
    guest = build_windows_guest(isf, context, SEED, tmp_path, ram_size=32 << 20)
    vmrs = wrap(guest, "vmrs", tmp_path)
    out = tmp_path / "guest.dmp"
    done = convert(vmrs, out, "--symbols", str(SYMBOLS), "-q")
    assert done.returncode == 0, done.stderr
    rows = vol_rows(out, "windows.pslist", win_cache)
    assert rows == vol_rows(guest.lime, "windows.pslist", win_cache)  # Volatility alone, on the same RAM
    assert rows == vol_rows(vmrs, "windows.pslist", win_cache)
    with lzma.open(isf) as fh:
        isf_doc = json.load(fh)
    symbol = {name: entry["address"] for name, entry in isf_doc["symbols"].items()}
    dump = kdmp_parser.KernelDumpParser(out)
    header = dump.header  # a view into the parser: keep the parser alive while it is used
    # a saved CR3 proven a kernel DTB, or (KVA shadow on every VP) the kernel's table found by the scan
    assert dump.directory_table_base == guest.dtb
    assert guest.saved_cr3_dtb in (guest.dtb, None)
    assert header.KdDebuggerDataBlock == guest.kernel_base + symbol["KdDebuggerDataBlock"]
    assert header.PsActiveProcessHead == guest.kernel_base + symbol["PsActiveProcessHead"]
    assert header.PsLoadedModuleList == guest.kernel_base + symbol["PsLoadedModuleList"]
    assert header.NumberProcessors == guest.vp_count
