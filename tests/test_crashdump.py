"""``vmssd convert --format dmp``: the Windows x64 crash dump read back by kdmp-parser and by Volatility's
crash-dump layer, its header layouts against Microsoft's (kernel symbol tables) and Volatility's, the
kernel symbols located in guest memory, and the missing-RAM and partial-file rules."""

from __future__ import annotations

import json
import lzma
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from shared_data import REPO, SHARED, need

from volatility3_vmssd import open_saved_state
from volatility3_vmssd.cpu.chunkwriter import build_partition_state
from volatility3_vmssd.cpu.cpustate import PartitionState, VpState
from volatility3_vmssd.cpu.registers import PrologVendor, SegmentRegister, TableRegister
from volatility3_vmssd.images import crashdump as cd
from volatility3_vmssd.images.export import provider_ranges
from volatility3_vmssd.images.lime import write_lime
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.images.winsymbols import self_referencing_tables
from volatility3_vmssd.memory.ramblock import BLOCK_SIZE, encode_block
from volatility3_vmssd.memory.rammap import RamMemoryBlockRecord
from volatility3_vmssd.storage.writer import HyperVStorageWriter
from volatility3_vmssd.vmrs.writer import write_vmrs

CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
MIB = 1 << 20
PAGE = 0x1000
SYMBOLS = SHARED / "data" / "windows-symbols"
ISF_DIR = SYMBOLS / "windows" / "ntkrnlmp.pdb"


def vmssd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, check=False)


# ------------------------------------------------------------------------------------------ test guests


def vp_registers(rng: random.Random, cr3: int, lstar: int = 0) -> dict[str, object]:
    """One VP's VTL0 bank in long mode, every value drawn from ``rng``."""
    regs: dict[str, object] = {n: rng.getrandbits(64) for n in cd._CONTEXT_INTEGERS[:-1]}
    regs |= {n.lower(): rng.getrandbits(64) for n in cd._CONTEXT_DEBUG}
    regs = {k.lower(): v for k, v in regs.items()}
    regs["rip"] = 0xFFFF_F800_0000_0000 | rng.getrandbits(39)
    regs["rflags"] = rng.getrandbits(22) | 2
    regs |= {f"xmm{i}": rng.getrandbits(128) for i in range(16)}
    regs |= {f"fpmmx{i}": rng.getrandbits(80) for i in range(8)}
    regs["fpcontrolstatus"] = rng.getrandbits(128)
    regs["xmmcontrolstatus"] = rng.getrandbits(64) | 0x1F80 << 64 | 0xFFFF << 96
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        regs[name] = SegmentRegister(
            rng.getrandbits(64) if name in "fsgs" else 0, 0xFFFFFFFF, rng.getrandbits(16), 0xA09B
        )
    regs |= {"cr0": 0x8005_0033, "cr3": cr3, "cr4": 0x0006_06F8, "efer": 0xD01, "lstar": lstar}
    regs["idtr"] = TableRegister(0xFFF, 0)
    return regs


def write_guest(path: Path, memory: dict[int, bytes], vps: list[dict[str, object]]) -> None:
    """A .vmrs whose RAM is ``memory`` (GPA -> bytes, whole pages) and whose VPs have these VTL0 banks."""
    ranges = sorted((gpa, len(data)) for gpa, data in memory.items())

    def read(gpa: int, size: int) -> bytes:
        for start, data in memory.items():
            if start <= gpa and gpa + size <= start + len(data):
                return data[gpa - start : gpa - start + size]
        raise AssertionError(f"read outside the guest at {gpa:#x}")

    lime = path.with_suffix(".lime")
    with open(lime, "wb") as fh:
        write_lime(fh, ranges, read)
    state = PartitionState(processor_vendor=PrologVendor.INTEL)
    state.vps = [VpState(index=i, registers={0: regs}) for i, regs in enumerate(vps)]  # type: ignore[misc]
    with MemoryImage.open(lime, "lime") as image:
        write_vmrs(path, image, state)
    lime.unlink()


def full_guest(tmp_path: Path, seed: int = 1) -> Path:
    """Three RAM ranges (a full dump), two VPs."""
    rng = random.Random(seed)
    memory = {0: rng.randbytes(0xA0000), MIB: rng.randbytes(3 * MIB), 0x1_0000_0000: rng.randbytes(MIB)}
    path = tmp_path / "full.vmrs"
    write_guest(path, memory, [vp_registers(rng, 0x5000), vp_registers(rng, 0x7000)])
    return path


