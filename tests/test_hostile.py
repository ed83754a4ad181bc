"""Regression tests for hostile inputs: each builds the minimal file that broke an invariant.

Invariants (docs/robustness.md): only documented exceptions escape; no allocation beyond what the
file holds or the caller asked for; loops over file-provided counts are bounded; decoding is linear;
a truncated file serves what it still has and reports the rest as findings.  Each test says what was
wrong before its fix.  Inputs are built by small builders from writer-made files (CRCs recomputed
with the fuzz harness's ``fix_crcs`` where the hostile file must look consistent).
"""

from __future__ import annotations

import gc
import json
import lzma
import shutil
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from builders import add_journal_entries, write_storage
from fuzz.crcfix import fix_crcs
from fuzz.seeds import synthetic_ram
from shared_data import BIOS_ROM, LINUX_GUEST, REPO, need

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.codecs import xpress
from volatility3_vmssd.cpu.chunks import ChunkId
from volatility3_vmssd.cpu.chunkwriter import build_partition_state
from volatility3_vmssd.cpu.cpujson import state_from_json
from volatility3_vmssd.errors import KEEP_PER_KIND, Findings, VmssdError
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.memory import pagedecode, ramblock
from volatility3_vmssd.memory.geometry import BLOCK_SIZE
from volatility3_vmssd.memory.guestmemory import GuestMemory, InMemoryBlockSource
from volatility3_vmssd.memory.ramblock import encode_block
from volatility3_vmssd.memory.rammap import RamMap, RamMemoryBlockRecord
from volatility3_vmssd.storage import HyperVStorage, HyperVStorageWriter
from volatility3_vmssd.storage.defs import (
    FILE_HEADER,
    KEY_ENTRY_HEADER,
    KEY_TABLE_HEADER,
    KEY_TABLE_SIGNATURE,
    OBJECT_ENTRY,
    OBJECT_TABLE_SIGNATURE,
    KeyType,
)
from volatility3_vmssd.storage.writer import replay_log_entry, replay_log_header
from volatility3_vmssd.vmrs.reader import ram_block_keys
from volatility3_vmssd.vmrs.writer import write_vmrs

LOG = 0x3000  # where HyperVStorageWriter puts the replay log (alignment 0x1000)
LOG_HEADER = 0x1000  # its header area: (0x1000 - 34) // 28 = 145 entry slots
ROOT = 0x2000


# ----------------------------------------------------------------------------------------- builders
def base(tmp_path: Path, **options: object) -> bytearray:
    """A small valid container from our writer (tables at 0x2000.., log at 0x3000)."""
    path = tmp_path / "base.vmrs"
    write_storage(path, {"configuration": {"version": 2304}, "a": {"b": 1, "c": "text"}}, **options)
    return bytearray(path.read_bytes())


def put_journal(buf: bytearray, pending: list[tuple[int, bytes]], *, data_at: int = LOG_HEADER) -> None:
    """Rewrite the replay log with ``pending`` (destination, data) entries, data laid out back to back."""
    table = b""
    pos = data_at
    for dst, data in pending:
        table += replay_log_entry(dst, len(data), pos, data)
        buf[LOG + pos : LOG + pos + len(data)] = data
        pos += len(data)
    buf[LOG : LOG + 34 + len(table)] = replay_log_header(len(pending), 145) + table


def free_root_slot(buf: bytearray) -> int:
    """Offset of the first empty (type 0) slot of the root object table."""
    count = struct.unpack_from("<I", buf, ROOT + 4)[0]
    for slot in range(count):
        at = ROOT + 8 + slot * OBJECT_ENTRY.size
        if buf[at] == 0:
            return at
    raise AssertionError("root object table is full")


def add_object(buf: bytearray, otype: int, offset: int, size: int) -> None:
    """Fill a free root slot with a valid (CRC-correct) object entry."""
    at = free_root_slot(buf)
    buf[at : at + OBJECT_ENTRY.size] = HyperVStorageWriter._object_entry(otype, offset, size, 1)


