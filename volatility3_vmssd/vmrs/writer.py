"""Write saved states: a ``.vmrs``, or a legacy ``.bin`` + ``.vsv`` pair, from a memory dump and CPU state.

This is how the test suite gets saved states with known content, and how a user turns a raw, LiME
or ELF dump into a file Hyper-V tooling reads.  The layout follows Microsoft's openvmm writer
(docs/format.md#vmrs-keys, #ram-map): every GPA range starts on a fresh 1 MiB RamBlock and the last
block of a range is zero-padded.  Pages are stored as fill, XPRESS or raw records, or, with
``raw_blocks``, every RamBlock is a full raw 1 MiB value: the one form the DLL is known to load.

Memory is streamed block by block; with ``jobs > 1`` the page encoding runs in worker processes
with a bounded number of blocks in flight, so memory use does not grow with the image.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
from collections.abc import Callable, Iterator, Sequence

from ..cpu.chunkwriter import build_partition_state
from ..cpu.cpustate import PartitionState
from ..errors import FormatError
from ..images.memoryimage import MemoryImage
from ..images.ranges import MemoryRange, subtract_holes
from ..lifetime import die_with_parent
from ..memory.geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from ..memory.legacy_bin import write_bin
from ..memory.ramblock import encode_block
from ..memory.rammap import RamMemoryBlockRecord, build_layout, layout_ram
from ..storage.writer import HyperVStorageWriter

VMRS_VM_VERSION = 0x0900  # 9.0: the version of the real test.VMRS; > 5.0 selects the /savedstate schema
LEGACY_VM_VERSION = 0x0500  # the real legacy .bin says 5.0

Progress = Callable[[int], None]


@dataclasses.dataclass
class WriteReport:
    records: list[RamMemoryBlockRecord]
    blocks: int
    ram_bytes: int
    stored_bytes: int


def plan_ranges(image: MemoryImage, holes: list[tuple[int, int]]) -> list[MemoryRange]:
    """The backed GPA ranges to save: the image's ranges minus ``[start, end)`` holes, page aligned."""
    ranges = subtract_holes(image.ranges, holes)
    for r in ranges:
        if r.gpa % PAGE_SIZE or r.length % PAGE_SIZE:
            raise FormatError(
                image.path,
                r.file_offset,
                f"memory range {r.gpa:#x}+{r.length:#x} is not page aligned; Hyper-V saves whole 4 KiB pages",
            )
    if not ranges:
        raise FormatError(image.path, None, "the memory image holds no memory to save")
    return ranges


