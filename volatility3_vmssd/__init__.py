"""Hyper-V saved states (.vmrs, legacy .bin + .vsv) read natively, for Volatility 3 and the command line.

Layers, from the bottom up: :mod:`.errors` and :mod:`.outputs`; :mod:`.storage` (the HyperVStorage
key-value container); :mod:`.codecs` (XPRESS); :mod:`.memory` (RAM map, RamBlocks, page records, guest
memory, legacy .bin); :mod:`.cpu` (partition_state, registers, paging, translation); :mod:`.images` (raw,
LiME, ELF readers and writers); :mod:`.vmrs` (the saved state assembled from and into a container); then
the provider layer: :mod:`.interface` (what every backend offers), :mod:`.summary` (what info shows),
:mod:`.native` and :mod:`.dll` (the two backends), :mod:`.files` (recognising files, finding partners) and
:mod:`.provider` (:func:`open_saved_state`).  Above it: the Volatility glue, the CLI, verify and triage.
Nothing below the Volatility glue imports Volatility; nothing imports upward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from volatility3_vmssd.errors import Finding, FormatError, VmssdError

__version__ = "0.1.0"

__all__ = [
    "Finding",
    "FormatError",
    "SavedState",
    "SavedStateProvider",
    "Summary",
    "VmssdError",
    "__version__",
    "open_saved_state",
]

if TYPE_CHECKING:
    from volatility3_vmssd.interface import SavedState
    from volatility3_vmssd.native import SavedStateProvider
    from volatility3_vmssd.provider import open_saved_state
    from volatility3_vmssd.summary import Summary

_LAZY = {
    "SavedState": "interface",
    "Summary": "summary",
    "SavedStateProvider": "native",
    "open_saved_state": "provider",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import volatility3_vmssd.storage` stays cheap for the CLI and the fuzzers.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