def sparse_guest(tmp_path: Path, seed: int = 2) -> Path:
    """More RAM ranges than a full dump's header holds (a bitmap dump), three VPs."""
    rng = random.Random(seed)
    memory = {}
    for i in range(cd.MAX_RUNS + 8):
        memory[i * 0x40000 + rng.randrange(0, 0x20) * PAGE] = rng.randbytes(PAGE * rng.randrange(1, 16))
    path = tmp_path / "sparse.vmrs"
    write_guest(path, memory, [vp_registers(rng, 0x3000) for _ in range(3)])
    return path


# ------------------------------------------------------------------------------------------ checks


def kdmp(path: Path):  # type: ignore[no-untyped-def]
    kdmp_parser = pytest.importorskip("kdmp_parser")
    return kdmp_parser.KernelDumpParser(path)


def check_against_saved_state(dump_path: Path, vmrs: Path, dump_type: int) -> None:
    """kdmp-parser's view of the dump equals the saved state: header facts, VP 0's context, every page."""
    dump = kdmp(dump_path)
    with open_saved_state(vmrs) as p:
        regs = p.get_registers(0, 0)
        cr3 = regs["cr3"]
        assert isinstance(cr3, int)
        assert dump.directory_table_base == cr3 & cd.DTB_MASK
        assert dump.header.MachineImageType == cd.MACHINE_AMD64 == 0x8664
        assert dump.header.NumberProcessors == p.vp_count()
        assert int(dump.type) == dump_type
        ctx = dump.context
        for name in (*cd._CONTEXT_INTEGERS, *cd._CONTEXT_DEBUG):
            assert getattr(ctx, name) == regs[name.lower()], name
        for name in cd._CONTEXT_SEGMENTS:
            seg = regs[name[3:].lower()]
            assert isinstance(seg, SegmentRegister) and getattr(ctx, name) == seg.selector, name
        assert ctx.EFlags == regs["rflags"]
        xmmcs = regs["xmmcontrolstatus"]
        assert isinstance(xmmcs, int) and ctx.MxCsr == ctx.MxCsr2 == (xmmcs >> 64) & 0xFFFFFFFF
        for i in (0, 7, 15):
            xmm = getattr(ctx, f"Xmm{i}")
            assert xmm.Low | xmm.High << 64 == regs[f"xmm{i}"]
        page_size, chunks = p.get_guest_physical_memory_chunks()
        expected = {(c.guest_physical_start_page_index + i) * page_size for c in chunks for i in range(c.page_count)}
        served = set(dump.pages.keys())
        assert served == expected
        for gpa in sorted(served):
            assert dump.read_physical_page(gpa) == p.read_guest_physical_address(gpa, PAGE), hex(gpa)


def check_volatility_layer(dump_path: Path, vmrs: Path) -> None:
    """Volatility's own crash-dump layer maps exactly the saved RAM, byte for byte."""
    pytest.importorskip("volatility3")
    from volatility3.framework import contexts
    from volatility3.framework.layers import crash, physical

    ctx = contexts.Context()
    ctx.config["base.location"] = dump_path.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["dmp.base_layer"] = "base"
    layer = crash.WindowsCrashDump64Layer(ctx, "dmp", "dmp")
    with open_saved_state(vmrs) as p:
        assert layer.dtb == p.get_registers(0, 0)["cr3"]
        ranges = provider_ranges(p)
        mapped = sorted((m[0], m[1]) for m in layer.mapping(0, layer.maximum_address + 1, ignore_errors=True))
        merged: list[tuple[int, int]] = []
        for gpa, n in mapped:
            if merged and merged[-1][0] + merged[-1][1] == gpa:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((gpa, n))
        assert merged == [(page * PAGE, count * PAGE) for page, count in cd.page_runs(ranges)]
        for gpa, n in ranges:
            assert layer.read(gpa, n) == p.read_guest_physical_address(gpa, n)


# ------------------------------------------------------------------------------------------ layouts


def _isf(name: str) -> dict:
    path = need(ISF_DIR / f"{name}.json.xz")
    return json.loads(lzma.open(path).read())


