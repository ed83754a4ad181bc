"""Register chunks of the ``partition_state`` blob: their layouts and how struct values map to names.

One table per architecture, in the writer's order; the parser looks chunks up by id and accepts any order.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Mapping

from .chunks import ChunkId
from .registers import (
    ARM64_CONTROL_REGISTER_NAMES,
    ARM64_GP_REGISTER_NAMES,
    ARM64_Q_NAMES,
    ARM64_TABLE_REGISTER_NAMES,
    X64_CONTROL_REGISTER_NAMES,
    X64_DEBUG_REGISTER_NAMES,
    X64_FPMMX_NAMES,
    X64_GP_REGISTER_NAMES,
    X64_SEGMENT_REGISTER_NAMES,
    X64_TABLE_REGISTER_NAMES,
    X64_XMM_NAMES,
    RegisterDict,
    RegisterValue,
    SegmentRegister,
    TableRegister,
)

X64_GP_REGISTERS = struct.Struct("<18Q")  # 144
X64_FP_REGISTERS = struct.Struct("<52Q")  # 416 = 26 x 128-bit
X64_CONTROL_REGISTERS = struct.Struct("<6Q")  # 48
X64_DEBUG_REGISTERS = struct.Struct("<6Q")  # 48
X64_SEGMENT_REGISTERS = struct.Struct("<" + "QIHH" * 8 + "B15x")  # 144: ES CS SS DS FS GS LDTR TR, CPL
X64_TABLE_REGISTERS = struct.Struct("<6xHQ6xHQ")  # 32: IDTR, GDTR
X64_VIRTUAL_MSRS = struct.Struct("<12Q")  # 96, one source only (docs/format.md#virtual-msrs)
X64_VIRTUAL_MSR_SLOTS: tuple[tuple[int, str], ...] = (
    (0, "tsc"),  # marked uncertain even in its one source
    (1, "kernelgsbase"),
    (2, "apicbase"),
    (7, "star"),
    (8, "lstar"),
    (9, "cstar"),
    (10, "sfmask"),
)
X64_XSAVE_CONTROL = struct.Struct("<Q56x")  # 64: XCR0 + 7 reserved u64
ARM64_GP_REGISTERS = struct.Struct("<42Q")  # 336
ARM64_FP_REGISTERS = struct.Struct("<66Q")  # 528: Q0-Q31, u64 FPSR, u64 FPCR
ARM64_CONTROL_REGISTERS = struct.Struct("<16Q")  # 128
ARM64_TABLE_REGISTERS = struct.Struct("<3Q8x")  # 32: TTBR0, TTBR1, VBAR, pad

_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _check_int(regs: Mapping[str, RegisterValue], name: str, bits: int) -> int:
    """A register value for the writer: missing means 0; wrong type or width is the caller's bug."""
    value = regs.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"register {name!r} must be an int, not {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"register {name!r} = {value:#x} does not fit in {bits} bits")
    return value


@dataclasses.dataclass(frozen=True)
class RegisterChunk:
    """How one register chunk maps between struct values and register names."""

    chunk_id: ChunkId
    layout: struct.Struct
    names: tuple[str, ...]  # every name the chunk carries (for the writer's name check)
    decode: Callable[[tuple[int, ...]], RegisterDict]
    encode: Callable[[Mapping[str, RegisterValue]], tuple[int, ...]]
    optional: bool = False  # written only when the caller supplied at least one of its names


def _count_values(layout: struct.Struct) -> int:
    """Number of values a struct packs (its format without pad bytes)."""
    return len(layout.unpack(bytes(layout.size)))


def _flat_chunk(chunk_id: ChunkId, layout: struct.Struct, names: tuple[str, ...]) -> RegisterChunk:
    """u64 registers in order; struct values past the named ones are written as 0."""
    unnamed = _count_values(layout) - len(names)

    def decode(values: tuple[int, ...]) -> RegisterDict:
        return dict(zip(names, values, strict=False))

    def encode(regs: Mapping[str, RegisterValue]) -> tuple[int, ...]:
        return (*(_check_int(regs, name, 64) for name in names), *([0] * unnamed))

    return RegisterChunk(chunk_id, layout, names, decode, encode)


def _wide_chunk(
    chunk_id: ChunkId, layout: struct.Struct, wide: tuple[str, ...], narrow: tuple[str, ...]
) -> RegisterChunk:
    """128-bit registers (two u64, low first), then u64 registers."""

    def decode(values: tuple[int, ...]) -> RegisterDict:
        regs: RegisterDict = {name: values[2 * i] | values[2 * i + 1] << 64 for i, name in enumerate(wide)}
        regs.update(zip(narrow, values[2 * len(wide) :], strict=True))
        return regs

    def encode(regs: Mapping[str, RegisterValue]) -> tuple[int, ...]:
        values: list[int] = []
        for name in wide:
            value = _check_int(regs, name, 128)
            values += [value & _U64, value >> 64]
        values += [_check_int(regs, name, 64) for name in narrow]
        return tuple(values)

    return RegisterChunk(chunk_id, layout, (*wide, *narrow), decode, encode)


def _decode_segments(values: tuple[int, ...]) -> RegisterDict:
    regs: RegisterDict = {
        name: SegmentRegister(*values[4 * i : 4 * i + 4]) for i, name in enumerate(X64_SEGMENT_REGISTER_NAMES)
    }
    regs["cpl"] = values[32]
    return regs


def _encode_segments(regs: Mapping[str, RegisterValue]) -> tuple[int, ...]:
    values: list[int] = []
    for name in X64_SEGMENT_REGISTER_NAMES:
        seg = regs.get(name, SegmentRegister(0, 0, 0, 0))
        if not isinstance(seg, SegmentRegister):
            raise ValueError(f"register {name!r} must be a SegmentRegister, not {type(seg).__name__}")
        for field, bits in (("base", 64), ("limit", 32), ("selector", 16), ("attributes", 16)):
            value = getattr(seg, field)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise ValueError(f"register {name!r}: {field} {value!r} does not fit in {bits} bits")
            values.append(value)
    values.append(_check_int(regs, "cpl", 8))
    return tuple(values)


def _decode_tables(values: tuple[int, ...]) -> RegisterDict:
    return {"idtr": TableRegister(values[0], values[1]), "gdtr": TableRegister(values[2], values[3])}


def _encode_tables(regs: Mapping[str, RegisterValue]) -> tuple[int, ...]:
    values: list[int] = []
    for name in X64_TABLE_REGISTER_NAMES:
        table = regs.get(name, TableRegister(0, 0))
        if not isinstance(table, TableRegister):
            raise ValueError(f"register {name!r} must be a TableRegister, not {type(table).__name__}")
        if not (isinstance(table.limit, int) and 0 <= table.limit <= 0xFFFF):
            raise ValueError(f"register {name!r}: limit {table.limit!r} does not fit in 16 bits")
        if not (isinstance(table.base, int) and 0 <= table.base <= _U64):
            raise ValueError(f"register {name!r}: base {table.base!r} does not fit in 64 bits")
        values += [table.limit, table.base]
    return tuple(values)


def _decode_vmsrs(values: tuple[int, ...]) -> RegisterDict:
    return {name: values[slot] for slot, name in X64_VIRTUAL_MSR_SLOTS}


def _encode_vmsrs(regs: Mapping[str, RegisterValue]) -> tuple[int, ...]:
    values = [0] * 12
    for slot, name in X64_VIRTUAL_MSR_SLOTS:
        values[slot] = _check_int(regs, name, 64)
    return tuple(values)


# Writer order: openvmm's (docs/format.md#register-chunks); the parser accepts any order.
X64_REGISTER_CHUNKS: tuple[RegisterChunk, ...] = (
    _flat_chunk(ChunkId.GP_REGISTERS, X64_GP_REGISTERS, X64_GP_REGISTER_NAMES),
    _flat_chunk(ChunkId.CONTROL_REGISTERS, X64_CONTROL_REGISTERS, X64_CONTROL_REGISTER_NAMES),
    RegisterChunk(
        ChunkId.SEGMENT_REGISTERS,
        X64_SEGMENT_REGISTERS,
        (*X64_SEGMENT_REGISTER_NAMES, "cpl"),
        _decode_segments,
        _encode_segments,
    ),
    RegisterChunk(
        ChunkId.TABLE_REGISTERS, X64_TABLE_REGISTERS, X64_TABLE_REGISTER_NAMES, _decode_tables, _encode_tables
    ),
    _flat_chunk(ChunkId.DEBUG_REGISTERS, X64_DEBUG_REGISTERS, X64_DEBUG_REGISTER_NAMES),
    _wide_chunk(
        ChunkId.FP_REGISTERS,
        X64_FP_REGISTERS,
        (*X64_XMM_NAMES, *X64_FPMMX_NAMES, "fpcontrolstatus", "xmmcontrolstatus"),
        (),
    ),
    _flat_chunk(ChunkId.XSAVE_CONTROL, X64_XSAVE_CONTROL, ("xcr0",)),
    # Not written by openvmm: ours, after its chunks, and only when the caller gave one of its names.
    RegisterChunk(
        ChunkId.VIRTUAL_MSRS,
        X64_VIRTUAL_MSRS,
        tuple(name for _, name in X64_VIRTUAL_MSR_SLOTS),
        _decode_vmsrs,
        _encode_vmsrs,
        optional=True,
    ),
)
ARM64_REGISTER_CHUNKS: tuple[RegisterChunk, ...] = (
    _flat_chunk(ChunkId.GP_REGISTERS, ARM64_GP_REGISTERS, ARM64_GP_REGISTER_NAMES),
    _flat_chunk(ChunkId.CONTROL_REGISTERS, ARM64_CONTROL_REGISTERS, ARM64_CONTROL_REGISTER_NAMES),
    _flat_chunk(ChunkId.TABLE_REGISTERS, ARM64_TABLE_REGISTERS, ARM64_TABLE_REGISTER_NAMES),
    _wide_chunk(ChunkId.FP_REGISTERS, ARM64_FP_REGISTERS, ARM64_Q_NAMES, ("fpsr", "fpcr")),
)
X64_CHUNKS_BY_ID: dict[int, RegisterChunk] = {c.chunk_id: c for c in X64_REGISTER_CHUNKS}
ARM64_CHUNKS_BY_ID: dict[int, RegisterChunk] = {c.chunk_id: c for c in ARM64_REGISTER_CHUNKS}

#: Every register name in chunk-layout order (x64, then ARM64): both backends list a bank in this order,
#: whatever order the file's chunks came in.
REGISTER_ORDER: dict[str, int] = {
    name: i
    for i, name in enumerate(dict.fromkeys(n for c in (*X64_REGISTER_CHUNKS, *ARM64_REGISTER_CHUNKS) for n in c.names))
}


def register_sort_key(name: str) -> tuple[int, str]:
    """Sort key of :data:`REGISTER_ORDER`; names outside it come last, alphabetically."""
    return REGISTER_ORDER.get(name, len(REGISTER_ORDER)), name
