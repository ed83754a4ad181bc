"""``vmssd info``: what a saved state holds, without reading its RAM."""

from __future__ import annotations

import argparse
import json
import sys

from ..locate import open_saved_state


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "info",
        help="summarise a saved state (.vmrs, .bin + .vsv, .bin alone)",
        description=(
            "Summarise a Hyper-V saved state: file kind, versions, VPs, vendor, architecture, paging mode,"
            " guest OS, RAM size and layout, decoder and cache, and every finding (bad CRCs, pending journal,"
            " unknown chunks, truncation). Reads no RAM. A .bin's .vsv (or a .vsv's .bin) is found beside it."
        ),
        epilog="examples:\n  vmssd info vm.vmrs\n  vmssd info --json vm.bin --vsv other-name.vsv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file")
    p.add_argument("--vsv", help="the .vsv of a legacy .bin, when it is not beside it with the same name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


LABELS = [
    ("file_kind", "File kind"),
    ("files", "Files"),
    ("container_version", "Container version"),
    ("vm_version", "VM version"),
    ("saved_state_type", "Saved-state type"),
    ("vp_count", "Virtual processors"),
    ("processor_vendor", "Processor vendor"),
    ("architecture", "Architecture (VP 0)"),
    ("paging_mode", "Paging mode (VP 0)"),
    ("guest_os", "Guest OS"),
    ("ram_bytes", "Guest RAM"),
    ("chunk_count", "GPA chunks"),
    ("ramblock_count", "RamBlocks"),
    ("raw_saved_memory_bytes", "Raw saved memory"),
    ("decoder", "XPRESS decoder"),
    ("cache_limit_blocks", "Block cache limit"),
    ("journal", "Replay log"),
]


def _text(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key in ("ram_bytes", "raw_saved_memory_bytes") and isinstance(value, int):
        return f"{value:,} bytes ({value / (1 << 20):,.1f} MiB)"
    if key == "cache_limit_blocks":
        return f"{value} blocks of 1 MiB"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def run(args: argparse.Namespace) -> int:
    with open_saved_state(args.file, vsv=args.vsv) as provider:
        info = provider.describe()
        if args.json:
            json.dump(info, sys.stdout, indent=1)
            print()
            return 0
        for key, label in LABELS:
            print(f"{label:<22} {_text(key, info.get(key))}")
        findings = info["findings"]
        print(f"{'Findings':<22} {len(findings) or 'none'}")
        for f in findings:
            print(f"  {f}")
    return 0
