"""Rebuild tests/data/sample.vmrs, the small saved state the README's first command reads.

Run: PYTHONPATH=. python tests/data/make_sample.py   (deterministic: same bytes every time)

8 MiB of synthetic guest RAM (zero, patterned, text and pseudo-random pages) with an MMIO-style hole
at 0xA0000-0xFFFFF, and two x64 VPs in long mode.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.vmrs.writer import write_vmrs

OUT = Path(__file__).with_name("sample.vmrs")
RAM = 8 << 20


def memory() -> bytes:
    rng = random.Random(20261127)
    out = bytearray(RAM)
    text = b"volatility3-vmssd sample saved state: Hyper-V memory read natively. " * 64
    for page in range(0, RAM, 4096):
        kind = rng.randrange(4)
        if kind == 1:
            out[page : page + 4096] = (page.to_bytes(8, "little")) * 512
        elif kind == 2:
            out[page : page + 4096] = text[:4096]
        elif kind == 3:
            out[page : page + 4096] = rng.randbytes(4096)
    return bytes(out)


def registers() -> dict:
    seg = {"selector": "0x10", "base": "0", "limit": "0xffffffff", "attributes": "0xa09b"}
    data = {"selector": "0x18", "base": "0", "limit": "0xffffffff", "attributes": "0xc093"}

    def vp(i: int) -> dict:
        return {
            "vp_index": i,
            "vtls": {
                "0": {
                    "rip": f"{0xFFFFF80000001000 + i * 0x10:#x}",
                    "rsp": f"{0xFFFFF80000200000 - i * 0x1000:#x}",
                    "rcx": str(i),
                    "rflags": "0x2",
                    "cr0": "0x80050033",
                    "cr3": "0x1000",
                    "cr4": "0x6f8",
                    "efer": "0xd01",
                    "cs": seg,
                    "ss": data,
                    "ds": data,
                    "es": data,
                    "gdtr": {"base": "0xfffff80000003000", "limit": "0x7f"},
                    "idtr": {"base": "0xfffff80000004000", "limit": "0xfff"},
                }
            },
        }

    return {
        "format": "vmssd-registers/1",
        "vendor": "intel",
        "guest_os_id": "0x0001040a00004f7c",
        "vps": [vp(0), vp(1)],
    }


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "ram.raw"
        raw.write_bytes(memory())
        if OUT.exists():
            OUT.unlink()
        with MemoryImage.open(raw) as image:
            write_vmrs(OUT, image, state_from_json(registers()), holes=[(0xA0000, 0x100000)])
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
