"""``vmssd apply-log``: a copy of a container with its pending replay log (journal) committed.

Readers here already apply a pending journal in memory; this is for tools that do not, and it
never touches the input: evidence stays as acquired.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import VmssdError
from ..files import sniff
from ..provider import apply_pending_replay_log
from ..storage import HyperVStorage
from .commands import add_command, add_output
from .convert import check_output


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "apply-log",
        run,
        help="write a copy of a .vmrs/.vsv/.vmcx with its pending journal committed",
        description=(
            "Write a copy of a HyperVStorage container (.vmrs, .vmcx, the .vsv of a legacy pair) with the"
            " entries of its pending replay log written into place, as Hyper-V would on its next open."
            " The input is only read; OUT must be another file. Says how many entries were applied; when"
            " nothing is pending it says so and writes no copy (the input is already what Hyper-V would"
            " read). `vmssd info` shows the journal state."
        ),
        examples=[
            "vmssd info vm.vmrs | grep 'Replay log'",
            "vmssd apply-log vm.vmrs -o vm-committed.vmrs",
            "vmssd apply-log vm.vsv -o committed/vm.vsv && cp vm.bin committed/",
        ],
    )
    p.add_argument("file", help="the container whose journal to commit (a legacy .bin has none: use its .vsv)")
    add_output(p, "the committed copy to write", force="overwrite OUT if it exists (never the input)")


def run(args: argparse.Namespace) -> int:
    check_output(args.output, [args.file], force=args.force)
    kind = sniff(args.file)
    if kind == "bin":
        raise VmssdError(f"{args.file} is a legacy .bin, which has no journal: apply-log its .vsv instead")
    with HyperVStorage.open(args.file, strict=True) as storage:  # a journal that does not verify is not committed
        pending = len(storage.overlay.entries) if storage.overlay is not None else 0
    if not pending:  # a copy would be byte for byte the input: say so instead of writing one
        print(
            f"{args.file} has no pending journal entries: nothing to apply, {args.output} not written", file=sys.stderr
        )
        return 0
    applied = apply_pending_replay_log(args.file, args.output)
    print(
        f"applied {applied} pending journal entr{'y' if applied == 1 else 'ies'}; wrote {args.output}", file=sys.stderr
    )
    return 0
