"""CPU register model shared by the partition_state parser, the page-table walker and a DLL binding.

Register values live in plain dicts keyed by lower-case names.  The x64 names are the SDK
``REGISTER_ID`` names lower-cased (docs/format.md#dll-api), so a native parse and a DLL query give the same keys.
128-bit registers (xmm*, fpmmx*, fpcontrolstatus, xmmcontrolstatus, q*) are Python ints.

Nothing here imports Volatility.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, TypeAlias

from ..errors import FormatError

# ---------------------------------------------------------------------------------------------
# Enums (SDK numbering, docs/format.md#dll-api)
# ---------------------------------------------------------------------------------------------


class Architecture(enum.IntEnum):
    """``VIRTUAL_PROCESSOR_ARCH`` as GetArchitecture reports it."""

    UNKNOWN = 0
    X86 = 1
    X64 = 2
    ARMV8 = 3


class PagingMode(enum.IntEnum):
    """``PAGING_MODE`` as GetPagingMode reports it.

    The SDK has no value for 5-level (LA57) paging; it is reported as ``LONG`` and the level count
    comes from ``cpumode.paging_levels``.
    """

    INVALID = 0
    NON_PAGED = 1
    BIT32 = 2  # Paging_32Bit
    PAE = 3
    LONG = 4
    ARMV8 = 5


class ProcessorVendor(enum.IntEnum):
    """``VIRTUAL_PROCESSOR_VENDOR`` (SDK numbering; differs from the on-disk prolog values)."""

    UNKNOWN = 0
    AMD = 1
    INTEL = 2
    HYGON = 3
    ARM = 4


class PrologVendor(enum.IntEnum):
    """Processor vendor as stored at Prolog data +8 (docs/format.md#chunk-ids; PR #1969 calls it "arch")."""

    AMD = 0
    INTEL = 1
    HYGON = 2
    ARM = 0x10


PROLOG_TO_SDK_VENDOR: dict[int, ProcessorVendor] = {
    PrologVendor.AMD: ProcessorVendor.AMD,
    PrologVendor.INTEL: ProcessorVendor.INTEL,
    PrologVendor.HYGON: ProcessorVendor.HYGON,
    PrologVendor.ARM: ProcessorVendor.ARM,
}
SDK_TO_PROLOG_VENDOR: dict[ProcessorVendor, PrologVendor] = {
    v: PrologVendor(k) for k, v in PROLOG_TO_SDK_VENDOR.items()
}


def sdk_vendor(prolog_vendor: int | None) -> ProcessorVendor:
    """Map the on-disk prolog vendor to the SDK enum; anything unrecognised is ``UNKNOWN``."""
    if prolog_vendor is None:
        return ProcessorVendor.UNKNOWN
    return PROLOG_TO_SDK_VENDOR.get(prolog_vendor, ProcessorVendor.UNKNOWN)


# ---------------------------------------------------------------------------------------------
# Structured register values
# ---------------------------------------------------------------------------------------------

# Segment attribute bits (VIRTUAL_PROCESSOR_REGISTER.Segment, SDK): type:4 S:1 DPL:2 P:1 rsvd:4
# AVL:1 L:1 D:1 G:1 -- the VMX access-rights layout with the reserved nibble squeezed out.
SEG_ATTR_TYPE_MASK = 0x000F
SEG_ATTR_S = 1 << 4
SEG_ATTR_DPL_SHIFT = 5
SEG_ATTR_DPL_MASK = 0x3 << SEG_ATTR_DPL_SHIFT
SEG_ATTR_PRESENT = 1 << 7
SEG_ATTR_AVL = 1 << 12
SEG_ATTR_LONG = 1 << 13
SEG_ATTR_DEFAULT = 1 << 14
SEG_ATTR_GRANULARITY = 1 << 15


@dataclasses.dataclass(frozen=True)
class SegmentRegister:
    """A segment register as the saved state and the SDK store it (u64 base, u32 limit, u16, u16)."""

    base: int
    limit: int
    selector: int
    attributes: int

    @property
    def type(self) -> int:
        return self.attributes & SEG_ATTR_TYPE_MASK

    @property
    def s(self) -> bool:
        """Descriptor type: True for code/data, False for system segments (TSS, LDT, gates)."""
        return bool(self.attributes & SEG_ATTR_S)

    @property
    def dpl(self) -> int:
        return (self.attributes & SEG_ATTR_DPL_MASK) >> SEG_ATTR_DPL_SHIFT

    @property
    def present(self) -> bool:
        return bool(self.attributes & SEG_ATTR_PRESENT)

    @property
    def avl(self) -> bool:
        return bool(self.attributes & SEG_ATTR_AVL)

    @property
    def long(self) -> bool:
        """CS.L: 64-bit code segment."""
        return bool(self.attributes & SEG_ATTR_LONG)

    @property
    def default(self) -> bool:
        """D/B: 32-bit default operand size."""
        return bool(self.attributes & SEG_ATTR_DEFAULT)

    @property
    def granularity(self) -> bool:
        return bool(self.attributes & SEG_ATTR_GRANULARITY)


@dataclasses.dataclass(frozen=True)
class TableRegister:
    """IDTR/GDTR: u16 limit, u64 base."""

    limit: int
    base: int


RegisterValue: TypeAlias = int | SegmentRegister | TableRegister
RegisterDict: TypeAlias = dict[str, RegisterValue]


@dataclasses.dataclass(frozen=True)
class FpControlStatus:
    """The 128-bit ``fpcontrolstatus`` value: FXSAVE bytes 0..15 (SDK union, openvmm agrees)."""

    fcw: int = 0
    fsw: int = 0
    ftw: int = 0  # abridged (FXSAVE) tag byte
    last_op: int = 0
    last_ip: int = 0  # LastFpRip, or (u32 Eip, u16 Cs) in 32-bit mode

    def to_int(self) -> int:
        return (
            (self.fcw & 0xFFFF)
            | (self.fsw & 0xFFFF) << 16
            | (self.ftw & 0xFF) << 32
            | (self.last_op & 0xFFFF) << 48
            | (self.last_ip & 0xFFFF_FFFF_FFFF_FFFF) << 64
        )

    @classmethod
    def from_int(cls, value: int) -> FpControlStatus:
        return cls(
            fcw=value & 0xFFFF,
            fsw=(value >> 16) & 0xFFFF,
            ftw=(value >> 32) & 0xFF,
            last_op=(value >> 48) & 0xFFFF,
            last_ip=(value >> 64) & 0xFFFF_FFFF_FFFF_FFFF,
        )


@dataclasses.dataclass(frozen=True)
class XmmControlStatus:
    """The 128-bit ``xmmcontrolstatus`` value: FXSAVE bytes 16..31 (LastFpRdp, MXCSR, MXCSR_MASK).

    Pascal Beyer's parser puts MXCSR in the upper half of qword 51, which is the MXCSR_MASK slot here;
    we follow the SDK union and openvmm (which copies FXSAVE bytes 16..31) [2 vs 1].
    """

    last_dp: int = 0
    mxcsr: int = 0
    mxcsr_mask: int = 0

    def to_int(self) -> int:
        return (
            (self.last_dp & 0xFFFF_FFFF_FFFF_FFFF)
            | (self.mxcsr & 0xFFFF_FFFF) << 64
            | (self.mxcsr_mask & 0xFFFF_FFFF) << 96
        )

    @classmethod
    def from_int(cls, value: int) -> XmmControlStatus:
        return cls(
            last_dp=value & 0xFFFF_FFFF_FFFF_FFFF,
            mxcsr=(value >> 64) & 0xFFFF_FFFF,
            mxcsr_mask=(value >> 96) & 0xFFFF_FFFF,
        )


# ---------------------------------------------------------------------------------------------
# Canonical register names
# ---------------------------------------------------------------------------------------------

X64_GP_REGISTER_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    *(f"r{i}" for i in range(8, 16)),
    "rip", "rflags",
)  # fmt: skip
X64_XMM_NAMES: tuple[str, ...] = tuple(f"xmm{i}" for i in range(16))
X64_FPMMX_NAMES: tuple[str, ...] = tuple(f"fpmmx{i}" for i in range(8))  # x87 ST0-7 / MMX0-7 slots
X64_FP_REGISTER_NAMES: tuple[str, ...] = (
    *X64_XMM_NAMES,
    *X64_FPMMX_NAMES,
    "fpcontrolstatus",
    "xmmcontrolstatus",
)
X64_CONTROL_REGISTER_NAMES: tuple[str, ...] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
X64_DEBUG_REGISTER_NAMES: tuple[str, ...] = ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7")
X64_SEGMENT_REGISTER_NAMES: tuple[str, ...] = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
X64_TABLE_REGISTER_NAMES: tuple[str, ...] = ("idtr", "gdtr")
# Virtual-MSR chunk 0x3000B000: every slot rests on one source (docs/format.md#virtual-msrs); "tsc" is
# uncertain even there.
# Names are the lower-cased HvX64Register* names.  Slot positions live next to the struct in
# register_chunks.py.
X64_VIRTUAL_MSR_NAMES: tuple[str, ...] = (
    "tsc",  # uncertain even in its one source
    "kernelgsbase",
    "apicbase",
    "star",
    "lstar",
    "cstar",
    "sfmask",
)
X64_REGISTER_NAMES: tuple[str, ...] = (
    *X64_GP_REGISTER_NAMES,
    *X64_FP_REGISTER_NAMES,
    *X64_CONTROL_REGISTER_NAMES,
    *X64_DEBUG_REGISTER_NAMES,
    *X64_SEGMENT_REGISTER_NAMES,
    *X64_TABLE_REGISTER_NAMES,
    "cpl",
    "xcr0",
    *X64_VIRTUAL_MSR_NAMES,
)

