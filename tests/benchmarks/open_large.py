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
from volatility3_vmssd.savedstate.writer import write_fill_vmrs


def build(path: Path, gib: int) -> None:
    """A mostly-fill image: every RamBlock is one multi-fill record, stored inline (< 2 KiB)."""
    state = state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"efer": "0xd01"}}}]})
    report = write_fill_vmrs(path, gib << 30, state)
    print(f"built {path.name}: {gib} GiB described, {report.blocks} RamBlocks, {path.stat().st_size:,} bytes")


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
                info = p.summary()
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
