"""Resource attacks of the open-cost issue: build each input, open it in a child, print time and peak RSS.

    python -m tests.fuzz.resource                 # the issue's sizes (about a minute to build)
    python -m tests.fuzz.resource --scale 0.05    # the same inputs, smaller (the suite's run)

Every input is made by the tests' own writers, then damaged the way the issue's table says.  Each is
opened by ``SavedStateProvider`` (or ``BinFile``) in a fresh process doing ``hyperv.info``-level work
(open, summary, findings), which reports its wall time, CPU time and peak RSS (VmHWM).  Nothing is
asserted here: the suite checks the structure (``tests/test_resource_bounds.py``) and that every row
ends in a summary or a documented error; the limits (5 s, 300 MB) are printed beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from volatility3_vmssd.cpu.chunks import VID_SAVED_STATE_DESCRIPTOR, VM_SAVE_CHUNK_HEADER, ChunkId  # noqa: E402
from volatility3_vmssd.cpu.chunkwriter import build_partition_state  # noqa: E402
from volatility3_vmssd.cpu.cpujson import state_from_json  # noqa: E402
from volatility3_vmssd.memory.legacy_bin import BIN_HEADER, BIN_INDEX_ENTRY, write_bin  # noqa: E402
from volatility3_vmssd.storage import HyperVStorage, HyperVStorageWriter  # noqa: E402
from volatility3_vmssd.storage.defs import (  # noqa: E402
    FILE_HEADER,
    FILE_HEADER_CRC_OFFSET,
    HEADER_COPY_OFFSETS,
    KEY_ENTRY_CRC_OFFSET,
    OBJECT_TABLE_SIGNATURE,
    FileHeaderFields,
    ObjectType,
    ReplayLogHeaderFields,
    seal,
)
from volatility3_vmssd.vmrs.writer import write_fill_vmrs  # noqa: E402

TIME_LIMIT_S = 5.0
RSS_LIMIT_MB = 300
STATE = {"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"efer": "0xd01", "cr0": "0x80000011"}}}]}


def _state():  # type: ignore[no-untyped-def]
    return state_from_json(STATE)


def keys_1m(path: Path, scale: float, bad_crcs: bool = False) -> None:
    """A .vmrs whose /savedstate holds ``scale`` x 1,048,576 RamBlock keys (1 TiB described at 1.0)."""
    write_fill_vmrs(path, max(4, int(1024 * scale)) << 30, _state(), holes=())
    if bad_crcs:
        with HyperVStorage.open(path) as s:
            offsets = [k.file_offset for k in s.get("/savedstate").numbered_children("RamBlock").values()]
        with open(path, "r+b") as fh:
            for off in offsets:
                fh.seek(off + KEY_ENTRY_CRC_OFFSET)
                fh.write(b"\xde\xad\xbe\xef")


def _small_vmrs(path: Path, *, pad: int = 0) -> tuple[bytearray, int]:
    with HyperVStorageWriter(path) as w:
        w.set("/configuration/properties/version", 0x900)
        w.set("/savedstate/VmVersion", 0x900)
        w.set("/savedstate/savedVM/partition_state", build_partition_state(_state()))
    buf = bytearray(path.read_bytes())
    end = len(buf)
    buf += os.urandom(pad)
    return buf, end


def _reseal_headers(buf: bytearray, **changes: int) -> None:
    for at in HEADER_COPY_OFFSETS:
        fields = dataclasses.replace(FileHeaderFields.parse(buf, at), **changes)
        buf[at : at + FILE_HEADER.size] = FILE_HEADER.pack(*dataclasses.astuple(fields))
        seal(buf, FILE_HEADER_CRC_OFFSET, at, at + FILE_HEADER.size)


def journal_2_32(path: Path, scale: float) -> None:
    """A replay log claiming 2**32 - 1 pending entries over ~40 MB of garbage (the whole file is 'log')."""
    buf, _ = _small_vmrs(path, pad=int(40e6 * scale))
    log = FileHeaderFields.parse(buf).replay_log_offset
    _reseal_headers(buf, replay_log_size=1 << 40, replay_log_header_size=0xFFFFFFFF)
    head = dataclasses.replace(
        ReplayLogHeaderFields.parse(buf, log), pending_count=0xFFFFFFFF, maximum_entries=0xFFFFFFFF
    )
    buf[log : log + len(head.pack())] = head.pack()
    path.write_bytes(bytes(buf))


def huge_object_table(path: Path, scale: float) -> None:
    """A chained object table claiming 2**32 - 1 entries over ~40 MB of garbage."""
    buf, end = _small_vmrs(path, pad=int(40e6 * scale))
    struct.pack_into("<II", buf, end, OBJECT_TABLE_SIGNATURE, 0xFFFFFFFF)
    entry = HyperVStorageWriter._object_entry(ObjectType.OBJECT_TABLE, end, len(buf) - end, 1)
    root = 0x2008
    slot = next(root + i * 18 for i in range(227) if buf[root + i * 18] == 0)
    buf[slot : slot + 18] = entry
    path.write_bytes(bytes(buf))


def _partition_state_with(chunks: bytes) -> bytes:
    blob = bytearray(build_partition_state(_state()))
    epilog = len(blob) - VM_SAVE_CHUNK_HEADER.size
    blob[epilog:epilog] = chunks
    descriptor, header, _total = VID_SAVED_STATE_DESCRIPTOR.unpack_from(blob)
    VID_SAVED_STATE_DESCRIPTOR.pack_into(blob, 0, descriptor, header, len(blob))
    return bytes(blob)


def _vmrs_with_state(path: Path, blob: bytes) -> None:
    with HyperVStorageWriter(path) as w:
        w.set("/configuration/properties/version", 0x900)
        w.set("/savedstate/VmVersion", 0x900)
        w.set("/savedstate/savedVM/partition_state", blob)


def unknown_chunks(path: Path, scale: float) -> None:
    """partition_state with ``scale`` x 2,000,000 chunks of distinct unknown ids."""
    n = int(2_000_000 * scale)
    _vmrs_with_state(
        path, _partition_state_with(b"".join(VM_SAVE_CHUNK_HEADER.pack(0x7000_0000 + i, 0) for i in range(n)))
    )


def vp_markers(path: Path, scale: float) -> None:
    """partition_state with ``scale`` x 1,000,000 VP markers (index i, padded to 16)."""
    n = int(1_000_000 * scale)
    one = VM_SAVE_CHUNK_HEADER.pack(ChunkId.VP, 16)
    _vmrs_with_state(path, _partition_state_with(b"".join(one + struct.pack("<I12x", i) for i in range(n))))


def flooded_bin(path: Path, scale: float) -> None:
    """A legacy .bin whose ``scale`` x 1,000,000 index slots all name one RamBlock."""
    write_bin(path, [(0, bytes(16)), (1, bytes(16))])
    buf = bytearray(path.read_bytes())
    sig, ver, unknown, _cap, index_offset, names_offset, names_size, used = BIN_HEADER.unpack_from(buf)
    slots = int(1_000_000 * scale)
    index = BIN_INDEX_ENTRY.pack(*BIN_INDEX_ENTRY.unpack_from(buf, index_offset)) * slots
    names = bytes(buf[names_offset : names_offset + names_size])
    buf = buf[:index_offset] + index + names
    BIN_HEADER.pack_into(buf, 0, sig, ver, unknown, slots, index_offset, index_offset + len(index), names_size, used)
    path.write_bytes(bytes(buf))


ROWS: list[tuple[str, str, Callable[[Path, float], None]]] = [
    ("1,048,576 keys in one node (1 TiB described)", "vmrs", keys_1m),
    ("the same with bad key CRCs", "vmrs", lambda p, s: keys_1m(p, s, bad_crcs=True)),
    ("replay log claiming 2^32 entries", "vmrs", journal_2_32),
    ("chained object table with a huge count", "vmrs", huge_object_table),
    ("2,000,000 unknown partition_state chunk ids", "vmrs", unknown_chunks),
    ("1,000,000 VP markers", "vmrs", vp_markers),
    ("legacy .bin whose name index is flooded", "bin", flooded_bin),
]

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
t0, c0 = time.perf_counter(), time.process_time()
out = {}
try:
    from volatility3_vmssd import SavedStateProvider
    from volatility3_vmssd.errors import VmssdError, summarize
    load = SavedStateProvider.load_bin if sys.argv[2] == "bin" else SavedStateProvider.load_vmrs
    try:
        with load(sys.argv[1]) as p:
            p.summary()
            findings = p.findings()
            out["findings_kept"] = len(findings)
            out["findings_total"] = len(findings) + sum(f.suppressed for f in findings)
            out["summary_lines"] = len(summarize(findings))
    except VmssdError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
except Exception as exc:  # an undocumented exception: the row's verdict says so
    out["crash"] = f"{type(exc).__name__}: {exc}"[:200]
out["seconds"] = round(time.perf_counter() - t0, 3)
out["cpu_seconds"] = round(time.process_time() - c0, 3)
with open("/proc/self/status") as fh:
    out["peak_rss_mb"] = next(int(l.split()[1]) // 1024 for l in fh if l.startswith("VmHWM"))
print(json.dumps(out))
"""


