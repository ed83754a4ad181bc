"""Hyper-V saved states (.vmrs, legacy .bin + .vsv) read natively, for Volatility 3 and the command line.

Layers, from the bottom up: :mod:`.storage` (the HyperVStorage key-value container),
:mod:`.codecs` (XPRESS), :mod:`.savedstate` (RAM map, page records, CPU state, legacy .bin),
:mod:`.provider` (the public API).  Nothing below the Volatility glue imports Volatility.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import Finding, FormatError, VmssdError

__version__ = "0.1.0"

__all__ = ["Finding", "FormatError", "SavedStateProvider", "VmssdError", "__version__"]

if TYPE_CHECKING:
    from .provider import SavedStateProvider


def __getattr__(name: str) -> Any:
    # Lazy so that `import volatility3_vmssd.storage` stays cheap for the CLI and the fuzzers.
    if name == "SavedStateProvider":
        from .provider import SavedStateProvider

        return SavedStateProvider
    raise AttributeError(name)
