"""``vmssd convert``: a saved state's RAM as a raw, LiME, ELF core or Windows crash-dump image."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable

from ..errors import VmssdError
from ..images.crashdump import DUMP_KINDS
from ..images.dumpsource import DumpOptions
from ..images.export import FORMATS, export, provider_ranges
from ..images.streaming import ExportReport
from ..outputs import check_target, partial_output
from .commands import add_command, add_output, add_quiet, add_saved_state
from .opening import open_state
from .progress import ProgressBar, human_duration, human_size

MISSING_SUFFIX = ".missing.json"
"""The sidecar ``--allow-missing`` writes beside OUT: the GPA ranges written as zeros, and why."""
SHOWN_RANGES = 10


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "convert",
        run,
        help="write the guest RAM as a raw image, a LiME file, an ELF core or a Windows crash dump",
        description=(
            "Write the guest-physical memory of a saved state in a format other tools open:"
            " raw (flat from GPA 0, holes zero-filled, written sparse), lime (one range header per"
            " GPA chunk) or elf (an ELF64 core: one PT_LOAD per chunk with p_paddr = GPA, and one"
            " NT_PRSTATUS note per VP so gdb and crash see the CPUs) or dmp (a Windows x64 kernel crash dump"
            " for WinDbg and kdmp-parser: VP 0's registers as its context, VP 0's CR3 as its DTB; --symbols"
            " adds the kernel addresses WinDbg reads, see docs/crashdump.md). Volatility opens all four."
            " Streams 16 MiB at a time: memory use does not grow with the guest. Writes a temporary file"
            " beside OUT and renames it when done; on an error, Ctrl-C, SIGTERM or SIGHUP it is removed."
            " RAM that the saved state declares but cannot provide (a cut copy, a missing RamBlock) is an"
            " error naming the ranges: nothing is written unless --allow-missing is given, which writes"
            " them as zeros and lists them in OUT.missing.json."
        ),
        examples=[
            "vmssd convert vm.vmrs -o vm.elf --format elf",
            "vol -f vm.elf windows.pslist",
            "vmssd convert vm.bin -o vm.lime --format lime        (vm.vsv found beside vm.bin)",
            "vmssd convert vm.bin --vsv other.vsv -o ram.raw --format raw -q",
            "vmssd convert vm.vmrs -o vm.dmp --format dmp --symbols ~/symbols    (windows/ntkrnlmp.pdb/...)",
        ],
    )
    add_saved_state(p)
    add_output(p, "the image to write")
    p.add_argument("--format", required=True, choices=FORMATS, help="raw, lime, elf or dmp")
    add_quiet(p)
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help=f"keep the image when some RAM cannot be read: those ranges are zeros, listed in OUT{MISSING_SUFFIX}",
    )
    dmp = p.add_argument_group("--format dmp")
    dmp.add_argument(
        "--dump-type",
        choices=DUMP_KINDS,
        default="auto",
        help="full (runs in the header, at most 42), bitmap, or auto: full when the runs fit, else bitmap",
    )
    dmp.add_argument(
        "--symbols",
        metavar="DIR",
        help="a Volatility symbol directory (as vol -s) with the kernel's table: windows/<pdb>/<GUID-age>.json.xz",
    )
    dmp.add_argument("--dtb", type=lambda s: int(s, 0), metavar="ADDR", help="the kernel DTB (default: VP 0's CR3)")


def check_output(output: str, inputs: Iterable[str], *, force: bool) -> None:
    """Refuse to write over any input (evidence is read-only), anything but a regular file, or, without ``force``,
    an existing file (``outputs.check_target``, shared by every command that writes)."""
    check_target(output, inputs, force=force)


def _missing_summary(source: str, report: ExportReport) -> str:
    return (
        f"{source}: {len(report.missing)} range(s), {report.missing_bytes:,} bytes of the"
        f" {report.ram_bytes:,} bytes of RAM could not be read"
    )


def _show_missing(report: ExportReport) -> None:
    for missing in report.missing[:SHOWN_RANGES]:
        print(f"  missing {missing}", file=sys.stderr)
    if len(report.missing) > SHOWN_RANGES:
        print(f"  ... and {len(report.missing) - SHOWN_RANGES} more range(s)", file=sys.stderr)


def write_missing_sidecar(path: str, source: list[str], report: ExportReport) -> None:
    """``OUT.missing.json``: which GPA ranges of OUT are zeros because the saved state lacked them."""
    doc = {
        "format": "vmssd-missing/1",
        "image": os.path.basename(path),
        "image_format": report.format,
        "source": source,
        "missing_bytes": report.missing_bytes,
        "ranges": [m.to_json() for m in report.missing],
    }
    with partial_output(path + MISSING_SUFFIX, force=True) as out:  # checked before the image was written
        out.write(json.dumps(doc, indent=2).encode() + b"\n")


def run(args: argparse.Namespace) -> int:
    if args.format != "dmp" and (args.symbols or args.dtb is not None or args.dump_type != "auto"):
        raise VmssdError("--symbols, --dtb and --dump-type apply to --format dmp only")
    if args.symbols and not os.path.isdir(args.symbols):
        raise VmssdError(f"--symbols {args.symbols}: not a directory")
    dump = DumpOptions(args.dtb, args.symbols, args.dump_type)
    given = [args.file] + ([args.vsv] if args.vsv else [])
    check_output(args.output, given, force=args.force)
    sidecar = args.output + MISSING_SUFFIX
    check_output(sidecar, given, force=args.force)
    with open_state(args, needs_memory=True) as provider:
        check_output(args.output, provider.paths, force=args.force)
        provider.set_memory_block_cache_limit(
            4
        )  # one pass; a few blocks so that probing a cut block page by page does not decode it again per page
        total = sum(n for _, n in provider_ranges(provider))
        if not total:
            raise VmssdError(f"{args.file}: no saved guest memory to convert")
        start = time.monotonic()
        bar = ProgressBar(total, label=f"convert {args.format}", enabled=None if not args.quiet else False)
        with bar, partial_output(args.output, force=args.force) as out:
            report = export(provider, out, args.format, progress=bar.update, dump=dump)
            if report.missing and not args.allow_missing:
                bar.close()
                _show_missing(report)
                raise VmssdError(
                    f"{_missing_summary(args.file, report)}; {args.output} not written (--allow-missing writes it"
                    f" with those ranges zero-filled and lists them in {sidecar})"
                )
        if report.missing:
            write_missing_sidecar(args.output, list(provider.paths), report)
        elapsed = time.monotonic() - start
        absent = [f for f in provider.findings() if f.kind == "missing-block"]  # declared, no RamBlock: holes
    if report.missing:
        print(f"vmssd convert: warning: {_missing_summary(args.file, report)}; zeros there", file=sys.stderr)
        _show_missing(report)
        print(f"  all missing ranges are listed in {sidecar}", file=sys.stderr)
    for finding in absent:
        print(f"vmssd convert: note: {finding}", file=sys.stderr)
    for note in report.notes:
        print(f"vmssd convert: note: {note}", file=sys.stderr)
    if not args.quiet:
        rate = human_size(report.ram_bytes / elapsed) if elapsed > 0 else "-"
        print(
            f"wrote {args.output}: {args.format}{f' ({report.detail})' if report.detail else ''},"
            f" {report.ranges} GPA range(s), {report.ram_bytes:,} bytes of RAM,"
            f" file {report.size:,} bytes ({report.stored:,} written, the rest sparse)"
            f" in {human_duration(elapsed)} ({rate}/s)",
            file=sys.stderr,
        )
    return 0
