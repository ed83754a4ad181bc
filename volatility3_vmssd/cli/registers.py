"""``vmssd registers``: every saved register of every VP and VTL, values in hex."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Mapping
from typing import Any

from ..cpu.chunks import MAX_VTL
from ..cpu.cpujson import FORMAT, VENDORS, register_to_json
from ..cpu.registers import WIDE_REGISTER_NAMES, RegisterValue, SegmentRegister, TableRegister
from ..errors import NotFoundError, VmssdError
from ..interface import SavedState
from .commands import add_command, add_json, add_saved_state
from .opening import open_state


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "registers",
        run,
        help="print the CPU registers of each VP and VTL",
        description=(
            "Print every saved register of each virtual processor, per VTL (the one used for analysis is"
            " marked: VTL0 when saved, else the lowest): general, SSE/x87, control, debug, segment"
            " (selector, base, limit, attributes and their decoded bits) and table registers, and the"
            " virtual MSRs. --json writes the vmssd-registers/1 document that `vmssd create --registers`"
            " reads back."
        ),
        examples=[
            "vmssd registers vm.vmrs",
            "vmssd registers vm.vmrs --vp 1 --vtl 0",
            "vmssd registers --json vm.bin --vsv vm.vsv > regs.json",
            "vmssd registers --json vm.vmrs | jq -r '.vps[0].vtls[\"0\"].cr3'",
        ],
    )
    add_saved_state(p)
    p.add_argument("--vp", type=int, metavar="N", help="only this VP (0-based; default: all)")
    p.add_argument("--vtl", type=int, metavar="N", help="only this VTL (default: every VTL saved)")
    add_json(p, "vmssd-registers/1 JSON (filtered by --vp/--vtl)")


SEGMENT_BITS = (("s", "S"), ("present", "P"), ("avl", "AVL"), ("long", "L"), ("default", "D/B"), ("granularity", "G"))


def format_value(name: str, value: RegisterValue) -> str:
    """Hex text of one register: 64-bit (or 128-bit) ints zero-padded, structures field by field."""
    if isinstance(value, SegmentRegister):
        bits = ", ".join(label for attr, label in SEGMENT_BITS if getattr(value, attr))
        decoded = f"type {value.type:#x}, DPL {value.dpl}" + (f", {bits}" if bits else "")
        return (
            f"selector {value.selector:#06x}  base {value.base:#018x}  limit {value.limit:#010x}"
            f"  attributes {value.attributes:#06x} ({decoded})"
        )
    if isinstance(value, TableRegister):
        return f"base {value.base:#018x}  limit {value.limit:#06x}"
    width = 34 if name in WIDE_REGISTER_NAMES or value >> 64 else 18
    return f"{value:#0{width}x}"


def format_bank(regs: Mapping[str, RegisterValue]) -> list[str]:
    return [f"  {name:<17} {format_value(name, value)}" for name, value in regs.items()]


def registers_document(provider: SavedState, selected: list[tuple[int, int]]) -> dict[str, Any]:
    """The vmssd-registers/1 document (what ``vmssd create --registers`` reads) of the selected banks."""
    doc: dict[str, Any] = {"format": FORMAT}
    with contextlib.suppress(VmssdError):  # the DLL cannot tell the vendor; create then assumes intel
        vendor = provider.get_processor_vendor().name.lower()
        if vendor in VENDORS:
            doc["vendor"] = vendor
    os_ids = {}
    for vtl in range(MAX_VTL + 1):
        with contextlib.suppress(VmssdError):
            os_info = provider.get_guest_os_info(vtl)
            if os_info is not None:
                os_ids[vtl] = hex(os_info.value)
    if 0 in os_ids:
        doc["guest_os_id"] = os_ids.pop(0)
    if os_ids:
        doc["guest_os_ids"] = {str(vtl): value for vtl, value in os_ids.items()}
    runnable: dict[int, bool | None] = {}
    for vp in {w for w, _ in selected}:
        with contextlib.suppress(VmssdError):  # the DLL cannot tell
            runnable[vp] = provider.is_higher_vtl_runnable(vp)
    doc["vps"] = [
        {
            "vp_index": vp,
            **({"vtl_runnable": runnable[vp]} if vp in runnable else {}),
            "vtls": {
                str(vtl): {name: register_to_json(v) for name, v in provider.get_registers(vp, vtl).items()}
                for w, vtl in selected
                if w == vp
            },
        }
        for vp in sorted({w for w, _ in selected})
    ]
    return doc


def run(args: argparse.Namespace) -> int:
    with open_state(args, warn=False) as provider:  # no CPU state is the error itself
        if not provider.has_cpu_state():
            raise NotFoundError(f"{provider.paths[0]}: no CPU state in this saved state ({provider.kind})")
        count = provider.vp_count()
        if args.vp is not None and not 0 <= args.vp < count:
            raise NotFoundError(f"VP {args.vp} does not exist (this saved state has {count} VPs)")
        positions = [args.vp] if args.vp is not None else list(range(count))
        selected: list[tuple[int, int]] = []  # (VP position, VTL)
        for i in positions:
            vtls = provider.get_virtual_trust_levels(i)
            selected += [(i, vtl) for vtl in vtls if args.vtl is None or vtl == args.vtl]
        if not selected:
            bank = "no register bank" + (f" for VTL {args.vtl}" if args.vtl is not None else "")
            where = f"VP {args.vp}" if args.vp is not None else "any VP"
            raise NotFoundError(f"{provider.paths[0]}: {bank} saved for {where}")
        if args.json:
            json.dump(registers_document(provider, selected), sys.stdout, indent=1)
            print()
            return 0
        out = sys.stdout
        for n, (i, vtl) in enumerate(selected):
            used = provider.get_active_virtual_trust_level(i)
            mark = " (used)" if vtl == used else ""
            if n:
                out.write("\n")
            out.write(f"VP {i}  VTL {vtl}{mark}\n")
            out.write("\n".join(format_bank(provider.get_registers(i, vtl))) + "\n")
    return 0
