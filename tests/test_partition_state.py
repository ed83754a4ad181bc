"""partition_state: writer/parser round trips, derivations, guest OS ids and hostile blobs."""

from __future__ import annotations

import json
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_data import SHARED

from volatility3_vmssd.cpu.chunkparser import parse_partition_state
from volatility3_vmssd.cpu.chunks import ChunkId
from volatility3_vmssd.cpu.chunkwriter import build_partition_state
from volatility3_vmssd.cpu.cpumode import architecture, is_la57, paging_levels, paging_mode
from volatility3_vmssd.cpu.cpustate import PartitionState, VpState, active_vtl_rule
from volatility3_vmssd.cpu.guestos import (
    GuestOsMicrosoftId,
    GuestOsOpenSourceId,
    GuestOsVendor,
    decode_guest_os_id,
    encode_guest_os_id,
)
from volatility3_vmssd.cpu.registers import (
    ARM64_REGISTER_NAMES,
    REGISTER_IDS,
    REGISTER_NAMES_BY_ID,
    WIDE_REGISTER_NAMES,
    X64_REGISTER_NAMES,
    X64_SEGMENT_REGISTER_NAMES,
    X64_TABLE_REGISTER_NAMES,
    Architecture,
    FpControlStatus,
    PagingMode,
    ProcessorVendor,
    PrologVendor,
    SegmentRegister,
    TableRegister,
    XmmControlStatus,
    registers_from_json,
    sdk_vendor,
)
from volatility3_vmssd.errors import Findings, FormatError, NotFoundError, TruncatedError, VmssdError

REGISTERS_JSON = SHARED / "data" / "linux-guest" / "registers.json"

WINDOWS_10_OS_ID = 0x0001_040A_0000_4A61  # Microsoft, Windows NT, 10.0, build 19041
LINUX_OS_ID = 0x8100 << 48 | 0x0601C0 << 16  # what Linux 6.1.192 writes (HV_LINUX_VENDOR_ID, version code)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def x64_registers(seed: int) -> dict:
    """Every x64 register name with a distinct value of the right width and type."""
    rng = random.Random(seed)
    regs: dict = {}
    for name in X64_REGISTER_NAMES:
        if name in X64_SEGMENT_REGISTER_NAMES:
            regs[name] = SegmentRegister(
                rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(16)
            )
        elif name in X64_TABLE_REGISTER_NAMES:
            regs[name] = TableRegister(rng.getrandbits(16), rng.getrandbits(64))
        elif name == "cpl":
            regs[name] = rng.getrandbits(2)
        else:
            regs[name] = rng.getrandbits(128 if name in WIDE_REGISTER_NAMES else 64)
    return regs


def arm64_registers(seed: int) -> dict:
    rng = random.Random(seed)
    return {n: rng.getrandbits(128 if n in WIDE_REGISTER_NAMES else 64) for n in ARM64_REGISTER_NAMES}


def long_mode(**extra: int) -> dict:
    return {"cr0": 0x8005_0033, "cr3": 0x1AD000, "cr4": 0x6F0, "efer": 0xD01, **extra}


