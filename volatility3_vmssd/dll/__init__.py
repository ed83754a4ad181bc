"""Microsoft's ``vmsavedstatedumpprovider.dll`` as a second backend and as the reference for ``vmssd verify``.

* :mod:`.binding`: ctypes structures and prototypes for both ABI generations, HRESULT mapping.
* :mod:`.discovery`: finding the DLL and vetting its version and machine type with pefile.
* :mod:`.provider`: :class:`DllSavedStateProvider`, the provider interface over the DLL.

Comparing this backend with the native one (``vmssd verify``) lives above both, in
:mod:`volatility3_vmssd.verify`.

Importing this package never loads the DLL nor imports Windows-only modules; the DLL is loaded
on the first ``DllSavedStateProvider.load_*`` call, on Windows only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DllInfo", "DllSavedStateProvider", "dll_available", "find_dll"]

if TYPE_CHECKING:
    from .discovery import DllInfo, find_dll
    from .provider import DllSavedStateProvider


def dll_available() -> bool:
    """True on Windows when an acceptable DLL is found (what ``backend="auto"`` asks)."""
    from ..errors import BackendUnavailableError
    from .binding import is_windows
    from .discovery import find_dll

    if not is_windows():
        return False
    try:
        find_dll()
    except BackendUnavailableError:
        return False
    return True


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not load ctypes prototypes or pefile.
    if name == "DllSavedStateProvider":
        from .provider import DllSavedStateProvider

        return DllSavedStateProvider
    if name in ("DllInfo", "find_dll"):
        from . import discovery

        return getattr(discovery, name)
    raise AttributeError(name)
