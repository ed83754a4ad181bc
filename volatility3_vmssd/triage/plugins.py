"""Which plugins a saved state gets: chosen from its guest OS id, or given with ``--plugins``.

Windows sets HV_GUEST_OS_ID (Microsoft, Windows NT) and so does Linux (open-source layout, Linux)
when they boot on Hyper-V; a guest that never set it (firmware, another hypervisor's image written
as a saved state) gets ``banners.Banners`` first, and the Linux set when that finds a Linux banner,
else the Windows set (docs/triage.md).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ALWAYS", "LINUX", "PROBE", "WINDOWS", "after_probe", "initial_plugins"]

ALWAYS = ("hyperv.info",)
WINDOWS = ("windows.info", "windows.pslist", "windows.cmdline", "windows.netscan")
LINUX = ("banners.Banners", "linux.pslist", "linux.sockstat")
PROBE = "banners.Banners"


def initial_plugins(os_family: str | None, override: Sequence[str] | None) -> list[str]:
    """The plugins to start with; for an unknown OS the probe, whose result decides the rest."""
    if override:
        return list(dict.fromkeys(override))
    if os_family == "windows":
        return [*ALWAYS, *WINDOWS]
    if os_family == "linux":
        return [*ALWAYS, *LINUX]
    return [*ALWAYS, PROBE]


def after_probe(found_linux_banner: bool, done: Sequence[str]) -> list[str]:
    """The rest of the set once the probe said which OS it is."""
    chosen = LINUX if found_linux_banner else WINDOWS
    return [p for p in chosen if p not in done]
