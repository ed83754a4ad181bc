"""Run one target: the bookkeeping harness and two engines (atheris, and a seeded mutation driver).

The harness counts executions, classifies every exception (documented for the target, or a crash),
and runs a watchdog over every input: its time (more than ``SLOW_SECONDS`` is a hang; past
``WATCHDOG_SECONDS`` the input is interrupted and the run goes on) and its own peak RSS (the kernel's
high-water mark is reset before each input; more than ``RSS_LIMIT_MB`` counts).  Crashing, slow and
memory-hungry inputs are saved with their traceback under ``<out>/<target>/`` and the run goes on.

Engines:

* ``atheris``: coverage-guided libFuzzer, in-process; only in a child process, because libFuzzer
  never returns (``python -m tests.fuzz.driver --engine atheris --target storage --seconds 120``);
* ``mutate``: a deterministic mutator (bit flips, interesting integers, truncation, splices,
  chunk copies) for pytest and for hosts where atheris does not install;
* ``replay``: every corpus file once, uninstrumented (clean timing and RSS after a run).
"""

from __future__ import annotations

import _thread
import argparse
import dataclasses
import hashlib
import json
import os
import random
import resource
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SLOW_SECONDS = 2.0
RSS_LIMIT_MB = 300
#: An input still running after this long is interrupted (KeyboardInterrupt in the main thread) and
#: recorded as a hang, so one runaway input cannot stall a long run.
WATCHDOG_SECONDS = 30.0
#: Address-space cap for fuzzing children: a runaway allocation becomes a MemoryError (a crash
#: we record) instead of pressure on a shared host.
ADDRESS_SPACE_LIMIT = 4 << 30


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM on Linux, else ``getrusage`` (``ru_maxrss``).

    ``ru_maxrss`` survives ``exec``: a child started by a big pytest process reports the parent's
    peak.  VmHWM belongs to the address space that exec created, so it measures only this process.
    """
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux/BSD: KiB


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0), so the next peak is one input's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class Watchdog:
    """A thread that interrupts the main thread when one input runs past ``WATCHDOG_SECONDS``.

    It interrupts with ``_thread.interrupt_main()``, which does nothing where SIGINT has no Python
    handler: a process started in the background by a non-interactive shell (a CI job, ``cmd &`` in a
    script) inherits SIGINT ignored, and there a runaway input ran forever.  So while armed, SIGINT
    gets Python's default handler when it has none, and gets its own back when disarmed.
    """

    def __init__(self, seconds: float = WATCHDOG_SECONDS) -> None:
        self.seconds = seconds
        self.fired = False
        self._deadline: float | None = None
        self._cond = threading.Condition()
        self._saved: Any = None  # SIGINT's handler while armed, when it was not Python's
        threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True).start()

    def arm(self) -> None:
        if threading.current_thread() is threading.main_thread() and not callable(signal.getsignal(signal.SIGINT)):
            self._saved = signal.signal(signal.SIGINT, signal.default_int_handler)
        with self._cond:
            self.fired = False
            self._deadline = time.monotonic() + self.seconds
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved)
            self._saved = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
                self.fired = True
                _thread.interrupt_main()


@dataclasses.dataclass
class Stats:
    """What one run of one target measured (written as ``<target>.stats.json``)."""

    target: str
    engine: str
    executions: int = 0
    crashes: int = 0  # inputs that raised outside the documented set (or broke an invariant)
    unique_crashes: int = 0
    hangs: int = 0  # inputs slower than SLOW_SECONDS
    slowest_seconds: float = 0.0
    slowest_input: str | None = None
    slowest_size: int = 0
    peak_rss_mb: float = 0.0
    rss_over_limit: bool = False
    interrupted: int = 0  # inputs stopped by the watchdog (counted in hangs too)
    inputs_over_rss: int = 0  # inputs whose own peak RSS passed RSS_LIMIT_MB
    max_input_rss_mb: float = 0.0  # the largest peak RSS of one input (high-water mark reset before each)
    max_input_rss_size: int = 0
    seconds: float = 0.0
    crash_kinds: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Harness:
    """Wraps one target; never lets an input stop the run."""

    def __init__(self, target: str, out_dir: Path | None, engine: str = "mutate") -> None:
        from .targets import targets

        self.target = targets()[target]
        self.stats = Stats(target, engine)
        self.out = out_dir / target if out_dir is not None else None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        self._seen: set[str] = set()
        self.crash_reports: list[str] = []
        self.watchdog = Watchdog()
        self._peak_so_far = peak_rss_mb()
        self._per_input_rss = reset_peak_rss()

    def _save(self, kind: str, data: bytes, text: str) -> str:
        digest = hashlib.sha1(data).hexdigest()[:16]
        name = f"{kind}-{digest}"
        if self.out is not None:
            (self.out / f"{name}.bin").write_bytes(data)
            (self.out / f"{name}.txt").write_text(text)
        return name

    def one(self, data: bytes) -> None:
        rss_before = max(self.stats.peak_rss_mb, self._peak_so_far)
        if self._per_input_rss:
            reset_peak_rss()
        start = time.perf_counter()
        self.watchdog.arm()
        try:
            self.target.run(data)
        except self.target.allowed:
            pass
        except KeyboardInterrupt:
            self.watchdog.disarm()
            if not self.watchdog.fired:
                raise
            self.stats.interrupted += 1
        except BaseException as exc:
            self._crash(data, exc)
        finally:
            self.watchdog.disarm()
        elapsed = time.perf_counter() - start
        st = self.stats
        input_rss = peak_rss_mb()
        self._peak_so_far = max(self._peak_so_far, input_rss)
        if input_rss > st.max_input_rss_mb:
            st.max_input_rss_mb = round(input_rss, 1)
            st.max_input_rss_size = len(data)
        if self._per_input_rss and input_rss > RSS_LIMIT_MB:
            st.inputs_over_rss += 1
            self._save("rss", data, f"peak RSS {input_rss:.0f} MB on this input (limit {RSS_LIMIT_MB} MB)")
        st.executions += 1
        if elapsed > st.slowest_seconds:
            st.slowest_seconds = elapsed
            st.slowest_size = len(data)
            st.slowest_input = self._save("slowest", data, f"{elapsed:.3f} s") if elapsed > 0.25 else None
        if elapsed > SLOW_SECONDS:
            st.hangs += 1
            self._save("hang", data, f"{elapsed:.3f} s for {len(data)} bytes")
        st.peak_rss_mb = self._peak_so_far
        if not self._per_input_rss and st.peak_rss_mb > RSS_LIMIT_MB and rss_before <= RSS_LIMIT_MB:
            st.rss_over_limit = True
            self._save("rss", data, f"peak RSS rose from {rss_before:.0f} to {st.peak_rss_mb:.0f} MB on this input")

    def _crash(self, data: bytes, exc: BaseException) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in tb if "volatility3_vmssd" in f.filename] or list(tb)
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        kind = f"{type(exc).__name__}@{where}"
        st = self.stats
        st.crashes += 1
        st.crash_kinds[kind] = st.crash_kinds.get(kind, 0) + 1
        if kind not in self._seen:
            self._seen.add(kind)
            st.unique_crashes += 1
            text = "".join(traceback.format_exception(exc))
            self.crash_reports.append(f"{kind}\n{text}")
            self._save("crash", data, text)

    def finish(self) -> Stats:
        self.stats.seconds = round(time.monotonic() - self._started, 1)
        self.stats.peak_rss_mb = round(max(self._peak_so_far, peak_rss_mb()), 1)
        self.stats.slowest_seconds = round(self.stats.slowest_seconds, 4)
        return self.stats


# ------------------------------------------------------------------------------------ mutation engine
_INTERESTING = (0, 1, 2, 3, 4, 7, 8, 15, 16, 17, 0x7F, 0x80, 0xFF, 0x100, 0x3FF, 0x1000, 0xFFF, 0x1001,
                0x8000, 0xFFFF, 0x10000, 0x100000, 0xFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFC, 0xFFFFFFFD,
                0xFFFFFFFE, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)  # fmt: skip
_WIDTHS = ((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q"))


def _hot_offset(rng: random.Random, data: bytes) -> int:
    """Mostly the metadata-rich front of a file; sometimes anywhere."""
    n = len(data)
    if rng.random() < 0.6:
        return rng.randrange(min(n, 0x4000))
    return rng.randrange(n)


def mutate(rng: random.Random, data: bytes, seeds: Sequence[bytes], max_len: int) -> bytes:
    """One to four stacked mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        n = len(buf)
        op = rng.randrange(9)
        if n == 0:
            buf += rng.randbytes(rng.randrange(1, 64))
            continue
        if op == 0:  # bit flip
            at = _hot_offset(rng, buf)
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:  # random byte
            buf[_hot_offset(rng, buf)] = rng.randrange(256)
        elif op in (2, 3):  # interesting integer, any width, sometimes relative to the length
            width, fmt = rng.choice(_WIDTHS)
            value = rng.choice(_INTERESTING)
            if rng.random() < 0.2:
                value = n + rng.randrange(-64, 64)
            at = _hot_offset(rng, buf)
            if at + width <= n:
                struct.pack_into(fmt, buf, at, value & ((1 << (8 * width)) - 1))
        elif op == 4:  # truncate
            del buf[rng.randrange(n) :]
        elif op == 5:  # delete a chunk
            at = rng.randrange(n)
            del buf[at : at + rng.randrange(1, 256)]
        elif op == 6:  # insert random bytes
            at = rng.randrange(n)
            buf[at:at] = rng.randbytes(rng.randrange(1, 64))
        elif op == 7:  # copy a chunk of the input over another place
            size = rng.randrange(1, min(n, 4096) + 1)
            src, dst = rng.randrange(n - size + 1), rng.randrange(n - size + 1)
            buf[dst : dst + size] = buf[src : src + size]
        else:  # splice with another seed
            other = rng.choice(seeds)
            if other:
                cut = rng.randrange(min(n, len(other)) + 1)
                buf = buf[:cut] + other[cut:] if rng.random() < 0.5 else bytearray(other[:cut]) + buf[cut:]
    return bytes(buf[:max_len])