def write(tmp_path: Path, data: bytes | bytearray, name: str = "hostile.vmrs") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


class CallCounter:
    """Python function calls made inside a block: a measure of work that does not depend on the machine's load.

    A quadratic walk over ``n`` items shows up as ``n**2`` calls however fast the machine is, so the
    hostile-input tests bound this count (and allocations) instead of seconds.
    """

    def __init__(self) -> None:
        self.calls = 0

    def _count(self, frame: object, event: str, arg: object) -> None:
        if event == "call":
            self.calls += 1


@contextmanager
def bounded(calls: int, megabytes: float | None = None) -> Iterator[CallCounter]:
    """Fail if the block makes more than ``calls`` Python calls, or allocates more than ``megabytes`` at peak.

    Limits are about 5x what the fixed code needs; the unfixed code needed 10-1000x.
    """
    counter = CallCounter()
    if megabytes is not None:
        tracemalloc.start()
    previous = sys.getprofile()
    sys.setprofile(counter._count)
    try:
        yield counter
    finally:
        sys.setprofile(previous)
        peak = tracemalloc.get_traced_memory()[1] / (1 << 20) if megabytes is not None else 0.0
        if megabytes is not None:
            tracemalloc.stop()
    print(f"{counter.calls:,} calls, {peak:.1f} MiB at peak")
    assert counter.calls <= calls, f"made {counter.calls:,} Python calls (limit {calls:,})"
    assert megabytes is None or peak < megabytes, f"allocated {peak:.1f} MiB at peak (limit {megabytes} MiB)"


# ----------------------------------------------------------------------------------------- journal
def test_journal_destination_past_eof_is_not_applied(tmp_path: Path) -> None:
    # Was: a pending entry for offset 2**40 stretched virtual_size to 2**40, so the root table's
    # count (0xFFFFFFFF) "fit", and read_at() padded the 77 GB read with zeros: MemoryError (or
    # the OOM killer).  Now such an entry is refused with a finding.
    buf = base(tmp_path)
    put_journal(buf, [(1 << 40, b"\x01" * 16)])
    struct.pack_into("<I", buf, ROOT + 4, 0xFFFFFFFF)
    with bounded(5_000, 20), HyperVStorage.open(write(tmp_path, buf)) as s:
        assert s.virtual_size == s.file_size
        assert any(f.kind == "journal" and "beyond the end of the file" in f.message for f in s.findings)
        assert s.get("/configuration/version").value == 2304


def test_journal_entries_sharing_one_data_area_are_bounded(tmp_path: Path) -> None:
    # Was: 145 pending entries all naming the same 256 KiB of log data were each read and kept:
    # memory grew with entries x data (2.2 GB and 20 s for a crafted 1 MiB file with a larger log
    # header).  Now the entries' sizes must fit the log's data area together.
    buf = base(tmp_path, replay_log_data_size=0x40000)
    data = bytes(buf[ROOT : ROOT + 0x3F000])  # the file's own bytes: applying them changes nothing
    entry = replay_log_entry(ROOT, len(data), LOG_HEADER, data)
    buf[LOG + LOG_HEADER : LOG + LOG_HEADER + len(data)] = data
    buf[LOG : LOG + 34 + 145 * 28] = replay_log_header(145, 145) + entry * 145
    with bounded(5_000, 8), HyperVStorage.open(write(tmp_path, buf)) as s:
        assert s.replay_log is not None and s.replay_log.applied_count == 1
        # 144 refused, reported as the first KEEP_PER_KIND verbatim and one count (aggregated findings)
        assert s.findings.tally("journal", "journal-entry") == 144
        assert sum("more data than is left" in f.message for f in s.findings) == KEEP_PER_KIND
        assert [f.suppressed for f in s.findings if f.suppressed] == [144 - KEEP_PER_KIND]
        assert s.get("/a/b").value == 1