def measure(path: Path, kind: str, timeout: float = 120) -> dict[str, object]:
    """Open ``path`` in a fresh interpreter (so its peak RSS is its own) and return what it measured."""
    cmd = [sys.executable, "-c", _CHILD, str(path), kind, str(REPO)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"crash": f"did not finish within {timeout} s"}
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"crash": f"child exited {run.returncode}: {run.stderr[-300:]}"}


def run(scale: float, rows: list[str] | None = None) -> list[dict[str, object]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="vmssd-resource-") as tmp:
        for name, kind, build in ROWS:
            if rows and not any(r in name for r in rows):
                continue
            path = Path(tmp) / f"input.{kind}"
            build(path, scale)
            result = {"input": name, "file_bytes": path.stat().st_size, **measure(path, kind)}
            # CPU time: on a shared host the wall time also measures the neighbours (docs/robustness.md).
            within = "crash" not in result and result.get("cpu_seconds", 1e9) < TIME_LIMIT_S  # type: ignore[operator]
            within = within and result.get("peak_rss_mb", 1e9) < RSS_LIMIT_MB  # type: ignore[operator]
            result["within_limits"] = within
            results.append(result)
            path.unlink()
            for extra in Path(tmp).iterdir():
                extra.unlink()
    return results


def report(results: list[dict[str, object]], scale: float) -> None:
    print(
        f"resource attacks at scale {scale} (limits: {TIME_LIMIT_S} s, {RSS_LIMIT_MB} MB peak RSS, measured in a child)"
    )
    head = f"{'input':<46}{'file MB':>9}{'wall s':>8}{'cpu s':>7}{'RSS MB':>8} {'findings':>10}  outcome"
    print(head)
    print("-" * len(head))
    for r in results:
        outcome = r.get("crash") or r.get("error") or f"opened; {r.get('summary_lines')} summary lines"
        kept = f"{r.get('findings_kept', '-')}/{r.get('findings_total', '-')}"
        print(
            f"{r['input']:<46}{int(r['file_bytes']) / 1e6:>9.1f}{r.get('seconds', 0):>8}{r.get('cpu_seconds', 0):>7}"  # type: ignore[call-overload]
            f"{r.get('peak_rss_mb', 0):>8} {kept:>10}  {'ok' if r['within_limits'] else 'OVER'}: {outcome}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rows", default="", help="comma-separated substrings of the rows to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = run(args.scale, [r for r in args.rows.split(",") if r])
    report(results, args.scale)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all("crash" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
