"""``vmssd create``: build a saved state (.vmrs or legacy .bin + .vsv) from a memory dump and registers."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import FormatError
from ..savedstate.cpujson import state_from_json
from ..savedstate.images import MemoryImage
from ..savedstate.writer import LEGACY_VM_VERSION, VMRS_VM_VERSION, write_bin_vsv, write_vmrs


def _range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x, 0) for x in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START-END (e.g. 0xA0000-0xFFFFF)") from None
    if end < start:
        raise argparse.ArgumentTypeError(f"{text!r}: END is below START")
    return start, end + 1  # inclusive on the command line, half-open inside


def _version(text: str) -> int:
    try:
        major, minor = (int(x) for x in text.split(".", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MAJOR.MINOR (e.g. 9.0)") from None
    return major << 8 | minor


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "create",
        help="build a .vmrs (or a legacy .bin + .vsv) from a memory dump and a registers JSON",
        description=(
            "Build a Hyper-V saved state from guest memory (a raw image, a LiME file, or an ELF core with"
            " physical addresses in PT_LOAD) and CPU registers (JSON, see docs/create.md), using fill, XPRESS"
            " and raw page records as Hyper-V does. Holes (MMIO ranges) are left unbacked."
        ),
        epilog=(
            "examples:\n"
            "  vmssd create --memory guest.elf --registers regs.json -o vm.vmrs\n"
            "  vmssd create --memory ram.raw --registers regs.json --hole 0xA0000-0xFFFFF -o vm.vmrs\n"
            "  vmssd create --memory ram.lime --registers regs.json --legacy -o vm.bin   (also writes vm.vsv)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--memory", required=True, help="guest memory: raw, LiME or ELF core")
    p.add_argument("--memory-format", choices=["auto", "raw", "lime", "elf"], default="auto")
    p.add_argument("--registers", required=True, help="registers JSON (vmssd-registers/1 or hvtest-registers/1)")
    p.add_argument("-o", "--output", required=True, help="the .vmrs (or, with --legacy, the .bin) to write")
    p.add_argument("--legacy", action="store_true", help="write a legacy .bin + .vsv pair instead of a .vmrs")
    p.add_argument("--vsv", help="with --legacy: the .vsv path (default: beside the .bin)")
    p.add_argument(
        "--hole",
        action="append",
        type=_range,
        default=[],
        metavar="START-END",
        help="leave this GPA range (inclusive) unbacked; repeatable",
    )
    p.add_argument("--vendor", choices=["intel", "amd", "hygon", "arm"], help="override the JSON's vendor")
    p.add_argument("--vm-version", type=_version, help="VM configuration version (default 9.0; 5.0 with --legacy)")
    p.add_argument("--alignment", type=lambda s: int(s, 0), default=0x1000, help="data alignment, 0x1000..0x10000")
    p.add_argument("--no-compress", action="store_true", help="store non-fill pages raw (faster, larger)")
    p.add_argument(
        "--raw-blocks",
        action="store_true",
        help="write what Microsoft's openvmm writer writes: every RamBlock a raw 1 MiB value, no /savedstate/type",
    )
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes for page encoding")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if os.path.abspath(args.output) == os.path.abspath(args.memory):
        raise FormatError(args.output, None, "the output must not be the input memory file")
    with open(args.registers, encoding="utf-8") as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as exc:
            raise FormatError(args.registers, exc.pos, f"not valid JSON: {exc.msg}") from None
    state = state_from_json(doc, vendor=args.vendor)
    with MemoryImage.open(args.memory, args.memory_format) as image:
        common = {
            "holes": args.hole,
            "compress": not args.no_compress,
            "raw_blocks": args.raw_blocks,
            "jobs": args.jobs,
            "overwrite": args.force,
        }
        if args.legacy:
            vsv = args.vsv or os.path.splitext(args.output)[0] + ".vsv"
            report = write_bin_vsv(
                args.output, vsv, image, state, vm_version=args.vm_version or LEGACY_VM_VERSION, **common
            )
            written = f"{args.output} + {vsv}"
        else:
            report = write_vmrs(
                args.output,
                image,
                state,
                vm_version=args.vm_version or VMRS_VM_VERSION,
                saved_state_type=None if args.raw_blocks else "Normal",
                alignment=args.alignment,
                **common,
            )
            written = args.output
    print(
        f"wrote {written}: {len(state.vps)} VP(s), {len(report.records)} GPA range(s),"
        f" {report.ram_bytes:,} bytes of RAM in {report.blocks} RamBlocks ({report.stored_bytes:,} bytes stored)",
        file=sys.stderr,
    )
    return 0
