"""One exception hierarchy and one findings model for the whole package.

Every error a parser raises on bad input is a :class:`VmssdError`; callers (the CLI, the Volatility
layer, fuzzers) catch that one base class.  Anything the reader could work around (a bad CRC with a
good second copy, a pending journal applied in memory, an unknown chunk) is recorded as a
:class:`Finding` instead, so an analyst sees what was not read as written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence


class VmssdError(Exception):
    """Base class of every exception this package raises on purpose."""


class FormatError(VmssdError):
    """The bytes at ``offset`` of ``path`` are not what the format requires.

    The message always names the file, the offset and what was expected, because an analyst
    holding a damaged evidence file needs to know where to look.
    """

    def __init__(self, path: str | os.PathLike[str] | None, offset: int | None, expected: str) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        self.expected = expected
        where = self.path or "<memory>"
        at = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(f"{where}{at}: {expected}")


class ChecksumError(FormatError):
    """A CRC did not verify and strict mode was asked for."""


class TruncatedError(FormatError):
    """The file ends before a structure it declares."""


class NotFoundError(VmssdError, KeyError):
    """A key, block or register that the caller asked for does not exist."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class UnmappedAddressError(VmssdError):
    """A guest address has no backing (MMIO hole, unmapped virtual page)."""

    def __init__(self, message: str, address: int) -> None:
        self.address = address
        super().__init__(message)


class UnsupportedError(VmssdError):
    """The input is valid but uses a variant we do not read (and we say which)."""


class BackendUnavailableError(VmssdError):
    """A provider backend (such as the Windows DLL) cannot be used on this host."""


#: Findings of one kind of one repeated problem in one file kept verbatim; the rest are counted in
#: one summary finding, so a file with a million bad entries costs a few dozen objects, not a
#: million (docs/robustness.md).
KEEP_PER_KIND = 20


@dataclasses.dataclass(frozen=True)
class Finding:
    """Something the reader noticed and worked around; shown by ``vmssd info`` and ``hyperv.info``.

    ``suppressed`` is non-zero only on a summary: the number of findings of this kind (in this file)
    that were counted but not kept; ``offset`` is then the first of them.
    """

    path: str
    offset: int | None
    kind: str  # short machine-readable tag: "crc", "journal", "unknown-chunk", "truncated", ...
    message: str
    suppressed: int = 0

    def __str__(self) -> str:
        at = f" @ {self.offset:#x}" if self.offset is not None else ""
        return f"[{self.kind}] {self.path}{at}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class _Tally:
    __slots__ = ("count", "first", "index", "last")

    def __init__(self) -> None:
        self.count = 0
        self.index = -1  # position of the summary in the list once one exists
        self.first: int | None = None
        self.last: int | None = None


