"""``vmssd verify``: our native reader against Microsoft's vmsavedstatedumpprovider.dll (Windows only)."""

from __future__ import annotations

import argparse
import json
import sys

from ..dll.binding import is_windows, unavailable_message
from ..errors import BackendUnavailableError
from ..verify import DEFAULT_SAMPLES
from .commands import add_command, add_json, add_saved_state
from .opening import check_vsv


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "verify",
        run,
        help="cross-check the native reader against Microsoft's DLL (Windows)",
        description=(
            "Open a saved state with both backends and compare their answers: VP count, architecture,"
            " paging mode, VTLs and every register of every VP, RIP/RSP translations, the GPA chunk map,"
            " the raw saved-memory size, and whole pages (first, middle and last page of every chunk plus"
            " --samples random pages, seeded). Needs Windows and vmsavedstatedumpprovider.dll from the"
            " Windows SDK (--dll, $VMSSD_DUMP_PROVIDER_DLL, or the Windows Kits folders, newest first)."
            " Exit status: 0 identical, 1 differences found or failure."
        ),
        examples=["vmssd verify vm.vmrs", "vmssd verify --samples 500 --json vm.bin --vsv vm.vsv"],
    )
    add_saved_state(p)
    p.add_argument("--dll", help="path of vmsavedstatedumpprovider.dll (default: discovered)")
    p.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"random pages to compare besides each chunk's first/middle/last (default {DEFAULT_SAMPLES})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random page sample (default 0)")
    add_json(p)


def run(args: argparse.Namespace) -> int:
    if not is_windows():
        raise BackendUnavailableError(unavailable_message())
    from ..verify import verify_files

    check_vsv(args)

    report = verify_files(args.file, vsv=args.vsv, dll_path=args.dll, samples=args.samples, seed=args.seed)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=1)
        print()
    else:
        print(report.render())
    return 0 if report.identical else 1
