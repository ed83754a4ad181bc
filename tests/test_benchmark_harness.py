"""The performance harness itself (issue #5): it must run on a fresh clone and print every target row.

This checks that the harness works and reports each row with its target and verdict, not the
figures: timings are never asserted in tests (they are machine-dependent; see docs/performance.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import REPO

try:
    import pyfwnt
except ImportError:
    pyfwnt = None

EXPECTED = {
    "[synthetic] T_dec": None,
    "[synthetic] provider reads, 16 MiB, cold / T_dec": "<= 1.33",
    "[synthetic] layer.read 16 MiB via mapping, cold / T_dec": "<= 1.67",
    "[synthetic] fallback pure-Python decoder rate": "report",
    "[every-form] T_dec": None,
    "[every-form] provider reads, 16 MiB, cold / T_dec": "<= 1.33",
    "[every-form] blocks on the careful path, full read": "0",
    "[synthetic-raw] provider reads of raw 1 MiB blocks / plain read() speed": ">= 0.67",
    "random 8-byte layer reads, 256 MiB working set, warm": ">= 100000",
    "open + stack + hyperv.info, 16 GiB described (best)": "< 0.5 s, 0 decoded",
    "open + stack + hyperv.info, 10,000 RamMemoryBlocks (best)": "< 0.5 s, 0 decoded",
    "open + chunk list, ": "< 1 s",
    "peak RSS scanning 1 GiB (banners) over idle vol": "<= 306 (limit + 50)",
    "vol banners.Banners, 2^40 pages declared over 1 RamBlock / 256 declared": "<= 1.25",
    "[synthetic] vmssd convert --format raw": "report",
    "[every-form] vmssd convert --format raw": "report",
    "[synthetic-raw] vmssd convert --format raw": "report",
    "[synthetic] vmssd convert --format dmp / --format raw (throughput)": ">= 0.9",
}


@pytest.mark.slow
@pytest.mark.skipif(pyfwnt is None, reason="libfwnt-python (pyfwnt) is not installed: T_dec is its time")
def test_quick_harness_prints_every_row_with_its_target(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Without ../shared (as on a fresh clone): the real-guest rows are skipped and say so.
    env = {**os.environ, "VMSSD_SHARED": str(tmp_path / "no-shared"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "benchmarks" / "run.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the real-guest rows are skipped" in proc.stdout
    result = json.loads(out.read_text())
    assert result["decoder"] in {"pyfwnt", "ntdll", "python"} and result["decode_threads"] >= 1
    rows = result["rows"]
    for prefix, target in EXPECTED.items():
        matching = [r for r in rows if r["measurement"].startswith(prefix)]
        assert len(matching) == 1, prefix
        row = matching[0]
        assert isinstance(row["value"], (int, float)) and (row["value"] > 0 or target == "0"), row
        if target is not None:
            assert row["target"] == target
        if target in (None, "report"):
            assert row["met"] is None
        else:
            assert row["met"] in (True, False)
            flag = "yes" if row["met"] else "NO"
            assert any(line.startswith(row["measurement"]) and f" {flag} " in line for line in proc.stdout.splitlines())
