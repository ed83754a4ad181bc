"""A one-line task counter on stderr (done/total, by status) while a triage runs.

Drawn only on a terminal (logs and tests get none) and at most a few times a second.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from typing import TextIO

__all__ = ["TaskProgress"]


class TaskProgress:
    def __init__(self, *, stream: TextIO, enabled: bool | None = None, interval: float = 0.2) -> None:
        self.stream = stream
        if enabled is None:
            try:
                enabled = stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.interval = interval
        self.total = 0
        self.statuses: Counter[str] = Counter()
        self._last = 0.0
        self._drawn = False

    def add(self, n: int) -> None:
        self.total += n
        self._draw()

    def done(self, status: str) -> None:
        self.statuses[status] += 1
        self._draw(force=sum(self.statuses.values()) == self.total)

    def line(self) -> str:
        finished = sum(self.statuses.values())
        width = max(10, min(30, shutil.get_terminal_size((80, 24)).columns - 60))
        filled = int(width * finished / self.total) if self.total else width
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items()))
        return f"triage [{'#' * filled}{'.' * (width - filled)}] {finished}/{self.total} tasks" + (
            f" ({parts})" if parts else ""
        )

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()
            self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
