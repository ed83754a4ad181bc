"""Opening the saved state a command was given: the same checks and the same warnings for every command.

``--vsv`` follows the rule ``vol --hyperv-vsv-location`` follows (``files.vsv_problem``): a file the user
names as the ``.vsv`` must be one, or the command stops in one line.  A ``.bin`` opened without its
``.vsv`` gets the warning vol prints, so that no command silently reads it with an assumed layout.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import VmssdError
from ..files import sniff, vsv_problem
from ..interface import SavedState
from ..provider import open_saved_state
from ..vmconfig import read_vm_config

#: Finding kinds that say a .bin is read without CPU state from a .vsv, most telling first.
NO_VSV = ("no-partner", "unsupported", "no-cpu-state")


def open_state(args: argparse.Namespace, *, needs_memory: bool = False, warn: bool = True) -> SavedState:
    """``open_saved_state(args.file, vsv=args.vsv)`` after checking ``--vsv``; warns of a .bin without .vsv.

    ``needs_memory``: a file without saved RAM (a .vmcx, a .vsv alone, a runtime-state .vmrs) is an
    error that says what the file is, instead of an empty map or a read that finds nothing.  ``warn``
    False: the command lists the findings itself (``info``).
    """
    check_vsv(args)
    provider = open_saved_state(args.file, vsv=getattr(args, "vsv", None))
    try:
        if needs_memory:
            absence = provider.memory_absence()
            if absence is not None:
                raise VmssdError(_no_memory(args.file, absence))
        if warn:
            warn_without_vsv(provider, args.command)
    except BaseException:
        provider.close()
        raise
    return provider


def check_vsv(args: argparse.Namespace) -> None:
    """Refuse a ``--vsv`` that is not the .vsv of the ``.bin`` given (``files.vsv_problem``, vol's rule too)."""
    vsv = getattr(args, "vsv", None)
    if vsv is not None and sniff(args.file) == "bin":  # with anything else open_saved_state refuses --vsv itself
        problem = vsv_problem(args.file, vsv)
        if problem is not None:
            raise VmssdError(f"--vsv: {problem}")


def _no_memory(path: str, absence: str) -> str:
    config = read_vm_config(path)
    if config.error is None and (config.name or config.vm_id):
        name = config.name or config.vm_id
        return (
            f"{path} is the configuration of VM {name!r} (a .vmcx: settings, no guest memory); its memory is in"
            " the .vmrs (or legacy .bin + .vsv) that saving the VM writes"
        )
    return f"{path}: {absence}"


def warn_without_vsv(provider: SavedState, command: str) -> None:
    """One stderr line when a legacy .bin is read without its .vsv (what ``vmssd info`` lists and vol warns)."""
    found = sorted((f for f in provider.findings() if f.kind in NO_VSV), key=lambda f: NO_VSV.index(f.kind))
    if found:
        print(
            f"vmssd {command}: warning: {found[0].path}: {found[0].message}; without a .vsv there is no CPU state"
            " and the RAM is read as one range from GPA 0 (memory only): give --vsv or put the .vsv beside the .bin",
            file=sys.stderr,
        )