def chunk(chunk_id: int, data: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<II8x", chunk_id, len(data) if length is None else length) + data


def envelope(stream: bytes, *, header_size: int = 24, total: int | None = None) -> bytes:
    blob = bytearray(struct.pack("<QQQ", 24, header_size, 0)) + bytes(header_size + 16 - 24) + stream
    struct.pack_into("<Q", blob, 16, len(blob) if total is None else total)
    return bytes(blob)


def chunk_stream(blob: bytes) -> list[tuple[int, int, int]]:
    """(offset, id, DataLength) of every chunk up to the Epilog."""
    header_size = struct.unpack_from("<Q", blob, 8)[0]
    pos, out = header_size + 16, []
    while pos + 16 <= len(blob):
        cid, length = struct.unpack_from("<II", blob, pos)
        out.append((pos, cid, length))
        if cid == ChunkId.EPILOG:
            break
        pos += 16 + length
    return out


def parse(blob: bytes | memoryview, **kw: object) -> tuple[PartitionState, Findings]:
    findings = Findings(strict=bool(kw.pop("strict", False)))
    state = parse_partition_state(blob, path="ps.bin", findings=findings, **kw)  # type: ignore[arg-type]
    return state, findings


def kinds(findings: Findings) -> list[str]:
    return [f.kind for f in findings]


def two_vp_state() -> PartitionState:
    return PartitionState(
        processor_vendor=PrologVendor.INTEL,
        guest_os_ids={0: WINDOWS_10_OS_ID},
        partition_vtls=[0, 1],
        bsp_index=0,
        vps=[
            VpState(0, vtl_runnable=True, registers={0: x64_registers(1), 1: x64_registers(2)}),
            VpState(1, vtl_runnable=False, registers={0: x64_registers(3), 1: x64_registers(4)}),
        ],
    )


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


def test_round_trip_one_vp_every_register_group() -> None:
    state = PartitionState(
        processor_vendor=PrologVendor.AMD,
        guest_os_ids={0: LINUX_OS_ID},
        partition_vtls=[0],
        bsp_index=0,
        vps=[VpState(0, registers={0: x64_registers(7)})],
        partition_msrs={"hypercall": 0x1001, "referencetsc": 0x2001},
    )
    blob = build_partition_state(state)
    parsed, findings = parse(blob)
    assert list(findings) == []
    assert parsed.processor_vendor == PrologVendor.AMD
    assert parsed.vendor is ProcessorVendor.AMD
    assert parsed.guest_os_id == LINUX_OS_ID
    assert parsed.partition_vtls == [0]
    assert parsed.bsp_index == 0
    assert parsed.present_vp_indices == [0]
    assert parsed.partition_msrs == {"hypercall": 0x1001, "referencetsc": 0x2001}
    assert parsed.vp_count == 1
    vp = parsed.vps[0]
    assert vp.vtl_runnable is None  # one VTL: no VTL control page
    assert vp.registers == state.vps[0].registers
    assert set(vp.registers[0]) == set(X64_REGISTER_NAMES)
    assert build_partition_state(parsed) == blob


def test_round_trip_two_vps_two_vtls_and_active_vtl() -> None:
    state = two_vp_state()
    blob = build_partition_state(state)
    parsed, findings = parse(blob)
    assert kinds(findings) == ["vtl-not-recorded"]
    (finding,) = findings
    assert "VPs 0, 1 hold VTLs 0, 1" in finding.message and "VTL 0 is used" in finding.message
    assert finding.offset == 40
    assert [vp.index for vp in parsed.vps] == [0, 1]
    assert parsed.partition_vtls == [0, 1]
    assert parsed.enabled_vtls_bitmap() == 0b11
    for want, got in zip(state.vps, parsed.vps, strict=True):
        assert got.registers == want.registers
        assert got.vtl_runnable is want.vtl_runnable
        assert got.enabled_vtls_bitmap() == 0b11
    # VtlIsRunnable (set on VP 0, clear on VP 1) does not say which VTL ran: VTL0 is used on both.
    assert parsed.vps[0].active_vtl() == 0 and parsed.vps[1].active_vtl() == 0
    assert parsed.vps[0].active_registers() == state.vps[0].registers[0]
    assert parsed.get_vp(1) is parsed.vps[1]
    with pytest.raises(NotFoundError):
        parsed.get_vp(5)
    assert build_partition_state(parsed) == blob


def test_writer_chunk_order_and_sizes() -> None:
    blob = build_partition_state(two_vp_state())
    assert struct.unpack_from("<QQQ", blob) == (24, 24, len(blob))
    stream = chunk_stream(blob)
    assert stream[0][0] == 40
    ids = [cid for _, cid, _ in stream]
    per_vtl = [  # openvmm's order; the virtual-MSR chunk (not written by openvmm) last
        ChunkId.VP_VTL,
        ChunkId.GP_REGISTERS,
        ChunkId.CONTROL_REGISTERS,
        ChunkId.SEGMENT_REGISTERS,
        ChunkId.TABLE_REGISTERS,
        ChunkId.DEBUG_REGISTERS,
        ChunkId.FP_REGISTERS,
        ChunkId.XSAVE_CONTROL,
        ChunkId.VIRTUAL_MSRS,
    ]
    per_vp = [ChunkId.VP, ChunkId.VP_VTL_CONTROL_PAGE, *per_vtl, *per_vtl]
    assert ids == [
        ChunkId.PROLOG,
        ChunkId.OS_ID,
        ChunkId.PARTITION_VTL,
        ChunkId.PARTITION_VTL,
        ChunkId.VP_INDICES,
        *per_vp,
        *per_vp,
        ChunkId.EPILOG,
    ]
    sizes = {cid: length for _, cid, length in stream}
    assert sizes[ChunkId.PROLOG] == 4064
    assert sizes[ChunkId.GP_REGISTERS] == 144
    assert sizes[ChunkId.FP_REGISTERS] == 416
    assert sizes[ChunkId.CONTROL_REGISTERS] == 48
    assert sizes[ChunkId.DEBUG_REGISTERS] == 48
    assert sizes[ChunkId.SEGMENT_REGISTERS] == 144
    assert sizes[ChunkId.TABLE_REGISTERS] == 32
    assert sizes[ChunkId.VIRTUAL_MSRS] == 96
    assert sizes[ChunkId.XSAVE_CONTROL] == 64
    assert sizes[ChunkId.VP_VTL_CONTROL_PAGE] == 32
    assert sizes[ChunkId.EPILOG] == 0
    assert sizes[ChunkId.VP_INDICES] == 12  # u32 BSP + 8-byte bitmap: later chunks are not 16-aligned
    assert {sizes[c] for c in (ChunkId.OS_ID, ChunkId.PARTITION_VTL, ChunkId.VP, ChunkId.VP_VTL)} == {16}
    vp_indices_at = next(pos for pos, cid, _ in stream if cid == ChunkId.VP_INDICES)
    assert all(pos % 16 == 4 for pos, _, _ in stream if pos > vp_indices_at)
    assert stream[-1][0] + 16 == len(blob)


def test_field_placement_matches_spec() -> None:
    """Spot-check byte offsets the spec states (CR3 at +0x20, CPL after 8 segments, table layout)."""
    regs = {
        "cr3": 0x1122334455667788,
        "cs": SegmentRegister(0xAAAA, 0xBBBB, 0x10, 0xA09B),
        "cpl": 3,
        "gdtr": TableRegister(0x7F, 0xFFFF_FE00_0000_1000),
        "xmm1": 0x0102030405060708_1112131415161718,
    }
    blob = build_partition_state(PartitionState(vps=[VpState(0, registers={0: regs})]))
    where = {cid: off + 16 for off, cid, _ in chunk_stream(blob)}
    # "CR3 is at chunk+0x20": counted from the chunk header, i.e. data +0x10
    assert struct.unpack_from("<Q", blob, where[ChunkId.CONTROL_REGISTERS] - 16 + 0x20)[0] == regs["cr3"]
    seg = where[ChunkId.SEGMENT_REGISTERS]
    assert struct.unpack_from("<QIHH", blob, seg + 16) == (0xAAAA, 0xBBBB, 0x10, 0xA09B)  # CS is second
    assert blob[seg + 128] == 3
    table = where[ChunkId.TABLE_REGISTERS]
    assert struct.unpack_from("<HQ", blob, table + 16 + 6) == (0x7F, 0xFFFF_FE00_0000_1000)  # GDTR second
    fp = where[ChunkId.FP_REGISTERS]
    assert blob[fp + 16 : fp + 32] == regs["xmm1"].to_bytes(16, "little")


def test_missing_registers_written_as_zero_and_vmsr_chunk_optional() -> None:
    blob = build_partition_state(PartitionState(vps=[VpState(0, registers={0: {"rip": 0x1234}})]))
    ids = [cid for _, cid, _ in chunk_stream(blob)]
    assert ChunkId.VIRTUAL_MSRS not in ids
    parsed, _ = parse(blob)
    regs = parsed.vps[0].registers[0]
    assert regs["rip"] == 0x1234
    assert regs["rax"] == 0
    assert regs["cs"] == SegmentRegister(0, 0, 0, 0)
    assert "lstar" not in regs


def test_round_trip_arm64() -> None:
    state = PartitionState(
        processor_vendor=PrologVendor.ARM,
        guest_os_ids={0: 0},
        partition_vtls=[0],
        bsp_index=0,
        vps=[VpState(0, registers={0: arm64_registers(5)}), VpState(1, registers={0: arm64_registers(6)})],
    )
    blob = build_partition_state(state)
    sizes = {cid: length for _, cid, length in chunk_stream(blob)}
    assert sizes[ChunkId.GP_REGISTERS] == 336
    assert sizes[ChunkId.FP_REGISTERS] == 528
    assert sizes[ChunkId.CONTROL_REGISTERS] == 128
    assert sizes[ChunkId.TABLE_REGISTERS] == 32
    assert ChunkId.SEGMENT_REGISTERS not in sizes
    parsed, findings = parse(blob)
    assert list(findings) == []
    assert parsed.is_arm and parsed.vendor is ProcessorVendor.ARM
    assert [vp.registers for vp in parsed.vps] == [vp.registers for vp in state.vps]
    regs = parsed.vps[0].registers[0]
    assert architecture(regs, parsed.processor_vendor) is Architecture.ARMV8
    assert paging_mode(regs, parsed.processor_vendor) is PagingMode.ARMV8


def test_writer_rejects_what_it_cannot_place() -> None:
    with pytest.raises(ValueError, match="no slot"):
        build_partition_state(PartitionState(vps=[VpState(0, registers={0: {"pc": 1}})]))
    with pytest.raises(ValueError, match="no slot"):
        build_partition_state(
            PartitionState(processor_vendor=PrologVendor.ARM, vps=[VpState(0, registers={0: {"rax": 1}})])
        )
    with pytest.raises(ValueError, match="64 bits"):
        build_partition_state(PartitionState(vps=[VpState(0, registers={0: {"rax": 1 << 64}})]))
    with pytest.raises(ValueError, match="SegmentRegister"):
        build_partition_state(PartitionState(vps=[VpState(0, registers={0: {"cs": 0x10}})]))
    with pytest.raises(ValueError, match="16 bits"):
        bad_cs = SegmentRegister(0, 0, 1 << 16, 0)
        build_partition_state(PartitionState(vps=[VpState(0, registers={0: {"cs": bad_cs}})]))
    with pytest.raises(ValueError, match="processor_vendor"):
        build_partition_state(PartitionState(processor_vendor=None))
    with pytest.raises(ValueError, match="cannot write"):
        build_partition_state(PartitionState(partition_vtls=[256]))
    with pytest.raises(ValueError, match="cannot write"):
        build_partition_state(PartitionState(guest_os_ids={0: 1 << 64}))


def test_parses_memoryview_and_applies_base_offset() -> None:
    blob = build_partition_state(two_vp_state())
    parsed, _ = parse(memoryview(blob))
    assert parsed.vp_count == 2
    bad = bytearray(blob)
    gp_offset = next(off for off, cid, _ in chunk_stream(blob) if cid == ChunkId.GP_REGISTERS)
    struct.pack_into("<I", bad, gp_offset + 4, 0x7FFF_0000)
    with pytest.raises(TruncatedError) as exc:
        parse(bytes(bad), base_offset=0x10000)
    assert exc.value.offset == 0x10000 + gp_offset
    assert exc.value.path == "ps.bin"


# ---------------------------------------------------------------------------------------------
# architecture / paging derivation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("regs", "vendor", "arch", "mode", "levels"),
    [
        ({"cr0": 0x10, "cr4": 0, "efer": 0}, PrologVendor.INTEL, Architecture.X86, PagingMode.NON_PAGED, 0),
        ({"cr0": 0x8000_0011, "cr4": 0x10, "efer": 0}, PrologVendor.INTEL, Architecture.X86, PagingMode.BIT32, 2),
        ({"cr0": 0x8000_0011, "cr4": 0x30, "efer": 0x800}, PrologVendor.AMD, Architecture.X86, PagingMode.PAE, 3),
        (long_mode(), PrologVendor.AMD, Architecture.X64, PagingMode.LONG, 4),
        (long_mode(cr4=0x6F0 | 1 << 12), PrologVendor.HYGON, Architecture.X64, PagingMode.LONG, 5),
        ({}, PrologVendor.INTEL, Architecture.UNKNOWN, PagingMode.INVALID, 0),
    ],
    ids=["nonpaged", "32bit", "pae", "long", "la57", "no-registers"],
)
def test_architecture_and_paging(regs: dict, vendor: int, arch: Architecture, mode: PagingMode, levels: int) -> None:
    assert architecture(regs, vendor) is arch
    assert paging_mode(regs, vendor) is mode
    assert paging_levels(regs, vendor) == levels
    assert is_la57(regs) == (levels == 5)


