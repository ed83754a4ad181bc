"""``vmssd create``: build a saved state (.vmrs or legacy .bin + .vsv) from a memory dump and registers."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..cpu.chunkwriter import build_partition_state
from ..cpu.cpujson import state_from_json
from ..cpu.cpustate import PartitionState
from ..errors import FormatError, VmssdError
from ..files import sniff
from ..host import usable_cores
from ..images.memoryimage import MemoryImage
from ..memory.geometry import BLOCK_SIZE, PAGE_SIZE
from ..memory.rammap import build_layout
from ..storage.defs import MAX_ALIGNMENT, MIN_ALIGNMENT
from ..vmrs.writer import LEGACY_VM_VERSION, VMRS_VM_VERSION, plan_ranges, write_bin_vsv, write_vmrs
from .commands import add_command, add_output, add_quiet
from .convert import check_output
from .progress import ProgressBar

#: Leading bytes of compressed files people hand over as memory images (a guest.elf.xz, a ram.raw.gz).
COMPRESSED = (
    (b"\xfd7zXZ\x00", "xz", "xz -dk"),
    (b"\x1f\x8b", "gzip", "gunzip -k"),
    (b"BZh", "bzip2", "bunzip2 -k"),
    (b"\x28\xb5\x2f\xfd", "zstd", "zstd -d"),
    (b"PK\x03\x04", "zip", "unzip"),
    (b"7z\xbc\xaf\x27\x1c", "7z", "7z x"),
)


def _range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x, 0) for x in text.split("-", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not START-END (e.g. 0xA0000-0xFFFFF)") from None
    if end < start:
        raise argparse.ArgumentTypeError(f"{text!r}: END is below START")
    return start, end + 1  # inclusive on the command line, half-open inside


def _alignment(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0x1000)") from None
    if not MIN_ALIGNMENT <= value <= MAX_ALIGNMENT or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the data alignment must be a power of two from {MIN_ALIGNMENT:#x} to {MAX_ALIGNMENT:#x}"
        )
    return value


def _jobs(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of worker processes") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least one worker process (1 encodes in this process)")
    return value


def _version(text: str) -> int:
    try:
        major, minor = (int(x) for x in text.split(".", 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MAJOR.MINOR (e.g. 9.0)") from None
    return major << 8 | minor


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "create",
        run,
        help="build a .vmrs (or a legacy .bin + .vsv) from a memory dump and a registers JSON",
        description=(
            "Build a Hyper-V saved state from guest memory (a raw image, a LiME file, or an ELF core with"
            " physical addresses in PT_LOAD; uncompressed) and CPU registers (a JSON file: 'vmssd registers"
            " --json' writes one from any saved state; the schema is docs/create.md in the source"
            " repository), using fill, XPRESS and raw page records as Hyper-V does. Holes (MMIO ranges) are"
            " left unbacked. Writes temporary files beside OUT (and VSV) and renames them when done; on an"
            " error, Ctrl-C, SIGTERM or SIGHUP they are removed, and the encoding workers end with this process."
            " OUT is named for its format: a .vmrs, or with --legacy a .bin (its .vsv beside it)."
        ),
        examples=[
            "vmssd create --memory guest.elf --registers regs.json -o vm.vmrs",
            "vmssd create --memory ram.raw --registers regs.json --hole 0xA0000-0xFFFFF -o vm.vmrs",
            "vmssd create --memory ram.lime --registers regs.json --legacy -o vm.bin   (also writes vm.vsv)",
        ],
    )
    p.add_argument("--memory", required=True, help="guest memory: raw, LiME or ELF core")
    p.add_argument(
        "--memory-format",
        choices=["auto", "raw", "lime", "elf"],
        default="auto",
        help="how to read --memory (default auto: ELF and LiME by their magic, anything else raw)",
    )
    p.add_argument("--registers", required=True, help="registers JSON (vmssd-registers/1 or hvtest-registers/1)")
    add_output(p, "the .vmrs (or, with --legacy, the .bin) to write", force="overwrite existing output files")
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
    p.add_argument(
        "--alignment", type=_alignment, default=0x1000, help="data alignment: a power of two, 0x1000..0x10000"
    )
    p.add_argument("--no-compress", action="store_true", help="store non-fill pages raw (faster, larger)")
    p.add_argument(
        "--raw-blocks",
        action="store_true",
        help="write what Microsoft's openvmm writer writes: every RamBlock a raw 1 MiB value, no /savedstate/type",
    )
    p.add_argument(
        "--jobs",
        type=_jobs,
        metavar="N",
        help="worker processes for page encoding (default and most: the CPU cores this process may use)",
    )
    add_quiet(p)


def read_registers(path: str, vendor: str | None) -> PartitionState:
    """The registers JSON as a partition state, every problem reported against ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, exc.start, "not a registers JSON file (binary data, not UTF-8 text)") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(path, exc.pos, f"not valid JSON: {exc.msg}") from None
    try:
        state = state_from_json(doc, vendor=vendor)
        build_partition_state(state)  # a name no chunk layout holds (a misspelt register) fails here, not mid-write
    except FormatError as exc:
        raise FormatError(path, exc.offset, exc.expected) from None
    except ValueError as exc:
        raise FormatError(path, None, f"registers JSON: {exc} (not a register the saved state holds)") from None
    return state


