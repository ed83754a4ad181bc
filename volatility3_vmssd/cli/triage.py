"""``vmssd triage``: every saved state of a host (or a fleet) classified and analysed in parallel."""

from __future__ import annotations

import argparse
import sys

from ..host import usable_cores
from ..triage.engine import EXTRA_HINT, TriageOptions, human_summary, run_triage
from .commands import add_command


def _plugins(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one plugin name")
    return names


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "triage",
        run,
        help="find, classify and analyse every saved state under some folders, in parallel",
        description=(
            "Find every Hyper-V saved state under the given files and folders (recursively), group them by VM"
            " (name and ID from the .vmcx), classify each without reading RAM, and run Volatility plugins on every"
            " saved state with memory, one task per (saved state, plugin), on a private local pool (one worker per"
            " usable core) or on a Dask cluster (--scheduler). Every file's size, modification time and SHA-256"
            " are recorded. Results go to --out; a re-run over the same --out computes only what did not finish."
            f" --scheduler needs the 'triage' extra: {EXTRA_HINT}."
        ),
        examples=[
            "vmssd triage --out triage/ 'D:/Hyper-V' 'E:/Exports'",
            "vmssd triage --out triage/ --symbols ./symbols --offline /mnt/host1",
            "vmssd triage --out triage/ --plugins hyperv.info,windows.pslist /mnt/host1",
            "vmssd triage --out /shared/triage --scheduler tcp://10.0.0.5:8786 /shared/evidence",
        ],
        footer=[
            "classes: saved-memory, legacy-pair, bin-without-vsv, vsv-without-bin, no-memory, configuration,",
            "  guest-state, damaged, not-hyperv (docs/triage.md)",
        ],
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; reused to resume)")
    p.add_argument(
        "--plugins",
        type=_plugins,
        metavar="P1,P2",
        help="comma-separated plugins to run on every saved state instead of the defaults chosen from the guest OS",
    )
    p.add_argument("-s", "--symbols", action="append", default=[], metavar="DIR", help="symbol folder (repeatable)")
    p.add_argument("-p", "--plugin-dir", action="append", default=[], metavar="DIR", help="extra Volatility plugins")
    p.add_argument("--offline", action="store_true", help="never fetch symbols from the network (vol --offline)")
    p.add_argument("--cache-path", metavar="DIR", help="Volatility's cache folder (vol --cache-path)")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"local workers, at most one per usable core (default: one per usable core, here {usable_cores()})",
    )
    p.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="use this Dask cluster instead of the local pool (it runs the plugins: trust it, docs/triage.md)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, metavar="SECONDS", help="time limit per task (default 1800)"
    )
    p.add_argument(
        "--cache-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="decoded-block cache per worker, shared by its threads (default 256)",
    )
    p.add_argument("--retry-failed", action="store_true", help="recompute tasks that failed or timed out before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-hash", action="store_true", help="skip the SHA-256 of each file (size and time still recorded)"
    )


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        print("vmssd triage: error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers is not None and args.scheduler:
        print(
            "vmssd triage: error: --workers sizes the local pool; a --scheduler's cluster has its own", file=sys.stderr
        )
        return 2
    cores = usable_cores()
    if args.workers is not None and args.workers > cores:
        # Each worker runs a whole Volatility process: more than the cores only queues them (and costs memory).
        print(
            f"vmssd triage: --workers {args.workers} is more than the {cores} usable core(s): using {cores}",
            file=sys.stderr,
        )
        args.workers = cores
    if args.cache_mib < 1:
        print("vmssd triage: error: --cache-mib must be at least 1", file=sys.stderr)
        return 2
    opts = TriageOptions(
        paths=args.paths,
        out=args.out,
        plugins=args.plugins,
        symbol_dirs=args.symbols,
        plugin_dirs=args.plugin_dir,
        offline=args.offline,
        cache_path=args.cache_path,
        workers=args.workers,
        scheduler=args.scheduler,
        timeout=args.timeout if args.timeout > 0 else None,
        cache_mib=args.cache_mib,
        retry_failed=args.retry_failed,
        progress=False if args.no_progress else None,
        hash=not args.no_hash,
    )
    report = run_triage(opts)
    print(human_summary(report))
    return 1 if report.failed else 0
