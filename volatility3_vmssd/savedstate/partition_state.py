"""Reader and writer of the ``partition_state`` blob: the saved CPU state of every VP (spec §4).

The blob is a 24-byte envelope followed by a stream of 16-byte-headed chunks.  Only the framing and a
few chunks are cross-checked by several sources; real Hyper-V files have not been seen here (spec §9),
so the parser treats every length as hostile, skips what it does not know, and records what it had
to work around as findings.  The writer follows the openvmm chunk order so tests (and the synthetic
``.vmrs`` writer) can produce blobs the parser must read back exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence

from ..errors import Findings, FormatError, NotFoundError, TruncatedError, UnsupportedError
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
    Architecture,
    PagingMode,
    ProcessorVendor,
    PrologVendor,
    RegisterDict,
    RegisterValue,
    SegmentRegister,
    TableRegister,
    sdk_vendor,
)

# ---------------------------------------------------------------------------------------------
# Envelope and chunk framing (spec §4.1, §4.2; [3])
# ---------------------------------------------------------------------------------------------

VID_SAVED_STATE_DESCRIPTOR = struct.Struct("<QQQ")  # DescriptorSize, HeaderSize, TotalSize
DESCRIPTOR_SIZE = VID_SAVED_STATE_DESCRIPTOR.size  # openvmm writes DescriptorSize = HeaderSize = 24
CHUNK_STREAM_GAP = 16  # the chunk stream starts at HeaderSize + 16
VM_SAVE_CHUNK_HEADER = struct.Struct("<II8x")  # ChunkId, DataLength, 8 reserved


class ChunkId(enum.IntEnum):
    """Chunk ids of spec §4.3.  Ids listed here but not decoded are skipped silently (they are known)."""

    PROLOG = 0x00000000
    PROCESSOR_CPUID = 0x20000000
    OS_ID = 0x20001000
    HYPERCALL_PAGE = 0x20002000
    REFERENCE_TSC = 0x20003000
    PARTITION_VTL = 0x20008000
    PARTITION_VSM_CONFIG = 0x2000A000
    VP_INDICES = 0x30000000
    VP = 0x30001000
    VP_CORE = 0x30003000
    GP_REGISTERS = 0x30005000
    FP_REGISTERS = 0x30006000
    CONTROL_REGISTERS = 0x30007000
    DEBUG_REGISTERS = 0x30008000
    SEGMENT_REGISTERS = 0x30009000
    TABLE_REGISTERS = 0x3000A000
    VIRTUAL_MSRS = 0x3000B000
    PAT_MTRRS = 0x3000C000
    XSAVE_CONTROL = 0x3000D000
    XSAVE_STATE = 0x3000E100
    SYNIC_APIC = 0x3000F000
    SYNIC_MSRS = 0x30010000
    SYNTHETIC_TIMERS = 0x30011000
    VP_VTL_CONTROL_PAGE = 0x30018000
    VP_VTL = 0x3001A000
    NESTED_BASE_VMCS = 0x30021000
    NESTED_CURRENT_VMCS = 0x30023000
    EPILOG = 0xF0000000


_KNOWN_CHUNK_IDS: frozenset[int] = frozenset(int(c) for c in ChunkId)


def _chunk_name(chunk_id: int) -> str:
    return ChunkId(chunk_id).name if chunk_id in _KNOWN_CHUNK_IDS else f"{chunk_id:#010x}"


# ---------------------------------------------------------------------------------------------
# Partition-level chunk layouts (data offsets, after the chunk header)
# ---------------------------------------------------------------------------------------------

OB_SAVE_CHUNK_PROLOG = struct.Struct("<IB3xI")  # tag, IsSummarySaveState, ProcessorVendor @+8 [2]
PROLOG_DATA_LENGTH = 4064
PROLOG_TAG = 0x50546475
PT_SAVE_CHUNK_OS_ID = struct.Struct("<Q8x")  # HV_GUEST_OS_ID [2]
HYPERCALL_PAGE_MSR = struct.Struct("<Q")  # [1?] Pascal
REFERENCE_TSC_PAGE_MSR = struct.Struct("<8xQ")  # [1?] Pascal: the MSR value is at +8
OB_SAVE_CHUNK_VTL = struct.Struct("<B")  # PartitionVtl and VP VTL marker: u8 VTL (written padded to 16)
VP_INDICES_BSP = struct.Struct("<I")  # then the present-VP bitmap [1]
VP_INDICES_MIN_BITMAP = 8  # bytes; openvmm: "must cover at least 64 VPs"
MAX_VP_BITMAP_BYTES = 1024  # 8192 VPs: far above Hyper-V's limits; caps the bitmap walk
OB_SAVE_CHUNK_VP = struct.Struct("<I")  # VP index (written padded to 16) [2]
VP_VTL_CONTROL_PAGE = struct.Struct("<24sB7x")  # VP-assist VTL control bytes, VtlIsRunnable [2]
_PROLOG_VENDORS: frozenset[int] = frozenset(int(v) for v in PrologVendor)
MAX_VTL = 15  # HV_VTL is a u8, but the enabled-VTL bitmaps are u32 and Hyper-V defines at most 16 [inf]

# ---------------------------------------------------------------------------------------------
# Register chunk layouts (spec §4.3).  Sizes are the spec's, all multiples of 16.
# ---------------------------------------------------------------------------------------------

X64_GP_REGISTERS = struct.Struct("<18Q")  # 144 [3]
X64_FP_REGISTERS = struct.Struct("<52Q")  # 416 = 26 x 128-bit [3]
X64_CONTROL_REGISTERS = struct.Struct("<6Q")  # 48 [3]
X64_DEBUG_REGISTERS = struct.Struct("<6Q")  # 48 [2]
X64_SEGMENT_REGISTERS = struct.Struct("<" + "QIHH" * 8 + "B15x")  # 144: ES CS SS DS FS GS LDTR TR, CPL [2]
X64_TABLE_REGISTERS = struct.Struct("<6xHQ6xHQ")  # 32: IDTR, GDTR [2]
X64_VIRTUAL_MSRS = struct.Struct("<12Q")  # 96 [1?]
X64_VIRTUAL_MSR_SLOTS: tuple[tuple[int, str], ...] = (
    (0, "tsc"),  # [1?] "TSC?" even in the one source
    (1, "kernelgsbase"),  # [1?]
    (2, "apicbase"),  # [1?]
    (7, "star"),  # [1?]
    (8, "lstar"),  # [1?]
    (9, "cstar"),  # [1?]
    (10, "sfmask"),  # [1?]
)
X64_XSAVE_CONTROL = struct.Struct("<Q56x")  # 64: XCR0 + 7 reserved u64 [2]
ARM64_GP_REGISTERS = struct.Struct("<42Q")  # 336 [1]
ARM64_FP_REGISTERS = struct.Struct("<66Q")  # 528: Q0-Q31, u64 FPSR, u64 FPCR [1]
ARM64_CONTROL_REGISTERS = struct.Struct("<16Q")  # 128 [1]
ARM64_TABLE_REGISTERS = struct.Struct("<3Q8x")  # 32: TTBR0, TTBR1, VBAR, pad [1]

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
class _RegisterChunk:
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


def _flat_chunk(chunk_id: ChunkId, layout: struct.Struct, names: tuple[str, ...]) -> _RegisterChunk:
    """u64 registers in order; struct values past the named ones are written as 0."""
    unnamed = _count_values(layout) - len(names)

    def decode(values: tuple[int, ...]) -> RegisterDict:
        return dict(zip(names, values, strict=False))

    def encode(regs: Mapping[str, RegisterValue]) -> tuple[int, ...]:
        return (*(_check_int(regs, name, 64) for name in names), *([0] * unnamed))

    return _RegisterChunk(chunk_id, layout, names, decode, encode)


def _wide_chunk(
    chunk_id: ChunkId, layout: struct.Struct, wide: tuple[str, ...], narrow: tuple[str, ...]
) -> _RegisterChunk:
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

    return _RegisterChunk(chunk_id, layout, (*wide, *narrow), decode, encode)


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


# Writer order (the brief's openvmm-like order); the parser accepts any order.
X64_REGISTER_CHUNKS: tuple[_RegisterChunk, ...] = (
    _flat_chunk(ChunkId.GP_REGISTERS, X64_GP_REGISTERS, X64_GP_REGISTER_NAMES),
    _wide_chunk(
        ChunkId.FP_REGISTERS,
        X64_FP_REGISTERS,
        (*X64_XMM_NAMES, *X64_FPMMX_NAMES, "fpcontrolstatus", "xmmcontrolstatus"),
        (),
    ),
    _flat_chunk(ChunkId.CONTROL_REGISTERS, X64_CONTROL_REGISTERS, X64_CONTROL_REGISTER_NAMES),
    _flat_chunk(ChunkId.DEBUG_REGISTERS, X64_DEBUG_REGISTERS, X64_DEBUG_REGISTER_NAMES),
    _RegisterChunk(
        ChunkId.SEGMENT_REGISTERS,
        X64_SEGMENT_REGISTERS,
        (*X64_SEGMENT_REGISTER_NAMES, "cpl"),
        _decode_segments,
        _encode_segments,
    ),
    _RegisterChunk(
        ChunkId.TABLE_REGISTERS, X64_TABLE_REGISTERS, X64_TABLE_REGISTER_NAMES, _decode_tables, _encode_tables
    ),
    _RegisterChunk(
        ChunkId.VIRTUAL_MSRS,
        X64_VIRTUAL_MSRS,
        tuple(name for _, name in X64_VIRTUAL_MSR_SLOTS),
        _decode_vmsrs,
        _encode_vmsrs,
        optional=True,
    ),
    _flat_chunk(ChunkId.XSAVE_CONTROL, X64_XSAVE_CONTROL, ("xcr0",)),
)
ARM64_REGISTER_CHUNKS: tuple[_RegisterChunk, ...] = (
    _flat_chunk(ChunkId.GP_REGISTERS, ARM64_GP_REGISTERS, ARM64_GP_REGISTER_NAMES),
    _wide_chunk(ChunkId.FP_REGISTERS, ARM64_FP_REGISTERS, ARM64_Q_NAMES, ("fpsr", "fpcr")),
    _flat_chunk(ChunkId.CONTROL_REGISTERS, ARM64_CONTROL_REGISTERS, ARM64_CONTROL_REGISTER_NAMES),
    _flat_chunk(ChunkId.TABLE_REGISTERS, ARM64_TABLE_REGISTERS, ARM64_TABLE_REGISTER_NAMES),
)
_X64_BY_ID: dict[int, _RegisterChunk] = {c.chunk_id: c for c in X64_REGISTER_CHUNKS}
_ARM64_BY_ID: dict[int, _RegisterChunk] = {c.chunk_id: c for c in ARM64_REGISTER_CHUNKS}

# ---------------------------------------------------------------------------------------------
# State model
# ---------------------------------------------------------------------------------------------


def active_vtl_rule(vtls: Sequence[int], vtl_runnable: bool | None) -> int:
    """The VTL a VP was executing when saved.  **Our unconfirmed reading** (spec §4.3, [inf]).

    With two or more VTLs, a set VtlIsRunnable byte in the VP VTL control page means VTL1 was
    running, otherwise VTL0.  With one VTL, that VTL.  Kept in this one function so it is easy to
    change once a real multi-VTL save is seen.
    """
    if len(vtls) >= 2:
        return 1 if vtl_runnable else 0
    return vtls[0] if vtls else 0


@dataclasses.dataclass
class VpState:
    """One virtual processor: its register banks per VTL."""

    index: int
    vtl_runnable: bool | None = None  # VP VTL control page +24; None when the chunk is absent
    registers: dict[int, RegisterDict] = dataclasses.field(default_factory=dict)

    def active_vtl(self) -> int:
        return active_vtl_rule(sorted(self.registers), self.vtl_runnable)

    def active_registers(self) -> RegisterDict:
        """The register bank of :meth:`active_vtl` (empty if the VP has none)."""
        return self.registers.get(self.active_vtl(), {})

    def enabled_vtls_bitmap(self) -> int:
        """Bit n set for every VTL this VP has a bank (or marker) for; VTL0 when there is none."""
        bitmap = 0
        for vtl in self.registers:
            bitmap |= 1 << vtl
        return bitmap or 1


@dataclasses.dataclass
class PartitionState:
    """Everything decoded from one partition_state blob."""

    processor_vendor: int | None = PrologVendor.INTEL  # on-disk prolog value; None if no prolog
    guest_os_id: int | None = None
    partition_vtls: list[int] = dataclasses.field(default_factory=list)
    bsp_index: int | None = None
    vps: list[VpState] = dataclasses.field(default_factory=list)
    present_vp_indices: list[int] | None = None  # VpIndices bitmap (parse only; the writer derives it)
    is_summary_save_state: bool = False
    partition_msrs: dict[str, int] = dataclasses.field(default_factory=dict)  # "hypercall", "referencetsc"
    chunk_counts: dict[int, int] = dataclasses.field(default_factory=dict)  # parse only: chunks seen by id

    @property
    def vendor(self) -> ProcessorVendor:
        return sdk_vendor(self.processor_vendor)

    @property
    def is_arm(self) -> bool:
        return self.processor_vendor == PrologVendor.ARM

    @property
    def vp_count(self) -> int:
        return len(self.vps)

    def get_vp(self, index: int) -> VpState:
        for vp in self.vps:
            if vp.index == index:
                return vp
        raise NotFoundError(f"no VP with index {index} (VPs: {[vp.index for vp in self.vps]})")

    def enabled_vtls_bitmap(self) -> int:
        """Partition-wide enabled VTLs (GetGuestEnabledVirtualTrustLevels): PartitionVtl chunks, else VPs."""
        bitmap = 0
        for vtl in self.partition_vtls:
            bitmap |= 1 << vtl
        if not bitmap:
            for vp in self.vps:
                bitmap |= vp.enabled_vtls_bitmap()
        return bitmap or 1

    @property
    def guest_os_info(self) -> GuestOsInfo | None:
        return None if self.guest_os_id is None else decode_guest_os_id(self.guest_os_id)


# ---------------------------------------------------------------------------------------------
# Architecture and paging mode (what GetArchitecture/GetPagingMode report; spec §4.3 [inf])
# ---------------------------------------------------------------------------------------------

EFER_LMA = 1 << 10
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12


def _reg(regs: Mapping[str, RegisterValue], name: str) -> int:
    value = regs.get(name, 0)
    return value if isinstance(value, int) else 0


def architecture(regs: Mapping[str, RegisterValue], vendor: int | None) -> Architecture:
    """ARM vendor -> Armv8; x86: EFER.LMA -> x64, else x86.  No control registers -> Unknown."""
    if vendor == PrologVendor.ARM:
        return Architecture.ARMV8
    if "efer" not in regs and "cr0" not in regs:
        return Architecture.UNKNOWN
    return Architecture.X64 if _reg(regs, "efer") & EFER_LMA else Architecture.X86


def paging_mode(regs: Mapping[str, RegisterValue], vendor: int | None) -> PagingMode:
    """EFER.LMA -> Long; else CR0.PG clear -> NonPaged; CR4.PAE -> Pae; else 32Bit (spec §4.3)."""
    arch = architecture(regs, vendor)
    if arch is Architecture.ARMV8:
        return PagingMode.ARMV8
    if arch is Architecture.UNKNOWN:
        return PagingMode.INVALID
    if arch is Architecture.X64:
        return PagingMode.LONG
    if not _reg(regs, "cr0") & CR0_PG:
        return PagingMode.NON_PAGED
    return PagingMode.PAE if _reg(regs, "cr4") & CR4_PAE else PagingMode.BIT32


def is_la57(regs: Mapping[str, RegisterValue]) -> bool:
    """CR4.LA57 (bit 12).  It only takes effect in long mode; :func:`paging_levels` checks that."""
    return bool(_reg(regs, "cr4") & CR4_LA57)


def paging_levels(regs: Mapping[str, RegisterValue], vendor: int | None = None) -> int:
    """Page-table depth: 0 (none/unknown), 2 (32-bit), 3 (PAE), 4 (long), 5 (long with LA57).

    The SDK's PAGING_MODE has no 5-level value, so this is how 5-level paging is reported.
    """
    mode = paging_mode(regs, vendor)
    if mode is PagingMode.ARMV8:
        raise UnsupportedError("ARMv8 page-table depth depends on TCR_EL1 and is not decoded")
    if mode is PagingMode.LONG:
        return 5 if is_la57(regs) else 4
    return {PagingMode.BIT32: 2, PagingMode.PAE: 3}.get(mode, 0)


# ---------------------------------------------------------------------------------------------
# Guest OS id (HV_GUEST_OS_ID; spec §4.3, layout [2]: SDK header, openvmm)
# ---------------------------------------------------------------------------------------------


class GuestOsVendor(enum.IntEnum):
    UNDEFINED = 0
    MICROSOFT = 1
    HPE = 2
    LANCOM = 0x200


class GuestOsMicrosoftId(enum.IntEnum):
    UNDEFINED = 0
    MSDOS = 1
    WINDOWS_3X = 2
    WINDOWS_9X = 3
    WINDOWS_NT = 4
    WINDOWS_CE = 5


class GuestOsOpenSourceId(enum.IntEnum):
    UNDEFINED = 0
    LINUX = 1
    FREEBSD = 2
    XEN = 3
    ILLUMOS = 4


_VENDOR_NAMES: dict[int, str] = {
    GuestOsVendor.MICROSOFT: "Microsoft",
    GuestOsVendor.HPE: "HPE",
    GuestOsVendor.LANCOM: "LANCOM",
}
_MICROSOFT_OS_NAMES: dict[int, str] = {
    GuestOsMicrosoftId.MSDOS: "MS-DOS",
    GuestOsMicrosoftId.WINDOWS_3X: "Windows 3.x",
    GuestOsMicrosoftId.WINDOWS_9X: "Windows 9x",
    GuestOsMicrosoftId.WINDOWS_NT: "Windows NT",
    GuestOsMicrosoftId.WINDOWS_CE: "Windows CE",
}
_OPEN_SOURCE_OS_NAMES: dict[int, str] = {
    GuestOsOpenSourceId.LINUX: "Linux",
    GuestOsOpenSourceId.FREEBSD: "FreeBSD",
    GuestOsOpenSourceId.XEN: "Xen",
    GuestOsOpenSourceId.ILLUMOS: "illumos",
}
GUEST_OS_OPEN_SOURCE = 1 << 63


@dataclasses.dataclass(frozen=True)
class GuestOsInfo:
    """A decoded HV_GUEST_OS_ID; fields of the other layout are None."""

    value: int
    is_open_source: bool
    os_id: int
    # closed-source layout (bit 63 = 0)
    vendor_id: int | None = None
    major: int | None = None
    minor: int | None = None
    service_version: int | None = None
    build_number: int | None = None
    # open-source layout (bit 63 = 1)
    version: int | None = None
    vendor_specific1: int | None = None
    vendor_specific2: int | None = None

    @property
    def vendor_name(self) -> str | None:
        if self.vendor_id is None:
            return None
        return _VENDOR_NAMES.get(self.vendor_id, f"vendor {self.vendor_id:#x}")

    @property
    def os_name(self) -> str:
        if self.is_open_source:
            return _OPEN_SOURCE_OS_NAMES.get(self.os_id, f"open-source OS {self.os_id:#x}")
        if self.vendor_id == GuestOsVendor.MICROSOFT:
            return _MICROSOFT_OS_NAMES.get(self.os_id, f"OS {self.os_id:#x}")
        return f"OS {self.os_id:#x}"

    @property
    def description(self) -> str:
        if self.value == 0:
            return "none (the guest did not set HV_X64_MSR_GUEST_OS_ID)"
        if self.is_open_source:
            version = f"version {self.version:#x}"
            if self.os_id == GuestOsOpenSourceId.LINUX and self.version is not None:
                # Linux writes LINUX_VERSION_CODE here (a << 16 | b << 8 | c) [inf: kernel source].
                v = self.version
                version += f" (kernel {v >> 16 & 0xFF}.{v >> 8 & 0xFF}.{v & 0xFF})"
            extra = ""
            if self.vendor_specific1 or self.vendor_specific2:
                extra = f", vendor-specific {self.vendor_specific1:#x}/{self.vendor_specific2:#x}"
            return f"{self.os_name} (open source) {version}{extra}"
        return (
            f"{self.vendor_name} {self.os_name} {self.major}.{self.minor} build {self.build_number}"
            f" (service version {self.service_version})"
        )

    def encode(self) -> int:
        return self.value


def decode_guest_os_id(value: int) -> GuestOsInfo:
    """Split a guest OS id into its fields (bit 63 picks the layout; spec §4.3)."""
    value &= _U64
    if value & GUEST_OS_OPEN_SOURCE:
        return GuestOsInfo(
            value=value,
            is_open_source=True,
            os_id=(value >> 56) & 0x7F,
            version=(value >> 16) & 0xFFFF_FFFF,
            vendor_specific1=value & 0xFFFF,
            vendor_specific2=(value >> 48) & 0xFF,
        )
    return GuestOsInfo(
        value=value,
        is_open_source=False,
        os_id=(value >> 40) & 0xFF,
        vendor_id=(value >> 48) & 0x7FFF,
        major=(value >> 32) & 0xFF,
        minor=(value >> 24) & 0xFF,
        service_version=(value >> 16) & 0xFF,
        build_number=value & 0xFFFF,
    )


def encode_guest_os_id(
    *,
    os_id: int,
    open_source: bool = False,
    vendor_id: int = 0,
    major: int = 0,
    minor: int = 0,
    service_version: int = 0,
    build_number: int = 0,
    version: int = 0,
    vendor_specific1: int = 0,
    vendor_specific2: int = 0,
) -> int:
    """The reverse of :func:`decode_guest_os_id`; fields of the other layout must stay 0."""

    def field(name: str, value: int, bits: int, shift: int) -> int:
        if not 0 <= value < 1 << bits:
            raise ValueError(f"guest OS id field {name} = {value!r} does not fit in {bits} bits")
        return value << shift

    if open_source:
        if vendor_id or major or minor or service_version or build_number:
            raise ValueError("closed-source fields given for an open-source guest OS id")
        return (
            GUEST_OS_OPEN_SOURCE
            | field("os_id", os_id, 7, 56)
            | field("vendor_specific2", vendor_specific2, 8, 48)
            | field("version", version, 32, 16)
            | field("vendor_specific1", vendor_specific1, 16, 0)
        )
    if version or vendor_specific1 or vendor_specific2:
        raise ValueError("open-source fields given for a closed-source guest OS id")
    return (
        field("vendor_id", vendor_id, 15, 48)
        | field("os_id", os_id, 8, 40)
        | field("major", major, 8, 32)
        | field("minor", minor, 8, 24)
        | field("service_version", service_version, 8, 16)
        | field("build_number", build_number, 16, 0)
    )


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Note:
    offset: int
    message: str
    count: int = 1


class _Parser:
    """One pass over the chunk stream.  Every read is bounded by the chunk's DataLength."""

    def __init__(self, data: memoryview, path: str, base_offset: int, findings: Findings) -> None:
        self.data = data
        self.path = path
        self.base = base_offset
        self.findings = findings
        self.state = PartitionState(processor_vendor=None)
        self.vp: VpState | None = None
        self.vtl = 0
        self.vps_by_index: dict[int, VpState] = {}
        self.implicit_vp0 = False
        # (kind, key) -> [first offset, count, message]; reported once each at the end
        self.notes: dict[tuple[str, int], _Note] = {}
        self.handlers: dict[int, tuple[struct.Struct, Callable[[memoryview, int], None]]] = {
            ChunkId.PROLOG: (OB_SAVE_CHUNK_PROLOG, self._prolog),
            ChunkId.OS_ID: (PT_SAVE_CHUNK_OS_ID, self._os_id),
            ChunkId.HYPERCALL_PAGE: (HYPERCALL_PAGE_MSR, self._hypercall_page),
            ChunkId.REFERENCE_TSC: (REFERENCE_TSC_PAGE_MSR, self._reference_tsc),
            ChunkId.PARTITION_VTL: (OB_SAVE_CHUNK_VTL, self._partition_vtl),
            ChunkId.VP_INDICES: (VP_INDICES_BSP, self._vp_indices),
            ChunkId.VP: (OB_SAVE_CHUNK_VP, self._vp_marker),
            ChunkId.VP_VTL_CONTROL_PAGE: (VP_VTL_CONTROL_PAGE, self._vtl_control_page),
            ChunkId.VP_VTL: (OB_SAVE_CHUNK_VTL, self._vp_vtl_marker),
        }

    # -- findings ---------------------------------------------------------------------------

    def note(self, kind: str, key: int, offset: int, message: str, error: type[FormatError] | None = None) -> None:
        """Record a repeatable finding once per (kind, key) with its first offset and a count."""
        entry = self.notes.get((kind, key))
        if entry is None:
            if error is not None and self.findings.strict:
                self.findings.add(self.path, self.base + offset, kind, message, error=error)
            self.notes[(kind, key)] = _Note(offset, message)
        else:
            entry.count += 1

    def flush_notes(self) -> None:
        for (kind, _), note in self.notes.items():
            suffix = f" ({note.count} occurrences; first offset shown)" if note.count != 1 else ""
            self.findings.add(self.path, self.base + note.offset, kind, f"{note.message}{suffix}")

    # -- driver -----------------------------------------------------------------------------

    def run(self) -> PartitionState:
        data = self.data
        size = len(data)
        if size < DESCRIPTOR_SIZE:
            raise TruncatedError(
                self.path, self.base, f"partition_state of {size} bytes cannot hold its 24-byte descriptor"
            )
        _descriptor_size, header_size, total_size = VID_SAVED_STATE_DESCRIPTOR.unpack_from(data, 0)
        start = header_size + CHUNK_STREAM_GAP
        if start > size:
            raise FormatError(
                self.path,
                self.base + 8,
                f"HeaderSize {header_size:#x} puts the chunk stream at {start:#x}, past the {size:#x}-byte blob",
            )
        if header_size < DESCRIPTOR_SIZE:
            self.findings.add(
                self.path,
                self.base + 8,
                "header-size",
                f"HeaderSize {header_size:#x} is smaller than the {DESCRIPTOR_SIZE}-byte descriptor",
                error=FormatError,
            )
        end = total_size
        if total_size > size:
            self.findings.add(
                self.path,
                self.base + 16,
                "truncated",
                f"TotalSize {total_size:#x} exceeds the {size:#x}-byte blob; reading only what is present",
                error=TruncatedError,
            )
            end = size
        if end < start:
            raise FormatError(
                self.path,
                self.base + 16,
                f"TotalSize {total_size:#x} ends before the chunk stream starts at {start:#x}",
            )

        pos = start
        saw_epilog = False
        while pos + VM_SAVE_CHUNK_HEADER.size <= end:
            chunk_id, length = VM_SAVE_CHUNK_HEADER.unpack_from(data, pos)
            counts = self.state.chunk_counts
            counts[chunk_id] = counts.get(chunk_id, 0) + 1
            if chunk_id == ChunkId.EPILOG:
                saw_epilog = True
                break
            data_start = pos + VM_SAVE_CHUNK_HEADER.size
            data_end = data_start + length
            if data_end > end:
                error = TruncatedError if data_end > size else FormatError
                limit = "blob" if data_end > size else "TotalSize"
                raise error(
                    self.path,
                    self.base + pos,
                    f"chunk {_chunk_name(chunk_id)} DataLength {length:#x} runs to {data_end:#x},"
                    f" past the end of the {limit} at {end:#x}",
                )
            self.dispatch(chunk_id, data[data_start:data_end], pos)
            pos = data_end
        if not saw_epilog and 0 < end - pos < VM_SAVE_CHUNK_HEADER.size:
            self.findings.add(
                self.path, self.base + pos, "trailing-bytes", f"{end - pos} bytes too short for a chunk header"
            )

        self.flush_notes()
        if not saw_epilog:
            self.findings.add(
                self.path,
                self.base + pos,
                "no-epilog",
                "chunk stream ends without an Epilog chunk",
                error=TruncatedError,
            )
        if self.state.processor_vendor is None:
            self.findings.add(self.path, self.base + start, "no-prolog", "no Prolog chunk: vendor unknown")
        if not self.state.vps:
            self.findings.add(
                self.path, self.base + start, "no-vps", "no VP marker chunks: zero VPs", error=FormatError
            )
        present = self.state.present_vp_indices
        if present is not None and self.state.vps and sorted(present) != sorted(self.vps_by_index):
            self.findings.add(
                self.path,
                self.base + start,
                "vp-indices",
                f"VpIndices bitmap lists VPs {present[:16]} but VP markers give {sorted(self.vps_by_index)[:16]}",
            )
        return self.state

    def dispatch(self, chunk_id: int, payload: memoryview, offset: int) -> None:
        register_chunk = (_ARM64_BY_ID if self.state.is_arm else _X64_BY_ID).get(chunk_id)
        entry = self.handlers.get(chunk_id)
        if entry is not None:
            layout, handler = entry
        elif register_chunk is not None:
            layout, handler = register_chunk.layout, functools.partial(self._registers, register_chunk)
        else:
            if chunk_id not in _KNOWN_CHUNK_IDS:
                self.note("unknown-chunk", chunk_id, offset, f"unknown chunk id {chunk_id:#010x} skipped by length")
            return  # known but not decoded (CPUID, SynIC, ...): skipped silently
        if len(payload) < layout.size:
            self.note(
                "short-chunk",
                chunk_id,
                offset,
                f"{_chunk_name(chunk_id)} chunk has DataLength {len(payload)}, its layout needs {layout.size}; skipped",
                error=FormatError,
            )
            return
        handler(payload, offset)

    # -- VP bookkeeping ---------------------------------------------------------------------

    def current_vp(self, offset: int) -> VpState:
        if self.vp is None:
            self.findings.add(
                self.path,
                self.base + offset,
                "orphan-chunk",
                "per-VP chunk before any VP marker; attributed to VP 0",
                error=FormatError,
            )
            self.vp = VpState(0)
            self.vps_by_index[0] = self.vp
            self.state.vps.append(self.vp)
            self.implicit_vp0 = True
            self.vtl = 0
        return self.vp

    # -- chunk handlers ---------------------------------------------------------------------

    def _prolog(self, payload: memoryview, offset: int) -> None:
        tag, summary, vendor = OB_SAVE_CHUNK_PROLOG.unpack_from(payload)
        if tag != PROLOG_TAG:
            self.note("prolog-tag", 0, offset, f"Prolog tag {tag:#010x}, expected {PROLOG_TAG:#010x}")
        if vendor not in _PROLOG_VENDORS:
            self.note("unknown-vendor", vendor, offset, f"processor vendor {vendor:#x} unknown; read as x86")
        self.state.processor_vendor = vendor
        self.state.is_summary_save_state = bool(summary)

    def _os_id(self, payload: memoryview, offset: int) -> None:
        (self.state.guest_os_id,) = PT_SAVE_CHUNK_OS_ID.unpack_from(payload)

    def _hypercall_page(self, payload: memoryview, offset: int) -> None:
        (self.state.partition_msrs["hypercall"],) = HYPERCALL_PAGE_MSR.unpack_from(payload)

    def _reference_tsc(self, payload: memoryview, offset: int) -> None:
        (self.state.partition_msrs["referencetsc"],) = REFERENCE_TSC_PAGE_MSR.unpack_from(payload)

    def _partition_vtl(self, payload: memoryview, offset: int) -> None:
        (vtl,) = OB_SAVE_CHUNK_VTL.unpack_from(payload)
        if vtl > MAX_VTL:
            self.note("bad-vtl", ChunkId.PARTITION_VTL, offset, f"PartitionVtl {vtl} is above {MAX_VTL}")
        if vtl not in self.state.partition_vtls:
            self.state.partition_vtls.append(vtl)

    def _vp_indices(self, payload: memoryview, offset: int) -> None:
        (self.state.bsp_index,) = VP_INDICES_BSP.unpack_from(payload)
        bitmap = payload[VP_INDICES_BSP.size :]
        if len(bitmap) > MAX_VP_BITMAP_BYTES:
            tail = bitmap[MAX_VP_BITMAP_BYTES:].tobytes()
            if tail.count(0) != len(tail):
                self.note("vp-indices", 1, offset, f"VpIndices bitmap has VPs beyond index {MAX_VP_BITMAP_BYTES * 8}")
            bitmap = bitmap[:MAX_VP_BITMAP_BYTES]
        bits = int.from_bytes(bitmap, "little")
        present: list[int] = []
        while bits:
            low = bits & -bits
            present.append(low.bit_length() - 1)
            bits ^= low
        self.state.present_vp_indices = present

    def _vp_marker(self, payload: memoryview, offset: int) -> None:
        (index,) = OB_SAVE_CHUNK_VP.unpack_from(payload)
        vp = self.vps_by_index.get(index)
        if vp is None:
            vp = VpState(index)
            self.vps_by_index[index] = vp
            self.state.vps.append(vp)
        elif index == 0 and self.implicit_vp0:
            self.implicit_vp0 = False  # the orphan chunks' VP 0 now has its marker
        else:
            self.note("duplicate-vp", index, offset, f"second marker for VP {index}; its chunks are merged")
        self.vp = vp
        self.vtl = 0  # register chunks before a VTL marker belong to VTL 0

    def _vtl_control_page(self, payload: memoryview, offset: int) -> None:
        _control, runnable = VP_VTL_CONTROL_PAGE.unpack_from(payload)
        self.current_vp(offset).vtl_runnable = bool(runnable)

    def _vp_vtl_marker(self, payload: memoryview, offset: int) -> None:
        (vtl,) = OB_SAVE_CHUNK_VTL.unpack_from(payload)
        if vtl > MAX_VTL:
            self.note("bad-vtl", ChunkId.VP_VTL, offset, f"VP VTL marker {vtl} is above {MAX_VTL}")
        self.current_vp(offset).registers.setdefault(vtl, {})
        self.vtl = vtl

    def _registers(self, chunk: _RegisterChunk, payload: memoryview, offset: int) -> None:
        values = chunk.layout.unpack_from(payload)
        self.current_vp(offset).registers.setdefault(self.vtl, {}).update(chunk.decode(values))


