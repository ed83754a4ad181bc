"""Child processes that end with their parent: encoding workers and plugin runners never outlive a killed CLI.

On Linux the kernel kills the child when its parent dies (``PR_SET_PDEATHSIG``); everywhere, and as a
second net on Linux, a thread notices within a second that the parent is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, exit_code: int = 1) -> None:
    """End this process (``os._exit(exit_code)``) as soon as ``parent_pid`` is no longer its parent."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # the parent is already gone (it died before prctl took effect)
        os._exit(exit_code)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(exit_code)

    threading.Thread(target=watch, name="vmssd-parent-watch", daemon=True).start()
