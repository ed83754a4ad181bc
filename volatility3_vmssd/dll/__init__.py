"""Microsoft's ``vmsavedstatedumpprovider.dll`` as a second backend and as the reference for ``vmssd verify``.

* :mod:`.binding`: ctypes structures and prototypes for both ABI generations, HRESULT mapping.
* :mod:`.discovery`: finding the DLL and vetting its version and machine type with pefile.
* :mod:`.provider`: :class:`DllSavedStateProvider`, the native provider's method names over the DLL.
* :mod:`.verify`: comparing two providers (registers, chunk map, sampled pages).

Importing this package never loads the DLL nor imports Windows-only modules; the DLL is loaded
on the first ``DllSavedStateProvider.load_*`` call, on Windows only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["DllInfo", "DllSavedStateProvider", "compare_providers", "dll_available", "find_dll"]

if TYPE_CHECKING:
    from .discovery import DllInfo, find_dll
    from .provider import DllSavedStateProvider
    from .verify import compare_providers


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
    # Lazy: the provider module imports the native provider, which the CLI may not need.
    if name == "DllSavedStateProvider":
        from .provider import DllSavedStateProvider

        return DllSavedStateProvider
    if name in ("DllInfo", "find_dll"):
        from . import discovery

        return getattr(discovery, name)
    if name == "compare_providers":
        from .verify import compare_providers

        return compare_providers
    raise AttributeError(name)