def run_mutation(
    harness: Harness,
    seeds: Sequence[bytes],
    *,
    iterations: int,
    seconds: float,
    rng_seed: int = 20261127,
    progress: Callable[[Stats], None] | None = None,
) -> Stats:
    """Seeds first, then ``iterations`` mutants (deterministic order), stopping early after ``seconds``."""
    rng = random.Random(rng_seed)
    deadline = time.monotonic() + seconds
    corpus = [s for s in seeds if s] or [b""]
    for seed in corpus:
        harness.one(seed)
    for i in range(iterations):
        if time.monotonic() > deadline:
            break
        child = mutate(rng, rng.choice(corpus), corpus, harness.target.max_len)
        harness.one(child)
        if progress is not None and i % 1000 == 0:
            progress(harness.stats)
    return harness.finish()


# ------------------------------------------------------------------------------------ atheris engine
def run_atheris(target: str, seconds: float, corpus: Path, out: Path, stats_file: Path) -> None:
    """Coverage-guided run; writes ``stats_file`` (also every few seconds) and exits the process."""
    import atheris

    # Only the package is instrumented: coverage of the harness itself would be noise (and slower).
    with atheris.instrument_imports(include=["volatility3_vmssd"]):
        import volatility3_vmssd.codecs._xpress_python
        import volatility3_vmssd.codecs.xpress
        import volatility3_vmssd.cpu.chunkparser
        import volatility3_vmssd.cpu.cpumode
        import volatility3_vmssd.cpu.guestos
        import volatility3_vmssd.memory.guestmemory
        import volatility3_vmssd.memory.legacy_bin
        import volatility3_vmssd.memory.pagedecode
        import volatility3_vmssd.memory.ramblock
        import volatility3_vmssd.memory.rammap
        import volatility3_vmssd.memory.records
        import volatility3_vmssd.provider
        import volatility3_vmssd.storage.reader
        import volatility3_vmssd.volatility.layer  # noqa: F401

        from . import crcfix, targets  # noqa: F401

    from .targets import Scratch

    harness = Harness(target, out, engine="atheris")
    deadline = time.monotonic() + seconds
    last_flush = [time.monotonic()]

    def flush() -> None:
        stats_file.write_text(json.dumps(harness.finish().to_json(), indent=1))

    def test_one_input(data: bytes) -> None:
        harness.one(data)
        now = time.monotonic()
        if now - last_flush[0] > 5:
            last_flush[0] = now
            flush()
        if now > deadline:
            flush()
            Scratch.cleanup()
            sys.stdout.flush()
            os._exit(0)

    max_len = harness.target.max_len
    argv = [
        sys.argv[0],
        str(corpus),
        f"-max_len={max_len}",
        f"-max_total_time={int(seconds) + 30}",
        "-timeout=20",  # libFuzzer's own kill switch; the harness already flags anything over SLOW_SECONDS
        "-rss_limit_mb=3072",
        "-print_final_stats=0",
        "-close_fd_mask=0",
    ]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--engine", choices=("atheris", "mutate", "replay"), default="atheris")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument(
        "--corpus", type=Path, nargs="+", required=True, help="seed/corpus directories (atheris adds to the first)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where crashes, hangs and stats go")
    parser.add_argument("--iterations", type=int, default=10**9)
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    args.out.mkdir(parents=True, exist_ok=True)
    stats_file = args.out / f"{args.target}.stats.json"
    if args.engine == "atheris":
        run_atheris(args.target, args.seconds, args.corpus[0], args.out, stats_file)
        return 0
    files = [p for d in args.corpus if d.is_dir() for p in sorted(d.iterdir())]
    seeds = [p.read_bytes() for p in files if p.is_file() and p.suffix != ".txt"]
    if args.engine == "replay":  # every corpus input once, uninstrumented: clean time and RSS figures
        harness = Harness(args.target, args.out, engine="replay")
        for data in seeds:
            harness.one(data)
        stats = harness.finish()
    else:
        stats = run_mutation(Harness(args.target, args.out), seeds, iterations=args.iterations, seconds=args.seconds)
    stats_file.write_text(json.dumps(stats.to_json(), indent=1))
    from .targets import Scratch

    Scratch.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
