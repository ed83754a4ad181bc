"""The long fuzz run: every target in turn, each in its own process, then a clean replay of its corpus.

    python -m tests.fuzz.run --minutes 20

Seeds are rebuilt into the cache (``$VMSSD_FUZZ_CACHE``, default ``/tmp/vmssd-fuzz``); the
corpora there grow from run to run.  Each target gets a share of the time (the fast decoders more,
because they reach far more inputs per second).  Per target it prints the inputs executed, crashes
(exceptions outside the documented set, or broken invariants), inputs over 2 s (the watchdog
interrupts one after 30 s and goes on), the slowest input, the largest peak RSS of one input and of
the process, both for the fuzzing process (which also holds libFuzzer's corpus) and for an
uninstrumented replay of the final corpus and of every slow or memory-hungry input (what our code
needs): the run fails when the replay confirms an input over 2 s or 300 MB.  Crashing/slow inputs and their
tracebacks are kept under ``<cache>/runs/<time>/<target>/``.  The exit status is 1 when anything
was found.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .driver import RSS_LIMIT_MB, SLOW_SECONDS
from .seeds import REPO, TARGETS, build_seeds, default_cache

#: Relative time shares: the container and layer targets cost ~10 ms an input, the XPRESS and
#: partition_state ones ~0.5 ms, so the latter get more time and supply most of the executions.
WEIGHTS = {"storage": 4, "bin": 2, "ramblock": 3, "xpress": 5, "partition_state": 4, "layer": 3}


def _engine(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install atheris); using the mutation driver instead")
        return "mutate"
    return "atheris"


def _child(args: list[str], log: Path, timeout: float) -> int:
    cmd = [sys.executable, "-m", "tests.fuzz.driver", *args]
    with open(log, "wb") as fh:
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return -9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20, help="total fuzzing time across targets")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {TARGETS}")
    parser.add_argument("--engine", choices=("auto", "atheris", "mutate"), default="auto")
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--no-real", action="store_true", help="seed from writer-made files only")
    args = parser.parse_args(argv)
    chosen = [t for t in args.targets.split(",") if t]
    unknown = set(chosen) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    engine = _engine(args.engine)

    seeds = build_seeds(args.cache / "seeds", use_real=not args.no_real)
    run_dir = args.cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    total = args.minutes * 60
    weight = sum(WEIGHTS[t] for t in chosen)
    rows = []
    for target in chosen:
        seconds = total * WEIGHTS[target] / weight
        corpus = args.cache / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        for seed in seeds[target]:
            shutil.copyfile(seed, corpus / f"seed-{seed.name}")
        print(f"[{time.strftime('%H:%M:%S')}] {target}: {engine} for {seconds:.0f} s", flush=True)
        common = ["--target", target, "--corpus", str(corpus), "--out", str(run_dir)]
        rc = _child(["--engine", engine, "--seconds", str(seconds), *common], run_dir / f"{target}.log", seconds + 300)
        stats_file = run_dir / f"{target}.stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {"executions": 0}
        stats["exit_code"] = rc
        replay_out = run_dir / "replay"  # the final corpus and every saved crash/slow input, uninstrumented
        replay = ["--engine", "replay", "--target", target, "--corpus", str(corpus), str(run_dir / target)]
        _child([*replay, "--out", str(replay_out)], run_dir / f"{target}.replay.log", 900)
        replay_file = replay_out / f"{target}.stats.json"
        stats["replay"] = json.loads(replay_file.read_text()) if replay_file.exists() else None
        rows.append(stats)
    (run_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    return _report(rows, run_dir)


def _report(rows: list[dict], run_dir: Path) -> int:
    """The per-target table; 1 when anything was found (crash, slow input, RSS over the limit, dead child)."""
    print(f"{'':<16}{'--- fuzzing (instrumented) ---':>44}  {'--- replay (clean) ---':>42}")
    head = (
        f"{'target':<16}{'executions':>12}{'crashes':>9}{'>2s':>5}{'slowest s':>10}{'RSS MB':>8}"
        f"  {'inputs':>8}{'crashes':>8}{'>2s':>5}{'slowest s':>10}{'input MB':>9}{'>300':>5}"
    )
    print(head)
    print("-" * len(head))
    bad = False
    for r in rows:
        rep = r.get("replay") or {}
        print(
            f"{r.get('target', '?'):<16}{r.get('executions', 0):>12,}{r.get('crashes', 0):>9}{r.get('hangs', 0):>5}"
            f"{r.get('slowest_seconds', 0):>10.3f}{r.get('peak_rss_mb', 0):>8.0f}"
            f"  {rep.get('executions', 0):>8,}{rep.get('crashes', 0):>8}{rep.get('hangs', 0):>5}"
            f"{rep.get('slowest_seconds', 0):>10.3f}{rep.get('max_input_rss_mb', 0):>9.0f}"
            f"{rep.get('inputs_over_rss', 0):>5}"
        )
        for kind, count in sorted(r.get("crash_kinds", {}).items()):
            print(f"    crash {kind} x{count}")
        for kind, count in sorted(rep.get("crash_kinds", {}).items()):
            print(f"    crash on replay {kind} x{count}")
        if r.get("exit_code") not in (0, None):
            print(f"    fuzzing process exited with {r['exit_code']}: see {run_dir / (r.get('target', '?') + '.log')}")
        bad |= bool(r.get("crashes") or rep.get("crashes") or rep.get("hangs") or rep.get("inputs_over_rss"))
        bad |= rep.get("peak_rss_mb", 0) > RSS_LIMIT_MB or r.get("exit_code") not in (0, None)
    total = sum(r.get("executions", 0) for r in rows)
    print(
        f"total executions: {total:,}.  Inputs over {SLOW_SECONDS} s or RSS over {RSS_LIMIT_MB} MB count when"
        " the clean replay confirms them (instrumentation makes Python code several times slower)."
    )
    print(f"inputs, tracebacks and logs: {run_dir}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
