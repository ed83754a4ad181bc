"""``vmssd memmap``: which guest-physical ranges are saved, where in raw saved memory, in which RamBlocks."""

from __future__ import annotations

import argparse
import json
import sys

from ..memory.rammap import flag_names
from .commands import add_command, add_json, add_saved_state
from .opening import open_state
from .progress import human_size


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "memmap",
        run,
        help="list the saved GPA ranges, their raw saved-memory offsets and RamBlocks",
        description=(
            "List the guest-physical ranges a saved state backs (one per RamMemoryBlock record, in GPA"
            " order), the holes between them, each range's offset in raw saved memory (the RamBlocks"
            " concatenated, as `vmssd read --raw-offset` reads it), the RamBlock numbers it uses and its"
            " flags (IsHotAdded, IsSgx, IsVtl2Mb, IsSpecificPurpose). Ends are inclusive. Reads no RAM."
        ),
        examples=["vmssd memmap vm.vmrs", "vmssd memmap --json vm.bin --vsv vm.vsv | jq '.[].gpa_start'"],
    )
    add_saved_state(p)
    add_json(p, "a JSON list: gpa_start, size, raw_offset, first_ramblock, last_ramblock, flags per range")


def _blocks(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _count_blocks(spans: list[tuple[int, int]]) -> int:
    """Distinct RamBlocks over inclusive spans, without listing them (a corrupt map may claim petabytes)."""
    count, reached = 0, -1
    for first, last in sorted(spans):
        first = max(first, reached + 1)
        if last >= first:
            count += last - first + 1
            reached = last
    return count


def run(args: argparse.Namespace) -> int:
    with open_state(args, needs_memory=True) as provider:
        ranges = provider.memory_map()
    if args.json:
        json.dump([r.as_dict() for r in ranges], sys.stdout, indent=1)
        print()
        return 0
    out = sys.stdout
    out.write(f"{'GPA start':<18}  {'GPA end':<18}  {'size':>10}  {'raw offset':<18}  {'RamBlocks':<12}  flags\n")
    pos = 0
    for r in ranges:
        start, size = r.gpa_start, r.size
        if start > pos:
            out.write(f"{pos:#018x}  {start - 1:#018x}  {human_size(start - pos):>10}  {'-':<18}  (hole)\n")
        known = r.flags  # None: the backend does not expose them (the DLL)
        flags = "?" if known is None else " ".join(flag_names(known))
        line = (
            f"{start:#018x}  {start + size - 1:#018x}  {human_size(size):>10}  {r.raw_offset:#018x}"
            f"  {_blocks(r.first_ramblock, r.last_ramblock):<12}  {flags}"
        )
        out.write(line.rstrip() + "\n")
        pos = max(pos, start + size)
    total = sum(r.size for r in ranges)
    blocks = _count_blocks([(r.first_ramblock, r.last_ramblock) for r in ranges])
    out.write(f"{len(ranges)} range(s), {total:,} bytes ({human_size(total)}) of RAM in {blocks} RamBlock(s)\n")
    return 0
