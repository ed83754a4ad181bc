"""Open a saved state: the one factory that recognises the file, finds its partner and picks the backend.

>>> from volatility3_vmssd import open_saved_state
>>> with open_saved_state("vm.vmrs") as p:                                 # doctest: +SKIP
...     p.vp_count(), p.get_paging_mode(0), hex(p.get_register_value(0, "cr3"))
...     p.read_guest_physical_address(0x1000, 16)

Every opened saved state is a :class:`~volatility3_vmssd.interface.SavedState`, whichever backend reads
it: ``"native"`` (this package's reader, any OS), ``"dll"`` (Microsoft's ``vmsavedstatedumpprovider.dll``,
Windows only) or ``"auto"`` (the DLL when an acceptable one is found, else native).
"""

from __future__ import annotations

import os

from .errors import BackendUnavailableError, FormatError
from .files import BIN_SIGNATURE, STORAGE_SIGNATURE, find_partner, sniff
from .interface import SavedState
from .memory.guestmemory import DEFAULT_CACHE_LIMIT
from .native import SavedStateProvider
from .sources import is_remote, open_binary, redact, suffix

__all__ = ["BACKENDS", "apply_pending_replay_log", "open_saved_state"]

BACKENDS = ("native", "dll", "auto")


def _use_dll(backend: str) -> bool:
    """True for "dll" and for "auto" when an acceptable DLL is found; False for "native"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        from .dll import dll_available

        return dll_available()
    return backend == "dll"


def open_saved_state(
    path: str | os.PathLike[str],
    *,
    vsv: str | os.PathLike[str] | None = None,
    partner: bool = True,
    backend: str = "native",
    strict: bool = False,
    cache_limit: int = DEFAULT_CACHE_LIMIT,
    dll_path: str | os.PathLike[str] | None = None,
) -> SavedState:
    """Open a ``.vmrs``, a legacy ``.bin`` (with its ``.vsv``) or a ``.vsv`` (with its ``.bin``).

    A ``.bin``'s ``.vsv`` is ``vsv`` when given, else the file beside it with the same base name
    (any case); without one the ``.bin`` is opened alone (memory only) and a finding says where we
    looked.  ``partner=False`` opens exactly the files given (the Volatility stacker has chosen them
    already).  A pending replay log is applied in memory only; evidence files are opened read-only.
    """
    held = open_binary(path) if is_remote(path) else None
    try:  # a remote object stays open across the sniff and the open: one version, asked for once
        return _open_saved_state(
            path, vsv=vsv, partner=partner, backend=backend, strict=strict, cache_limit=cache_limit, dll_path=dll_path
        )
    finally:
        if held is not None:
            held.close()


def _open_saved_state(
    path: str | os.PathLike[str],
    *,
    vsv: str | os.PathLike[str] | None,
    partner: bool,
    backend: str,
    strict: bool,
    cache_limit: int,
    dll_path: str | os.PathLike[str] | None,
) -> SavedState:
    kind = sniff(path)
    dll = _use_dll(backend)
    if dll and is_remote(path):
        if backend == "dll":
            raise BackendUnavailableError(
                f"{redact(path)}: Microsoft's DLL reads local files only; use the native backend for a URL"
            )
        dll = False  # "auto": the native reader reads URLs (docs/remote.md)
    if kind == "bin":
        found = vsv if vsv is not None else find_partner(path, [".vsv"])[0] if partner else None
        if found is not None:
            return _open_pair(path, found, dll, strict=strict, cache_limit=cache_limit, dll_path=dll_path)
        if dll and backend == "dll":
            raise BackendUnavailableError(
                f"{redact(path)}: the DLL opens a legacy .bin only with its .vsv (none found beside it);"
                " use the native backend to read its memory alone"
            )
        provider = SavedStateProvider.load_bin(path, strict=strict, cache_limit=cache_limit)
        if partner:
            looked = find_partner(path, [".vsv"])[1]
            provider.add_finding(
                redact(path), None, "no-partner", f"no .vsv found beside it (looked for {looked[0]}, any case)"
            )
        return provider
    if kind == "storage":
        if vsv is not None:
            raise FormatError(
                redact(path),
                0,
                "is a HyperVStorage container (.vmrs/.vsv), not a legacy .bin: --vsv goes with a .bin",
            )
        if partner and suffix(path).lower() == ".vsv":
            bin_path, looked = find_partner(path, [".bin"])
            if bin_path is None:
                raise FormatError(
                    redact(path), None, f"a .vsv needs its .bin: none found (looked for {looked[0]}, any case)"
                )
            return _open_pair(bin_path, path, dll, strict=strict, cache_limit=cache_limit, dll_path=dll_path)
        if dll:
            from .dll.provider import DllSavedStateProvider

            return DllSavedStateProvider.load_vmrs(path, dll_path=dll_path)
        return SavedStateProvider.load_vmrs(path, strict=strict, cache_limit=cache_limit)
    raise FormatError(
        redact(path),
        0,
        f"not a Hyper-V saved state: expected signature {STORAGE_SIGNATURE:#010x} (.vmrs/.vsv) or"
        f" {BIN_SIGNATURE:#010x} (legacy .bin)",
    )


def _open_pair(
    bin_path: str | os.PathLike[str],
    vsv_path: str | os.PathLike[str],
    dll: bool,
    *,
    strict: bool,
    cache_limit: int,
    dll_path: str | os.PathLike[str] | None,
) -> SavedState:
    if dll:
        from .dll.provider import DllSavedStateProvider

        return DllSavedStateProvider.load_bin_vsv(bin_path, vsv_path, dll_path=dll_path)
    return SavedStateProvider.load_bin_vsv(bin_path, vsv_path, strict=strict, cache_limit=cache_limit)


def apply_pending_replay_log(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Write a committed **copy** of ``src`` to ``dst`` (ApplyPendingSavedStateFileReplayLog, never in place).

    Returns the number of replay-log entries applied.
    """
    return SavedStateProvider.apply_pending_replay_log(src, dst)
