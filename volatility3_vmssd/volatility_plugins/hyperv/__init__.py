"""Hyper-V saved-state plugins (``hyperv.*``), from the volatility3-vmssd package.

Installed as ``volatility3/plugins/hyperv/``; the code lives in ``volatility3_vmssd.volatility``.
Like ``volatility3/plugins/windows/__init__.py``, this rebuilds ``__path__`` from the parent's path
list, so that a ``-p`` directory and the installed copy merge into one package.
"""

import os
import sys

parent_module, module_name = ".".join(__name__.split(".")[:-1]), __name__.split(".")[-1]
__path__ = [os.path.join(x, module_name) for x in sys.modules[parent_module].__path__]
