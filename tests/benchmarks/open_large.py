"""Benchmark: open a .vmrs describing 16 GiB of RAM and summarise it; count blocks decoded.

Run: python tests/benchmarks/open_large.py [--gib 16]
Prints the build time, the open + describe() time (best of 5) and how many RamBlocks were decoded
(must be 0: opening indexes, it never decodes).  Not part of the test run: timings are not asserted.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.savedstate.cpujson import state_from_json
from volatility3_vmssd.savedstate.partition_state import build_partition_state
from volatility3_vmssd.savedstate.ramblock import encode_block
from volatility3_vmssd.savedstate.rammap import BLOCK_SIZE, build_layout
from volatility3_vmssd.storage import HyperVStorageWriter


def build(path: Path, gib: int) -> None:
    """A mostly-fill image: every RamBlock is one multi-fill record, stored inline (< 2 KiB)."""
    ram = gib << 30
    hole = (0xC0000000, 0x1_0000_0000)  # the usual 32-bit MMIO gap: RAM continues above 4 GiB
    ranges = [(0, hole[0]), (hole[1], ram - hole[0])]
    records = build_layout(ranges)
    zero = encode_block(bytes(BLOCK_SIZE))
    state = state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"efer": "0xd01"}}}]})
    with HyperVStorageWriter(path) as w:
        w.set("/configuration/properties/version", 0x900)
        w.set("/savedstate/VmVersion", 0x900)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(records):
            w.set(f"/savedstate/RamMemoryBlock{i}", rec.build())
        blocks = sum(-(-r.page_count_total // 256) for r in records)
        first = 0
        for rec in records:
            first = rec.mbp_index_start // 256
            for n in range(first, first + -(-rec.page_count_total // 256)):
                w.set(f"/savedstate/RamBlock{n}", zero)
    print(f"built {path.name}: {gib} GiB described, {blocks} RamBlocks, {path.stat().st_size:,} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gib", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "large.vmrs"
        t0 = time.perf_counter()
        build(path, args.gib)
        built = time.perf_counter() - t0
        times = []
        decoded = []
        for _ in range(5):
            t0 = time.perf_counter()
            with SavedStateProvider.load_vmrs(path) as p:
                info = p.describe()
                decoded.append(p.memory.blocks_decoded)
            times.append(time.perf_counter() - t0)
        result = {
            "described_gib": args.gib,
            "build_s": round(built, 3),
            "open_describe_best_s": round(min(times), 4),
            "open_describe_worst_s": round(max(times), 4),
            "blocks_decoded": max(decoded),
            "ram_bytes": info["ram_bytes"],
            "target": "< 0.5 s, 0 blocks decoded",
            "met": min(times) < 0.5 and max(decoded) == 0,
        }
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
