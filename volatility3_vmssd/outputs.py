"""Every file this package writes, written so that no reader ever sees half of one (docs/cli.md, "Outputs").

One helper for the CLI (``read -o``, ``convert``, ``create``, ``apply-log``), the journal commit and
triage's summaries, because the details are easy to get wrong once per copy:

* the data goes to a temporary file created with ``O_EXCL`` under a fresh random name in the
  target's own folder (so the final rename stays on one file system and two runs never share one),
  and is renamed to the target only when complete; on any failure (an error, a full disk, Ctrl-C,
  SIGTERM) the temporary file is removed;
* only a regular file is ever replaced.  A target that exists as anything else (a symbolic link, a
  device node such as ``/dev/full``, a FIFO, a socket, a directory) is refused in one line, with or
  without ``--force``: renaming over it would put a regular file where the user had something we did
  not create, and writing through it would lose the all-or-nothing guarantee.  When the target did
  not exist at the start it is published with ``link()``, which fails instead of replacing whatever
  appeared there in the meantime;
* an OS error names the file the user gave and what failed ("No space left on device writing
  out.raw"), never the temporary name.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO

from .errors import VmssdError

__all__ = ["OutputError", "check_target", "partial_output", "partial_paths", "same_file", "target_problem"]

#: Errors a write can raise without naming a file: they belong to the output being written.
WRITE_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS) if e is not None
)
_NAME_MAX = 255
_NO_HARD_LINKS = frozenset(
    e
    for e in (errno.EPERM, errno.EXDEV, errno.EMLINK, getattr(errno, "ENOTSUP", None), errno.ENOSYS, errno.EACCES)
    if e is not None
)
_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


class OutputError(OSError):
    """An OS error on an output, told against the name the user gave and the step that failed."""

    def __init__(self, code: int | None, strerror: str | None, filename: str, action: str) -> None:
        super().__init__(code, strerror or os.strerror(code or 0), filename)
        self.action = action

    def __str__(self) -> str:
        return f"{self.strerror} {self.action} {self.filename}"


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: ``samefile`` when both exist, else the resolved paths."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def target_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` may not be replaced by an output (None: it does not exist or is a regular file)."""
    name = os.fspath(path)
    try:
        mode = os.lstat(name).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot check {name}: {exc.strerror}"
    if stat.S_ISREG(mode):
        return None
    kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
    return f"refusing to write {name}: it is {kind}; outputs only ever replace regular files, --force or not"


def check_target(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]] = (), *, force: bool) -> None:
    """Refuse ``output`` when it is an input (evidence is read-only), not a regular file, or exists (no ``force``)."""
    name = os.fspath(output)
    for path in inputs:
        if same_file(name, path):
            raise VmssdError(f"refusing to write {name}: it is an input ({os.fspath(path)})")
    problem = target_problem(name)
    if problem is not None:
        raise VmssdError(problem)
    if os.path.lexists(name) and not force:
        raise VmssdError(f"{name} exists (use --force to overwrite it)")


def _named(exc: OSError, final: str, tmp: str | None, action: str) -> OSError:
    """``exc`` retold against ``final`` when it is about the output; other errors (an input's) unchanged."""
    if isinstance(exc, OutputError):
        return exc
    if tmp is not None and exc.filename == tmp:
        return OutputError(exc.errno, exc.strerror, final, action)
    # shutil.copyfile names (source, destination): only a write error of the destination is ours
    if exc.errno in WRITE_ERRNOS and (exc.filename is None or (tmp is not None and exc.filename2 == tmp)):
        return OutputError(exc.errno, exc.strerror, final, action)
    return exc


def _create_temp(final: str) -> tuple[str, int]:
    """A new empty file beside ``final`` under a random name nobody else holds (O_EXCL); returns (path, fd).

    The name carries the writer's process id, so that a later run can tell a temporary file of a writer
    that was killed (removable) from one still being written (triage's output folders).
    """
    folder, name = os.path.split(final)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(64):
        token = secrets.token_hex(4)
        tmp_name = f"{name}.{os.getpid()}.{token}.partial"
        if len(os.fsencode(tmp_name)) > _NAME_MAX:
            tmp_name = f".vmssd-{os.getpid()}.{token}.partial"
        tmp = os.path.join(folder, tmp_name)
        try:
            return tmp, os.open(tmp, flags, 0o666)  # the umask applies, as for any file the user creates
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror, final, "creating") from None
    raise OutputError(errno.EEXIST, "no free temporary name", final, "creating")


def _publish(tmp: str, final: str, *, force: bool) -> None:
    """Rename the finished ``tmp`` to ``final``, never over anything but a regular file (and that only with force)."""
    problem = target_problem(final)
    if problem is not None:  # something other than a file appeared while we wrote
        raise VmssdError(problem)
    if os.path.lexists(final):
        if not force:
            raise VmssdError(f"{final} appeared while it was being written; not replaced (use --force)")
        try:
            os.replace(tmp, final)
        except OSError as exc:
            raise OutputError(exc.errno, exc.strerror, final, "renaming the finished file to") from None
        return
    try:
        os.link(tmp, final)  # fails, replacing nothing, if anything appeared at final meanwhile
    except FileExistsError:
        raise VmssdError(f"{final} appeared while it was being written; not replaced") from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise OutputError(exc.errno, exc.strerror, final, "renaming the finished file to") from None
        try:  # a file system without hard links (FAT, some network shares): the plain rename
            os.replace(tmp, final)
        except OSError as exc2:
            raise OutputError(exc2.errno, exc2.strerror, final, "renaming the finished file to") from None
        return
    with suppress(OSError):
        os.unlink(tmp)


@contextmanager
def partial_paths(*finals: str | os.PathLike[str], force: bool = False) -> Iterator[list[str]]:
    """Temporary paths (existing, empty) for ``finals``, renamed to them when the block completes.

    For writers that open a path themselves.  All targets are checked before anything is created;
    on any failure every temporary file is removed and an OS error about one names its final path.
    """
    names = [os.fspath(f) for f in finals]
    for name in names:
        problem = target_problem(name)
        if problem is not None:
            raise VmssdError(problem)
    temps: list[str] = []
    try:
        for name in names:
            tmp, fd = _create_temp(name)
            os.close(fd)
            temps.append(tmp)
        try:
            yield list(temps)
        except OSError as exc:
            for tmp, name in zip(temps, names, strict=False):
                if tmp in (exc.filename, exc.filename2):
                    raise _named(exc, name, tmp, "writing") from exc
            raise _named(exc, names[0], None, "writing") from exc
        for tmp, name in zip(temps, names, strict=True):
            _publish(tmp, name, force=force)
    finally:
        for tmp in temps:
            with suppress(OSError):
                os.unlink(tmp)


@contextmanager
def partial_output(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: renamed to ``path`` on success, removed on any failure or Ctrl-C.

    ``force`` lets the rename replace a regular file that exists (the caller checked, with
    :func:`check_target`, that the user allowed it); nothing else is ever replaced.
    """
    final = os.fspath(path)
    problem = target_problem(final)
    if problem is not None:
        raise VmssdError(problem)
    tmp, fd = _create_temp(final)
    try:
        fh = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(tmp)
        raise
    try:
        try:
            yield fh
            fh.close()  # flushes: a full disk can show here first
        except OSError as exc:
            raise _named(exc, final, tmp, "writing") from exc
        _publish(tmp, final, force=force)
    finally:
        with suppress(OSError):
            fh.close()
        with suppress(OSError):
            os.unlink(tmp)
