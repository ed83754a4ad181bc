"""A one-line progress bar on stderr (bytes done/total, rate, ETA) for long CLI jobs.

It draws only when the stream is a terminal, so logs, pipes and tests get no carriage-return noise,
and redraws at most a few times a second, so it costs nothing next to the work it reports.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units, one decimal (bytes stay whole)."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3700`` -> ``"1:01:40"``."""
    s = max(0, int(seconds + 0.5))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """Call :meth:`update` with each amount of bytes done; :meth:`close` (or ``with``) clears the line."""

    def __init__(
        self,
        total: int,
        *,
        label: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval: float = 0.2,
    ) -> None:
        self.total = max(total, 0)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = _is_terminal(self.stream)
        self.enabled = enabled
        self.interval = interval
        self.done = 0
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None, width: int | None = None) -> str:
        """The text of the bar as it would be drawn now, fitted to ``width`` (default: the terminal).

        On a narrow terminal whole pieces are left out (the bar first, then the ETA, the rate, the
        sizes, the label), never cut in the middle of a word.
        """
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        left = (self.total - self.done) / rate if rate > 0 and self.done else None
        if width is None:
            width = shutil.get_terminal_size((80, 24)).columns - 1
        pieces = {
            "label": self.label,
            "percent": f"{frac * 100:3.0f}%",
            "sizes": f"{human_size(self.done)}/{human_size(self.total)}",
            "rate": f"{human_size(rate)}/s",
            "eta": "ETA --:--" if left is None else f"ETA {human_duration(left)}",
        }
        order = ["label", "percent", "sizes", "rate", "eta"]
        for drop in ("eta", "rate", "sizes", "label", None):
            text = "  ".join(pieces[k] for k in order if pieces[k])
            cells = min(40, width - len(text) - 3)  # "[" + cells + "] " beside the text
            if cells >= 10:
                filled = int(frac * cells)
                head = f"{pieces['label']} " if pieces["label"] else ""
                rest = "  ".join(pieces[k] for k in order[1:] if pieces[k])
                return f"{head}[{'#' * filled}{'.' * (cells - filled)}] {rest}"
            if len(text) <= width:
                return text
            if drop is not None:
                order.remove(drop)
        return pieces["percent"].strip()[: max(width, 0)]

    def _draw(self, now: float) -> None:
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