def test_arm_vendor_means_armv8_whatever_the_registers() -> None:
    from volatility3_vmssd.errors import UnsupportedError

    assert architecture(long_mode(), 0x10) is Architecture.ARMV8
    assert paging_mode({}, 0x10) is PagingMode.ARMV8
    with pytest.raises(UnsupportedError):
        paging_levels({}, 0x10)


def test_la57_bit_outside_long_mode_is_not_five_level() -> None:
    regs = {"cr0": 0x8000_0011, "cr4": 0x30 | 1 << 12, "efer": 0}
    assert is_la57(regs)
    assert paging_levels(regs, 1) == 3


def test_vendor_mapping() -> None:
    assert [sdk_vendor(v) for v in (0, 1, 2, 0x10, 7, None)] == [
        ProcessorVendor.AMD,
        ProcessorVendor.INTEL,
        ProcessorVendor.HYGON,
        ProcessorVendor.ARM,
        ProcessorVendor.UNKNOWN,
        ProcessorVendor.UNKNOWN,
    ]
    assert [int(m) for m in PagingMode] == [0, 1, 2, 3, 4, 5]
    assert [int(a) for a in Architecture] == [0, 1, 2, 3]


def test_active_vtl_rule() -> None:
    """VTL0 when it has registers, else the lowest VTL with registers; VtlIsRunnable plays no part."""
    assert active_vtl_rule([0]) == 0
    assert active_vtl_rule([1]) == 1
    assert active_vtl_rule([]) == 0
    assert active_vtl_rule([0, 1]) == 0
    assert active_vtl_rule([0, 2]) == 0
    assert active_vtl_rule([1, 2]) == 1
    assert active_vtl_rule([2]) == 2
    for runnable in (None, False, True):
        vp = VpState(0, vtl_runnable=runnable, registers={0: {"rax": 1}, 1: {"rax": 2}})
        assert vp.active_vtl() == 0 and vp.active_registers() == {"rax": 1}
    # A VTL marker without registers is never chosen, even when VTL0 has none either.
    empty_vtl0 = VpState(0, registers={0: {}, 2: {"rax": 5}})
    assert empty_vtl0.saved_vtls() == [0, 2] and empty_vtl0.register_vtls() == [2]
    assert empty_vtl0.active_vtl() == 2 and empty_vtl0.active_registers() == {"rax": 5}
    assert VpState(0, registers={0: {"rax": 1}, 1: {}}).active_vtl() == 0
    assert VpState(0).enabled_vtls_bitmap() == 1


