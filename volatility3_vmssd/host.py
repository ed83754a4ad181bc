"""What this machine lets the process use, asked in one place so that every pool sizes itself alike.

``os.cpu_count()`` counts the host's CPUs, not those this process may run on: under ``taskset``, a
cgroup cpuset or a container limit it overstates them, and pools sized by it oversubscribe.
"""

from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one), at least 1."""
    process_cpu_count = getattr(os, "process_cpu_count", None)  # Python 3.13+: affinity-aware on every OS
    if process_cpu_count is not None:
        return max(1, process_cpu_count() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity call (macOS, Windows before 3.13)
        return max(1, os.cpu_count() or 1)
