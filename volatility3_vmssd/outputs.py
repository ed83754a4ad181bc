"""Outputs written so that a reader never sees half of one: a temporary name, renamed on success."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: ``samefile`` when both exist, else the resolved paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


@contextmanager
def partial_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Write ``path + ".partial"`` and rename it to ``path`` on success; remove it on any failure or Ctrl-C.

    A reader never sees a half-written image under the final name.
    """
    final = os.fspath(path)
    tmp = final + ".partial"
    fh = open(tmp, "wb")  # noqa: SIM115 - closed below on every path
    try:
        yield fh
        fh.close()
        os.replace(tmp, final)
    except BaseException:
        fh.close()
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