# ---------------------------------------------------------------------------------------------
# registers model
# ---------------------------------------------------------------------------------------------


def test_segment_attribute_bits() -> None:
    cs = SegmentRegister(base=0, limit=0xFFFF_FFFF, selector=0x10, attributes=0xA09B)
    assert (cs.type, cs.s, cs.dpl, cs.present) == (0xB, True, 0, True)
    assert (cs.avl, cs.long, cs.default, cs.granularity) == (False, True, False, True)
    user = SegmentRegister(0, 0xFFFF_FFFF, 0x2B, 0xC0F3)
    assert (user.dpl, user.default, user.long, user.granularity) == (3, True, False, True)
    tss = SegmentRegister(0, 0x67, 0x40, 0x108B)
    assert (tss.s, tss.type, tss.avl) == (False, 0xB, True)


def test_register_ids() -> None:
    expected = {
        "rax": 0, "rcx": 1, "rflags": 17, "xmm0": 18, "xmm15": 33, "fpmmx0": 34, "fpmmx7": 41,
        "fpcontrolstatus": 42, "xmmcontrolstatus": 43, "cr0": 44, "cr3": 46, "efer": 49, "dr0": 50,
        "dr7": 55, "es": 56, "cs": 57, "tr": 63, "idtr": 64, "gdtr": 65, "x0": 67, "x28": 95, "fp": 96,
        "lr": 97, "pc": 98, "sp_el0": 99, "sp_el1": 100, "cpsr": 101, "q0": 102, "q31": 133, "fpsr": 134,
        "fpcr": 135, "esr_el1": 136, "ttbr0_el1": 141, "ttbr1_el1": 142, "tcr_el1": 146, "cntv_ctl_el0": 157,
    }  # fmt: skip
    for name, rid in expected.items():
        assert REGISTER_IDS[name] == rid, name
    assert len(REGISTER_NAMES_BY_ID) == len(REGISTER_IDS)  # ids are unique
    assert set(REGISTER_IDS.values()) == set(range(66)) | set(range(67, 158))
    assert {n for n in X64_REGISTER_NAMES if n not in REGISTER_IDS} == {
        "cpl", "xcr0", "tsc", "kernelgsbase", "apicbase", "star", "lstar", "cstar", "sfmask",
    }  # fmt: skip
    assert all(n in REGISTER_IDS for n in ARM64_REGISTER_NAMES if not n.endswith("_el2") and "afsr" not in n)


def test_fp_control_status_helpers() -> None:
    fcs = FpControlStatus(fcw=0x37F, fsw=0x1234, ftw=0xAB, last_op=0x5CD, last_ip=0xFFFF_8000_1234_5678)
    assert FpControlStatus.from_int(fcs.to_int()) == fcs
    assert fcs.to_int().to_bytes(16, "little")[:8] == bytes.fromhex("7f033412ab00cd05")
    xcs = XmmControlStatus(last_dp=0x1122, mxcsr=0x1F80, mxcsr_mask=0xFFFF)
    assert XmmControlStatus.from_int(xcs.to_int()) == xcs
    assert xcs.to_int().to_bytes(16, "little")[8:12] == (0x1F80).to_bytes(4, "little")


