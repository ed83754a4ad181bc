"""Small saved states written with our writer, shared by the tests of this folder.

Not a conftest.py: tests/ has no packages, so a second ``conftest`` module would shadow the top-level
one that other test files import by name.  Test modules wrap :func:`build_states` in a
``states`` fixture.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.vmrs.writer import write_bin_vsv, write_vmrs

RAM = 3 << 20  # 3 MiB: a few RamBlocks, fast to write
HOLE = (0xA0000, 0x100000)
PML4 = 0x10000  # identity-ish page tables for the VA translation checks


def ram(seed: int = 7) -> bytearray:
    rng = random.Random(seed)
    out = bytearray(RAM)
    for page in range(0, RAM, 4096):
        kind = rng.randrange(3)
        if kind == 1:
            out[page : page + 4096] = page.to_bytes(8, "little") * 512
        elif kind == 2:
            out[page : page + 4096] = rng.randbytes(4096)
    # 4-level tables mapping VA 0xFFFF800000000000 + x -> x for the first 2 MiB (one 2 MiB page).
    pml4, pdpt, pd = PML4, PML4 + 0x1000, PML4 + 0x2000
    out[pml4 : pml4 + 0x3000] = bytes(0x3000)
    out[pml4 + 256 * 8 : pml4 + 256 * 8 + 8] = (pdpt | 0x3).to_bytes(8, "little")
    out[pdpt : pdpt + 8] = (pd | 0x3).to_bytes(8, "little")
    out[pd : pd + 8] = (0x0 | 0x83).to_bytes(8, "little")
    return out


def registers(rip_offset: int = 0) -> dict[str, Any]:
    code = {"selector": "0x10", "base": "0", "limit": "0xffffffff", "attributes": "0xa09b"}
    data = {"selector": "0x18", "base": "0", "limit": "0xffffffff", "attributes": "0xc093"}
    fs = {"selector": "0x2b", "base": "0x7ff7a0001000", "limit": "0xfffff", "attributes": "0xc0f3"}

    def vp(i: int) -> dict[str, Any]:
        return {
            "vp_index": i,
            "vtls": {
                "0": {
                    "rip": f"{0xFFFF800000001000 + i * 0x10 + rip_offset:#x}",
                    "rsp": f"{0xFFFF800000180000 - i * 0x1000:#x}",
                    "rax": "0x1122334455667788",
                    "rcx": str(i),
                    "rflags": "0x202",
                    "cr0": "0x80050033",
                    "cr3": f"{PML4:#x}",
                    "cr4": "0x6f8",
                    "efer": "0xd01",
                    "dr7": "0x400",
                    "xmm3": "0x0123456789abcdeffedcba9876543210",
                    "cs": code,
                    "ss": data,
                    "ds": data,
                    "es": data,
                    "fs": fs,
                    "gs": data,
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


def write_state(
    out: Path, memory: bytes, regs: dict[str, Any], *, holes: list[tuple[int, int]] | None = None, pair: bool = False
) -> list[Path]:
    raw = out.with_suffix(".raw")
    raw.write_bytes(memory)
    with MemoryImage.open(raw) as image:
        if pair:
            bin_path, vsv_path = out.with_suffix(".bin"), out.with_suffix(".vsv")
            write_bin_vsv(bin_path, vsv_path, image, state_from_json(regs), holes=[HOLE] if holes is None else holes)
            result = [bin_path, vsv_path]
        else:
            write_vmrs(out, image, state_from_json(regs), holes=[HOLE] if holes is None else holes)
            result = [out]
    raw.unlink()
    return result


def build_states(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """base.vmrs; same.vmrs (an identical twin); changed.vmrs (a register and a page differ);
    relaid.vmrs (another MMIO hole, so another chunk map); pair.bin + pair.vsv."""
    if _BUILT:
        return _BUILT
    d = tmp_path_factory.mktemp("dll-states")
    base = ram()
    changed = bytearray(base)
    changed[0x200000 + 100] ^= 0xFF
    out = {
        "base": write_state(d / "base.vmrs", bytes(base), registers()),
        "same": write_state(d / "same.vmrs", bytes(base), registers()),
        "changed": write_state(d / "changed.vmrs", bytes(changed), registers(rip_offset=8)),
        "relaid": write_state(d / "relaid.vmrs", bytes(base), registers(), holes=[(0xC0000, 0x100000)]),
        "pair": write_state(d / "pair", bytes(base), registers(), pair=True),
    }
    _BUILT.update(out)
    return out


_BUILT: dict[str, list[Path]] = {}  # one build per session even when several modules import the fixture
