"""The raw / LiME / ELF core writers: bytes read back (by our reader and by Volatility's layers),
sparse output, register notes in the Linux layout, and the partial-file discipline."""

from __future__ import annotations

import io
import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volatility3_vmssd import outputs
from volatility3_vmssd.cli.progress import ProgressBar, human_duration, human_size
from volatility3_vmssd.cpu.registers import SegmentRegister
from volatility3_vmssd.errors import VmssdError
from volatility3_vmssd.images import elf, lime, raw
from volatility3_vmssd.images.memoryimage import MemoryImage

MIB = 1 << 20


_PERIOD = MIB - 17  # not a power of two: no two MiBs of the pattern are alike
_BASE = random.Random(6).randbytes(_PERIOD)


def pattern(gpa: int, size: int) -> bytes:
    """Deterministic pseudo-random content as a function of the GPA (never a zero MiB)."""
    start = gpa % _PERIOD
    reps = -(-(start + size) // _PERIOD)
    return (_BASE * reps)[start : start + size]


def reader(ranges: list[tuple[int, int]], zero: tuple[int, int] | None = None):  # type: ignore[no-untyped-def]
    """A padded read over ``ranges`` (pattern inside, zeros outside and inside ``zero``)."""

    def read(gpa: int, size: int) -> bytes:
        out = bytearray(size)
        for start, length in ranges:
            lo, hi = max(gpa, start), min(gpa + size, start + length)
            if lo < hi:
                out[lo - gpa : hi - gpa] = pattern(lo, hi - lo)
        if zero is not None:
            lo, hi = max(gpa, zero[0]), min(gpa + size, zero[1])
            if lo < hi:
                out[lo - gpa : hi - gpa] = bytes(hi - lo)
        return bytes(out)

    return read


RANGES = [(0, 0xA0000), (0x100000, 3 * MIB), (0x1_0000_0000, 2 * MIB)]
ZERO = (0x100000, 0x100000 + 2 * MIB)  # two all-zero MiB inside RAM: must be seeked, not written


def test_raw_is_flat_with_zero_holes_and_sparse(tmp_path: Path) -> None:
    out = tmp_path / "ram.raw"
    read = reader(RANGES, ZERO)
    with open(out, "wb") as fh:
        report = raw.write_raw(fh, RANGES, read, read_size=MIB + 4096)
    assert report.size == out.stat().st_size == 0x1_0000_0000 + 2 * MIB
    assert report.ram_bytes == 0xA0000 + 5 * MIB and report.ranges == 3
    assert report.stored <= 0xA0000 + 3 * MIB  # the zero MiBs and the 4 GiB hole were seeked over
    assert out.stat().st_blocks * 512 < 16 * MIB
    with open(out, "rb") as fh:
        for gpa in (0, 0x9F000, 0xA0000, 0xFF000, 0x100000, 0x2FF000, 0x300000, 0xFFFFF000, 0x1_0000_0000):
            fh.seek(gpa)
            assert fh.read(0x2000) == read(gpa, 0x2000), hex(gpa)


def test_trailing_zeros_still_count(tmp_path: Path) -> None:
    out = tmp_path / "z.raw"
    with open(out, "wb") as fh:
        report = raw.write_raw(fh, [(0, 4 * MIB)], lambda g, n: bytes(n))
    assert report.size == out.stat().st_size == 4 * MIB and report.stored == 0
    assert out.read_bytes() == bytes(4 * MIB)


def test_lime_reads_back_with_our_reader_and_volatility(tmp_path: Path) -> None:
    out = tmp_path / "ram.lime"
    read = reader(RANGES, ZERO)
    with open(out, "wb") as fh:
        report = lime.write_lime(fh, RANGES, read)
    assert report.size == out.stat().st_size == 3 * 32 + 0xA0000 + 5 * MIB
    head = out.read_bytes()[:32]
    assert struct.unpack("<IIQQ", head[:24]) == (0x4C694D45, 1, 0, 0x9FFFF) and head[24:] == bytes(8)
    with MemoryImage.open(out) as image:
        assert image.kind == "lime"
        assert [(r.gpa, r.length) for r in image.ranges] == RANGES
        assert image.read(0x1_0000_0000 + 5, 100) == read(0x1_0000_0000 + 5, 100)
    layer = volatility_layer(out, "lime")
    for gpa in (0x1000, 0x100000 + 2 * MIB, 0x1_0000_0000 + MIB):
        assert layer.read(gpa, 4096) == read(gpa, 4096)
    assert not layer.is_valid(0xA0000)


def test_elf_core_layout_notes_and_volatility(tmp_path: Path) -> None:
    out = tmp_path / "ram.elf"
    read = reader(RANGES, ZERO)
    regs = {
        "rip": 0xFFFFFFFF81000000,
        "rsp": 0xFFFFC90000003F00,
        "rflags": 0x246,
        "rax": 1,
        "r15": 15,
        "cs": SegmentRegister(0, 0xFFFFFFFF, 0x10, 0xA09B),
        "ss": SegmentRegister(0, 0xFFFFFFFF, 0x18, 0xC093),
        "gs": SegmentRegister(0xFFFF888007A00000, 0, 0, 0),
    }
    notes = elf.elf_note(b"CORE", elf.NT_PRSTATUS, elf.prstatus_x86_64(0, regs))
    with open(out, "wb") as fh:
        report = elf.write_elf(fh, RANGES, read, notes=notes)
    data = out.read_bytes()[:4096]
    ehdr = elf.ELF64_HEADER.unpack_from(data)
    assert ehdr[0][:5] == b"\x7fELF\x02" and ehdr[1] == elf.ET_CORE and ehdr[2] == elf.EM_X86_64 and ehdr[10] == 4
    phdrs = [elf.ELF64_PHDR.unpack_from(data, 64 + 56 * i) for i in range(4)]
    assert phdrs[0][0] == elf.PT_NOTE
    loads = [p for p in phdrs if p[0] == elf.PT_LOAD]
    assert [(p[3], p[4], p[5], p[6]) for p in loads] == [(g, g, n, n) for g, n in RANGES]  # vaddr = paddr = GPA
    assert all(p[2] % MIB == p[3] % MIB for p in loads)  # GPA MiBs are file MiBs: zero ones stay sparse
    assert report.size == out.stat().st_size == loads[-1][2] + loads[-1][5]
    with MemoryImage.open(out) as image:
        assert [(r.gpa, r.length) for r in image.ranges] == RANGES
        (note,) = image.notes
        assert note.name == b"CORE" and note.type == 1 and len(note.desc) == 336
        assert struct.unpack_from("<i", note.desc, 32)[0] == 1  # pr_pid = VP + 1
        user = dict(zip(elf.X86_64_USER_REGS, struct.unpack_from("<27Q", note.desc, 112), strict=True))
        assert user["rip"] == regs["rip"] and user["rsp"] == regs["rsp"] and user["eflags"] == 0x246
        assert user["cs"] == 0x10 and user["ss"] == 0x18 and user["gs_base"] == 0xFFFF888007A00000
        assert user["r15"] == 15 and user["rax"] == 1 and user["fs_base"] == 0
        assert image.read(0x2FF000, 0x2000) == read(0x2FF000, 0x2000)
    layer = volatility_layer(out, "elf")
    for gpa in (0, 0x9F000, 0x100000 + 2 * MIB, 0x1_0000_0000 + MIB):
        assert layer.read(gpa, 4096) == read(gpa, 4096)


def test_aarch64_prstatus_layout() -> None:
    regs = {f"x{i}": i + 1 for i in range(29)}
    regs.update(fp=0xF0, lr=0x1E, elr_el2=0xFFFF800010001234, spsr_el2=0x3C5, sp_el1=0x5B1, sp_el0=0x5B0)
    desc = elf.prstatus_aarch64(2, regs)
    assert len(desc) == 392 and struct.unpack_from("<i", desc, 32)[0] == 3
    values = struct.unpack_from("<34Q", desc, 112)
    assert values[:29] == tuple(range(1, 30)) and values[29:31] == (0xF0, 0x1E)
    assert values[31:] == (0x5B1, 0xFFFF800010001234, 0x3C5)  # EL1h -> SP_EL1; pc; pstate
    regs["spsr_el2"] = 0x3C4  # EL1t uses SP_EL0
    assert struct.unpack_from("<Q", elf.prstatus_aarch64(0, regs), 112 + 31 * 8)[0] == 0x5B0


def test_overlapping_ranges_are_refused() -> None:
    with pytest.raises(VmssdError, match="overlap"):
        raw.write_raw(io.BytesIO(), [(0, 2 * 4096), (4096, 4096)], lambda g, n: bytes(n))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 3 * MIB), st.integers(1, 3 * MIB)), min_size=1, max_size=4),
    st.integers(4096, 5 * MIB),
    st.booleans(),
)
def test_every_format_round_trips(
    tmp_path: Path, spans: list[tuple[int, int]], read_size: int, with_zeros: bool
) -> None:
    """Random byte-granular ranges, read sizes and zero stretches: each format reads back the same bytes."""
    ranges, pos = [], 0
    for gap, length in spans:
        pos += gap
        ranges.append((pos, length))
        pos += length
    read = reader(ranges, (ranges[0][0] + 100, ranges[0][0] + 100 + 2 * MIB) if with_zeros else None)
    for fmt, writer in (("raw", raw.write_raw), ("lime", lime.write_lime), ("elf", elf.write_elf)):
        out = tmp_path / f"x.{fmt}"
        with open(out, "wb") as fh:
            report = writer(fh, ranges, read, read_size=read_size)
        assert report.size == out.stat().st_size
        with MemoryImage.open(out, fmt) as image:
            assert [(r.gpa, r.length) for r in image.ranges] == ([(0, pos)] if fmt == "raw" else ranges)
            for gpa, length in ranges:
                assert image.read(gpa, length) == read(gpa, length)


