"""One exception hierarchy and one findings model for the whole package.

Every error a parser raises on bad input is a :class:`VmssdError`; callers (the CLI, the Volatility
layer, fuzzers) catch that one base class.  Anything the reader could work around (a bad CRC with a
good second copy, a pending journal applied in memory, an unknown chunk) is recorded as a
:class:`Finding` instead, so an analyst sees what was not read as written.
"""

from __future__ import annotations

import dataclasses
import os


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


@dataclasses.dataclass(frozen=True)
class Finding:
    """Something the reader noticed and worked around; shown by ``vmssd info`` and ``hyperv.info``."""

    path: str
    offset: int | None
    kind: str  # short machine-readable tag: "crc", "journal", "unknown-chunk", "truncated", ...
    message: str

    def __str__(self) -> str:
        at = f" @ {self.offset:#x}" if self.offset is not None else ""
        return f"[{self.kind}] {self.path}{at}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Findings(list[Finding]):
    """A list of findings with a helper that enforces strict mode in one place."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict

    def add(
        self,
        path: str | os.PathLike[str],
        offset: int | None,
        kind: str,
        message: str,
        *,
        error: type[FormatError] | None = None,
    ) -> None:
        """Record a finding; in strict mode raise ``error`` instead when one is given."""
        if self.strict and error is not None:
            raise error(path, offset, message)
        self.append(Finding(os.fspath(path), offset, kind, message))
