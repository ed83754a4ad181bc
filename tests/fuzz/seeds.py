"""Build the seed corpora of the fuzz targets into a cache directory (never into the repository).

Two sources:

* files our writers make (always available, so a fresh clone without ``../shared`` can fuzz): a
  small ``.vmrs`` with fill, multi-fill, XPRESS and raw pages over two GPA ranges and 2 VPs, the
  same with a pending and a stale journal entry, one with variable-run and cut-short RamBlocks, a
  truncated copy, a ``.bin`` + ``.vsv`` pair, RamBlock values, XPRESS streams, partition_state blobs;
* when ``../shared/data/real`` exists: the real ``test.VMRS`` / ``test.vmcx`` (AGPL-3.0, from
  fox-it/dissect.hypervisor) and a ``.bin`` rebuilt from three real RamBlocks of ``test_file.bin``
  (MIT/Apache-2.0, rafawo/vmsavedstatetodump-rs), their RamBlock values and XPRESS pages, and the
  real Linux guest's registers as a partition_state blob.  These copies live in the cache only.

Run ``python -m tests.fuzz.seeds DIR`` to (re)build and list them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from volatility3_vmssd.codecs import _xpress_python, xpress
from volatility3_vmssd.cpu.chunkwriter import build_partition_state
from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.cpu.cpustate import PartitionState, VpState
from volatility3_vmssd.cpu.registers import PrologVendor, SegmentRegister, TableRegister
from volatility3_vmssd.errors import Findings
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE
from volatility3_vmssd.memory.legacy_bin import BinFile, write_bin
from volatility3_vmssd.memory.ramblock import KIND_XPRESS, encode_block, index_block
from volatility3_vmssd.memory.rammap import RamMemoryBlockRecord
from volatility3_vmssd.storage import HyperVStorage, HyperVStorageWriter
from volatility3_vmssd.vmrs.writer import write_bin_vsv, write_vmrs

try:  # run as ``python -m tests.fuzz.seeds``
    from ..builders import add_journal_entries
    from ..shared_data import REAL, SHARED
except ImportError:  # imported by the test suite as ``fuzz.seeds`` (tests/ on sys.path)
    from builders import add_journal_entries  # type: ignore[no-redef]
    from shared_data import REAL, SHARED  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[2]
LINUX_REGISTERS = SHARED / "data" / "linux-guest" / "registers.json"

TARGETS = ("storage", "bin", "ramblock", "xpress", "partition_state", "layer")
XPRESS_SIZE = struct.Struct("<H")  # xpress target inputs: u16 output size, then the stream
LOW_HOLE = (0xA0000, 0x100000)


def default_cache() -> Path:
    """Where seeds and corpora live between runs (outside the repository)."""
    base = os.environ.get("VMSSD_FUZZ_CACHE") or os.path.join(tempfile.gettempdir(), "vmssd-fuzz")
    return Path(base)


# ------------------------------------------------------------------------------------ synthetic data
def synthetic_ram(size: int, seed: int = 8) -> bytes:
    """Mostly zero RAM with pattern, text and random pages: every record kind the writer emits."""
    rng = random.Random(seed)
    out = bytearray(size)
    text = b"vmssd fuzz seed: Hyper-V saved state, hostile input welcome. " * 80
    for page in range(0, size, PAGE_SIZE):
        roll = rng.randrange(64)
        if roll < 6:
            out[page : page + PAGE_SIZE] = struct.pack("<Q", 0x0101010101010101 * (page >> 12 & 0xFF)) * 512
        elif roll < 12:
            out[page : page + PAGE_SIZE] = text[page % 64 : page % 64 + PAGE_SIZE]
        elif roll == 12:
            out[page : page + PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    return bytes(out)


def synthetic_state(vps: int = 2, *, arm: bool = False, vtls: tuple[int, ...] = (0,)) -> PartitionState:
    """A small CPU state: long-mode x64 VPs (or ARM64), one register bank per VTL."""
    banks = []
    for i in range(vps):
        regs: dict[str, object]
        if arm:
            regs = {"elr_el1": 0xFFFF000000001000 + i, "sp_el1": 0x1000, "ttbr1_el1": 0x40000000}
        else:
            regs = {
                "rip": 0xFFFFF80000001000 + i,
                "rcx": i,
                "cr0": 0x80050033,
                "cr3": 0x1000,
                "cr4": 0x6F8,
                "efer": 0xD01,
                "cs": SegmentRegister(0, 0xFFFFFFFF, 0x10, 0xA09B),
                "gdtr": TableRegister(0x7F, 0xFFFFF80000003000),
                "lstar": 0xFFFFF80000005000,
            }
        banks.append(VpState(index=i, vtl_runnable=bool(i & 1), registers={v: dict(regs) for v in vtls}))
    return PartitionState(
        processor_vendor=PrologVendor.ARM if arm else PrologVendor.INTEL,
        guest_os_ids={0: 0x8100_0006_0104_0000},
        partition_vtls=list(vtls),
        vps=banks,  # type: ignore[arg-type]
        partition_msrs={"hypercall": 0x1001, "referencetsc": 0x2001},
    )


def _write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------ container seeds
def small_vmrs(out: Path, work: Path) -> Path:
    """2 MiB of RAM minus the 0xA0000-0xFFFFF hole (two ranges, two RamBlocks), 2 VPs."""
    image = _write_raw(work / "ram2.raw", synthetic_ram(2 << 20))
    with MemoryImage.open(image) as img:
        write_vmrs(out, img, synthetic_state(2), holes=[LOW_HOLE], overwrite=True)
    return out


def journal_vmrs(out: Path, clean: Path) -> Path:
    """``clean`` with one pending journal entry (over the first key table) and one stale entry."""
    shutil.copyfile(clean, out)
    with HyperVStorage.open(out) as storage:
        table = storage.key_tables[0].offset
        root_entry = 0x2000 + 8
    add_journal_entries(out, pending=[(table, bytes(0x200))], stale=[(root_entry, b"\xff" * 18)])
    return out


def pieces_vmrs(out: Path) -> Path:
    """A .vmrs whose RamBlocks use variable runs, end early, or are raw: the rarer decode paths."""
    ram = synthetic_ram(BLOCK_SIZE, seed=3)
    blocks = [
        encode_block(ram, use_variable_runs=True),
        encode_block(ram)[:40_000],  # cut short: the rest of the block is missing
        encode_block(ram, compress=False, end_marker=False),
    ]
    with HyperVStorageWriter(out, overwrite=True) as w:
        w.set("/configuration/properties/version", 0x0900)
        w.set("/savedstate/VmVersion", 0x0900)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(synthetic_state(1, vtls=(0, 1))))
        w.set("/savedstate/RamMemoryBlock0", RamMemoryBlockRecord(512, 0, 0).build())
        w.set("/savedstate/RamMemoryBlock1", RamMemoryBlockRecord(256, 512, 0x1000).build())
        for n, value in enumerate(blocks):
            w.set(f"/savedstate/RamBlock{n}", value)
    return out


def truncated_copy(out: Path, src: Path, fraction: float) -> Path:
    data = src.read_bytes()
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def bin_vsv(bin_out: Path, vsv_out: Path, work: Path) -> tuple[Path, Path]:
    image = _write_raw(work / "ram-pair.raw", synthetic_ram(2 << 20, seed=5))
    with MemoryImage.open(image) as img:
        write_bin_vsv(bin_out, vsv_out, img, synthetic_state(2), overwrite=True)
    return bin_out, vsv_out


def real_bin_subset(out: Path, real_bin: Path, numbers: tuple[int, ...] = (0, 100, 251)) -> Path:
    """A small legacy .bin made of a few real RamBlock values (XPRESS, raw and fill pages)."""
    with BinFile.open(real_bin) as b:
        values = [(n, b.read_block_value(n)) for n in numbers if n in b.blocks]
    write_bin(out, values)
    return out


# ------------------------------------------------------------------------------------ value seeds
def ramblock_values(real_bin: Path | None) -> dict[str, bytes]:
    ram = synthetic_ram(BLOCK_SIZE, seed=11)
    seeds = {
        "mixed": encode_block(ram),
        "variable-runs": encode_block(ram, use_variable_runs=True),
        "uncompressed": encode_block(ram, compress=False),
        "no-end-marker": encode_block(ram, end_marker=False),
        "early-end": encode_block(ram)[:20_000] + b"\xff\xff\xff\xff",
        "zero": encode_block(bytes(BLOCK_SIZE)),
    }
    if real_bin is not None:
        with BinFile.open(real_bin) as b:
            for n in (0, 100, 251):
                if n in b.blocks:
                    seeds[f"real-{n}"] = b.read_block_value(n)
    return seeds


def xpress_streams(real_bin: Path | None) -> dict[str, bytes]:
    """u16 output size + stream: real XPRESS pages, our encoder's output, the 32-bit length form."""
    page = synthetic_ram(64 * PAGE_SIZE, seed=2)
    text = next(page[i : i + PAGE_SIZE] for i in range(0, len(page), PAGE_SIZE) if page[i : i + 4] == b"vmss")
    seeds = {
        "text": XPRESS_SIZE.pack(PAGE_SIZE) + xpress.compress(text),
        "runs": XPRESS_SIZE.pack(PAGE_SIZE) + xpress.compress(bytes(100) + b"ab" * 1500 + bytes(896)),
        "long-u32": XPRESS_SIZE.pack(60000) + _xpress_python.compress(bytes(60000), force_u32=True),
        "long-u16": XPRESS_SIZE.pack(40000) + xpress.compress(b"x" + bytes(39999)),
        "empty": XPRESS_SIZE.pack(0) + b"\xff\xff\xff\xff",
    }
    if real_bin is not None:
        with BinFile.open(real_bin) as b:
            value = b.read_block_value(1)
        index = index_block(value, path=str(real_bin), file_offset=0, findings=Findings())
        kept = 0
        for p in range(256):
            if index.kinds[p] == KIND_XPRESS and kept < 24:
                start = index.args[p]
                seeds[f"real-page-{p}"] = XPRESS_SIZE.pack(PAGE_SIZE) + value[start : start + index.lengths[p]]
                kept += 1
    return seeds


