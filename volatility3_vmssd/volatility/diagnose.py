"""Why a file cannot be read as a saved state, in one sentence an analyst can act on.

The ``hyperv.*`` plugins give this as the reason of their unmet layer requirement, so what vol
prints says what the file is: not a Hyper-V file at all, empty, unreadable, a HyperVStorage file
without guest memory (and what to collect instead: the provider's :meth:`memory_absence`), or a
``--hyperv-vsv-location`` that does not name the ``.bin``'s ``.vsv``.  Nothing here imports Volatility.
"""

from __future__ import annotations

import os

from ..errors import VmssdError
from ..files import BIN_SIGNATURE, STORAGE_SIGNATURE, read_head, signature_kind
from ..provider import open_saved_state
from ..sources import is_file, is_remote

__all__ = ["vsv_problem", "why_not_a_saved_state"]


def why_not_a_saved_state(path: str | os.PathLike[str]) -> str:
    """One line saying why ``path`` is not a saved state with memory (a .vmrs, or a .bin + .vsv)."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
    except OSError as exc:
        return f"cannot read {name}: {exc.strerror or exc}"
    if size == 0:
        return f"{name} is empty (0 bytes): not a Hyper-V saved state"
    head = read_head(name)
    if signature_kind(head) is None and not name.lower().endswith(".vsv"):
        return (
            f"{name} is not a Hyper-V saved state: it begins with {head[:4].hex() or 'nothing'}, not the signature"
            f" of a HyperVStorage file (.vmrs, .vmcx, .vsv: {STORAGE_SIGNATURE:#010x}) or of a legacy .bin"
            f" ({BIN_SIGNATURE:#010x})"
        )
    try:
        provider = open_saved_state(name)
    except (OSError, VmssdError) as exc:
        return f"{name} cannot be read as a Hyper-V saved state: {exc}"
    with provider:
        absence = provider.memory_absence()
    if absence is not None:
        return f"{name}: {absence}"
    return f"{name} is a Hyper-V saved state, but no layer was built on it (run with -vvvv to see why)"


def vsv_problem(bin_path: str | os.PathLike[str], vsv_path: str | os.PathLike[str]) -> str | None:
    """Why ``vsv_path`` cannot be the ``.vsv`` of the legacy ``bin_path`` (None when it can).

    For a ``.vsv`` named explicitly: a wrong file must be refused, not read as "no CPU state".
    """
    vsv = os.fspath(vsv_path)
    if not is_file(vsv):
        exists = is_remote(vsv) or os.path.exists(vsv)
        return f"{vsv} is not a file (or does not exist)" if exists else f"{vsv} does not exist"
    try:
        provider = open_saved_state(bin_path, vsv=vsv)
    except (OSError, VmssdError) as exc:
        return f"{vsv} cannot be read as the .vsv of {os.fspath(bin_path)}: {exc}"
    with provider:
        if provider.has_cpu_state() and provider.vp_count():
            return None
        kinds = {f.kind for f in provider.findings() if f.path == vsv}
    if "unsupported" in kinds or signature_kind(read_head(vsv)) is None:
        what = f"not a HyperVStorage file (signature {STORAGE_SIGNATURE:#010x})"
    elif vsv.lower().endswith(".vmcx"):
        what = "a VM configuration (.vmcx)"
    else:
        what = "a HyperVStorage file without CPU state (no partition_state)"
    return f"{vsv} is not the .vsv of {os.fspath(bin_path)}: it is {what}"
