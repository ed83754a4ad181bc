"""How long ``vmssd triage``'s discovery takes on one folder of many saved states (each folder listed once).

Run from the repository root:

    python tests/benchmarks/triage_discovery.py              # 10,000 sparse .vmrs of 1 GiB in one folder
    python tests/benchmarks/triage_discovery.py --files 50000

The files are sparse (no data written; the first bytes are zero, so each is sniffed and called
not-hyperv, as junk named .vmrs would be), with one ``.vmcx`` among them so that the search for
configurations has work to do.  Not part of the test suite (tests/test_triage_discovery_hostile.py
asserts the listing count): it prints the time, the number of folder listings and files found.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from volatility3_vmssd.triage.discovery import discover  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--gib", type=int, default=1, help="apparent (sparse) size of each file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmssd-bench-") as tmp:
        vms = Path(tmp) / "Hyper-V" / "Virtual Machines"
        vms.mkdir(parents=True)
        for i in range(args.files):
            with open(vms / f"{i:08X}-0000-4000-8000-000000000000.vmrs", "wb") as fh:
                fh.truncate(args.gib << 30)
        (vms / "00000007-0000-4000-8000-000000000000.vmcx").write_bytes(b"\0" * 64)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        found = discover([tmp])
        seconds = time.perf_counter() - start
    print(f"{args.files} sparse .vmrs of {args.gib} GiB in one folder (load average {load:.1f} before)")
    print(f"discovery: {seconds:.2f} s, {found.listings} folder listing(s), {len(found.files)} file(s) found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