def parse_partition_state(
    blob: bytes | bytearray | memoryview, *, path: str, base_offset: int = 0, findings: Findings
) -> PartitionState:
    """Decode a partition_state blob.

    Raises :class:`FormatError` (or its :class:`TruncatedError` subclass) when the envelope or the chunk
    framing cannot be followed; everything else (unknown or short chunks, a clamped TotalSize, a missing
    Epilog or VP marker) becomes a finding.  ``base_offset`` is added to every reported offset.
    """
    data = memoryview(blob)
    if data.ndim != 1 or data.itemsize != 1:
        data = data.cast("B")
    return _Parser(data, path, base_offset, findings).run()


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def _chunk(chunk_id: int, data: bytes, data_length: int | None = None) -> bytes:
    """A chunk with its data zero-padded to ``data_length`` (default: the next multiple of 16)."""
    if data_length is None:
        data_length = -(-len(data) // 16) * 16
    return VM_SAVE_CHUNK_HEADER.pack(chunk_id, data_length) + data.ljust(data_length, b"\0")


def _vtls_of(vps: Iterable[VpState]) -> list[int]:
    vtls: set[int] = set()
    for vp in vps:
        vtls.update(vp.registers)
    return sorted(vtls) or [0]


def build_partition_state(state: PartitionState) -> bytes:
    """Serialise ``state`` in openvmm's order (spec §4.3 "Stream order").

    Per VTL bank the writer emits GP, FP, control, debug, segment, table, virtual-MSR (only when one of
    its names is present) and XSAVE-control chunks (x64) or GP, FP, control, table (ARM64).  Names missing
    from a bank are written as 0; names the layout cannot hold raise ValueError rather than vanish.
    """
    try:
        return _build(state)
    except struct.error as exc:  # an out-of-range VTL, VP index, vendor or MSR value from the caller
        raise ValueError(f"cannot write partition_state: {exc}") from exc


def _build(state: PartitionState) -> bytes:
    vendor = state.processor_vendor
    if vendor is None:
        raise ValueError("processor_vendor is required to write a Prolog")
    chunks = ARM64_REGISTER_CHUNKS if vendor == PrologVendor.ARM else X64_REGISTER_CHUNKS
    allowed = {name for chunk in chunks for name in chunk.names}

    out = bytearray(DESCRIPTOR_SIZE + CHUNK_STREAM_GAP)
    out += _chunk(
        ChunkId.PROLOG,
        OB_SAVE_CHUNK_PROLOG.pack(PROLOG_TAG, int(state.is_summary_save_state), vendor),
        PROLOG_DATA_LENGTH,
    )
    out += _chunk(ChunkId.OS_ID, PT_SAVE_CHUNK_OS_ID.pack(state.guest_os_id or 0))
    if "hypercall" in state.partition_msrs:
        out += _chunk(ChunkId.HYPERCALL_PAGE, HYPERCALL_PAGE_MSR.pack(state.partition_msrs["hypercall"]))
    if "referencetsc" in state.partition_msrs:
        out += _chunk(ChunkId.REFERENCE_TSC, REFERENCE_TSC_PAGE_MSR.pack(state.partition_msrs["referencetsc"]))
    for vtl in state.partition_vtls or _vtls_of(state.vps):
        out += _chunk(ChunkId.PARTITION_VTL, OB_SAVE_CHUNK_VTL.pack(vtl))

    indices = [vp.index for vp in state.vps]
    if any(not 0 <= i < MAX_VP_BITMAP_BYTES * 8 for i in indices):
        raise ValueError(f"VP indices must be below {MAX_VP_BITMAP_BYTES * 8}")
    bitmap_len = max(VP_INDICES_MIN_BITMAP, (max(indices, default=0) // 8) + 1)
    # Pad so that 4 + bitmap is a multiple of 16 (the bitmap stays a multiple of 4, as the spec asks).
    bitmap_len = -(-(VP_INDICES_BSP.size + bitmap_len) // 16) * 16 - VP_INDICES_BSP.size
    bitmap = bytearray(bitmap_len)
    for i in indices:
        bitmap[i // 8] |= 1 << (i % 8)
    bsp = state.bsp_index if state.bsp_index is not None else (indices[0] if indices else 0)
    out += _chunk(ChunkId.VP_INDICES, VP_INDICES_BSP.pack(bsp) + bytes(bitmap))

    for vp in state.vps:
        out += _chunk(ChunkId.VP, OB_SAVE_CHUNK_VP.pack(vp.index))
        vtls = sorted(vp.registers)
        if len(vtls) > 1:
            control = VP_VTL_CONTROL_PAGE.pack(bytes(24), int(bool(vp.vtl_runnable)))
            out += _chunk(ChunkId.VP_VTL_CONTROL_PAGE, control)
        for vtl in vtls:
            regs = vp.registers[vtl]
            unknown = sorted(set(regs) - allowed)
            if unknown:
                raise ValueError(f"VP {vp.index} VTL {vtl}: the chunk layouts have no slot for {unknown}")
            out += _chunk(ChunkId.VP_VTL, OB_SAVE_CHUNK_VTL.pack(vtl))
            for chunk in chunks:
                if chunk.optional and not any(name in regs for name in chunk.names):
                    continue
                out += _chunk(chunk.chunk_id, chunk.layout.pack(*chunk.encode(regs)))
    out += _chunk(ChunkId.EPILOG, b"")
    VID_SAVED_STATE_DESCRIPTOR.pack_into(out, 0, DESCRIPTOR_SIZE, DESCRIPTOR_SIZE, len(out))
    return bytes(out)