class Findings:
    """The findings of one file: strict mode enforced in one place, repeats aggregated.

    The first :data:`KEEP_PER_KIND` findings of each (path, kind, group) are kept as they are;
    later ones only increment a counter shown by one summary finding in their place.  ``group``
    names a problem that can repeat once per entry ("object-entry-crc"); call sites that report
    once per structure leave it out and share the default group of their kind.  The summary text
    is brought up to date by every read (iteration, indexing, length), so adding stays cheap in hot
    loops; the list itself is private, so no read can skip that.
    """

    def __init__(self, strict: bool = False, *, keep: int = KEEP_PER_KIND) -> None:
        self._items: list[Finding] = []
        self.strict = strict
        self.keep = keep
        self._tallies: dict[tuple[str, str, str | None], _Tally] = {}
        self._stale = False

    def verbatim(self, path: str, kind: str, group: str | None = None) -> bool:
        """Whether the next finding of (path, kind, group) would be kept as written (or raise in strict mode).

        Hot loops build a message only when it will be shown; past the kept ones they add "".
        """
        tally = self._tallies.get((path, kind, group))
        return self.strict or tally is None or tally.count < self.keep

    def tally(self, kind: str, group: str | None = None) -> int:
        """How many findings of ``kind`` (and ``group``) were added, kept or only counted."""
        return sum(t.count for (_p, k, g), t in self._tallies.items() if k == kind and g == group)

    @property
    def suppressed(self) -> int:
        """Findings counted but not kept verbatim, over all kinds."""
        return sum(t.count - min(t.count, self.keep) for t in self._tallies.values())

    def add(
        self,
        path: str | os.PathLike[str],
        offset: int | None,
        kind: str,
        message: str,
        *,
        error: type[FormatError] | None = None,
        group: str | None = None,
    ) -> None:
        """Record a finding; in strict mode raise ``error`` instead when one is given."""
        if self.strict and error is not None:
            raise error(path, offset, message)
        spath = path if isinstance(path, str) else os.fspath(path)
        key = (spath, kind, group)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        tally.count += 1
        if tally.count <= self.keep:
            self._items.append(Finding(spath, offset, kind, message))
            return
        if tally.index < 0:
            tally.index = len(self._items)
            tally.first = offset
            self._items.append(Finding(spath, offset, kind, ""))
        if offset is not None:
            tally.last = offset
            if tally.first is None:
                tally.first = offset
        self._stale = True

    def add_all(
        self,
        path: str,
        kind: str,
        offsets: Sequence[int],
        message: Callable[[int], str],
        *,
        error: type[FormatError] | None = None,
        group: str | None = None,
    ) -> None:
        """One finding per offset, as :meth:`add`; ``message(j)`` builds the j-th text only while it is kept.

        What hot loops use: they collect offsets, and a million of them cost one counter update.
        """
        j = 0
        while j < len(offsets) and self.verbatim(path, kind, group):
            self.add(path, offsets[j], kind, message(j), error=error, group=group)
            j += 1
        if j == len(offsets):
            return
        self.add(path, offsets[j], kind, "", error=error, group=group)  # makes the summary if needed
        tally = self._tallies[(path, kind, group)]
        tally.count += len(offsets) - j - 1
        tally.last = offsets[-1]
        self._stale = True

    def _current(self) -> list[Finding]:
        """The kept findings, summaries brought up to date."""
        if self._stale:
            self._stale = False
            for (path, kind, _group), t in self._tallies.items():
                if t.index < 0:
                    continue
                n = t.count - self.keep
                span = ""
                if t.first is not None and t.last is not None and t.last != t.first:
                    span = f", offsets {t.first:#x} to {t.last:#x}"
                message = f"{n} more {kind!r} finding(s) like those above, counted but not listed{span}"
                self._items[t.index] = Finding(path, t.first, kind, message, suppressed=n)
        return self._items

    def __iter__(self) -> Iterator[Finding]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Finding:
        return self._current()[index]

    def __eq__(self, other: object) -> bool:
        """Equal to another collection of the same findings in the same order (a list, or Findings)."""
        if isinstance(other, Findings | list | tuple):
            return self._current() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"Findings({self._current()!r})"


def count_findings(findings: Iterable[Finding]) -> int:
    """How many findings there were, those counted in summaries included."""
    return sum(f.suppressed or 1 for f in findings)


def summarize(findings: Iterable[Finding], per_kind: int = 3) -> list[str]:
    """Lines for a terminal: the first ``per_kind`` findings of each kind, then one count per kind.

    ``vmssd info`` and ``hyperv.info`` print this; ``vmssd info --findings-json`` gives every finding kept.
    """
    shown: dict[str, int] = {}
    hidden: dict[str, int] = {}
    lines: list[str] = []
    for f in findings:
        kind, extra = f.kind, f.suppressed
        if shown.get(kind, 0) < per_kind and not extra:
            shown[kind] = shown.get(kind, 0) + 1
            lines.append(str(f))
        else:
            hidden[kind] = hidden.get(kind, 0) + (extra or 1)
    for kind, n in hidden.items():
        lines.append(f"[{kind}] ... and {n} more finding(s) of this kind (all kept: vmssd info --findings-json)")
    return lines