# ---------------------------------------------------------------------------------------------
# guest OS id
# ---------------------------------------------------------------------------------------------


def test_guest_os_id_closed_source() -> None:
    info = decode_guest_os_id(WINDOWS_10_OS_ID)
    assert not info.is_open_source
    assert info.vendor_id == GuestOsVendor.MICROSOFT
    assert info.os_id == GuestOsMicrosoftId.WINDOWS_NT
    assert (info.major, info.minor, info.service_version, info.build_number) == (10, 0, 0, 19041)
    assert info.version is None
    assert info.description == "Microsoft Windows NT 10.0 build 19041 (service version 0)"
    assert (
        encode_guest_os_id(vendor_id=1, os_id=4, major=10, minor=0, service_version=0, build_number=19041)
        == WINDOWS_10_OS_ID
    )
    hpe = decode_guest_os_id(encode_guest_os_id(vendor_id=GuestOsVendor.HPE, os_id=9, major=1))
    assert hpe.vendor_name == "HPE" and hpe.os_name == "OS 0x9"
    lancom = decode_guest_os_id(encode_guest_os_id(vendor_id=0x200, os_id=1))
    assert lancom.vendor_name == "LANCOM"


def test_guest_os_id_open_source() -> None:
    info = decode_guest_os_id(LINUX_OS_ID)
    assert info.is_open_source
    assert info.os_id == GuestOsOpenSourceId.LINUX
    assert info.version == 0x0601C0
    assert (info.vendor_specific1, info.vendor_specific2) == (0, 0)
    assert info.vendor_id is None and info.build_number is None
    assert info.description == "Linux (open source) version 0x601c0 (kernel 6.1.192)"
    assert encode_guest_os_id(open_source=True, os_id=1, version=0x0601C0) == LINUX_OS_ID
    bsd = decode_guest_os_id(encode_guest_os_id(open_source=True, os_id=2, version=14, vendor_specific2=3))
    assert bsd.os_name == "FreeBSD" and "vendor-specific 0x0/0x3" in bsd.description
    assert decode_guest_os_id(0).description.startswith("none")
    with pytest.raises(ValueError):
        encode_guest_os_id(open_source=True, os_id=1, major=1)
    with pytest.raises(ValueError):
        encode_guest_os_id(os_id=1, version=1)
    with pytest.raises(ValueError):
        encode_guest_os_id(open_source=True, os_id=0x80)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_guest_os_id_decode_encode_round_trip(value: int) -> None:
    info = decode_guest_os_id(value)
    if info.is_open_source:
        again = encode_guest_os_id(
            open_source=True,
            os_id=info.os_id,
            version=info.version or 0,
            vendor_specific1=info.vendor_specific1 or 0,
            vendor_specific2=info.vendor_specific2 or 0,
        )
    else:
        again = encode_guest_os_id(
            os_id=info.os_id,
            vendor_id=info.vendor_id or 0,
            major=info.major or 0,
            minor=info.minor or 0,
            service_version=info.service_version or 0,
            build_number=info.build_number or 0,
        )
    assert again == value
    assert isinstance(info.description, str)


# ---------------------------------------------------------------------------------------------
# tolerance: unknown and short chunks, odd streams
# ---------------------------------------------------------------------------------------------


def test_unknown_chunks_skipped_and_reported_once_per_id() -> None:
    state = two_vp_state()
    blob = build_partition_state(state)
    extra = chunk(0x12345678, bytes(32)) * 3 + chunk(0x7777, bytes(16)) + chunk(ChunkId.PROCESSOR_CPUID, bytes(48))
    # put them mid-stream: right after the first VP's GP chunk, so framing must hold
    gp = next(off for off, cid, _ in chunk_stream(blob) if cid == ChunkId.GP_REGISTERS) + 16 + 144
    mutated = bytearray(blob[:gp] + extra + blob[gp:])
    struct.pack_into("<Q", mutated, 16, len(mutated))
    parsed, findings = parse(bytes(mutated))
    unknown = [f for f in findings if f.kind == "unknown-chunk"]
    assert len(unknown) == 2
    assert [f for f in findings if f.kind != "vtl-not-recorded"] == unknown  # CPUID is known: skipped silently
    assert "0x12345678" in unknown[0].message and "3 occurrences" in unknown[0].message
    assert unknown[0].offset == gp
    assert unknown[1].offset == gp + 3 * 48
    assert [vp.registers for vp in parsed.vps] == [vp.registers for vp in state.vps]
    assert parsed.chunk_counts[0x12345678] == 3


def test_longer_known_chunk_is_accepted() -> None:
    regs = {"rip": 0x42}
    body = bytearray(144 + 32)
    struct.pack_into("<Q", body, 16 * 8, 0x42)
    blob = envelope(chunk(ChunkId.VP, bytes(16)) + chunk(ChunkId.GP_REGISTERS, bytes(body)) + chunk(ChunkId.EPILOG))
    parsed, findings = parse(blob)
    assert parsed.vps[0].registers[0]["rip"] == regs["rip"]
    assert kinds(findings) == ["no-prolog"]


def test_short_known_chunk_is_a_finding_not_fatal() -> None:
    stream = (
        chunk(ChunkId.VP, bytes(16))
        + chunk(ChunkId.GP_REGISTERS, bytes(64))  # 144 needed
        + chunk(ChunkId.GP_REGISTERS, bytes(16))
        + chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", 1, 2, 3, 4, 5, 6))
        + chunk(ChunkId.EPILOG)
    )
    parsed, findings = parse(envelope(stream))
    short = [f for f in findings if f.kind == "short-chunk"]
    assert len(short) == 1 and "2 occurrences" in short[0].message
    assert parsed.vps[0].registers[0]["cr3"] == 3
    assert "rax" not in parsed.vps[0].registers[0]
    with pytest.raises(FormatError):
        parse(envelope(stream), strict=True)