def test_partial_output_renames_or_removes(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    with outputs.partial_output(out) as fh:
        fh.write(b"ok")
        assert len(list(tmp_path.glob("o.bin.*.partial"))) == 1 and not out.exists()
    assert out.read_bytes() == b"ok" and not list(tmp_path.glob("*.partial"))
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), outputs.partial_output(tmp_path / "p.bin") as fh:
            fh.write(b"half")
            raise exc
        assert os.listdir(tmp_path) == ["o.bin"]


def test_same_file(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"x")
    os.link(a, tmp_path / "hard")
    assert outputs.same_file(a, tmp_path / "hard") and outputs.same_file(a, tmp_path / "." / "a")
    assert not outputs.same_file(a, tmp_path / "b") and outputs.same_file(tmp_path / "b", tmp_path / "b")


def test_progress_bar_draws_only_when_asked() -> None:
    stream = io.StringIO()
    with ProgressBar(100 * MIB, label="convert raw", stream=stream, enabled=True, interval=0) as bar:
        bar.update(50 * MIB)
        assert "50%" in bar.line() and "50.0 MiB/100.0 MiB" in bar.line() and "ETA" in bar.line()
    text = stream.getvalue()
    assert text.startswith("\r") and "convert raw [" in text and text.endswith("\r\x1b[K")
    quiet = io.StringIO()  # a StringIO is not a terminal: nothing is drawn
    with ProgressBar(10, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    assert human_size(1536) == "1.5 KiB" and human_size(17 << 30) == "17.0 GiB" and human_size(5) == "5 B"
    assert human_duration(75) == "1:15" and human_duration(3700) == "1:01:40"


@pytest.fixture(autouse=True)
def _no_volatility_cache_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ELF layer validates a small symbol table; do not record that in the user's cache."""
    from volatility3 import schemas

    monkeypatch.setattr(schemas, "record_cached_validations", lambda validations: None)


def volatility_layer(path: Path, kind: str):  # type: ignore[no-untyped-def]
    """Volatility's own LimeLayer / Elf64Layer over ``path``: what `vol -f` would stack."""
    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, lime, physical

    ctx = contexts.Context()
    ctx.config["base.location"] = path.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["mem.base_layer"] = "base"
    cls = lime.LimeLayer if kind == "lime" else elf.Elf64Layer
    layer = cls(ctx, "mem", "mem")
    ctx.add_layer(layer)
    return layer
