"""Saved states written with every legitimate RamBlock form, for tests and the benchmark harness.

Our writer (``vmrs/writer.py``) writes one form: openvmm's layout with multi-fill, XPRESS and
raw page records and an end marker after 256 pages.  Other writers may legitimately produce more,
and a reader's fast path must take all of them (issue 14):

* ranges that are not a whole number of blocks, whose last block ends early with the end marker;
* variable-length runs (``0xFFFFFFFC``), raw or XPRESS, that leave the output off page boundaries;
* single-fill records (one per page, as Hyper-V writes empty pages) and multi-fill records, mixed
  within a block; raw page records;
* blocks stored as the raw 1 MiB value; blocks under 2 KiB, which the container stores inline;
* 64 KiB data alignment.

The forms are drawn per block from a seeded generator, and the RAM is cut into ranges of random
lengths, so that no form is tied to one content.  :func:`write_raw_vmrs` writes what openvmm's
writer does: every RamBlock a raw 1 MiB value.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator

from volatility3_vmssd.cpu.chunkwriter import build_partition_state
from volatility3_vmssd.cpu.cpustate import PartitionState
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from volatility3_vmssd.memory.ramblock import encode_block
from volatility3_vmssd.memory.rammap import RamMemoryBlockRecord
from volatility3_vmssd.storage.writer import HyperVStorageWriter
from volatility3_vmssd.vmrs.writer import VMRS_VM_VERSION, plan_ranges

#: Inline threshold of the container writer: smaller values live in the key table.
INLINE_BELOW = 2048


def cut_ranges(ranges: list[tuple[int, int]], rng: random.Random, pieces: int = 3) -> list[tuple[int, int]]:
    """Cut each ``(gpa, length)`` range at up to ``pieces - 1`` random page boundaries (adjacent in GPA,
    each on a fresh RamBlock in raw memory), so that many ranges end inside a block."""
    out: list[tuple[int, int]] = []
    for gpa, length in ranges:
        pages = length // PAGE_SIZE
        cuts = sorted(rng.sample(range(1, pages), min(pieces - 1, pages - 1))) if pages > 1 else []
        start = 0
        for cut in [*cuts, pages]:
            out.append((gpa + start * PAGE_SIZE, (cut - start) * PAGE_SIZE))
            start = cut
    return out


def _layout(ranges: list[tuple[int, int]]) -> list[RamMemoryBlockRecord]:
    records: list[RamMemoryBlockRecord] = []
    next_block = 0
    for n, (gpa, length) in enumerate(ranges):
        pages = length // PAGE_SIZE
        records.append(
            RamMemoryBlockRecord(pages, next_block * PAGES_PER_BLOCK, gpa // PAGE_SIZE, key=f"RamMemoryBlock{n}")
        )
        next_block += -(-pages // PAGES_PER_BLOCK)
    return records


def _blocks(image: MemoryImage, records: list[RamMemoryBlockRecord]) -> Iterator[tuple[int, bytes, int]]:
    """(RamBlock number, 1 MiB of RAM zero-padded, pages of the range in it)."""
    for rec in records:
        first = rec.mbp_index_start // PAGES_PER_BLOCK
        gpa0 = rec.gpa_index_start * PAGE_SIZE
        for k in range(-(-rec.page_count_total // PAGES_PER_BLOCK)):
            pages = min(PAGES_PER_BLOCK, rec.page_count_total - k * PAGES_PER_BLOCK)
            data = image.read(gpa0 + k * BLOCK_SIZE, pages * PAGE_SIZE)
            yield first + k, data + bytes(BLOCK_SIZE - len(data)), pages


#: The forms of a block that holds 256 pages; each is drawn in turn for the first blocks, then at random.
FULL_FORMS = ("raw 1 MiB", "variable runs", "uncompressed page records", "mixed fills", "no end marker", "plain")
_WEIGHTS = (0.08, 0.2, 0.08, 0.34, 0.1, 0.2)


def every_form_value(data: bytes, pages: int, rng: random.Random, form: str | None = None) -> tuple[bytes, str]:
    """One RamBlock value for ``data`` in ``form`` (drawn from ``rng`` if None), and the form's name."""
    if pages < PAGES_PER_BLOCK:
        form = "early end"
        value = encode_block(data, pages=pages, single_fills=rng.random() < 0.5, alternate=rng.random() < 0.5)
    else:
        form = form or rng.choices(FULL_FORMS, _WEIGHTS)[0]
        if form == "raw 1 MiB":
            return data, form
        if form == "variable runs":
            value = encode_block(data, use_variable_runs=True, alternate=rng.random() < 0.5)
        elif form == "uncompressed page records":
            value = encode_block(data, compress=False, single_fills=rng.random() < 0.5)
        elif form == "mixed fills":
            value = encode_block(data, single_fills=rng.random() < 0.5, alternate=True)
        elif form == "no end marker":
            value = encode_block(data, end_marker=False)
        else:
            value = encode_block(data)
    if len(value) == BLOCK_SIZE:
        form = "raw 1 MiB"
    elif len(value) < INLINE_BELOW:
        form += ", inline"
    return value, form


def write_every_form_vmrs(
    path: str | os.PathLike[str],
    image: MemoryImage,
    state: PartitionState,
    *,
    holes: list[tuple[int, int]] | None = None,
    seed: int = 1,
    alignment: int = 0x10000,
) -> Counter[str]:
    """A ``.vmrs`` of ``image`` (minus ``holes``) in every legitimate form; returns the count of each form."""
    rng = random.Random(seed)
    ranges = cut_ranges([(r.gpa, r.length) for r in plan_ranges(image, holes or [])], rng)
    records = _layout(ranges)
    forms: Counter[str] = Counter()
    with HyperVStorageWriter(path, alignment=alignment) as w:
        w.set("/configuration/properties/version", VMRS_VM_VERSION)
        w.set("/savedstate/VmVersion", VMRS_VM_VERSION)
        w.set("/savedstate/type", "Normal")
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(records):
            w.set(f"/savedstate/RamMemoryBlock{i}", rec.build())
        full = 0
        for n, data, pages in _blocks(image, records):
            turn = FULL_FORMS[full] if pages == PAGES_PER_BLOCK and full < len(FULL_FORMS) else None
            full += pages == PAGES_PER_BLOCK
            value, form = every_form_value(data, pages, rng, turn)
            forms[form] += 1
            w.set(f"/savedstate/RamBlock{n}", value)
    return forms


def write_raw_vmrs(
    path: str | os.PathLike[str],
    image: MemoryImage,
    state: PartitionState,
    *,
    holes: list[tuple[int, int]] | None = None,
    alignment: int = 0x1000,
) -> int:
    """What openvmm's writer writes: every RamBlock the raw 1 MiB value, the last of a range zero-padded."""
    records = _layout([(r.gpa, r.length) for r in plan_ranges(image, holes or [])])
    count = 0
    with HyperVStorageWriter(path, alignment=alignment) as w:
        w.set("/configuration/properties/version", 0x0A00)
        w.set("/savedstate/VmVersion", 0x0A00)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(state))
        for i, rec in enumerate(records):
            w.set(f"/savedstate/RamMemoryBlock{i}", rec.build())
        for n, data, _ in _blocks(image, records):
            w.set(f"/savedstate/RamBlock{n}", data)
            count += 1
    return count