@pytest.fixture(scope="module")
def kernel_isf() -> dict:
    return _isf("BBED7C2955FBE4522AAA23F4B8677AD9-1")


@pytest.mark.parametrize(
    ("layout", "isf_type"),
    [
        (cd.CONTEXT, "_CONTEXT"),
        (cd.XSAVE_FORMAT, "_XSAVE_FORMAT"),
        (cd.PHYSICAL_MEMORY_DESCRIPTOR, "_PHYSICAL_MEMORY_DESCRIPTOR"),
        (cd.PHYSICAL_MEMORY_RUN, "_PHYSICAL_MEMORY_RUN"),
    ],
)
def test_layouts_match_microsofts_types(kernel_isf: dict, layout: cd.Layout, isf_type: str) -> None:
    """Every field we declare sits where the real kernel's type puts it, with the same size."""
    t = kernel_isf["user_types"][isf_type]
    if layout is not cd.PHYSICAL_MEMORY_DESCRIPTOR:  # that one's declared size counts one run
        assert t["size"] == layout.size
    for field, (offset, fmt) in layout.fields.items():
        assert t["fields"][field]["offset"] == offset, field
        if fmt in ("B", "H", "I", "Q"):
            base = t["fields"][field]["type"]["name"]
            assert kernel_isf["base_types"][base]["size"] == struct.calcsize(fmt), field


def test_header_layouts_match_volatilitys() -> None:
    """_DUMP_HEADER64, the exception record and the bitmap summary where Volatility's crash layer reads them."""
    pytest.importorskip("volatility3")
    import volatility3.framework.symbols.windows as win

    folder = Path(win.__file__).parent
    crash64 = json.loads((folder / "crash64.json").read_text())["user_types"]
    common = json.loads((folder / "crash_common.json").read_text())["user_types"]
    for layout, fields in (
        (cd.DUMP_HEADER64, crash64["_DUMP_HEADER64"]),
        (cd.EXCEPTION_RECORD64, crash64["_EXCEPTION_RECORD64"]),
    ):
        for field, (offset, _) in layout.fields.items():
            assert fields["fields"][field]["offset"] == offset, field
    assert crash64["_DUMP_HEADER64"]["size"] == cd.HEADER_SIZE
    names = {"FirstPage": "HeaderSize", "TotalPresentPages": "Pages", "Pages": "BitmapSize"}
    for field, (offset, _) in cd.BITMAP_HEADER.fields.items():
        assert common["_SUMMARY_DUMP"]["fields"][names.get(field, field)]["offset"] == offset, field
    assert cd.DUMP_HEADER64.offset("PhysicalMemoryBlockBuffer") + cd.PHYSICAL_MEMORY_ROOM <= cd.DUMP_HEADER64.offset(
        "ContextRecord"
    )


