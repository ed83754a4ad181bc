"""Test plugins for vmssd triage's time limit and crash handling (loaded with ``-p``; never shipped)."""

import os
import time

from volatility3.framework import interfaces


class Sleep(interfaces.plugins.PluginInterface):
    """Never finishes (for the per-task time limit)."""

    _required_framework_version = (2, 0, 0)

    @classmethod
    def get_requirements(cls) -> list:
        return []

    def run(self) -> None:
        time.sleep(3600)


class Crash(interfaces.plugins.PluginInterface):
    """Ends its process at once, leaving no result (a plugin taking its interpreter down)."""

    _required_framework_version = (2, 0, 0)

    @classmethod
    def get_requirements(cls) -> list:
        return []

    def run(self) -> None:
        os._exit(9)


class SpawnSleep(interfaces.plugins.PluginInterface):
    """Starts a child that would outlive it (``sleep``), writes the child's pid to $TRIAGETEST_PIDFILE, never
    finishes: the time limit must end the child too."""

    _required_framework_version = (2, 0, 0)

    @classmethod
    def get_requirements(cls) -> list:
        return []

    def run(self) -> None:
        import subprocess

        child = subprocess.Popen(["sleep", "3600"])
        pidfile = os.environ.get("TRIAGETEST_PIDFILE")
        if pidfile:
            with open(pidfile + ".tmp", "w") as fh:
                fh.write(str(child.pid))
            os.replace(pidfile + ".tmp", pidfile)
        time.sleep(3600)
