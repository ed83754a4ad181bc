"""A one-minute fuzz of every parser (the long, coverage-guided run is ``python -m tests.fuzz.run``).

Each target runs in its own process (so its peak RSS is its own) with the deterministic mutation
driver of ``tests/fuzz/driver.py``: the seeds and the random sequence are fixed, only how far the
sequence gets in the time budget depends on the machine.  Seeds come from our writers, plus the
real sample files when ``../shared`` is present.  ``VMSSD_FUZZ_SECONDS`` changes the total budget.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.driver import RSS_LIMIT_MB
from fuzz.run import WEIGHTS
from fuzz.seeds import TARGETS, build_seeds
from shared_data import REAL, REPO

TOTAL_SECONDS = float(os.environ.get("VMSSD_FUZZ_SECONDS", "60"))


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fuzz") / "seeds"
    build_seeds(dest, use_real=REAL.is_dir())
    return dest


@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz(target: str, seed_dir: Path, tmp_path: Path) -> None:
    seconds = TOTAL_SECONDS * WEIGHTS[target] / sum(WEIGHTS.values())
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "tests.fuzz.driver",
        "--engine",
        "mutate",
        "--target",
        target,
        "--seconds",
        f"{seconds:.1f}",
        "--corpus",
        str(seed_dir / target),
        "--out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds + 120)
    assert run.returncode == 0, run.stderr[-3000:]
    stats = json.loads((out / f"{target}.stats.json").read_text())
    reports = "\n\n".join(p.read_text() for p in sorted((out / target).glob("crash-*.txt")))
    assert stats["executions"] > len(list((seed_dir / target).iterdir())), stats
    assert stats["crashes"] == 0, f"{stats['crash_kinds']}\n{reports}"
    assert stats["hangs"] == 0, f"inputs slower than 1 s: {sorted((out / target).glob('hang-*.bin'))}"
    assert stats["peak_rss_mb"] < RSS_LIMIT_MB, stats
