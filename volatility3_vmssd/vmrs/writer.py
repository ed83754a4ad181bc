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
import errno
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..cpu.chunkwriter import build_partition_state
from ..cpu.cpustate import PartitionState
from ..errors import FormatError
from ..host import usable_cores
from ..images.memoryimage import MemoryImage
from ..images.ranges import MemoryRange, subtract_holes
from ..lifetime import die_with_parent
from ..memory.geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from ..memory.legacy_bin import write_bin
from ..memory.ramblock import encode_block
from ..memory.rammap import RamMemoryBlockRecord, build_layout, layout_ram
from ..outputs import partial_paths
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
    for name in ("SIGTERM", "SIGHUP"):  # a handler inherited from the CLI would print a traceback per worker
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
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
    jobs = min(jobs, usable_cores())  # more processes than cores only cost memory and fork time
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init, initargs=(os.getpid(),))
    try:
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
    except BaseException:  # an error, Ctrl-C, SIGTERM, the consumer gone: not after the whole queue
        _stop_pool(pool)
        raise
    pool.shutdown()


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Cancel every queued block and wait only for the ones being encoded (at most about two per worker).

    Killing the workers instead would be quicker by a block, but a worker killed while it sends a
    result leaves the pool's reader waiting forever for the rest of the message, and the interpreter
    joins that reader at exit: the process would hang instead of ending.
    """
    pool.shutdown(wait=True, cancel_futures=True)


def _refuse_existing(paths: Sequence[str | os.PathLike[str]], overwrite: bool) -> None:
    """Without ``overwrite`` an existing output is an error before anything is written."""
    if not overwrite:
        for p in paths:
            if os.path.lexists(p):
                raise FileExistsError(errno.EEXIST, "exists; refusing to overwrite it", os.fspath(p))


class _RamWrite:
    """The RAM half both writers share: the ranges planned around the holes, the records laid out, the
    blocks encoded and counted for the report.  ``overwrite`` is here because it is one of the options
    both writers take through ``**options``."""

    def __init__(
        self,
        image: MemoryImage,
        *,
        holes: list[tuple[int, int]] | None = None,
        compress: bool = True,
        raw_blocks: bool = False,
        jobs: int = 1,
        overwrite: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.image = image
        self.ranges = plan_ranges(image, holes or [])
        self.records = build_layout([(r.gpa, r.length) for r in self.ranges])
        self.encoding = {"compress": compress, "raw_blocks": raw_blocks, "jobs": jobs, "progress": progress}
        self.overwrite = overwrite
        self.blocks = self.stored = 0

    def refuse_existing(self, *paths: str | os.PathLike[str]) -> None:
        _refuse_existing(paths, self.overwrite)

    def encoded(self) -> Iterator[tuple[int, bytes]]:
        for n, value in encoded_blocks(self.image, self.records, **self.encoding):
            self.blocks += 1
            self.stored += len(value)
            yield n, value

    def report(self) -> WriteReport:
        return WriteReport(self.records, self.blocks, sum(r.length for r in self.ranges), self.stored)


def write_vmrs(
    path: str | os.PathLike[str],
    image: MemoryImage,
    state: PartitionState,
    *,
    vm_version: int = VMRS_VM_VERSION,
    saved_state_type: str | None = "Normal",
    alignment: int = 0x1000,
    **options: Any,
) -> WriteReport:
    """Write a ``.vmrs`` with the keys the DLL needs (openvmm's minimum set) plus the RAM.

    ``saved_state_type`` None leaves out ``/savedstate/type``, which openvmm does not write; with
    ``raw_blocks`` as well, the file has openvmm's key set, value types and block form.  ``options``:
    ``holes``, ``compress``, ``raw_blocks``, ``jobs``, ``overwrite``, ``progress`` (:class:`_RamWrite`).
    """
    ram = _RamWrite(image, **options)
    ram.refuse_existing(path)
    with (
        partial_paths(path, force=ram.overwrite) as (tmp,),
        HyperVStorageWriter(tmp, alignment=alignment, overwrite=True) as w,
    ):
        w.set("/configuration/properties/version", vm_version)
        w.set("/savedstate/VmVersion", vm_version)
        if saved_state_type is not None:
            w.set("/savedstate/type", saved_state_type)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(ram.records):
            w.set(f"/savedstate/RamMemoryBlock{i}", rec.build())
        for n, value in ram.encoded():
            w.set(f"/savedstate/RamBlock{n}", value)
    return ram.report()


def write_bin_vsv(
    bin_path: str | os.PathLike[str],
    vsv_path: str | os.PathLike[str],
    image: MemoryImage,
    state: PartitionState,
    *,
    vm_version: int = LEGACY_VM_VERSION,
    **options: Any,
) -> WriteReport:
    """Write a legacy pair: RamBlocks in the ``.bin``; CPU state and the RAM map in the ``.vsv``.

    No real ``.vsv`` is available (docs/format.md#legacy-bin-vsv), so the ``.vsv`` is our one fixed assumption: a
    HyperVStorage container with ``/savedVM/partition_state`` and a node ``/RamMemoryBlock`` whose
    children ``0``, ``1``, … hold version-3 RamMemoryBlock records.  ``options`` as :func:`write_vmrs`.
    """
    ram = _RamWrite(image, **options)
    ram.refuse_existing(bin_path, vsv_path)
    with partial_paths(bin_path, vsv_path, force=ram.overwrite) as (bin_tmp, vsv_tmp):
        write_bin(bin_tmp, ram.encoded(), vm_version=vm_version)
        with HyperVStorageWriter(vsv_tmp, overwrite=True) as w:
            w.set("/configuration/properties/version", vm_version)
            w.set("/savedVM/partition_state", build_partition_state(state))
            for i, rec in enumerate(ram.records):
                w.set(f"/RamMemoryBlock/{i}", rec.build())
    return ram.report()


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
    _refuse_existing([path], False)
    with partial_paths(path) as (tmp,), HyperVStorageWriter(tmp, overwrite=True) as w:
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