def test_overlapping_journal_entries_apply_in_order(tmp_path: Path) -> None:
    # The flattened journal (added so that a read costs O(log n), not O(n), for n entries) must
    # give what applying the entries one after the other gives: the later entry wins.
    buf = base(tmp_path)
    pending = [(0x100, b"A" * 16), (0x108, b"B" * 16), (0x104, b"C" * 4), (0x100, b""), (0x117, b"D")]
    put_journal(buf, pending)
    expected = bytearray(buf[0x100:0x120])
    for dst, data in pending:
        expected[dst - 0x100 : dst - 0x100 + len(data)] = data
    with HyperVStorage.open(write(tmp_path, buf)) as s:
        assert s.read_at(0x100, 0x20) == bytes(expected)
        assert s.read_at(0x10A, 3) == b"BBB" and s.read_at(0x0FF, 2) == b"\0A"


def test_many_tiny_journal_entries_do_not_slow_every_read(tmp_path: Path) -> None:
    # Was: read_at() walked every pending entry for every read, so n entries x m reads (key tables,
    # values) grew quadratically with the file.  3,000 one-byte entries with a 256 KiB log header.
    buf = base(tmp_path, replay_log_data_size=0x80000)
    struct.pack_into("<I", buf, FILE_HEADER.size - 4, 0x40000)  # ReplayLogHeaderSize of copy 0
    struct.pack_into("<I", buf, 0x1000 + FILE_HEADER.size - 4, 0x40000)
    n = 3000
    entries = [(0x1100 + i, bytes([i & 0xFF])) for i in range(n)]  # the unused tail of header copy 1
    table = b"".join(replay_log_entry(dst, 1, 0x40000 + i, data) for i, (dst, data) in enumerate(entries))
    buf[LOG : LOG + 34 + len(table)] = replay_log_header(len(entries), len(entries)) + table
    buf[LOG + 0x40000 : LOG + 0x40000 + len(entries)] = bytes(d[0] for _, d in entries)
    with bounded(200_000), HyperVStorage.open(write(tmp_path, fix_crcs(bytes(buf)))) as s:
        assert s.replay_log is not None and s.replay_log.applied_count == n
        assert s.read_at(0x1100, n) == bytes(i & 0xFF for i in range(n))
        for _ in range(3000):
            s.read_at(0x1800, 64)


# ----------------------------------------------------------------------------------------- object tables
def test_root_object_table_count_is_capped(tmp_path: Path) -> None:
    # Was: one flipped count byte made the root table span the whole file, so a multi-GiB .vmrs
    # parsed as 10**8 garbage entries (and as many CRC findings).  The root table holds at most
    # one 64 KiB alignment unit (3,640 slots; real files use one page, 227).
    buf = base(tmp_path) + bytes(1 << 20)
    struct.pack_into("<I", buf, ROOT + 4, 0xFFFFFFFF)
    with bounded(5_000, 30), HyperVStorage.open(write(tmp_path, buf)) as s:
        assert any("only 3640 fit" in f.message for f in s.findings)
        assert len(s.findings) < 4000