def test_plan_rule_and_bitmap_bits() -> None:
    runs = [(i * 8 * PAGE, PAGE * (i % 3 + 1)) for i in range(cd.MAX_RUNS)]
    assert cd.plan_dump(runs).dump_type == cd.DUMP_TYPE_FULL
    more = [*runs, (cd.MAX_RUNS * 8 * PAGE + 3 * PAGE, 5 * PAGE)]
    plan = cd.plan_dump(more)
    assert plan.dump_type == cd.DUMP_TYPE_BITMAP and plan.bitmap_pages % 64 == 0
    with pytest.raises(cd.VmssdError, match="at most 42 physical-memory runs"):
        cd.plan_dump(more, "full")
    assert cd.plan_dump(runs, "bitmap").dump_type == cd.DUMP_TYPE_BITMAP
    bitmap = b"".join(cd.bitmap_chunks(plan, chunk=3))  # chunk edges inside runs
    bits = {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}
    assert bits == {g // PAGE + k for g, n in more for k in range(n // PAGE)}
    assert cd.page_runs([(0, PAGE), (PAGE, PAGE)]) == [(0, 2)]  # touching ranges are one run
    with pytest.raises(cd.VmssdError, match="whole 4 KiB pages"):
        cd.plan_dump([(0, 100)])


# ------------------------------------------------------------------------------------------ conversions


def test_full_guest_dump_reads_back(tmp_path: Path) -> None:
    vmrs = full_guest(tmp_path)
    out = tmp_path / "full.dmp"
    r = vmssd("convert", vmrs, "-o", out, "--format", "dmp")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: dmp (full dump, type 1, DirectoryTableBase 0x5000 = VP 0's saved CR3 (VTL0)" in r.stderr
    assert [line for line in r.stderr.splitlines() if "no kernel symbols given" in line] == [
        f"vmssd convert: note: {cd.WITHOUT_SYMBOLS}"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.dmp", "full.vmrs"]  # no .partial left
    check_against_saved_state(out, vmrs, cd.DUMP_TYPE_FULL)
    check_volatility_layer(out, vmrs)
    header = out.read_bytes()[: cd.HEADER_SIZE]
    fields = cd.DUMP_HEADER64.unpack_from(header)
    assert fields["RequiredDumpSpace"] == out.stat().st_size
    assert (fields["KdDebuggerDataBlock"], fields["PsActiveProcessHead"], fields["PsLoadedModuleList"]) == (0, 0, 0)


def test_sparse_guest_is_a_bitmap_dump(tmp_path: Path) -> None:
    vmrs = sparse_guest(tmp_path)
    out = tmp_path / "sparse.dmp"
    r = vmssd("convert", vmrs, "-o", out, "--format", "dmp", "-q")
    assert r.returncode == 0, r.stderr
    check_against_saved_state(out, vmrs, cd.DUMP_TYPE_BITMAP)
    check_volatility_layer(out, vmrs)
    r = vmssd("convert", vmrs, "-o", tmp_path / "forced.dmp", "--format", "dmp", "--dump-type", "full")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("vmssd convert: error: a full crash dump describes at most 42")
    assert not (tmp_path / "forced.dmp").exists() and not (tmp_path / "forced.dmp.partial").exists()


def test_bitmap_can_be_forced_on_a_full_guest(tmp_path: Path) -> None:
    vmrs = full_guest(tmp_path, seed=3)
    out = tmp_path / "bitmap.dmp"
    assert vmssd("convert", vmrs, "-o", out, "--format", "dmp", "--dump-type", "bitmap", "-q").returncode == 0
    check_against_saved_state(out, vmrs, cd.DUMP_TYPE_BITMAP)


def test_dmp_options_need_the_dmp_format(tmp_path: Path) -> None:
    r = vmssd("convert", full_guest(tmp_path), "-o", tmp_path / "x.raw", "--format", "raw", "--dump-type", "full")
    assert r.returncode == 1 and "apply to --format dmp only" in r.stderr


@pytest.mark.slow
def test_missing_ram_rule(tmp_path: Path) -> None:
    """A cut copy: refused without --allow-missing (nothing left), zeros + sidecar with it."""
    rng = random.Random(5)
    memory = {0: rng.randbytes(8 * MIB)}
    vmrs = tmp_path / "whole.vmrs"
    write_guest(vmrs, memory, [vp_registers(rng, 0x1000)])
    cut = tmp_path / "cut.vmrs"
    cut.write_bytes(vmrs.read_bytes()[: vmrs.stat().st_size // 2])
    out = tmp_path / "cut.dmp"
    r = vmssd("convert", cut, "-o", out, "--format", "dmp")
    assert r.returncode == 1 and "could not be read" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.vmrs", "whole.vmrs"]
    r = vmssd("convert", cut, "-o", out, "--format", "dmp", "--allow-missing", "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads(Path(f"{out}.missing.json").read_text())
    assert doc["image_format"] == "dmp" and doc["ranges"]
    dump = kdmp(out)
    for m in doc["ranges"]:
        for gpa in range(m["gpa"], m["gpa"] + m["size"], PAGE):
            assert dump.read_physical_page(gpa) == bytes(PAGE)
    with open_saved_state(cut) as p:
        missing = {g for m in doc["ranges"] for g in range(m["gpa"], m["gpa"] + m["size"], PAGE)}
        for gpa in range(0, 8 * MIB, PAGE):
            if gpa not in missing:
                assert dump.read_physical_page(gpa) == p.read_guest_physical_address(gpa, PAGE)


def test_a_file_declaring_2_to_the_40_pages_finishes(tmp_path: Path) -> None:
    """One RamMemoryBlock declaring 2^40 pages over one RamBlock: the dump holds the present MiB only."""
    block = random.Random(9).randbytes(BLOCK_SIZE)
    state = PartitionState(processor_vendor=PrologVendor.INTEL)
    state.vps = [VpState(index=0, registers={0: vp_registers(random.Random(9), 0x1000)})]  # type: ignore[misc]
    huge = tmp_path / "huge.vmrs"
    with HyperVStorageWriter(huge) as w:
        w.set("/savedstate/VmVersion", 0x0900)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        w.set("/savedstate/RamMemoryBlock0", RamMemoryBlockRecord(1 << 40, 0, 0).build())
        w.set("/savedstate/RamBlock0", encode_block(block))
    out = tmp_path / "huge.dmp"
    r = vmssd("convert", huge, "-o", out, "--format", "dmp", "-q")
    assert r.returncode == 0, r.stderr
    assert "no RamBlock in the file" in r.stderr
    dump = kdmp(out)
    assert sorted(dump.pages.keys()) == list(range(0, BLOCK_SIZE, PAGE))
    assert b"".join(dump.read_physical_page(g) for g in range(0, BLOCK_SIZE, PAGE)) == block
    assert out.stat().st_size == cd.HEADER_SIZE + BLOCK_SIZE


# ------------------------------------------------------------------------------------------ symbols


def test_self_referencing_tables_are_found_and_decoys_are_not() -> None:
    rng = random.Random(4)
    base = 0x1A0000
    data = bytearray(16 * PAGE)
    want = []
    for page in range(16):
        pa = base + page * PAGE
        at = page * PAGE
        if page % 4 == 0:  # a real one, at a random kernel-half index
            index = rng.randrange(256, 512)
            struct.pack_into("<Q", data, at + index * 8, pa | 0x63 | 1 << 63)
            want.append(pa)
        elif page % 4 == 1:  # in the user half: not Windows' self-reference
            struct.pack_into("<Q", data, at + rng.randrange(0, 256) * 8, pa | 0x63)
        elif page % 4 == 2:  # not present
            struct.pack_into("<Q", data, at + rng.randrange(256, 512) * 8, pa | 0x62)
        else:  # the address bytes, but not on an entry boundary
            struct.pack_into("<Q", data, at + 0x900 + 3, pa | 0x63)
    assert list(self_referencing_tables(bytes(data), base)) == want


class PageTables:
    """4-level tables built in a dict of physical pages (test-only): map 4 KiB pages, then read them back."""

    def __init__(self, memory: bytearray, first_table: int) -> None:
        self.memory = memory
        self.next = first_table
        self.root = self._table()

    def _table(self) -> int:
        addr = self.next
        self.next += PAGE
        return addr

    def map(self, va: int, pa: int) -> None:
        table = self.root
        for shift in (39, 30, 21):
            slot = table + ((va >> shift) & 0x1FF) * 8
            (entry,) = struct.unpack_from("<Q", self.memory, slot)
            if not entry & 1:
                entry = self._table() | 0x3
                struct.pack_into("<Q", self.memory, slot, entry)
            table = entry & cd.DTB_MASK
        struct.pack_into("<Q", self.memory, table + ((va >> 12) & 0x1FF) * 8, pa | 0x3)


def windows_kernel_guest(
    tmp_path: Path, isf: dict, base: int, *, build_in_kernel: bool = True
) -> tuple[Path, dict[str, int]]:
    """A guest whose kernel PE (CodeView record = the ISF's GUID and age) is mapped at ``base``, with
    MmPfnDatabase and NtBuildNumber (unmapped unless ``build_in_kernel``) filled in, and
    KUSER_SHARED_DATA at its fixed address; LSTAR points inside the image."""
    rng = random.Random(base)
    memory = bytearray(rng.randbytes(16 * MIB))
    memory[0x10000:0x40000] = bytes(0x30000)
    tables = PageTables(memory, 0x10000)
    pdb = isf["metadata"]["windows"]["pdb"]
    guid = pdb["GUID"]
    symbols = {name: isf["symbols"][name]["address"] for name in ("MmPfnDatabase", "NtBuildNumber")}
    if not build_in_kernel:
        del symbols["NtBuildNumber"]
    pages = {0, 0x2000, *(a & ~0xFFF for a in symbols.values())}
    image_pa = {rva: 0x100000 + i * PAGE for i, rva in enumerate(sorted(pages))}
    for rva, pa in image_pa.items():
        tables.map(base + rva, pa)
        memory[pa : pa + PAGE] = bytes(PAGE)

    def put(rva: int, data: bytes) -> None:
        pa = image_pa[rva & ~0xFFF] + (rva & 0xFFF)
        memory[pa : pa + len(data)] = data

    size = 0x1000000
    opt = 0x80 + 0x18
    put(0, b"MZ" + bytes(0x3A) + struct.pack("<I", 0x80))
    put(0x80, b"PE\0\0" + struct.pack("<HH", 0x8664, 1) + bytes(12) + struct.pack("<HH", 0xF0, 0x22))
    put(opt, struct.pack("<H", 0x20B))
    put(opt + 56, struct.pack("<I", size))
    put(opt + 108, struct.pack("<I", 16))
    put(opt + 112 + 48, struct.pack("<II", 0x2000, 28))
    name = pdb["database"].encode() + b"\0"
    put(0x2000, struct.pack("<IIHHIIII", 0, 0, 0, 0, 2, 24 + len(name), 0x2100, 0))
    d4 = bytes.fromhex(guid[16:])
    put(
        0x2100,
        b"RSDS"
        + struct.pack("<IHH8sI", int(guid[:8], 16), int(guid[8:12], 16), int(guid[12:16], 16), d4, pdb["age"])
        + name,
    )
    pfn_value = 0xFFFF_FA80_0000_0000 | rng.getrandbits(20) << 12
    build = 0xF000_0000 | rng.randrange(10000, 30000)
    put(symbols["MmPfnDatabase"], struct.pack("<Q", pfn_value))
    if build_in_kernel:
        put(symbols["NtBuildNumber"], struct.pack("<I", build))
    kuser_pa = 0x180000
    tables.map(0xFFFF_F780_0000_0000, kuser_pa)
    kuser = {k: v["offset"] for k, v in isf["user_types"]["_KUSER_SHARED_DATA"]["fields"].items()}
    system_time, up_time, product = rng.getrandbits(63), rng.getrandbits(50), rng.choice([1, 2, 3])
    memory[kuser_pa : kuser_pa + PAGE] = bytes(PAGE)
    for field, value in (("SystemTime", system_time), ("InterruptTime", up_time)):
        at = kuser_pa + kuser[field]
        memory[at : at + 12] = struct.pack("<III", value & 0xFFFFFFFF, value >> 32, value >> 32)
    struct.pack_into("<I", memory, kuser_pa + kuser["NtBuildNumber"], build)
    struct.pack_into("<I", memory, kuser_pa + kuser["NtProductType"], product)
    vmrs = tmp_path / "win.vmrs"
    vps = [vp_registers(rng, 0x10000, lstar=base + 0x400123) for _ in range(2)]
    write_guest(vmrs, {0: bytes(memory)}, vps)
    return vmrs, {"pfn": pfn_value, "build": build & 0xFFFF, "time": system_time, "up": up_time, "product": product}


@pytest.mark.slow
@pytest.mark.parametrize("table", ["BBED7C2955FBE4522AAA23F4B8677AD9-1", "C2EADB24A615E9472CE47C8ADD31F130-1"])
def test_symbols_fill_the_kernel_fields(tmp_path: Path, table: str) -> None:
    isf = _isf(table)
    base = 0xFFFF_F806_1240_0000 if table.startswith("B") else 0xFFFF_F800_7A21_D000
    vmrs, values = windows_kernel_guest(tmp_path, isf, base, build_in_kernel=table.startswith("B"))
    out = tmp_path / "win.dmp"
    r = vmssd("convert", vmrs, "-o", out, "--format", "dmp", "--symbols", SYMBOLS)
    assert r.returncode == 0, r.stderr
    assert "no kernel symbols given" not in r.stderr
    sym = {k: v["address"] for k, v in isf["symbols"].items()}
    dump = kdmp(out)
    header = dump.header  # a view into the parser: keep the parser alive while it is used
    assert header.KdDebuggerDataBlock == base + sym["KdDebuggerDataBlock"]
    assert header.PsLoadedModuleList == base + sym["PsLoadedModuleList"]
    assert header.PsActiveProcessHead == base + sym["PsActiveProcessHead"]
    assert header.PfnDatabase == values["pfn"]
    assert header.MinorVersion == values["build"] and header.MajorVersion == cd.MAJOR_VERSION_FREE
    assert (header.SystemTime, header.SystemUpTime, header.ProductType) == (
        values["time"],
        values["up"],
        values["product"],
    )
    assert dump.translate_virtual(base) == 0x100000


@pytest.mark.slow
def test_symbols_errors_are_one_line(tmp_path: Path) -> None:
    need(SYMBOLS)
    vmrs = full_guest(tmp_path)  # no page tables at CR3: no kernel to find
    r = vmssd("convert", vmrs, "-o", tmp_path / "o.dmp", "--format", "dmp", "--symbols", SYMBOLS)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--symbols: no Windows kernel image found through DTB 0x5000" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    isf = _isf("BBED7C2955FBE4522AAA23F4B8677AD9-1")
    win, _ = windows_kernel_guest(tmp_path, isf, 0xFFFF_F806_1240_0000)
    r = vmssd("convert", win, "-o", tmp_path / "o.dmp", "--format", "dmp", "--symbols", empty)
    assert (
        r.returncode == 1
        and "no symbol table for the guest kernel ntkrnlmp.pdb BBED7C2955FBE4522AAA23F4B8677AD9-1" in r.stderr
    )
    assert not list(tmp_path.glob("o.dmp*"))


class _NoKernelSource:
    """One x64 VP whose saved CR3 maps no kernel, RAM that holds none, and a given guest OS id."""

    def __init__(self, guest_os_id: int, ram: bytes) -> None:
        from volatility3_vmssd.cpu.guestos import decode_guest_os_id

        self._os, self._ram = decode_guest_os_id(guest_os_id), ram
        self._regs = vp_registers(random.Random(5), 0x5000)

    def has_cpu_state(self) -> bool:
        return True

    def vp_count(self) -> int:
        return 1

    def get_guest_os_info(self, vtl: int = 0):  # type: ignore[no-untyped-def]
        return self._os

    def get_architecture(self, vp: int):  # type: ignore[no-untyped-def]
        from volatility3_vmssd.cpu.registers import Architecture

        return Architecture.X64

    def get_virtual_trust_levels(self, vp: int) -> list[int]:
        return [0]

    def get_registers(self, vp: int, vtl: int | None = None) -> dict[str, object]:
        return self._regs

    def read_guest_physical_address(self, gpa: int, size: int) -> bytes:
        return self._ram[gpa : gpa + size]

    def read_guest_physical_address_padded(self, gpa: int, size: int) -> bytes:
        return self._ram[gpa : gpa + size].ljust(size, b"\0")

    def get_guest_physical_memory_chunks(self):  # type: ignore[no-untyped-def]
        from volatility3_vmssd.interface import GpaMemoryChunk

        return 4096, [GpaMemoryChunk(0, len(self._ram) // 4096)]


def test_ram_is_scanned_for_the_kernel_table_only_when_the_guest_registered_as_windows() -> None:
    """The scan costs a look at every page: worth it for Windows (KVA shadow on every VP), not for others."""
    from volatility3_vmssd.cpu.guestos import GuestOsMicrosoftId, GuestOsOpenSourceId, GuestOsVendor, encode_guest_os_id
    from volatility3_vmssd.images.dumpsource import DumpOptions, dump_inputs

    ram = random.Random(9).randbytes(64 * 4096)
    windows = encode_guest_os_id(os_id=GuestOsMicrosoftId.WINDOWS_NT, vendor_id=GuestOsVendor.MICROSOFT, major=10)
    linux = encode_guest_os_id(os_id=GuestOsOpenSourceId.LINUX, open_source=True, version=0x060100)
    for guest_os, scans in ((windows, True), (linux, False), (0, False)):
        inputs, scan = dump_inputs(_NoKernelSource(guest_os, ram), DumpOptions())  # type: ignore[arg-type]
        assert (scan is not None) == scans, guest_os
        assert inputs.dtb == 0x5000  # VP 0's saved CR3 until (unless) the scan finds the kernel's table
        if scan is None:
            assert "did not register as Windows" in inputs.dtb_source
        else:
            scan.feed(ram, 0)
            assert scan.found is None and scan.inputs(inputs).dtb == 0x5000  # no kernel in this RAM
