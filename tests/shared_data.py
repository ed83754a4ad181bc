"""Where the shared real data lives, importable under a unique name.

Test files import these from here rather than from ``conftest``: with pytest's default import mode a
second ``conftest.py`` (tests/volatility/) can shadow the first under that module name.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: $VMSSD_SHARED when set and not empty, else ../shared beside the checkout: the one rule of every test,
#: fuzz seed and benchmark that needs real data
SHARED = Path(os.environ.get("VMSSD_SHARED") or REPO.parent / "shared")
REAL = SHARED / "data" / "real"
LINUX_GUEST = SHARED / "data" / "linux-guest"


def need(path: Path) -> Path:
    """Return ``path`` or skip the test, saying what is missing (a fresh clone has no ../shared)."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder beside the repository, or $VMSSD_SHARED); not present")
    return path


BIOS_ROM = (0xFFFC0000, 0x1_0000_0000)  # not RAM: left out of a Hyper-V image (data README)
LOW_HOLE = (0xA0000, 0x100000)
