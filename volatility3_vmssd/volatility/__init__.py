"""Volatility 3 glue: the saved-state layer, its stackers, the options automagic and plugin code.

Importing this package is what registers everything with Volatility: the framework finds layers,
stackers and automagics as imported subclasses of its interfaces.  The ``hyperv.*`` plugin shims
(installed as ``volatility3/plugins/hyperv/``; in a checkout use
``vol -p volatility3_vmssd/volatility_plugins``) import it, so once vol has loaded its plugins the
stackers take part in every run, ``windows.*`` and ``linux.*`` included.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .layer import HyperVSavedStateLayer
from .options import HyperVSavedStateOptions
from .remote import ObjectStoreHandler
from .stackers import HyperVIntelStacker, HyperVSavedStateStacker

__all__ = [
    "HyperVIntelStacker",
    "HyperVSavedStateLayer",
    "HyperVSavedStateOptions",
    "HyperVSavedStateStacker",
    "ObjectStoreHandler",
    "plugin_dir",
]


def plugin_dir() -> Path | None:
    """A directory holding our ``hyperv/`` plugin shims, to give ``vol -p``.

    From a checkout that is ``volatility3_vmssd/volatility_plugins``; from an installed wheel it is
    the ``volatility3/plugins`` folder the shims were installed into, which vol only finds by itself
    when volatility3 lives in the same site-packages.
    """
    checkout = Path(__file__).resolve().parent.parent / "volatility_plugins"
    if (checkout / "hyperv" / "__init__.py").is_file():
        return checkout
    for entry in sys.path:
        candidate = Path(entry or ".") / "volatility3" / "plugins"
        if (candidate / "hyperv" / "__init__.py").is_file():
            return candidate.resolve()
    return None
