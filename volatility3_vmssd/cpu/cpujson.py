"""The registers JSON that ``vmssd create`` reads and ``vmssd registers --json`` writes.

Schema ``vmssd-registers/1`` (documented in docs/create.md)::

    {"format": "vmssd-registers/1",
     "vendor": "intel" | "amd" | "hygon" | "arm",          # optional, default intel
     "guest_os_id": "0x8100000000000000",                  # optional HV_GUEST_OS_ID of VTL0
     "guest_os_ids": {"1": "0x..."},                       # optional, other VTLs' guest OS ids
     "vps": [{"vp_index": 0,
              "vtl_runnable": true,                        # optional VtlIsRunnable (a higher VTL can run)
              "vtls": {"0": {"rip": "0x...", "cr3": "0x...",
                             "cs": {"selector": "0x10", "base": "0x0", "limit": "0xffffffff",
                                    "attributes": "0xa09b"},
                             "gdtr": {"base": "0x...", "limit": "0x7f"}, ...},
                       "1": {...}}}]}

Numbers may be JSON integers or hex/decimal strings.  The real-guest capture format
``hvtest-registers/1`` (one VTL per VP) is accepted as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import FormatError
from .cpustate import PartitionState, VpState
from .registers import (
    REGISTERS_JSON_FORMAT,
    PrologVendor,
    RegisterDict,
    RegisterValue,
    SegmentRegister,
    TableRegister,
    registers_from_json,
)

FORMAT = "vmssd-registers/1"
VENDORS = {"amd": PrologVendor.AMD, "intel": PrologVendor.INTEL, "hygon": PrologVendor.HYGON, "arm": PrologVendor.ARM}


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise FormatError(None, None, f"registers JSON: {where} must be a number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise FormatError(None, None, f"registers JSON: {where} = {value!r} is not a number")


def _register(name: str, value: Any, where: str) -> RegisterValue:
    if isinstance(value, Mapping):
        if "selector" in value or "attributes" in value:
            return SegmentRegister(
                _int(value.get("base", 0), f"{where}.base"),
                _int(value.get("limit", 0), f"{where}.limit"),
                _int(value.get("selector", 0), f"{where}.selector"),
                _int(value.get("attributes", 0), f"{where}.attributes"),
            )
        return TableRegister(_int(value.get("limit", 0), f"{where}.limit"), _int(value.get("base", 0), f"{where}.base"))
    return _int(value, where)


def _guest_os_ids(obj: Mapping[str, Any]) -> dict[int, int]:
    """``guest_os_id`` (VTL0's) and ``guest_os_ids`` (per VTL) as one VTL -> id map; they must agree."""
    ids: dict[int, int] = {}
    per_vtl = obj.get("guest_os_ids", {})
    if not isinstance(per_vtl, Mapping):
        raise FormatError(None, None, "registers JSON: 'guest_os_ids' must be an object of VTL -> id")
    for vtl, value in per_vtl.items():
        ids[_int(vtl, "guest_os_ids key")] = _int(value, f"guest_os_ids.{vtl}")
    if obj.get("guest_os_id") is not None:
        vtl0 = _int(obj["guest_os_id"], "guest_os_id")
        if ids.setdefault(0, vtl0) != vtl0:
            raise FormatError(None, None, "registers JSON: guest_os_id and guest_os_ids.0 differ")
    return ids


def state_from_json(obj: Any, *, vendor: str | None = None) -> PartitionState:
    """Build the CPU state to write from either accepted JSON format."""
    if not isinstance(obj, Mapping):
        raise FormatError(None, None, "registers JSON: the document must be an object")
    fmt = obj.get("format")
    chosen_vendor = (vendor or str(obj.get("vendor", "intel"))).lower()
    if chosen_vendor not in VENDORS:
        raise FormatError(None, None, f"registers JSON: vendor {chosen_vendor!r} is not one of {sorted(VENDORS)}")
    state = PartitionState(processor_vendor=VENDORS[chosen_vendor], guest_os_ids=_guest_os_ids(obj))
    if fmt == REGISTERS_JSON_FORMAT:
        for i, regs in enumerate(registers_from_json(obj)):
            state.vps.append(VpState(index=i, registers={0: regs}))
    elif fmt == FORMAT:
        vps = obj.get("vps")
        if not isinstance(vps, list) or not vps:
            raise FormatError(None, None, "registers JSON: 'vps' must be a non-empty list")
        for pos, vp in enumerate(vps):
            where = f"vps[{pos}]"
            if not isinstance(vp, Mapping) or not isinstance(vp.get("vtls"), Mapping):
                raise FormatError(None, None, f"registers JSON: {where} needs a 'vtls' object")
            banks: dict[int, RegisterDict] = {}
            for vtl, regs in vp["vtls"].items():
                if not isinstance(regs, Mapping):
                    raise FormatError(None, None, f"registers JSON: {where}.vtls.{vtl} must be an object")
                banks[_int(vtl, f"{where}.vtls key")] = {
                    name.lower(): _register(name, value, f"{where}.vtls.{vtl}.{name}") for name, value in regs.items()
                }
            runnable = vp.get("vtl_runnable")
            state.vps.append(
                VpState(
                    index=_int(vp.get("vp_index", pos), f"{where}.vp_index"),
                    vtl_runnable=None if runnable is None else bool(runnable),
                    registers=banks,
                )
            )
    else:
        raise FormatError(
            None, None, f"registers JSON: format {fmt!r}, expected {FORMAT!r} or {REGISTERS_JSON_FORMAT!r}"
        )
    vtls = sorted({v for vp in state.vps for v in vp.registers})
    state.partition_vtls = vtls or [0]
    stray = sorted(set(state.guest_os_ids) - set(state.partition_vtls) - {0})
    if stray:
        raise FormatError(None, None, f"registers JSON: guest_os_ids for VTL {stray}, which no VP has")
    return state


def register_to_json(value: RegisterValue) -> Any:
    if isinstance(value, SegmentRegister):
        return {
            "selector": f"{value.selector:#06x}",
            "base": f"{value.base:#018x}",
            "limit": f"{value.limit:#010x}",
            "attributes": f"{value.attributes:#06x}",
        }
    if isinstance(value, TableRegister):
        return {"base": f"{value.base:#018x}", "limit": f"{value.limit:#06x}"}
    return hex(value)