def check_memory_input(path: str) -> None:
    """Refuse inputs that are not memory images: compressed files and Hyper-V files (their bytes are not RAM)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    for magic, name, command in COMPRESSED:
        if head.startswith(magic):
            raise FormatError(path, 0, f"{name}-compressed; decompress it first ({command} {os.path.basename(path)})")
    kind = sniff(path)
    if kind is not None:
        what = "a HyperVStorage container (.vmrs, .vmcx, .vsv)" if kind == "storage" else "a legacy Hyper-V .bin"
        raise FormatError(
            path,
            0,
            f"{what}, not a memory image; to rebuild a saved state from it, first write its RAM with"
            " 'vmssd convert FILE -o ram.elf --format elf' and give that",
        )


#: What each Hyper-V extension names, for refusing an output named as another format than it is.
HYPERV_NAMES = {
    ".vmrs": "a .vmrs saved state",
    ".bin": "a legacy .bin",
    ".vsv": "a legacy .vsv",
    ".vmcx": "a VM configuration",
}
#: What each output holds, and the one hint that fixes a mismatch.
WRITES = {
    ".vmrs": ("a .vmrs", "name it *.vmrs, or add --legacy to write a .bin + .vsv pair"),
    ".bin": ("a legacy .bin (--legacy)", "name it *.bin, or drop --legacy to write a .vmrs"),
    ".vsv": ("a legacy .vsv", "name it *.vsv"),
}


def check_output_name(path: str, writes: str, option: str) -> None:
    """Refuse an output named as another Hyper-V file: tools (and our own partner search) go by the extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext in HYPERV_NAMES and ext != writes:
        what, hint = WRITES[writes]
        raise VmssdError(f"{option} {path}: the name says {HYPERV_NAMES[ext]}, but this writes {what}; {hint}")


def _ram_to_encode(image: MemoryImage, holes: list[tuple[int, int]]) -> int:
    """Bytes the writer will encode (whole RamBlocks), for the progress bar's total."""
    records = build_layout([(r.gpa, r.length) for r in plan_ranges(image, holes)])
    return sum(-(-rec.page_count_total * PAGE_SIZE // BLOCK_SIZE) for rec in records) * BLOCK_SIZE


def run(args: argparse.Namespace) -> int:
    if args.vsv is not None and not args.legacy:
        print("vmssd create: error: --vsv only applies with --legacy", file=sys.stderr)
        return 2
    vsv = (args.vsv or os.path.splitext(args.output)[0] + ".vsv") if args.legacy else None
    outputs = [args.output] + ([vsv] if vsv else [])
    if vsv is not None and os.path.abspath(vsv) == os.path.abspath(args.output):
        raise VmssdError(f"the .vsv and the .bin must be two files ({vsv})")
    for out in outputs:
        check_output(out, [args.memory, args.registers], force=args.force)
    check_output_name(args.output, ".bin" if args.legacy else ".vmrs", "-o")
    if args.vsv is not None:
        check_output_name(args.vsv, ".vsv", "--vsv")
    cores = usable_cores()
    jobs = cores if args.jobs is None else args.jobs
    if jobs > cores:
        print(
            f"vmssd create: note: --jobs {jobs} is more than the {cores} usable CPU core(s); using {cores}",
            file=sys.stderr,
        )
        jobs = cores
    state = read_registers(args.registers, args.vendor)
    check_memory_input(args.memory)
    with MemoryImage.open(args.memory, args.memory_format) as image:
        holes = args.hole  # [start, end) pairs, as the writer takes them
        total = _ram_to_encode(image, holes)
        bar = ProgressBar(total, label="create", enabled=False if args.quiet else None)
        common = {
            "holes": holes,
            "compress": not args.no_compress,
            "raw_blocks": args.raw_blocks,
            "jobs": jobs,
            "overwrite": args.force,
        }
        with bar:
            if args.legacy:
                report = write_bin_vsv(
                    args.output,
                    vsv,
                    image,
                    state,
                    vm_version=args.vm_version or LEGACY_VM_VERSION,
                    progress=bar.update,
                    **common,
                )
            else:
                report = write_vmrs(
                    args.output,
                    image,
                    state,
                    vm_version=args.vm_version or VMRS_VM_VERSION,
                    saved_state_type=None if args.raw_blocks else "Normal",
                    alignment=args.alignment,
                    progress=bar.update,
                    **common,
                )
    if not args.quiet:
        print(
            f"wrote {' + '.join(outputs)}: {len(state.vps)} VP(s), {len(report.records)} GPA range(s),"
            f" {report.ram_bytes:,} bytes of RAM in {report.blocks} RamBlocks ({report.stored_bytes:,} bytes stored)",
            file=sys.stderr,
        )
    return 0
