"""Python runs this at start-up when this folder is on PYTHONPATH: ``--hyperv-backend dll`` then uses the fake DLL.

Only the test suite puts it there (``VMSSD_FAKE_DLL=1`` with ``tests/dll/vol_fake`` on PYTHONPATH), so that
``vol`` in a subprocess drives :class:`DllSavedStateProvider` through real ctypes calls on any OS.
"""

import os
import sys

if os.environ.get("VMSSD_FAKE_DLL") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/dll: fakedll
    from fakedll import FakeDll

    from volatility3_vmssd.dll import provider as _dll_provider

    _FAKE = FakeDll().library()

    def _fake_library(dll_path, library, abi):  # type: ignore[no-untyped-def]
        return library if library is not None else _FAKE

    _dll_provider._library = _fake_library