def partition_blobs() -> dict[str, bytes]:
    seeds = {
        "x64-2vp": build_partition_state(synthetic_state(2)),
        "x64-vtl01": build_partition_state(synthetic_state(2, vtls=(0, 1))),
        "arm64": build_partition_state(synthetic_state(1, arm=True)),
    }
    if LINUX_REGISTERS.exists():
        seeds["linux-guest"] = build_partition_state(state_from_json(json.loads(LINUX_REGISTERS.read_text())))
    return seeds


# ------------------------------------------------------------------------------------ driver
def build_seeds(dest: Path, *, use_real: bool = True) -> dict[str, list[Path]]:
    """Write every target's seeds under ``dest/<target>/`` (rebuilt from scratch) and list them."""
    real = REAL if use_real and REAL.is_dir() else None
    real_bin = real / "test_file.bin" if real is not None and (real / "test_file.bin").exists() else None
    if dest.exists():
        shutil.rmtree(dest)
    dirs = {t: dest / t for t in TARGETS}
    for d in dirs.values():
        d.mkdir(parents=True)
    work = dest / "_work"
    work.mkdir()

    vmrs = small_vmrs(work / "small.vmrs", work)
    files: dict[str, Path] = {
        "small.vmrs": vmrs,
        "journal.vmrs": journal_vmrs(work / "journal.vmrs", vmrs),
        "pieces.vmrs": pieces_vmrs(work / "pieces.vmrs"),
        "cut-60.vmrs": truncated_copy(work / "cut-60.vmrs", vmrs, 0.6),
    }
    pair_bin, pair_vsv = bin_vsv(work / "pair.bin", work / "pair.vsv", work)
    if real is not None:
        for name in ("test.VMRS", "test.vmcx"):
            if (real / name).exists():
                shutil.copyfile(real / name, dirs["storage"] / f"real-{name}")
    for name in ("small.vmrs", "journal.vmrs", "pieces.vmrs", "cut-60.vmrs"):
        shutil.copyfile(files[name], dirs["storage"] / name)
        shutil.copyfile(files[name], dirs["layer"] / name)
    shutil.copyfile(pair_vsv, dirs["storage"] / "pair.vsv")
    shutil.copyfile(pair_bin, dirs["bin"] / "pair.bin")
    shutil.copyfile(pair_bin, dirs["layer"] / "pair.bin")
    if real_bin is not None:
        real_bin_subset(dirs["bin"] / "real-subset.bin", real_bin)
        shutil.copyfile(dirs["bin"] / "real-subset.bin", dirs["layer"] / "real-subset.bin")

    writers: dict[str, Callable[[], dict[str, bytes]]] = {
        "ramblock": lambda: ramblock_values(real_bin),
        "xpress": lambda: xpress_streams(real_bin),
        "partition_state": partition_blobs,
    }
    for target, make in writers.items():
        for name, data in make().items():
            (dirs[target] / name).write_bytes(data)
    shutil.rmtree(work)
    return {t: sorted(d.iterdir()) for t, d in dirs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", nargs="?", type=Path, default=default_cache() / "seeds")
    parser.add_argument("--no-real", action="store_true", help="writer-made seeds only (as on a fresh clone)")
    args = parser.parse_args(argv)
    for target, paths in build_seeds(args.dest, use_real=not args.no_real).items():
        print(f"{target:<16} {len(paths):>3} seeds, {sum(p.stat().st_size for p in paths):>9,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
