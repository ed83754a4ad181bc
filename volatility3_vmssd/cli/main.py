"""``vmssd``: the command line.  Each subcommand lives in its own module of this package.

Exit codes: 0 ok, 1 runtime failure (one line on stderr; the traceback with ``-v``), 2 usage.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import VmssdError
from . import apply_log, convert, create, info, keys, memmap, read, registers, triage, verify

COMMANDS = [info, keys, registers, memmap, read, convert, apply_log, verify, create, triage]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmssd",
        description=(
            "Read Hyper-V saved states (.vmrs, legacy .bin + .vsv) and HyperVStorage containers"
            " (.vmrs, .vmcx) without Microsoft's DLL. Evidence files are only ever opened read-only."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail; tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("vmssd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (VmssdError, OSError) as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"vmssd {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