# ARM64 chunk layouts (docs/format.md#register-chunks: openvmm only).  openvmm abbreviates some system registers
# (ACTLR, TCR, ...); we use the full architectural names, which match the SDK REGISTER_ID names.
ARM64_GP_REGISTER_NAMES: tuple[str, ...] = (
    *(f"x{i}" for i in range(29)),
    "fp", "lr", "elr_el2", "spsr_el2", "esr_el1", "spsr_el1", "far_el1", "par_el1", "elr_el1",
    "sp_el0", "sp_el1", "afsr0_el1", "afsr1_el1",
)  # fmt: skip
ARM64_CONTROL_REGISTER_NAMES: tuple[str, ...] = (
    "vmpidr_el2", "vpidr_el2", "sctlr_el1", "actlr_el1", "tcr_el1", "mair_el1", "tpidr_el1", "amair_el1",
    "tpidrro_el0", "tpidr_el0", "contextidr_el1", "cpacr_el1", "csselr_el1", "cntkctl_el1",
    "cntv_cval_el0", "cntv_ctl_el0",
)  # fmt: skip
ARM64_TABLE_REGISTER_NAMES: tuple[str, ...] = ("ttbr0_el1", "ttbr1_el1", "vbar_el1")
ARM64_Q_NAMES: tuple[str, ...] = tuple(f"q{i}" for i in range(32))
ARM64_FP_REGISTER_NAMES: tuple[str, ...] = (*ARM64_Q_NAMES, "fpsr", "fpcr")
ARM64_REGISTER_NAMES: tuple[str, ...] = (
    *ARM64_GP_REGISTER_NAMES,
    *ARM64_FP_REGISTER_NAMES,
    *ARM64_CONTROL_REGISTER_NAMES,
    *ARM64_TABLE_REGISTER_NAMES,
)

