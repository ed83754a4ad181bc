"""Shared fixtures: where ../shared lives, and clean skips when it does not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("VMSSD_SHARED", REPO.parent / "shared"))
REAL = SHARED / "data" / "real"
LINUX_GUEST = SHARED / "data" / "linux-guest"


def need(path: Path) -> Path:
    """Return ``path`` or skip the test, saying what is missing (a fresh clone has no ../shared)."""
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder beside the repository); not present here")
    return path


@pytest.fixture
def real_dir() -> Path:
    return need(REAL)
