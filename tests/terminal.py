"""Running a command as a terminal's foreground job runs, for the tests that press Ctrl-C.

A process inherits ignored signals across ``exec``, and a job started with ``&`` by a
non-interactive shell (a CI job, a script) has SIGINT ignored, so a ``vmssd`` started from there
rightly ignores Ctrl-C.  A test of what Ctrl-C does must start its child as a terminal would: with
SIGINT at its default, whatever the test process inherited.
"""

from __future__ import annotations

import sys

#: exec's the command that follows it with SIGINT at its default disposition (dispositions set to
#: default survive exec, as ignored ones do)
_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def foreground(cmd: list[str]) -> list[str]:
    """``cmd`` as a terminal's foreground job starts it: Ctrl-C (SIGINT) is delivered, not ignored."""
    return [sys.executable, "-c", _WITH_SIGINT, *cmd]
