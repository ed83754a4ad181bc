"""``vmssd triage`` end to end: discover, classify, run one Dask task per (saved state, plugin), summarise.

Discovery and classification run here, in the client (they read indexes, no RAM).  Analysis runs on
Dask: by default a local cluster of process workers, one per usable core, one task at a time each;
or an existing cluster (``scheduler``), whose workers must see the evidence at the same paths.  The
client writes every finished task's result at once (outputs.py), so a re-run over the same folder
computes only what did not finish.  Dask itself retries the tasks of a worker that was lost.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from ..errors import VmssdError
from . import plugins as plugin_sets
from .classify import Classification, classify
from .discovery import SavedStateFile, discover
from .outputs import OutDir, task_id
from .progress import TaskProgress
from .tasks import execute

__all__ = ["DaskMissingError", "TriageOptions", "TriageReport", "run_triage", "usable_cores"]

EXTRA_HINT = "pip install 'volatility3-vmssd[triage]'"


class DaskMissingError(VmssdError):
    def __init__(self, missing: str) -> None:
        super().__init__(f"vmssd triage runs on Dask, which is not installed ({missing}): {EXTRA_HINT}")


@dataclasses.dataclass
class TriageOptions:
    paths: Sequence[str]
    out: str
    plugins: Sequence[str] | None = None
    symbol_dirs: Sequence[str] = ()
    plugin_dirs: Sequence[str] = ()
    offline: bool = False
    cache_path: str | None = None
    workers: int | None = None
    scheduler: str | None = None
    timeout: float | None = 1800.0
    cache_mib: int = 256
    retry_failed: bool = False
    progress: bool | None = None  # None: draw when stderr is a terminal


@dataclasses.dataclass
class Entry:
    file: SavedStateFile
    cls: Classification
    plugins: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # plugin -> result
    probing: bool = False


@dataclasses.dataclass
class TriageReport:
    entries: list[Entry]
    computed: int
    resumed: int
    lost: int
    skipped_files: int
    out: Path

    def counts(self) -> Counter[str]:
        return Counter(r["status"] for e in self.entries for r in e.plugins.values())


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _require_dask() -> None:
    for module in ("dask", "distributed"):
        try:
            __import__(module)
        except ImportError:
            raise DaskMissingError(module) from None


def _client(opts: TriageOptions) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    # Dask logs every worker start and stop at INFO; keep them for -vv (the CLI sets the root level).
    logging.getLogger("distributed").setLevel(max(logging.getLogger().getEffectiveLevel(), logging.WARNING))
    if opts.scheduler:
        return Client(opts.scheduler), None
    cluster = LocalCluster(
        n_workers=opts.workers or usable_cores(),
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return Client(cluster), cluster


def _spec(opts: TriageOptions, out: OutDir, f: SavedStateFile, plugin: str, tid: str) -> dict[str, Any]:
    return {
        "file": os.path.abspath(f.path),
        "vsv": os.path.abspath(f.partner) if f.partner else None,
        "plugin": plugin,
        "symbol_dirs": [os.path.abspath(p) for p in opts.symbol_dirs],
        "plugin_dirs": [os.path.abspath(p) for p in opts.plugin_dirs],
        "offline": opts.offline,
        "cache_path": opts.cache_path,
        "output_dir": os.path.abspath(out.files_dir(tid)),
    }


def run_triage(opts: TriageOptions, stream: TextIO | None = None) -> TriageReport:
    """Run the whole triage; plugin failures and time-outs are results, not exceptions."""
    _require_dask()
    stream = sys.stderr if stream is None else stream
    out = OutDir(opts.out)
    out.log("run", None, paths=[os.path.abspath(p) for p in opts.paths], pid=os.getpid())
    found = discover(opts.paths)
    if found.missing:
        raise VmssdError(f"not found: {', '.join(found.missing)}")
    entries = [Entry(f, classify(f)) for f in found.files]
    pending: list[tuple[Entry, str, str]] = []
    counters = {"computed": 0, "resumed": 0, "lost": 0}

    def want(entry: Entry, names: Sequence[str]) -> None:
        for plugin in names:
            if plugin in entry.plugins:
                continue
            tid = task_id(entry.file.files, plugin)
            done = out.load(tid)
            if done is not None and not (opts.retry_failed and done.get("status") != "ok"):
                counters["resumed"] += 1
                out.log("resumed", tid, plugin=plugin, file=entry.file.path, status=done.get("status"))
                finish(entry, plugin, done)
            else:
                entry.plugins[plugin] = {"status": "pending"}
                pending.append((entry, plugin, tid))

    def finish(entry: Entry, plugin: str, result: dict[str, Any]) -> None:
        entry.plugins[plugin] = result
        if entry.probing and plugin == plugin_sets.PROBE:
            entry.probing = False
            found_linux = result.get("status") == "ok" and bool(result.get("rows"))
            want(entry, plugin_sets.after_probe(found_linux, list(entry.plugins)))

    for entry in entries:
        if entry.cls.analyse:
            first = plugin_sets.initial_plugins(entry.cls.os_family, opts.plugins)
            entry.probing = not opts.plugins and entry.cls.os_family is None
            want(entry, first)

    if pending:
        _compute(opts, out, pending, counters, finish, stream)
    report = TriageReport(entries, counters["computed"], counters["resumed"], counters["lost"], found.skipped, out.root)
    _write_outputs(out, report)
    return report


def _compute(
    opts: TriageOptions,
    out: OutDir,
    pending: list[tuple[Entry, str, str]],
    counters: dict[str, int],
    finish: Callable[[Entry, str, dict[str, Any]], None],
    stream: TextIO,
) -> None:
    from distributed import as_completed

    client, cluster = _client(opts)
    progress = TaskProgress(stream=stream, enabled=opts.progress)
    try:
        queue = as_completed()
        by_key: dict[str, tuple[Entry, str, str]] = {}

        def submit_pending() -> None:
            while pending:
                entry, plugin, tid = pending.pop(0)
                spec = _spec(opts, out, entry.file, plugin, tid)
                fut = client.submit(execute, spec, opts.timeout, opts.cache_mib, key=f"vmssd-triage-{tid}", pure=False)
                by_key[fut.key] = (entry, plugin, tid)
                out.log("submitted", tid, plugin=plugin, file=entry.file.path)
                progress.add(1)
                queue.add(fut)

        submit_pending()
        for fut in queue:
            entry, plugin, tid = by_key.pop(fut.key)
            try:
                result = fut.result()
            except Exception as exc:  # the engine gave up (KilledWorker after repeated losses) or was stopped
                counters["lost"] += 1
                result = {"status": "lost", "columns": [], "rows": [], "error": f"{type(exc).__name__}: {exc}"}
                out.log("lost", tid, plugin=plugin, file=entry.file.path, error=result["error"])
            else:
                counters["computed"] += 1
                out.save(tid, result)  # before the log line: a logged "computed" task is always on disk
                out.log(
                    "computed",
                    tid,
                    plugin=plugin,
                    file=entry.file.path,
                    status=result["status"],
                    worker=result.get("worker"),
                    seconds=result.get("seconds"),
                )
            progress.done(result["status"])
            finish(entry, plugin, result)
            submit_pending()
    finally:
        progress.close()
        client.close()
        if cluster is not None:
            cluster.close()


def summary_rows(report: TriageReport) -> list[dict[str, Any]]:
    rows = []
    for e in report.entries:
        f, c = e.file, e.cls
        rows.append(
            {
                "vm_name": f.vm_name,
                "vm_id": f.vm_id,
                "state": f.state,
                "checkpoint_name": f.checkpoint_name,
                "path": f.path,
                "partner": f.partner,
                "class": c.cls,
                "content": c.content,
                "vp_count": c.vp_count,
                "ram_bytes": c.ram_bytes,
                "guest_os": c.guest_os,
                "os_family": c.os_family,
                "findings": c.findings,
                "note": c.note,
                "plugins": {
                    p: {"status": r["status"], "rows": len(r.get("rows") or []), "error": r.get("error")}
                    for p, r in e.plugins.items()
                },
            }
        )
    return rows


def _write_outputs(out: OutDir, report: TriageReport) -> None:
    plugins: list[str] = []
    by_plugin: dict[str, list[dict[str, Any]]] = {}
    for e in report.entries:
        for plugin, result in e.plugins.items():
            if plugin not in plugins:
                plugins.append(plugin)
            rows = by_plugin.setdefault(plugin, [])
            for row in result.get("rows") or []:
                rows.append({"vm_name": e.file.vm_name, "vm_id": e.file.vm_id, "file": e.file.path, **row})
    out.write_results(by_plugin)
    out.write_summary(summary_rows(report), plugins)


def human_summary(report: TriageReport) -> str:
    """A few lines for the terminal: what was found, what ran, what failed, where the outputs are."""
    classes = Counter(e.cls.cls for e in report.entries)
    vms = {e.file.vm_id for e in report.entries if e.file.vm_id}
    analysed = sum(1 for e in report.entries if e.plugins)
    counts = report.counts()
    lines = [
        f"{len(report.entries)} file(s) of {len(vms)} VM(s); {analysed} saved state(s) analysed"
        + (f"; {report.skipped_files} other file(s) under the folders skipped" if report.skipped_files else ""),
        "  classes: " + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())),
        f"  tasks: {sum(counts.values())} ({report.computed} computed, {report.resumed} from an earlier run): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    ]
    problems = [
        (e, p, r) for e in report.entries for p, r in e.plugins.items() if r.get("status") not in ("ok", "pending")
    ]
    for e, p, r in problems[:10]:
        lines.append(f"  {r['status']}: {p} on {e.file.path}: {r.get('error')}")
    if len(problems) > 10:
        lines.append(f"  ... and {len(problems) - 10} more (summary.csv)")
    damaged = [e for e in report.entries if e.cls.cls == "damaged"]
    for e in damaged[:5]:
        first = e.cls.findings[0] if e.cls.findings else "no detail"
        lines.append(
            f"  damaged: {e.file.path}: {first}" + (f" (+{len(e.cls.findings) - 1})" if e.cls.findings[1:] else "")
        )
    lines.append(f"  outputs: {report.out / 'summary.csv'}, summary.jsonl, results/<plugin>.jsonl, tasks.log")
    return "\n".join(lines)