def test_register_chunks_before_vtl_marker_belong_to_vtl0() -> None:
    stream = (
        chunk(ChunkId.PROLOG, struct.pack("<IB3xI", 0x50546475, 0, 1))
        + chunk(ChunkId.VP, struct.pack("<I12x", 3))
        + chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", 1, 2, 3, 4, 5, 6))
        + chunk(ChunkId.VP_VTL, bytes([1]) + bytes(15))
        + chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", 7, 8, 9, 10, 11, 12))
        + chunk(ChunkId.VP, struct.pack("<I12x", 4))
        + chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", 13, 14, 15, 16, 17, 18))
        + chunk(ChunkId.EPILOG)
    )
    parsed, findings = parse(envelope(stream))
    assert kinds(findings) == ["vtl-not-recorded"]
    assert "VP 3 holds VTLs 0, 1" in findings[0].message
    assert [vp.index for vp in parsed.vps] == [3, 4]
    assert parsed.vps[0].registers[0]["cr3"] == 3
    assert parsed.vps[0].registers[1]["cr3"] == 9
    assert parsed.vps[1].registers == {0: {"cr0": 13, "cr2": 14, "cr3": 15, "cr4": 16, "cr8": 17, "efer": 18}}


def test_register_chunks_before_any_vp_marker_become_vp0() -> None:
    stream = (
        chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", 1, 2, 3, 4, 5, 6))
        + chunk(ChunkId.VP, bytes(16))  # VP 0's own marker arrives late: same VP, no duplicate finding
        + chunk(ChunkId.DEBUG_REGISTERS, bytes(48))
        + chunk(ChunkId.EPILOG)
    )
    parsed, findings = parse(envelope(stream))
    assert kinds(findings) == ["orphan-chunk", "no-prolog"]
    assert parsed.vp_count == 1
    assert parsed.vps[0].registers[0]["cr3"] == 3 and parsed.vps[0].registers[0]["dr7"] == 0


def test_no_vp_markers_gives_zero_vps_with_a_finding() -> None:
    stream = chunk(ChunkId.PROLOG, struct.pack("<IB3xI", 0x50546475, 0, 1)) + chunk(ChunkId.EPILOG)
    parsed, findings = parse(envelope(stream))
    assert parsed.vps == []
    assert kinds(findings) == ["no-vps"]
    with pytest.raises(FormatError):
        parse(envelope(stream), strict=True)


def test_duplicate_vp_markers_merge_with_one_finding() -> None:
    marker = chunk(ChunkId.VP, struct.pack("<I12x", 2))
    stream = b"".join(
        marker + chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", i, 0, 0, 0, 0, 0)) for i in range(4)
    ) + chunk(ChunkId.EPILOG)
    parsed, findings = parse(envelope(stream))
    assert [f.kind for f in findings if f.kind == "duplicate-vp"] == ["duplicate-vp"]
    assert parsed.vp_count == 1 and parsed.vps[0].registers[0]["cr0"] == 3


def test_prolog_oddities_and_vp_indices_mismatch() -> None:
    stream = (
        chunk(ChunkId.PROLOG, struct.pack("<IB3xI", 0xDEADBEEF, 1, 7))
        + chunk(ChunkId.VP_INDICES, struct.pack("<I", 0) + bytes([0b101]) + bytes(11))
        + chunk(ChunkId.VP, bytes(16))
        + chunk(ChunkId.EPILOG)
    )
    parsed, findings = parse(envelope(stream))
    assert parsed.is_summary_save_state
    assert parsed.processor_vendor == 7 and parsed.vendor is ProcessorVendor.UNKNOWN
    assert parsed.present_vp_indices == [0, 2]
    assert sorted(kinds(findings)) == ["prolog-tag", "unknown-vendor", "vp-indices"]


# ---------------------------------------------------------------------------------------------
# hostile blobs
# ---------------------------------------------------------------------------------------------


def test_empty_and_tiny_blobs() -> None:
    for blob in (b"", bytes(8), bytes(23)):
        with pytest.raises(TruncatedError):
            parse(blob)


def test_zero_length_everything() -> None:
    with pytest.raises(FormatError, match="TotalSize"):
        parse(bytes(64))  # HeaderSize 0 -> stream at 16, TotalSize 0 ends before it
    parsed, findings = parse(envelope(b""))
    assert parsed.vps == [] and parsed.processor_vendor is None
    assert kinds(findings) == ["no-epilog", "no-prolog", "no-vps"]
    # a long run of all-zero chunk headers is a run of empty Prologs: one finding, not thousands
    parsed, findings = parse(envelope(bytes(16 * 5000)))
    assert kinds(findings) == ["short-chunk", "no-epilog", "no-prolog", "no-vps"]
    assert "5000 occurrences" in findings[0].message


def test_header_size_past_the_blob() -> None:
    blob = bytearray(build_partition_state(two_vp_state()))
    struct.pack_into("<Q", blob, 8, len(blob))
    with pytest.raises(FormatError, match="HeaderSize") as exc:
        parse(bytes(blob), base_offset=0x100)
    assert exc.value.offset == 0x108
    struct.pack_into("<Q", blob, 8, (1 << 64) - 1)
    with pytest.raises(FormatError, match="HeaderSize"):
        parse(bytes(blob))