def test_overlapping_object_tables_are_read_once(tmp_path: Path) -> None:
    # Was: n chained tables 32 bytes apart, each declaring entries to the end of the region, were
    # all parsed: O(n x region) entries and CRC findings (46,000 findings from a 40 KB file).
    buf = base(tmp_path)
    region, step, n = len(buf), 32, 200
    buf += bytes(n * step + 64)
    for j in range(n):
        off = region + step * j
        struct.pack_into("<II", buf, off, OBJECT_TABLE_SIGNATURE, (len(buf) - off - 8) // 18)
        add_object(buf, 1, off, 0)
    with bounded(10_000, 20), HyperVStorage.open(write(tmp_path, buf)) as s:
        assert s.findings.tally("object-table", "table") >= n - 1  # the overlaps, and chain loops
        assert sum("overlaps an earlier object table" in f.message for f in s.findings) == KEEP_PER_KIND
        assert len(s.objects) < 1000 and len(s.findings) < 100


# ----------------------------------------------------------------------------------------- key tables
def add_chained_table(buf: bytearray, objects: list[tuple[int, int, int]]) -> None:
    """Append an object table holding ``(type, offset, size)`` entries, chained from the root."""
    at = len(buf)
    body = struct.pack("<II", OBJECT_TABLE_SIGNATURE, len(objects))
    body += b"".join(OBJECT_ENTRY.pack(t, 0, off, size, 1) for t, off, size in objects)
    buf += body
    add_object(buf, 1, at, len(body))


def test_overlapping_key_tables_are_parsed_once(tmp_path: Path) -> None:
    # Was: n key tables whose entries run into one another were each parsed to the end of the
    # region: n**2 / 2 keys (2,000 tables -> 2 million keys, minutes and gigabytes).  Each Int
    # entry carries 10 bytes of slack that hold the next table's header, so every table is valid
    # from its header to the end.  Now a key table overlapping one already read is skipped.
    buf = base(tmp_path)
    n, esize = 2000, KEY_ENTRY_HEADER.size + 2 + 8 + KEY_TABLE_HEADER.size
    region = len(buf)
    body = bytearray()
    for j in range(n):
        body += KEY_TABLE_HEADER.pack(KEY_TABLE_SIGNATURE, 10 + j, 1, 0)
        body += KEY_ENTRY_HEADER.pack(KeyType.INT, 0, esize - KEY_TABLE_HEADER.size, 0, 0, 0, j + 1, 2)
        body += b"k\0" + struct.pack("<q", j)
    for j in range(n - 1):  # widen entry j over the next table's header (its slack)
        at = j * esize + KEY_TABLE_HEADER.size
        struct.pack_into("<I", body, at + 2, esize)
    buf += body
    add_chained_table(buf, [(2, region + j * esize, len(body) - j * esize) for j in range(n)])
    with bounded(3_000_000), HyperVStorage.open(write(tmp_path, fix_crcs(bytes(buf)))) as s:
        assert s.findings.tally("key-table", "table") == n - 1
        assert sum("overlaps an earlier key table" in f.message for f in s.findings) == KEEP_PER_KIND
        assert [t.entries for t in s.key_tables][1:] == [n]


def test_long_parent_chain_into_a_cycle_is_linear(tmp_path: Path) -> None:
    # Was: each unreachable key walked its whole parent chain (no memo), and each was removed from
    # its parent's list one by one: 8,000 Node keys chained into a 2-cycle took 33 s.  Now 0.4 s.
    buf = base(tmp_path)
    n, esize = 8000, KEY_ENTRY_HEADER.size + 2 + 12
    offsets = [KEY_TABLE_HEADER.size + i * esize for i in range(n)]
    size = -(-(offsets[-1] + esize + KEY_ENTRY_HEADER.size + 1) // 0x1000) * 0x1000
    table = bytearray(size)
    KEY_TABLE_HEADER.pack_into(table, 0, KEY_TABLE_SIGNATURE, 7, 1, 0)
    for i, pos in enumerate(offsets):
        parent = offsets[i + 1] if i + 1 < n else offsets[n - 2]
        KEY_ENTRY_HEADER.pack_into(table, pos, KeyType.NODE, 0, esize, 7, parent, 0, 1, 2)
        table[pos + KEY_ENTRY_HEADER.size : pos + esize] = b"k\0" + struct.pack("<QI", 0, 1)
    end = offsets[-1] + esize
    KEY_ENTRY_HEADER.pack_into(table, end, KeyType.FREE, 0, size - end, 0, 0, 0, 0, 0)
    add_object(buf, 2, len(buf), size)
    buf += table
    with bounded(400_000), HyperVStorage.open(write(tmp_path, fix_crcs(bytes(buf)))) as s:
        assert any(f.kind == "orphan" and f"{n} key(s)" in f.message for f in s.findings)
        assert s.get("/a/b").value == 1


# ----------------------------------------------------------------------------------------- truncated copies
@pytest.fixture(scope="module")
def linux_guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(guest.elf, guest.vmrs) of the real Linux guest: conftest's session fixtures when it has them
    (so the 268 MB image is decompressed and written once per session), else built here."""
    try:
        return request.getfixturevalue("guest_elf"), request.getfixturevalue("guest_vmrs")
    except pytest.FixtureLookupError:
        pass
    src = need(LINUX_GUEST / "memory" / "guest.elf.xz")
    registers = json.loads(need(LINUX_GUEST / "registers.json").read_text())
    out = tmp_path_factory.mktemp("guest")
    elf, vmrs = out / "guest.elf", out / "guest.vmrs"
    with lzma.open(src) as fin, open(elf, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
    with MemoryImage.open(elf) as image:
        write_vmrs(vmrs, image, state_from_json(registers), holes=[BIOS_ROM], jobs=2)
    return elf, vmrs


def _cut_points(vmrs: Path) -> dict[str, int]:
    with HyperVStorage.open(vmrs) as s:
        tables_end = max(t.offset + t.size for t in s.key_tables)
        state = s.get("/savedstate/savedVM/partition_state").data_location
    assert state is not None and state[0] >= tables_end  # our writer: key tables first, then values
    size = vmrs.stat().st_size
    return {
        "after-key-tables": tables_end,
        "after-partition-state": state[0] + state[1],
        "25%": size // 4,
        "50%": size // 2,
        "90%": size * 9 // 10,
    }


CUTS = ["after-key-tables", "after-partition-state", "25%", "50%", "90%"]


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("cut", CUTS)
def test_truncated_linux_guest_serves_what_is_left(cut: str, linux_guest: tuple[Path, Path], tmp_path: Path) -> None:
    """A copy cut short still opens, serves every page it holds, and ``vmssd info`` reports the cut."""
    elf, vmrs = linux_guest
    at = _cut_points(vmrs)[cut]
    copy = tmp_path / f"cut-{cut.rstrip('%')}.vmrs"
    with open(vmrs, "rb") as fin:
        copy.write_bytes(fin.read(at))
    provider = SavedStateProvider.load_vmrs(copy)
    with provider, MemoryImage.open(elf) as image:
        whole, partial, gone = [], [], []
        with HyperVStorage.open(copy) as storage:
            block_keys = ram_block_keys(storage)
        for n, key in sorted(block_keys.items()):
            loc = key.data_location
            if loc is None or loc[0] + loc[1] <= at:
                whole.append(n)
            elif loc[0] < at:
                partial.append(n)
            else:
                gone.append(n)
        assert whole, "every cut keeps the inline (uniform) RamBlocks at least"
        for n in whole:  # identity map: RamBlock n is GPA n MiB
            assert provider.read_guest_physical_address(n << 20, BLOCK_SIZE) == image.read(n << 20, BLOCK_SIZE)
        for n in partial:  # the pages its surviving records produce are served, the rest are missing
            block = provider.read_guest_physical_address_padded(n << 20, BLOCK_SIZE)
            original = image.read(n << 20, BLOCK_SIZE)
            served = provider.read_guest_physical_address(n << 20, BLOCK_SIZE)  # stops at the first missing page
            assert served == original[: len(served)]
            for page in range(0, BLOCK_SIZE, 0x1000):
                if block[page : page + 0x1000] != original[page : page + 0x1000]:
                    assert block[page : page + 0x1000] == bytes(0x1000)
        for n in gone[:3]:
            with pytest.raises(VmssdError):
                provider.read_guest_physical_address(n << 20, 16)
            assert provider.read_guest_physical_address_padded(n << 20, 16) == bytes(16)
        if gone or partial:
            assert any(f.kind == "truncated" for f in provider.findings())
    if not (gone or partial) and cut != "after-partition-state":
        pytest.fail(f"cut {cut} at {at:#x} left every RamBlock whole; choose another cut")
    info = vmssd_info(copy)
    assert any(f.startswith("[truncated]") and str(copy) in f for f in info["findings"]), info["findings"]
    rows = hyperv_info_rows(copy)
    assert any(k == "Finding" and v.startswith("[truncated]") for k, v in rows), rows


def hyperv_info_rows(path: Path) -> list[tuple[str, str]]:
    """What ``vol -f PATH hyperv.info`` shows, in-process: stack our layer on the file, take its rows."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed")
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    from volatility3_vmssd.volatility.plugin_impl import info_rows
    from volatility3_vmssd.volatility.stackers import HyperVSavedStateStacker

    ctx = contexts.Context()
    ctx.config["base.location"] = path.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    layer = HyperVSavedStateStacker.stack(ctx, "base")
    assert layer is not None, f"{path} did not stack"
    ctx.add_layer(layer)
    return list(info_rows(layer))


def vmssd_info(path: Path) -> dict:
    """``vmssd info --json`` run as a user would run it."""
    r = subprocess.run(
        [sys.executable, "-m", "volatility3_vmssd.cli.main", "info", "--json", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------------------- findings in vmssd info
def _with_unknown_chunk(blob: bytes, chunk_id: int = 0x12345000) -> bytes:
    """``blob`` with an unknown 16-byte chunk before its Epilog (the last 16 bytes); TotalSize fixed."""
    assert struct.unpack_from("<I", blob, len(blob) - 16)[0] == ChunkId.EPILOG
    out = bytearray(blob[:-16] + struct.pack("<II8x", chunk_id, 16) + bytes(range(16)) + blob[-16:])
    struct.pack_into("<Q", out, 16, len(out))
    return bytes(out)


def test_every_finding_kind_reaches_vmssd_info(tmp_path: Path) -> None:
    """A CRC mismatch, an applied journal, an unknown chunk and a truncated RamBlock, each with file and offset."""
    from fuzz.seeds import synthetic_state

    path = tmp_path / "damaged.vmrs"
    with HyperVStorageWriter(path) as w:
        w.set("/configuration/properties/version", 0x0900)
        w.set("/savedstate/savedVM/partition_state", _with_unknown_chunk(build_partition_state(synthetic_state(2))))
        w.set("/savedstate/RamMemoryBlock0", RamMemoryBlockRecord(256, 0, 0).build())
        w.set("/savedstate/RamBlock0", encode_block(synthetic_ram(BLOCK_SIZE, seed=1)))
    with HyperVStorage.open(path) as s:
        table = s.key_tables[0].offset
        value = s.get("/savedstate/RamBlock0").data_location
    assert value is not None
    add_journal_entries(path, pending=[(table, bytes(32))])  # "journal": applied in memory
    buf = bytearray(path.read_bytes()[: value[0] + value[1] // 2])  # "truncated": RamBlock0 cut in half
    buf[0x1000 + 8] ^= 0xFF  # "crc": header copy 1's sequence no longer matches its CRC
    path.write_bytes(buf)

    findings = vmssd_info(path)["findings"]
    for kind in ("crc", "journal", "unknown-chunk", "truncated"):
        hits = [f for f in findings if f.startswith(f"[{kind}] {path} @ 0x")]
        assert hits, f"no [{kind}] finding with file and offset in {findings}"
    assert any("header copy 1 fails its CRC-32" in f for f in findings)
    assert any("0x12345000" in f for f in findings)


# ----------------------------------------------------------------------------------------- RamBlock decoding
def _variable_run_block(data: bytes, run: int = BLOCK_SIZE) -> bytes:
    """One RamBlock value made of XPRESS variable runs of ``run`` bytes (the largest the format allows)."""
    out = b""
    for at in range(0, len(data), run):
        chunk = data[at : at + run]
        packed = xpress.compress(chunk)
        out += struct.pack("<III", 0xFFFFFFFC, len(chunk), len(packed)) + packed
    return out + b"\xff\xff\xff\xff"


def test_page_reads_inside_one_variable_run_expand_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Was: with no block cache (SetMemoryBlockCacheLimit(0)) a read decoded each page on its own,
    # and every page of a 1 MiB variable run re-expanded the whole run: 256 expansions for one
    # read (0.6 s each in pure Python for a hostile stream: minutes).  Now one walk per run.
    ram = synthetic_ram(BLOCK_SIZE, seed=4)
    value = _variable_run_block(ram)
    calls = []
    real = pagedecode._xpress.decompress

    def counting(data: bytes, size: int, **kwargs: object) -> bytes:
        calls.append(size)
        return real(data, size, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pagedecode._xpress, "decompress", counting)
    memory = GuestMemory(RamMap.identity(256), InMemoryBlockSource({0: value}), cache_limit=0)
    assert memory.read_gpa(0x800, BLOCK_SIZE - 0x1000) == ram[0x800 : BLOCK_SIZE - 0x800]
    assert calls == [BLOCK_SIZE]


def test_decode_pages_matches_decode_block_on_every_range() -> None:
    ram = synthetic_ram(BLOCK_SIZE, seed=6)
    for value in (_variable_run_block(ram, 0x3001), encode_block(ram), encode_block(ram)[:30_000]):
        index = ramblock.index_block(value, path="x", file_offset=None, findings=Findings())
        block = pagedecode.decode_block(value, index)
        for first, stop in ((0, 256), (0, 1), (3, 9), (100, 101), (200, 256), (255, 256), (7, 7)):
            assert pagedecode.decode_pages(value, index, first, stop) == block[first << 12 : stop << 12]


def test_undecodable_pages_leave_no_reference_cycles() -> None:
    # Was: each undecodable XPRESS page was kept in the caller's ``errors`` list with its traceback,
    # which refers back to the decoder's frame (holding that list and the 1 MiB output): a reference
    # cycle only the cyclic GC frees.  Decoding damaged blocks one after another held their buffers
    # (fuzzing: 225 MB RSS after 12,000 inputs, 45 MB once fixed).  Measured here with the GC off.
    ram = synthetic_ram(BLOCK_SIZE, seed=9)
    pages = bytearray(encode_block(ram))  # XPRESS page records, each overwritten with 0xFF
    index = ramblock.index_block(pages, path="x", file_offset=0, findings=Findings())
    for page in range(256):
        if index.kinds[page] == ramblock.KIND_XPRESS:
            start = index.args[page]
            pages[start : start + index.lengths[page]] = b"\xff" * index.lengths[page]
    runs = bytearray(_variable_run_block(ram, 0x3001))  # variable runs, each stream broken after 16 bytes
    at = 0
    while at < len(runs) - 4:
        csize = struct.unpack_from("<I", runs, at + 8)[0]
        runs[at + 28 : at + 12 + csize] = b"\xff" * max(0, csize - 16)
        at += 12 + csize
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        for _ in range(10):
            for data in (bytes(pages), bytes(runs)):
                idx = ramblock.index_block(data, path="x", file_offset=0, findings=Findings())
                errors: list = []
                pagedecode.decode_block(data, idx, errors=errors)
                assert errors
                pagedecode.decode_block_pages(data, idx, errors=[])
                memory = GuestMemory(RamMap.identity(256), InMemoryBlockSource({0: data}), cache_limit=0)
                memory.read_gpa_padded(0, BLOCK_SIZE - 1)
                memory.read_gpa_padded(0x5000, 0x10)
        retained = tracemalloc.get_traced_memory()[0] / (1 << 20)
    finally:
        tracemalloc.stop()
        gc.enable()
    assert retained < 3, f"{retained:.1f} MiB still allocated after the decodes (reference cycles)"
