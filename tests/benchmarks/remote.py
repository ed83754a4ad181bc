"""Benchmark rows for evidence read in place from S3 (docs/remote.md): the real Linux guest's .vmrs in
moto's S3 on loopback, behind a proxy that counts requests and bytes (counts, not timings, for the
open row).

    python tests/benchmarks/remote.py            # alone (builds the guest's .vmrs, ~1 min)
    python tests/benchmarks/run.py               # these rows at the end of the real-guest section

Rows: what ``vmssd info`` fetches (target: no byte of a RamBlock value, <= 4 MiB in all), ``vol
linux.pslist`` from S3 over the local file (<= 2.5x on loopback), ``vmssd convert`` from S3 over the
local file (>= 0.5x the local throughput).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

from volatility3_vmssd import SavedStateProvider  # noqa: E402

MIB = 1 << 20
Row = Callable[..., None]
VolRun = Callable[[list[str], dict[str, str]], tuple[float, int, str]]


def ram_value_ranges(path: Path) -> list[tuple[int, int]]:
    """[start, end) of every RamBlock value in the file, sorted."""
    with SavedStateProvider.load_vmrs(path) as p:
        source = p.memory.source
        spans = [source.block_location(n) for n in source.block_numbers()]
    return sorted((off, off + size) for off, size in (s for s in spans if s is not None))


def overlap(fetched: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> int:
    total = 0
    for a, b in fetched:
        for s, e in ranges:
            if s < b and a < e:
                total += min(b, e) - max(a, s)
    return total


def _ranges(log: list) -> list[tuple[int, int]]:  # type: ignore[type-arg]
    out = []
    for r in log:
        if r.method == "GET" and r.range and r.range.startswith("bytes="):
            a, _, b = r.range[6:].partition("-")
            out.append((int(a), int(b) + 1))
    return out


def _vmssd(args: list[str], env: dict[str, str]) -> float:
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "volatility3_vmssd.cli.main", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def remote_rows(vmrs: Path, symbols: str | None, run_vol: VolRun | None, row: Row, reps: int, tmp: Path) -> None:
    from remote_store import S3
    from run import interleaved  # the harness's rule for a ratio of two whole-process timings

    store = S3()
    try:
        url = store.upload("bench", "host42/Virtual Machines/guest.vmrs", vmrs)
        env = store.env
        store.proxy.take_log()
        _vmssd(["info", url], env)
        log = store.proxy.take_log()
        fetched = sum(r.sent for r in log)
        ram = overlap(_ranges(log), ram_value_ranges(vmrs))
        row(
            "[linux-guest in S3] vmssd info: bytes fetched",
            fetched / MIB,
            "MiB",
            "<= 4, no RAM",
            fetched <= 4 * MIB and ram == 0,
            f"{len(log)} requests ({sum(r.method == 'HEAD' for r in log)} HEAD, listings included),"
            f" {ram} bytes of RamBlock values",
        )
        with SavedStateProvider.load_vmrs(vmrs) as p:
            ram_bytes = sum(n for _, n in p.get_guest_physical_memory_chunks()[1]) * 4096

        def convert(source: str, out: Path) -> float:
            return _vmssd(["convert", source, "-o", str(out), "--format", "raw", "-q", "--force"], env)

        local_run = (str(vmrs), tmp / "l.raw")
        times = interleaved(reps, {"local": local_run, "s3": (url, tmp / "r.raw")}, lambda run: convert(*run))
        local, remote = min(times["local"]), min(times["s3"])
        store.proxy.take_log()
        same = (tmp / "l.raw").read_bytes() == (tmp / "r.raw").read_bytes()
        ratio = local / remote
        row(
            "[linux-guest in S3] vmssd convert: S3 / local throughput",
            ratio,
            "x",
            ">= 0.5",
            ratio >= 0.5 and same,
            f"{ram_bytes / 1e6 / remote:.0f} vs {ram_bytes / 1e6 / local:.0f} MB/s; same image: {same}",
        )
        # the same through HTTP range requests (a static server that reads only the range it sends, where
        # moto copies the whole object for every ranged GET): what the store's own cost hides above
        from remote_store import Proxy, range_server

        with range_server(vmrs.parent) as upstream:
            proxy = Proxy(upstream)
            try:
                http = f"{proxy.url}/{vmrs.name}"
                times = interleaved(
                    reps, {"local": local_run, "http": (http, tmp / "h.raw")}, lambda run: convert(*run)
                )
                local, web = min(times["local"]), min(times["http"])
                hlog = proxy.take_log()  # the local runs do not pass the proxy
            finally:
                proxy.close()
        same = (tmp / "l.raw").read_bytes() == (tmp / "h.raw").read_bytes()
        ratio = local / web
        row(
            "[linux-guest over HTTP] vmssd convert: HTTP / local throughput",
            ratio,
            "x",
            ">= 0.5",
            ratio >= 0.5 and same,
            f"{ram_bytes / 1e6 / web:.0f} vs {ram_bytes / 1e6 / local:.0f} MB/s; {len(hlog) // reps} requests,"
            f" {sum(r.sent for r in hlog) / reps / MIB:.1f} MiB per run; same image: {same}",
        )
        if run_vol is not None and symbols is not None:
            run_vol(["-s", symbols, "-f", str(vmrs), "linux.pslist"], env)  # warm the identifier cache
            store.proxy.take_log()
            runs = interleaved(
                reps, {"local": str(vmrs), "s3": url}, lambda f: run_vol(["-s", symbols, "-f", f, "linux.pslist"], env)
            )
            (lt, _, lout), (rt, _, rout) = min(runs["local"]), min(runs["s3"])
            log = store.proxy.take_log()  # the local runs do not pass the proxy
            ratio = rt / lt
            same = lout.splitlines()[1:] == rout.splitlines()[1:]
            row(
                "[linux-guest in S3] vol linux.pslist: S3 / local wall time",
                ratio,
                "x",
                "<= 2.5",
                ratio <= 2.5 and same,
                f"{rt:.2f} s vs {lt:.2f} s; {len(log) // reps} requests,"
                f" {sum(r.sent for r in log) / reps / MIB:.1f} MiB per run; same rows: {same}",
            )
    finally:
        store.close()


def main() -> int:
    import lzma

    from run import run_vol  # the harness's vol runner (this checkout's plugins)
    from shared_data import LINUX_GUEST as guest  # the one rule for where real data lives

    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.images.memoryimage import MemoryImage
    from volatility3_vmssd.vmrs.writer import write_vmrs

    if not (guest / "memory" / "guest.elf.xz").exists():
        print(f"(no {guest}: nothing to measure)")
        return 0
    rows: list[dict[str, object]] = []

    def row(name: str, value: float, unit: str, target: str, met: bool | None, detail: str = "") -> None:
        rows.append({"measurement": name, "value": round(value, 4), "unit": unit, "target": target, "met": met,
                     "detail": detail})  # fmt: skip
        flag = "-" if met is None else ("yes" if met else "NO")
        print(f"{name:<62} {value:>12.4g} {unit:<8} {target:<28} {flag:<4} {detail}", flush=True)

    with tempfile.TemporaryDirectory(prefix="vmssd-bench-remote-") as tmpdir:
        tmp = Path(tmpdir)
        elf = tmp / "guest.elf"
        with lzma.open(guest / "memory" / "guest.elf.xz") as fin, open(elf, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 22)
        vmrs = tmp / "guest.vmrs"
        regs = state_from_json(json.loads((guest / "registers.json").read_text()))
        with MemoryImage.open(elf) as image:
            write_vmrs(vmrs, image, regs, holes=[(0xFFFC0000, 1 << 32)], jobs=2)
        elf.unlink()
        remote_rows(vmrs, str(guest / "symbols"), run_vol, row, 3, tmp)
    print(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