def test_absurd_total_size_is_clamped_with_a_finding() -> None:
    blob = bytearray(build_partition_state(two_vp_state()))
    struct.pack_into("<Q", blob, 16, (1 << 64) - 1)
    parsed, findings = parse(bytes(blob))
    assert kinds(findings) == ["truncated", "vtl-not-recorded"]
    assert parsed.vp_count == 2
    with pytest.raises(TruncatedError):
        parse(bytes(blob), strict=True)


def test_total_size_shorter_than_a_chunk_is_fatal() -> None:
    blob = bytearray(build_partition_state(two_vp_state()))
    gp = next(off for off, cid, _ in chunk_stream(bytes(blob)) if cid == ChunkId.GP_REGISTERS)
    struct.pack_into("<Q", blob, 16, gp + 100)
    with pytest.raises(FormatError, match="TotalSize") as exc:
        parse(bytes(blob))
    assert exc.value.offset == gp and not isinstance(exc.value, TruncatedError)


def test_truncated_blob() -> None:
    blob = build_partition_state(two_vp_state())
    with pytest.raises(TruncatedError):
        parse(blob[: len(blob) // 2])  # TotalSize clamped, then a chunk runs off the end
    parsed, findings = parse(blob[:-16])  # cut exactly before the Epilog
    assert parsed.vp_count == 2
    assert kinds(findings) == ["truncated", "no-epilog", "vtl-not-recorded"]


def test_huge_vp_bitmap_is_bounded() -> None:
    stream = chunk(ChunkId.VP_INDICES, struct.pack("<I", 0) + b"\xff" * 4096) + chunk(ChunkId.VP, bytes(16))
    parsed, findings = parse(envelope(stream + chunk(ChunkId.EPILOG)))
    assert parsed.present_vp_indices is not None and len(parsed.present_vp_indices) == 8192
    assert "vp-indices" in kinds(findings)


_VALID_BLOB = build_partition_state(two_vp_state())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cut=st.integers(min_value=0, max_value=len(_VALID_BLOB)),
    edits=st.lists(
        st.tuples(st.integers(min_value=0, max_value=len(_VALID_BLOB) - 1), st.integers(0, 255)), max_size=12
    ),
    words=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(_VALID_BLOB) // 4 - 1),
            st.sampled_from([0, 1, 0xF, 0x10, 0x90, 0xFFFF_FFFF, 0x3000_1000, 0x3001_A000, 0xF000_0000]),
        ),
        max_size=4,
    ),
    strict=st.booleans(),
)
def test_mutated_blobs_only_raise_vmssd_errors(
    cut: int, edits: list[tuple[int, int]], words: list[tuple[int, int]], strict: bool
) -> None:
    blob = bytearray(_VALID_BLOB)
    for offset, value in edits:
        blob[offset] = value
    for index, value in words:  # aligned u32 rewrites hit ids, lengths and size fields far more often
        struct.pack_into("<I", blob, index * 4, value)
    try:
        state, _ = parse(bytes(blob[:cut]), strict=strict)
    except VmssdError:
        return
    assert isinstance(state, PartitionState)
    for vp in state.vps:
        vp.active_vtl()
        for regs in vp.registers.values():
            architecture(regs, state.processor_vendor)
            paging_mode(regs, state.processor_vendor)


# ---------------------------------------------------------------------------------------------
# real data: shared/data/linux-guest/registers.json
# ---------------------------------------------------------------------------------------------


@pytest.mark.shared
def test_real_linux_guest_registers_load_and_round_trip() -> None:
    if not REGISTERS_JSON.exists():
        pytest.skip(f"needs {REGISTERS_JSON} (the shared real-data folder beside the repository)")
    doc = json.loads(REGISTERS_JSON.read_text())
    vps = registers_from_json(doc)
    assert len(vps) == doc["vp_count"] == 2
    vp0, vp1 = vps
    assert vp0["cr3"] == 0x2BD2000 and vp1["cr3"] == 0x2A56000
    assert vp0["rip"] == vp1["rip"] == 0xFFFFFFFFAAE592EB
    assert vp0["efer"] == 0xD01 and vp0["cr8"] == 1 and vp0["cpl"] == 0
    cs = vp0["cs"]
    assert isinstance(cs, SegmentRegister) and cs.long and cs.present and cs.selector == 0x10
    assert vp0["gs"] == SegmentRegister(base=0xFFFF8BDFCF600000, limit=0, selector=0, attributes=0)
    assert vp0["gdtr"] == TableRegister(limit=0x7F, base=0xFFFFFE0000001000)
    assert vp1["xmm2"] == 0x7461706C616572006B6E696C64616572
    assert FpControlStatus.from_int(vp0["fpcontrolstatus"]).fcw == 0x37F  # type: ignore[arg-type]
    assert XmmControlStatus.from_int(vp0["xmmcontrolstatus"]).mxcsr == 0x1F80  # type: ignore[arg-type]
    assert vp0["apicbase"] == 0xFEE00900 and vp1["apicbase"] == 0xFEE00800
    for regs in vps:
        assert architecture(regs, PrologVendor.AMD) is Architecture.X64
        assert paging_mode(regs, PrologVendor.AMD) is PagingMode.LONG
        assert paging_levels(regs, PrologVendor.AMD) == 4
    # the qemu64 CPU reports AMD; write it as a saved state and read it back unchanged
    state = PartitionState(
        processor_vendor=PrologVendor.AMD,
        guest_os_ids={0: 0},
        partition_vtls=[0],
        bsp_index=0,
        vps=[VpState(i, registers={0: regs}) for i, regs in enumerate(vps)],
    )
    parsed, findings = parse(build_partition_state(state))
    assert list(findings) == []
    for i, regs in enumerate(vps):
        got = parsed.vps[i].registers[0]
        assert {k: got[k] for k in regs} == regs
        assert got["xcr0"] == 0  # not in the JSON: written as 0


