"""``vmssd registers``: every saved register of every VP and VTL, values in hex."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping

from ..errors import NotFoundError
from ..locate import open_saved_state
from ..savedstate.cpujson import state_to_json
from ..savedstate.registers import WIDE_REGISTER_NAMES, RegisterValue, SegmentRegister, TableRegister


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "registers",
        help="print the CPU registers of each VP and VTL",
        description=(
            "Print every saved register of each virtual processor, per VTL (the active one is marked):"
            " general, SSE/x87, control, debug, segment (selector, base, limit, attributes and their"
            " decoded bits) and table registers, and the virtual MSRs. --json writes the"
            " vmssd-registers/1 document that `vmssd create --registers` reads back."
        ),
        epilog=(
            "examples:\n"
            "  vmssd registers vm.vmrs\n"
            "  vmssd registers vm.vmrs --vp 1 --vtl 0\n"
            "  vmssd registers --json vm.bin --vsv vm.vsv > regs.json\n"
            "  vmssd registers --json vm.vmrs | jq -r '.vps[0].vtls[\"0\"].cr3'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", help="the saved state: .vmrs, .bin + .vsv or .vsv (+ .bin)")
    p.add_argument("--vsv", help="the .vsv of a legacy .bin, when it is not beside it with the same name")
    p.add_argument("--vp", type=int, metavar="N", help="only this VP (0-based; default: all)")
    p.add_argument("--vtl", type=int, metavar="N", help="only this VTL (default: every VTL saved)")
    p.add_argument("--json", action="store_true", help="vmssd-registers/1 JSON (filtered by --vp/--vtl)")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    with open_saved_state(args.file, vsv=args.vsv) as provider:
        state = provider.state
        if state is None:
            raise NotFoundError(f"{provider.paths[0]}: no CPU state in this saved state ({provider.kind})")
        if args.vp is not None and not 0 <= args.vp < len(state.vps):
            raise NotFoundError(f"VP {args.vp} does not exist (this saved state has {len(state.vps)} VPs)")
        positions = [args.vp] if args.vp is not None else list(range(len(state.vps)))
        selected: list[tuple[int, int]] = []  # (VP position, VTL)
        for i in positions:
            vtls = provider.get_virtual_trust_levels(i)
            selected += [(i, vtl) for vtl in vtls if args.vtl is None or vtl == args.vtl]
        if not selected:
            bank = "no register bank" + (f" for VTL {args.vtl}" if args.vtl is not None else "")
            where = f"VP {args.vp}" if args.vp is not None else "any VP"
            raise NotFoundError(f"{provider.paths[0]}: {bank} saved for {where}")
        if args.json:
            doc = state_to_json(state)
            doc["vps"] = [
                {**doc["vps"][i], "vtls": {str(v): doc["vps"][i]["vtls"][str(v)] for w, v in selected if w == i}}
                for i in positions
                if any(w == i for w, _ in selected)
            ]
            json.dump(doc, sys.stdout, indent=1)
            print()
            return 0
        out = sys.stdout
        for n, (i, vtl) in enumerate(selected):
            vp = state.vps[i]
            active = provider.get_active_virtual_trust_level(i)
            mark = " (active)" if vtl == active else ""
            if n:
                out.write("\n")
            out.write(f"VP {i}  VTL {vtl}{mark}\n")
            out.write("\n".join(format_bank(vp.registers[vtl])) + "\n")
    return 0
