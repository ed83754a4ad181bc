"""``vmssd``: the command line.  Each subcommand lives in its own module of this package.

Exit codes: 0 ok, 1 runtime failure (one line on stderr; the traceback with ``-v``), 2 usage,
130 Ctrl-C, 128 + N for signal N (143 SIGTERM, 129 SIGHUP).  Every output is written under a
temporary name and renamed when complete, so an interrupted command leaves nothing behind: SIGTERM
and SIGHUP (sent by ``timeout``, job schedulers, a closed terminal) clean up as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from types import FrameType
from typing import NoReturn

from .. import __version__
from ..errors import VmssdError
from ..outputs import WRITE_ERRNOS, OutputError
from . import apply_log, convert, create, info, keys, memmap, read, registers, remote_options, triage, verify

COMMANDS = [info, keys, registers, memmap, read, convert, apply_log, verify, create, triage]
CLEANUP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be, so every cleanup that handles Ctrl-C runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


@contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` in the main thread for the duration."""
    previous = {}
    for signum in CLEANUP_SIGNALS:
        with suppress(ValueError, OSError):  # not the main thread, or not allowed here
            previous[signum] = signal.signal(signum, _raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), pointing at ``--help`` instead of printing the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vmssd",
        description=(
            "Read Hyper-V saved states (.vmrs, legacy .bin + .vsv) and HyperVStorage containers"
            " (.vmrs, .vmcx) without Microsoft's DLL. Evidence files are only ever opened read-only."
        ),
        epilog="Run 'vmssd COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    verbose_help = "more detail; tracebacks on errors (before or after COMMAND)"
    parser.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)
    remote_options.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    for command in sub.choices.values():
        # SUPPRESS: a sub-command that is not given -v keeps the count given before it
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=verbose_help)
    return parser


def stdout_closed() -> bool:
    """Whether standard output is closed (``>&-``): Python then sets ``sys.stdout`` to None and print() is silent."""
    if sys.stdout is None:
        return True
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError, AttributeError):  # a replaced stream (tests, embedding): it is open
        return False
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _prints_result(args: argparse.Namespace) -> bool:
    """Commands that write files (-o) report on stderr; every other one prints its result on stdout."""
    return getattr(args, "output", None) is None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    if _prints_result(args) and stdout_closed():  # refuse before doing work whose result nobody would see
        print(
            f"vmssd {args.command}: error: standard output is closed; nothing to print to"
            " (redirect it to a file or to /dev/null)",
            file=sys.stderr,
        )
        return 1
    try:
        remote_options.apply(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        with cleanup_on_signals():
            code = int(args.func(args) or 0)
            if sys.stdout is not None:
                sys.stdout.flush()  # a full disk or device shows here, not as a traceback at exit
            return code
    except Terminated as exc:
        name = signal.Signals(exc.signum).name
        print(f"vmssd: terminated by {name}; partial outputs removed", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("vmssd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `vmssd keys x | head`: the reader had enough
        _silence_stdout()
        return 0
    except (VmssdError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno in WRITE_ERRNOS:
            exc = OutputError(exc.errno, exc.strerror, "standard output", "writing")  # the only unnamed output left
            _silence_stdout()
        print(f"vmssd {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail again at exit."""
    with suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