WIDE_REGISTER_NAMES: frozenset[str] = frozenset(
    (*X64_XMM_NAMES, *X64_FPMMX_NAMES, "fpcontrolstatus", "xmmcontrolstatus", *ARM64_Q_NAMES)
)
"""Registers that hold 128-bit values."""

# ---------------------------------------------------------------------------------------------
# SDK REGISTER_ID ("new", single enum; docs/format.md#dll-api)
# ---------------------------------------------------------------------------------------------

X64_REGISTER_MAX = 66
ARM64_REGISTER_MAX = 158
# SDK order of the ARM64 system registers (ids 136-157), which differs from the chunk layouts.
_ARM64_SYSTEM_REGISTER_ID_ORDER: tuple[str, ...] = (
    "esr_el1", "spsr_el1", "far_el1", "par_el1", "elr_el1", "ttbr0_el1", "ttbr1_el1",
    "vbar_el1", "sctlr_el1", "actlr_el1", "tcr_el1", "mair_el1", "amair_el1", "tpidr_el0",
    "tpidrro_el0", "tpidr_el1", "contextidr_el1", "cpacr_el1", "csselr_el1", "cntkctl_el1",
    "cntv_cval_el0", "cntv_ctl_el0",
)  # fmt: skip

REGISTER_IDS: dict[str, int] = {
    **{name: i for i, name in enumerate(X64_GP_REGISTER_NAMES)},  # 0-17
    **{name: 18 + i for i, name in enumerate(X64_XMM_NAMES)},  # 18-33
    **{name: 34 + i for i, name in enumerate(X64_FPMMX_NAMES)},  # 34-41
    "fpcontrolstatus": 42,
    "xmmcontrolstatus": 43,
    **{name: 44 + i for i, name in enumerate(X64_CONTROL_REGISTER_NAMES)},  # 44-49
    **{name: 50 + i for i, name in enumerate(X64_DEBUG_REGISTER_NAMES)},  # 50-55
    **{name: 56 + i for i, name in enumerate(X64_SEGMENT_REGISTER_NAMES)},  # 56-63
    "idtr": 64,
    "gdtr": 65,
    **{f"x{i}": 67 + i for i in range(29)},  # 67-95
    "fp": 96,
    "lr": 97,
    # "pc" and "cpsr" have SDK ids but no slot in the chunk layouts (docs/format.md#arm64): the native
    # parser does not produce these two keys and nothing is invented for them.
    "pc": 98,
    "sp_el0": 99,
    "sp_el1": 100,
    "cpsr": 101,
    **{name: 102 + i for i, name in enumerate(ARM64_Q_NAMES)},  # 102-133
    "fpsr": 134,  # FpStatus
    "fpcr": 135,  # FpControl
    **{name: 136 + i for i, name in enumerate(_ARM64_SYSTEM_REGISTER_ID_ORDER)},  # 136-157
}
REGISTER_NAMES_BY_ID: dict[int, str] = {v: k for k, v in REGISTER_IDS.items()}