def _block_inputs(image: MemoryImage, records: list[RamMemoryBlockRecord]) -> Iterator[tuple[int, bytes]]:
    for rec in records:
        first_block = rec.mbp_index_start // PAGES_PER_BLOCK
        size = rec.page_count_total * PAGE_SIZE
        gpa0 = rec.gpa_index_start * PAGE_SIZE
        for k in range(-(-rec.page_count_total // PAGES_PER_BLOCK)):
            want = min(BLOCK_SIZE, size - k * BLOCK_SIZE)
            data = image.read(gpa0 + k * BLOCK_SIZE, want)
            yield first_block + k, data if want == BLOCK_SIZE else data + bytes(BLOCK_SIZE - want)


def _encode(item: tuple[int, bytes, bool]) -> tuple[int, bytes]:
    """Page records for one block (worker-process entry point)."""
    n, data, compress = item
    return n, encode_block(data, compress=compress)


def _worker_init(parent: int) -> None:
    """Encoding workers leave signals to the parent and end with it, even when it is killed (SIGKILL).

    Ctrl-C reaches the whole process group: the parent stops and cleans up, so a worker's own
    KeyboardInterrupt traceback is noise.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)


def encoded_blocks(
    image: MemoryImage,
    records: list[RamMemoryBlockRecord],
    *,
    compress: bool = True,
    raw_blocks: bool = False,
    jobs: int = 1,
    progress: Progress | None = None,
) -> Iterator[tuple[int, bytes]]:
    """(RamBlock number, value) in order; at most ``2 * jobs`` blocks are held at once.

    With ``raw_blocks`` every value is the block's raw 1 MiB (nothing to encode, so no workers).
    """
    if raw_blocks:
        for item in _block_inputs(image, records):
            if progress:
                progress(BLOCK_SIZE)
            yield item
        return
    inputs = ((n, data, compress) for n, data in _block_inputs(image, records))
    if jobs <= 1:
        for item in inputs:
            out = _encode(item)
            if progress:
                progress(BLOCK_SIZE)
            yield out
        return
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, initializer=_worker_init, initargs=(os.getpid(),)
    ) as pool:
        pending: list[concurrent.futures.Future[tuple[int, bytes]]] = []
        for item in inputs:
            pending.append(pool.submit(_encode, item))
            if len(pending) >= 2 * jobs:
                yield pending.pop(0).result()
                if progress:
                    progress(BLOCK_SIZE)
        for fut in pending:
            yield fut.result()
            if progress:
                progress(BLOCK_SIZE)


def write_vmrs(
    path: str | os.PathLike[str],
    image: MemoryImage,
    state: PartitionState,
    *,
    holes: list[tuple[int, int]] | None = None,
    vm_version: int = VMRS_VM_VERSION,
    saved_state_type: str | None = "Normal",
    alignment: int = 0x1000,
    compress: bool = True,
    raw_blocks: bool = False,
    jobs: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Write a ``.vmrs`` with the keys the DLL needs (openvmm's minimum set) plus the RAM.

    ``saved_state_type`` None leaves out ``/savedstate/type``, which openvmm does not write; with
    ``raw_blocks`` as well, the file has openvmm's key set, value types and block form.
    """
    ranges = plan_ranges(image, holes or [])
    records = build_layout([(r.gpa, r.length) for r in ranges])
    blocks = stored = 0
    with HyperVStorageWriter(path, alignment=alignment, overwrite=overwrite) as w:
        w.set("/configuration/properties/version", vm_version)
        w.set("/savedstate/VmVersion", vm_version)
        if saved_state_type is not None:
            w.set("/savedstate/type", saved_state_type)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(records):
            w.set(f"/savedstate/RamMemoryBlock{i}", rec.build())
        blocks_out = encoded_blocks(
            image, records, compress=compress, raw_blocks=raw_blocks, jobs=jobs, progress=progress
        )
        for n, value in blocks_out:
            w.set(f"/savedstate/RamBlock{n}", value)
            blocks += 1
            stored += len(value)
    return WriteReport(records, blocks, sum(r.length for r in ranges), stored)


def write_bin_vsv(
    bin_path: str | os.PathLike[str],
    vsv_path: str | os.PathLike[str],
    image: MemoryImage,
    state: PartitionState,
    *,
    holes: list[tuple[int, int]] | None = None,
    vm_version: int = LEGACY_VM_VERSION,
    compress: bool = True,
    raw_blocks: bool = False,
    jobs: int = 1,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> WriteReport:
    """Write a legacy pair: RamBlocks in the ``.bin``; CPU state and the RAM map in the ``.vsv``.

    No real ``.vsv`` is available (docs/format.md#legacy-bin-vsv), so the ``.vsv`` is our one fixed assumption: a
    HyperVStorage container with ``/savedVM/partition_state`` and a node ``/RamMemoryBlock`` whose
    children ``0``, ``1``, … hold version-3 RamMemoryBlock records.
    """
    ranges = plan_ranges(image, holes or [])
    records = build_layout([(r.gpa, r.length) for r in ranges])
    if not overwrite:
        for p in (bin_path, vsv_path):
            if os.path.exists(p):
                raise FileExistsError(f"{os.fspath(p)} exists; refusing to overwrite it")
    sizes: list[int] = []

    def counted() -> Iterator[tuple[int, bytes]]:
        blocks_out = encoded_blocks(
            image, records, compress=compress, raw_blocks=raw_blocks, jobs=jobs, progress=progress
        )
        for n, value in blocks_out:
            sizes.append(len(value))
            yield n, value

    write_bin(bin_path, counted(), vm_version=vm_version)
    with HyperVStorageWriter(vsv_path, overwrite=True) as w:
        w.set("/configuration/properties/version", vm_version)
        w.set("/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(records):
            w.set(f"/RamMemoryBlock/{i}", rec.build())
    return WriteReport(records, len(sizes), sum(r.length for r in ranges), sum(sizes))


def write_fill_vmrs(
    path: str | os.PathLike[str],
    ram_bytes: int,
    state: PartitionState,
    *,
    holes: Sequence[tuple[int, int]] = ((0xC0000000, 0x40000000),),
    blocks: Sequence[bytes] | None = None,
    vm_version: int = VMRS_VM_VERSION,
) -> WriteReport:
    """A ``.vmrs`` describing ``ram_bytes`` of RAM laid out around ``(start, size)`` holes (default: the
    32-bit MMIO gap), whose RamBlocks cycle through already-encoded ``blocks`` (default: one all-zero
    block, a 20-byte inline multi-fill record).  16 GiB cost about a megabyte and a fraction of a
    second: how tests and benchmarks get large saved states without large inputs.
    """
    records = build_layout(layout_ram(ram_bytes, holes))
    values = list(blocks) if blocks else [encode_block(bytes(BLOCK_SIZE))]
    count = stored = 0
    with HyperVStorageWriter(path) as w:
        w.set("/configuration/properties/version", vm_version)
        w.set("/savedstate/VmVersion", vm_version)
        w.set("/savedstate/type", "Normal")
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(records):
            w.set(f"/savedstate/RamMemoryBlock{i}", rec.build())
        for rec in records:
            first = rec.mbp_index_start // PAGES_PER_BLOCK
            for n in range(first, first + -(-rec.page_count_total // PAGES_PER_BLOCK)):
                value = values[count % len(values)]
                w.set(f"/savedstate/RamBlock{n}", value)
                count += 1
                stored += len(value)
    return WriteReport(records, count, ram_bytes, stored)
