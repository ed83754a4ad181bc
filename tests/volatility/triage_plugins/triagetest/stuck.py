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