def test_registers_json_rejects_bad_input() -> None:
    with pytest.raises(FormatError, match="format"):
        registers_from_json({"format": "other", "vps": []})
    with pytest.raises(FormatError, match="not hex"):
        registers_from_json({"format": "hvtest-registers/1", "vps": [{"rip": "zz"}]})
    with pytest.raises(FormatError, match="list of 16"):
        registers_from_json({"format": "hvtest-registers/1", "vps": [{"fpu": {"xmm": []}}]})
    with pytest.raises(FormatError):
        registers_from_json([])
    doc = {"format": "hvtest-registers/1", "vps": [{"vp_index": 1}, {"vp_index": 0, "rip": 5}]}
    assert registers_from_json(doc) == [{"rip": 5}, {}]


# ---------------------------------------------------------------------------------------------
# guest OS id per VTL, markers without registers, 16-byte-aligned streams
# ---------------------------------------------------------------------------------------------


def test_os_id_chunks_are_kept_per_vtl_and_never_overwritten() -> None:
    """An OsId chunk belongs to the VTL of the PartitionVtl chunk before it (VTL0 before any)."""

    def os_id(value: int) -> bytes:
        return chunk(ChunkId.OS_ID, struct.pack("<Q8x", value))

    def vtl(n: int) -> bytes:
        return chunk(ChunkId.PARTITION_VTL, bytes([n]) + bytes(15))

    stream = (
        chunk(ChunkId.PROLOG, struct.pack("<IB3xI", 0x50546475, 0, 1))
        + os_id(WINDOWS_10_OS_ID)
        + vtl(0)
        + vtl(1)
        + os_id(LINUX_OS_ID)
        + os_id(0x1234)  # a second one for VTL1: reported, the first one kept
        + chunk(ChunkId.VP, bytes(16))
        + chunk(ChunkId.EPILOG)
    )
    parsed, findings = parse(envelope(stream))
    assert parsed.guest_os_ids == {0: WINDOWS_10_OS_ID, 1: LINUX_OS_ID}
    assert parsed.guest_os_id == WINDOWS_10_OS_ID and parsed.guest_os_info.value == WINDOWS_10_OS_ID  # type: ignore[union-attr]
    assert parsed.guest_os_info_for(1).value == LINUX_OS_ID  # type: ignore[union-attr]
    assert parsed.guest_os_info_for(2) is None
    (note,) = [f for f in findings if f.kind == "os-id"]
    assert "2 occurrences" in note.message and f"{LINUX_OS_ID:#018x}" in note.message
    rebuilt, again = parse(build_partition_state(parsed))
    assert rebuilt.guest_os_ids == parsed.guest_os_ids and [f.kind for f in again] == ["os-id"]


def test_writer_control_page_and_marker_only_banks() -> None:
    state = PartitionState(
        processor_vendor=PrologVendor.INTEL,
        vps=[VpState(0, registers={0: x64_registers(1), 2: {}}), VpState(5, registers={0: x64_registers(2)})],
    )
    blob = build_partition_state(state)
    stream = chunk_stream(blob)
    ids = [cid for _, cid, _ in stream]
    assert ids[:6] == [
        ChunkId.PROLOG,
        ChunkId.OS_ID,
        ChunkId.PARTITION_VTL,
        ChunkId.PARTITION_VTL,
        ChunkId.VP_INDICES,
        ChunkId.VP,
    ]
    assert ids[6] == ChunkId.VP_VTL_CONTROL_PAGE and ids.count(ChunkId.VP_VTL_CONTROL_PAGE) == 1
    control_at = stream[6][0] + 16
    assert blob[control_at + 24] == 1  # VtlIsRunnable as openvmm writes it when the state does not say
    vp2 = ids.index(ChunkId.VP, 6)
    assert ids[vp2 - 1] == ChunkId.VP_VTL  # VTL2's marker, and nothing after it for VP 0
    parsed, findings = parse(blob)
    assert parsed.vps[0].registers[2] == {} and parsed.vps[0].vtl_runnable is True
    assert parsed.vps[0].saved_vtls() == [0, 2] and parsed.vps[0].register_vtls() == [0]
    assert parsed.present_vp_indices == [0, 5] and parsed.partition_vtls == [0, 2]
    assert [f.kind for f in findings] == ["vtl-not-recorded"]


def test_reader_accepts_16_byte_aligned_streams() -> None:
    """Older writers padded every chunk to 16 bytes (VpIndices of 16): still read, nothing reported."""
    stream = (
        chunk(ChunkId.PROLOG, struct.pack("<IB3xI", 0x50546475, 0, 1).ljust(4064, b"\0"))
        + chunk(ChunkId.OS_ID, struct.pack("<Q8x", LINUX_OS_ID))
        + chunk(ChunkId.PARTITION_VTL, bytes(16))
        + chunk(ChunkId.VP_INDICES, struct.pack("<I", 0) + bytes([1]) + bytes(11))
        + chunk(ChunkId.VP, bytes(16))
        + chunk(ChunkId.VP_VTL, bytes(16))
        + chunk(ChunkId.CONTROL_REGISTERS, struct.pack("<6Q", 1, 2, 3, 4, 5, 6))
        + chunk(ChunkId.EPILOG)
    )
    assert all(length % 16 == 0 for _, _, length in chunk_stream(envelope(stream)))
    parsed, findings = parse(envelope(stream))
    assert list(findings) == []
    assert parsed.present_vp_indices == [0] and parsed.vps[0].registers[0]["cr3"] == 3
