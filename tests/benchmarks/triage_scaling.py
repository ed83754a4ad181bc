"""How ``vmssd triage`` scales: the same N saved states on the local pool of 1 worker, then of 2.

Run from the repository root:

    python tests/benchmarks/triage_scaling.py                  # 8 saved states of 32 MiB
    python tests/benchmarks/triage_scaling.py --states 4 --mib 8 --plugins hyperv.info

Each saved state is written by the project's writer from memory-like pages (zero, text, random);
the default plugins are ``hyperv.info`` and ``banners.Banners`` (which reads, and so decodes, all of
the guest's RAM).  Both runs start from an empty ``--out`` (nothing resumes) and include starting
the pool, as a user's run does.  Not part of the test suite: it prints times and the speed-up,
and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from volatility3_vmssd.cpu.cpujson import state_from_json  # noqa: E402
from volatility3_vmssd.images.memoryimage import MemoryImage  # noqa: E402
from volatility3_vmssd.vmrs.writer import write_vmrs  # noqa: E402

PAGE = 4096


def memory(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    out = bytearray(size)
    text = b"Linux version? no: a benchmark guest's page of text, compressible by XPRESS. " * 64
    for page in range(0, size, PAGE):
        kind = rng.randrange(4)
        if kind == 1:
            out[page : page + PAGE] = text[:PAGE]
        elif kind == 2:
            out[page : page + PAGE] = rng.randbytes(PAGE)
        elif kind == 3:
            out[page : page + PAGE] = page.to_bytes(8, "little") * (PAGE // 8)
    return bytes(out)


def state() -> dict:
    vp = {"cr0": "0x80050033", "cr3": "0x10000", "cr4": "0x6f0", "efer": "0xd01", "rip": "0x1000"}
    return {"format": "vmssd-registers/1", "vps": [{"vp_index": 0, "vtls": {"0": vp}}]}


def build(folder: Path, count: int, mib: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        raw = folder / f"vm{i}.raw"
        raw.write_bytes(memory(mib << 20, seed=i))
        with MemoryImage.open(raw) as image:
            write_vmrs(folder / f"vm{i}.vmrs", image, state_from_json(state()))
        raw.unlink()


def run(folder: Path, out: Path, workers: int, plugins: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "triage", "--out", str(out), "--no-progress"]
    cmd += ["--offline", "--workers", str(workers), "--plugins", plugins, str(folder)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"vmssd triage failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    statuses: dict[str, int] = {}
    busy = 0.0
    for line in (out / "tasks.log").read_text().splitlines():
        event = json.loads(line)
        if event["event"] == "computed":
            statuses[event["status"]] = statuses.get(event["status"], 0) + 1
            busy += event["seconds"]
    return elapsed, {"tasks": statuses, "task_seconds": round(busy, 1), "load_after": _load()}


def _load() -> str:
    """The 1-minute load average: other processes on the machine skew both runs, and it says by how much."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=8)
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--plugins", default="hyperv.info,banners.Banners")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmssd-triage-bench-") as tmp:
        folder = Path(tmp, "host")
        build(folder, args.states, args.mib)
        tasks = args.states * len(args.plugins.split(","))
        print(f"load average before: {_load()}")
        one, st1 = run(folder, Path(tmp, "out1"), 1, args.plugins)
        two, st2 = run(folder, Path(tmp, "out2"), 2, args.plugins)
    print(f"{args.states} saved states of {args.mib} MiB, {tasks} tasks ({args.plugins}); {os.cpu_count()} CPUs")
    print(f"  1 worker : {one:7.1f} s  {st1}")
    print(f"  2 workers: {two:7.1f} s  {st2}")
    print(f"  speed-up : {one / two:.2f}x (aim: >= 1.7x on 2 cores)")


if __name__ == "__main__":
    main()
