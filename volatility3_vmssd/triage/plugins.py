"""Which plugins a saved state gets: chosen from its guest OS id, or given with ``--plugins``.

Windows sets HV_GUEST_OS_ID (Microsoft, Windows NT) and so does Linux (open-source layout, Linux)
when they boot on Hyper-V; a guest that never set it (firmware, another hypervisor's image written
as a saved state) gets ``banners.Banners`` first: the Linux set when it finds a Linux banner, else
``windows.info``, and the rest of the Windows set only when that finds a Windows kernel.  A guest that
shows neither is reported as of unknown OS, and no OS plugin is run into a certain failure
(docs/triage.md).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ALWAYS", "LINUX", "PROBE", "UNKNOWN_OS_NOTE", "WINDOWS", "WINDOWS_PROBE", "after_probe", "initial_plugins"]

ALWAYS = ("hyperv.info",)
WINDOWS = ("windows.info", "windows.pslist", "windows.cmdline", "windows.netscan")
LINUX = ("banners.Banners", "linux.pslist", "linux.sockstat")
PROBE = "banners.Banners"
WINDOWS_PROBE = "windows.info"
UNKNOWN_OS_NOTE = (
    "guest OS unknown: no guest OS id in the CPU state, no Linux banner and no Windows kernel found"
    " (damaged, encrypted or not an OS Volatility knows); no OS plugins run"
)


def initial_plugins(os_family: str | None, override: Sequence[str] | None) -> list[str]:
    """The plugins to start with; for an unknown OS the probe, whose result decides the rest."""
    if override:
        return list(dict.fromkeys(override))
    if os_family == "windows":
        return [*ALWAYS, *WINDOWS]
    if os_family == "linux":
        return [*ALWAYS, *LINUX]
    return [*ALWAYS, PROBE]


def after_probe(plugin: str, found: bool, done: Sequence[str]) -> tuple[list[str], str | None]:
    """What to run once a probe finished: (plugins, OS family found or None).

    ``banners.Banners`` that found a Linux banner gives the Linux set; without one, ``windows.info``
    is tried, and when that found a Windows kernel the rest of the Windows set follows.  Nothing more
    when neither found anything (the OS is unknown).
    """
    if plugin == PROBE:
        chosen = LINUX if found else (WINDOWS_PROBE,)
        return [p for p in chosen if p not in done], "linux" if found else None
    if plugin == WINDOWS_PROBE and found:
        return [p for p in WINDOWS if p not in done], "windows"
    return [], None