# ---------------------------------------------------------------------------------------------
# Loader for the hvtest-registers JSON (shared/data/linux-guest/registers.json)
# ---------------------------------------------------------------------------------------------

REGISTERS_JSON_FORMAT = "hvtest-registers/1"


def _json_int(value: Any, where: str) -> int:
    """Hex strings (or plain ints) from the JSON; anything else is a FormatError naming the field."""
    if isinstance(value, bool):
        raise FormatError(None, None, f"registers JSON: {where} is a boolean, expected a number")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        try:
            result = int(value, 16)
        except ValueError:
            raise FormatError(None, None, f"registers JSON: {where} = {value!r} is not hex") from None
    else:
        raise FormatError(None, None, f"registers JSON: {where} has type {type(value).__name__}")
    if result < 0:
        raise FormatError(None, None, f"registers JSON: {where} is negative")
    return result


def _json_map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise FormatError(None, None, f"registers JSON: {where} is not an object")
    return value


def _json_list(value: Any, where: str, length: int) -> list[Any]:
    if not isinstance(value, list) or len(value) != length:
        raise FormatError(None, None, f"registers JSON: {where} is not a list of {length}")
    return value


def _vp_from_json(vp: Mapping[str, Any], where: str) -> RegisterDict:
    regs: RegisterDict = {}
    gpr = _json_map(vp.get("gpr", {}), f"{where}.gpr")
    for name in X64_GP_REGISTER_NAMES[:16]:
        if name in gpr:
            regs[name] = _json_int(gpr[name], f"{where}.gpr.{name}")
    for name in ("rip", "rflags", "cpl", "efer"):
        if name in vp:
            regs[name] = _json_int(vp[name], f"{where}.{name}")
    for group in ("control", "debug"):
        section = _json_map(vp.get(group, {}), f"{where}.{group}")
        for name, value in section.items():
            if name in X64_CONTROL_REGISTER_NAMES or name in X64_DEBUG_REGISTER_NAMES:
                regs[name] = _json_int(value, f"{where}.{group}.{name}")
    segments = _json_map(vp.get("segments", {}), f"{where}.segments")
    for name in X64_SEGMENT_REGISTER_NAMES:
        if name in segments:
            seg = _json_map(segments[name], f"{where}.segments.{name}")
            regs[name] = SegmentRegister(
                base=_json_int(seg.get("base", 0), f"{where}.segments.{name}.base"),
                limit=_json_int(seg.get("limit", 0), f"{where}.segments.{name}.limit"),
                selector=_json_int(seg.get("selector", 0), f"{where}.segments.{name}.selector"),
                attributes=_json_int(seg.get("attributes", 0), f"{where}.segments.{name}.attributes"),
            )
    for name in X64_TABLE_REGISTER_NAMES:
        if name in vp:
            table = _json_map(vp[name], f"{where}.{name}")
            regs[name] = TableRegister(
                limit=_json_int(table.get("limit", 0), f"{where}.{name}.limit"),
                base=_json_int(table.get("base", 0), f"{where}.{name}.base"),
            )
    if "fpu" in vp:
        fpu = _json_map(vp["fpu"], f"{where}.fpu")
        if "xmm" in fpu:
            # "high qword first": the hex string is the natural 128-bit number.
            for i, value in enumerate(_json_list(fpu["xmm"], f"{where}.fpu.xmm", 16)):
                regs[f"xmm{i}"] = _json_int(value, f"{where}.fpu.xmm[{i}]")
        if "st" in fpu:
            # FXSAVE ST slot: 64-bit mantissa, then the 16-bit sign+exponent.
            for i, st in enumerate(_json_list(fpu["st"], f"{where}.fpu.st", 8)):
                st = _json_map(st, f"{where}.fpu.st[{i}]")
                mantissa = _json_int(st.get("mantissa", 0), f"{where}.fpu.st[{i}].mantissa")
                exponent = _json_int(st.get("exponent", 0), f"{where}.fpu.st[{i}].exponent")
                regs[f"fpmmx{i}"] = (exponent & 0xFFFF) << 64 | (mantissa & 0xFFFF_FFFF_FFFF_FFFF)
        regs["fpcontrolstatus"] = FpControlStatus(
            fcw=_json_int(fpu.get("fcw", 0), f"{where}.fpu.fcw"),
            fsw=_json_int(fpu.get("fsw", 0), f"{where}.fpu.fsw"),
            ftw=_json_int(fpu.get("ftw", 0), f"{where}.fpu.ftw"),
        ).to_int()
        # The JSON has no MXCSR_MASK or last data pointer; they stay 0 rather than being invented.
        regs["xmmcontrolstatus"] = XmmControlStatus(mxcsr=_json_int(fpu.get("mxcsr", 0), f"{where}.fpu.mxcsr")).to_int()
    if "kernel_gs_base" in vp:
        regs["kernelgsbase"] = _json_int(vp["kernel_gs_base"], f"{where}.kernel_gs_base")
    if "apic_base" in vp:
        regs["apicbase"] = _json_int(vp["apic_base"], f"{where}.apic_base")
    return regs


def registers_from_json(obj: Any) -> list[RegisterDict]:
    """Turn an ``hvtest-registers/1`` document into one register dict per VP, ordered by ``vp_index``.

    fs_base/gs_base are the FS/GS segment bases and so are not repeated; halted/a20/smm/lapic_tpr
    have no saved-state slot (CR8 already carries the TPR).
    """
    doc = _json_map(obj, "document")
    fmt = doc.get("format")
    if fmt != REGISTERS_JSON_FORMAT:
        raise FormatError(None, None, f"registers JSON: format {fmt!r}, expected {REGISTERS_JSON_FORMAT!r}")
    vps = doc.get("vps")
    if not isinstance(vps, list):
        raise FormatError(None, None, "registers JSON: 'vps' is not a list")
    indexed: list[tuple[int, RegisterDict]] = []
    for position, vp in enumerate(vps):
        where = f"vps[{position}]"
        vp = _json_map(vp, where)
        index = _json_int(vp.get("vp_index", position), f"{where}.vp_index")
        indexed.append((index, _vp_from_json(vp, where)))
    indexed.sort(key=lambda item: item[0])
    return [regs for _, regs in indexed]
