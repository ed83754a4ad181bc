"""Rebuild tests/data/sample.vmrs, the small container the README's first command reads.

Run: python tests/data/make_sample.py  (deterministic: same bytes every time)
"""

from __future__ import annotations

from pathlib import Path

from volatility3_vmssd.storage import write_storage

OUT = Path(__file__).with_name("sample.vmrs")

TREE = {
    "configuration": {
        "properties": {"version": 0x0900, "name": "vmssd sample VM"},
        "settings": {"memory": {"bank": {"size": 256}}, "processors": {"count": 2}},
    },
    "savedstate": {"VmVersion": 0x0900, "type": "Normal", "note": bytes(range(256)) * 16},
}

if __name__ == "__main__":
    if OUT.exists():
        OUT.unlink()
    write_storage(OUT, TREE)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
