"""``vmssd convert``: a saved state's RAM as a raw, LiME or ELF core image, for tools that read those."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable

from ..errors import VmssdError
from ..exporters import FORMATS, export, partial_output, provider_ranges, same_file
from ..provider import open_saved_state
from .progress import ProgressBar, human_duration, human_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "convert",
        help="write the guest RAM as a raw image, a LiME file or an ELF core",
        description=(
            "Write the guest-physical memory of a saved state in a format other tools open:"
            " raw (flat from GPA 0, holes zero-filled, written sparse), lime (one range header per"
            " GPA chunk) or elf (an ELF64 core: one PT_LOAD per chunk with p_paddr = GPA, and one"
            " NT_PRSTATUS note per VP so gdb and crash see the CPUs). Volatility opens all three."
            " Streams 16 MiB at a time: memory use does not grow with the guest. Writes OUT.partial"
            " and renames it when done; on an error or Ctrl-C the partial file is removed."
        ),
        epilog=(
            "examples:\n"
            "  vmssd convert vm.vmrs -o vm.elf --format elf\n"
            "  vol -f vm.elf windows.pslist\n"
            "  vmssd convert vm.bin -o vm.lime --format lime        (vm.vsv found beside vm.bin)\n"
            "  vmssd convert vm.bin --vsv other.vsv -o ram.raw --format raw -q"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="the saved state: .vmrs, .bin (+ .vsv) or .vsv (+ .bin)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the image to write")
    p.add_argument("--format", required=True, choices=FORMATS, help="raw, lime or elf")
    p.add_argument("--vsv", help="the .vsv of a legacy .bin, when it is not beside it with the same name")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.set_defaults(func=run)


def check_output(output: str, inputs: Iterable[str], *, force: bool) -> None:
    """Refuse to write over any input (evidence is read-only) or, without ``force``, over any file."""
    for path in inputs:
        if same_file(output, path) or same_file(output + ".partial", path):
            raise VmssdError(f"refusing to write {output}: it is an input ({path})")
    if os.path.isdir(output):
        raise VmssdError(f"{output} is a directory")
    if os.path.lexists(output) and not force:
        raise VmssdError(f"{output} exists (use --force to overwrite it)")


def run(args: argparse.Namespace) -> int:
    given = [args.file] + ([args.vsv] if args.vsv else [])
    check_output(args.output, given, force=args.force)
    with open_saved_state(args.file, vsv=args.vsv) as provider:
        check_output(args.output, provider.paths, force=args.force)
        provider.set_memory_block_cache_limit(0)  # one pass: a cache would only hold memory
        total = sum(n for _, n in provider_ranges(provider))
        if not total:
            raise VmssdError(f"{args.file}: no saved guest memory to convert")
        start = time.monotonic()
        bar = ProgressBar(total, label=f"convert {args.format}", enabled=None if not args.quiet else False)
        with bar, partial_output(args.output) as out:
            report = export(provider, out, args.format, progress=bar.update)
        elapsed = time.monotonic() - start
    if not args.quiet:
        rate = human_size(report.ram_bytes / elapsed) if elapsed > 0 else "-"
        print(
            f"wrote {args.output}: {args.format}, {report.ranges} GPA range(s), {report.ram_bytes:,} bytes of RAM,"
            f" file {report.size:,} bytes ({report.stored:,} written, the rest sparse)"
            f" in {human_duration(elapsed)} ({rate}/s)",
            file=sys.stderr,
        )
    return 0
