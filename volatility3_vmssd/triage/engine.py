"""``vmssd triage`` end to end: discover, classify, run one task per (saved state, plugin), summarise.

Discovery and classification run here, in the client (they read indexes, no RAM).  Analysis runs as
one child process per task (tasks.py), started by a pool: by default a private pool of threads in this
process, one per usable core, which listens on no port at all (nobody else can submit work to it);
or an existing Dask cluster (``scheduler``), whose workers must see the evidence at the same paths
(docs/triage.md says what that trusts).  The SHA-256 of every file is taken on the same pool.  The
client writes every finished task's result at once (outputs.py), so a re-run over the same folder
computes only what did not finish.  Dask itself retries the tasks of a worker that was lost.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import queue
import socket
import struct
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from ..errors import VmssdError
from ..host import usable_cores
from ..sources import is_remote, redact
from . import plugins as plugin_sets
from .classify import Classification, classify
from .discovery import Discovery, SavedStateFile, absolute, discover, shown
from .evidence import file_identity, iso_time, remote_identity
from .outputs import OutDir, task_id
from .progress import TaskProgress
from .tasks import execute, kill_running, remove_stale_scratch

__all__ = [
    "DaskMissingError",
    "SchedulerError",
    "TriageOptions",
    "TriageReport",
    "check_scheduler_address",
    "run_triage",
]

EXTRA_HINT = "pip install '.[triage]'"
HASH_TASK = "evidence.sha256"  # the name a file's hash task is saved under in tasks/
#: How long a --scheduler gets to answer: a TCP connection, Dask's greeting, the client's handshake.
CONNECT_SECONDS = 5.0
#: How long a scheduler may have no worker (at the start, or while tasks wait) before the run stops.
NO_WORKER_SECONDS = 10.0


class DaskMissingError(VmssdError):
    def __init__(self, missing: str) -> None:
        super().__init__(f"--scheduler runs on Dask, which is not installed ({missing}): {EXTRA_HINT}")


class SchedulerError(VmssdError):
    """The --scheduler given cannot be used: not an address, nothing there, not Dask, or no workers."""


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
    hash: bool = True  # SHA-256 of every file (size and modification time are always recorded)


@dataclasses.dataclass
class Entry:
    file: SavedStateFile
    cls: Classification
    plugins: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # plugin -> result
    probing: bool = False
    os_family: str | None = None  # the guest OS id's word, else what the probes found
    os_from: str | None = None  # "guest-os-id", "banner", "kernel"; None: unknown (or not analysed)
    os_note: str | None = None
    evidence: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # path -> size, mtime, sha256


@dataclasses.dataclass
class TriageReport:
    entries: list[Entry]
    computed: int
    resumed: int
    lost: int
    skipped_files: int
    out: Path
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(r["status"] for e in self.entries for r in e.plugins.values())

    @property
    def failed(self) -> bool:
        """Exit 1: tasks lost, or files and folders that could not be read."""
        return bool(self.lost or self.problems)


def _require_dask() -> None:
    for module in ("dask", "distributed"):
        try:
            __import__(module)
        except ImportError:
            raise DaskMissingError(module) from None


def check_scheduler_address(address: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a Dask scheduler address (``tcp://HOST:PORT``, ``tls://``, or a bare
    ``HOST:PORT``); SchedulerError in one line for anything else."""
    bad = SchedulerError(
        f"--scheduler {address!r} is not a Dask scheduler address: give tcp://HOST:PORT or tls://HOST:PORT"
    )
    text = address if "://" in address else f"tcp://{address}"
    try:
        parts = urlsplit(text)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("tcp", "tls") or not host or port is None or parts.path not in ("", "/"):
        raise bad
    if parts.query or parts.fragment or parts.username or parts.password:
        raise bad
    return parts.scheme, host, port


def _probe(address: str) -> str:
    """Fail in one line, within seconds, unless a Dask server answers at ``address``.  A Dask server
    greets a new TCP connection first (a frame whose first 8 bytes are a little-endian length); an HTTP
    server, or anything else, waits for the client: Dask's own client would then wait forever."""
    scheme, host, port = check_scheduler_address(address)
    where = f"{scheme}://{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
    except OSError as exc:
        raise SchedulerError(f"no Dask scheduler at {where}: {exc.strerror or exc}") from None
    with sock:
        if scheme != "tcp":  # TLS speaks only after its own handshake: left to the client (with a deadline)
            return where
        sock.settimeout(CONNECT_SECONDS)
        head = b""
        try:
            while len(head) < 8:
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    break
                head += chunk
        except OSError:
            pass
    if len(head) < 8 or not 0 < struct.unpack("<Q", head)[0] < 1 << 20:
        raise SchedulerError(
            f"{where} is not a Dask scheduler: it did not greet as one within {CONNECT_SECONDS:g} s"
            " (an HTTP or other service?)"
        )
    return where


def _dask_client(address: str) -> Any:
    """A Dask client of the scheduler at ``address``, with workers, or SchedulerError within seconds."""
    _require_dask()
    where = _probe(address)
    from distributed import Client

    # Dask logs every worker start and stop at INFO; keep them for -vv (the CLI sets the root level).
    logging.getLogger("distributed").setLevel(max(logging.getLogger().getEffectiveLevel(), logging.WARNING))
    box: dict[str, Any] = {}

    def connect() -> None:
        try:
            box["client"] = Client(address, timeout=CONNECT_SECONDS)
        except BaseException as exc:  # reported below, in the calling thread
            box["error"] = exc

    t = threading.Thread(target=connect, name="vmssd-connect", daemon=True)
    t.start()
    t.join(3 * CONNECT_SECONDS)
    if "client" not in box:
        err = box.get("error")
        if err is None:
            raise SchedulerError(f"{where} did not complete Dask's handshake within {3 * CONNECT_SECONDS:g} s")
        first = str(err).splitlines()[0] if str(err) else ""
        raise SchedulerError(f"cannot connect to the Dask scheduler at {where}: {type(err).__name__}: {first}")
    client = box["client"]
    try:
        client.wait_for_workers(1, timeout=NO_WORKER_SECONDS)
    except Exception:
        client.close()
        raise SchedulerError(
            f"the Dask scheduler at {where} has no workers (waited {NO_WORKER_SECONDS:g} s): start some"
            f" (dask worker {where}) or run without --scheduler"
        ) from None
    return client


class _Pool:
    """Where tasks run: submit(fn, *args) -> a future with add_done_callback; close() stops everything."""

    def __init__(self, opts: TriageOptions) -> None:
        self.client: Any = None
        self.threads: concurrent.futures.ThreadPoolExecutor | None = None
        if opts.scheduler:
            self.client = _dask_client(opts.scheduler)
        else:
            self.threads = concurrent.futures.ThreadPoolExecutor(
                max_workers=opts.workers or usable_cores(), thread_name_prefix="vmssd-triage"
            )

    def submit(self, fn: Callable[..., Any], *args: Any, key: str) -> Any:
        if self.client is not None:
            return self.client.submit(fn, *args, key=key, pure=False)
        assert self.threads is not None
        return self.threads.submit(fn, *args)

    def has_workers(self) -> bool:
        if self.client is None:
            return True
        try:
            return bool(self.client.scheduler_info().get("workers"))
        except Exception:
            return False

    def close(self) -> None:
        if self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)
            kill_running()  # the children of tasks still running (a stopped run): their threads then return
            self.threads.shutdown(wait=True)
        if self.client is not None:
            self.client.close()


def _spec(opts: TriageOptions, out: OutDir, f: SavedStateFile, plugin: str, tid: str) -> dict[str, Any]:
    return {
        "file": absolute(f.path),
        "vsv": absolute(f.partner) if f.partner else None,
        "plugin": plugin,
        "symbol_dirs": [os.path.abspath(p) for p in opts.symbol_dirs],
        "plugin_dirs": [os.path.abspath(p) for p in opts.plugin_dirs],
        "offline": opts.offline,
        "cache_path": opts.cache_path,
        "output_dir": os.path.abspath(out.files_dir(tid)),
    }


def hash_files(paths: Sequence[str]) -> dict[str, Any]:
    """A task: size, modification time and SHA-256 of each file, as a result that outputs.py saves."""
    rows: list[dict[str, Any]] = []
    errors = []
    for p in paths:
        try:
            rows.append({"path": shown(p), **file_identity(p)})
        except OSError as exc:
            errors.append(f"{shown(p)}: {exc.strerror or exc}")
    return {
        "status": "failed" if errors else "ok",
        "columns": ["path", "size", "mtime", "sha256"],
        "rows": rows,
        "error": "; ".join(errors) or None,
    }


def _stat_identity(path: str) -> dict[str, Any]:
    if is_remote(path):
        return remote_identity(path, digest=False)
    try:
        st = os.stat(path)
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}
    return {"size": st.st_size, "mtime": iso_time(st.st_mtime_ns / 1e9), "sha256": None}


def check_out(out: str, inputs: Sequence[str]) -> None:
    """Refuse an --out inside a folder being scanned: the run would read its own outputs as evidence."""
    real_out = os.path.realpath(out)
    for item in inputs:
        if os.path.isdir(item):
            real_in = os.path.realpath(item)
            if real_out == real_in or real_out.startswith(real_in.rstrip(os.sep) + os.sep):
                raise VmssdError(
                    f"--out {shown(out)} is inside the folder being scanned ({shown(item)}): choose an output"
                    " folder outside the evidence"
                )


def run_triage(opts: TriageOptions, stream: TextIO | None = None) -> TriageReport:
    """Run the whole triage; plugin failures and time-outs are results, not exceptions."""
    stream = sys.stderr if stream is None else stream
    check_out(opts.out, opts.paths)
    if opts.scheduler:
        _require_dask()
        _probe(opts.scheduler)  # one line, before any work, when nothing (or not Dask) answers there
    remove_stale_scratch()
    found = discover(opts.paths)
    if found.missing:
        raise VmssdError(f"not found: {', '.join(map(shown, found.missing))}")
    out = OutDir(opts.out)
    out.log("run", None, paths=[shown(redact(absolute(p))) for p in opts.paths], pid=os.getpid())
    for path, why in found.problems:
        out.log("problem", None, file=shown(path), error=why)
    entries = [Entry(f, classify(f)) for f in found.files]
    jobs = _Jobs(opts, out, found)
    for entry in entries:
        jobs.plan(entry)
    if jobs.pending:
        _compute(opts, jobs, stream)
    report = TriageReport(
        entries,
        jobs.counters["computed"],
        jobs.counters["resumed"],
        jobs.counters["lost"],
        found.skipped,
        out.root,
        found.problems,
        found.warnings,
    )
    _write_outputs(out, report)
    return report


class _Jobs:
    """The tasks of a run: which to load from an earlier run, which to submit, and what a result starts."""

    def __init__(self, opts: TriageOptions, out: OutDir, found: Discovery) -> None:
        self.opts, self.out = opts, out
        self.pending: list[tuple[Entry, str, str]] = []  # (entry, plugin or HASH_TASK, task id)
        self.counters = {"computed": 0, "resumed": 0, "lost": 0}

    def plan(self, entry: Entry) -> None:
        c = entry.cls
        if c.os_family:
            entry.os_family, entry.os_from = c.os_family, "guest-os-id"
        if self.opts.hash:
            self._want_hash(entry)
        else:
            entry.evidence = {p: _stat_identity(p) for p in entry.file.files}
        if c.analyse:
            first = plugin_sets.initial_plugins(c.os_family, self.opts.plugins)
            entry.probing = not self.opts.plugins and c.os_family is None
            self.want(entry, first)

    def _want_hash(self, entry: Entry) -> None:
        try:
            tid = task_id(entry.file.files, HASH_TASK)
        except OSError as exc:
            entry.evidence = {p: {"error": exc.strerror or str(exc)} for p in entry.file.files}
            return
        done = self.out.load(tid, HASH_TASK)
        if done is not None and done.get("status") == "ok":
            self.out.log("hash-resumed", tid, file=shown(entry.file.path))
            self.finish(entry, HASH_TASK, tid, done)
        else:
            self.pending.append((entry, HASH_TASK, tid))

    def want(self, entry: Entry, names: Sequence[str]) -> None:
        for plugin in names:
            if plugin in entry.plugins:
                continue
            tid = task_id(entry.file.files, plugin)
            done = self.out.load(tid, plugin)
            if done is not None and not (self.opts.retry_failed and done.get("status") != "ok"):
                self.counters["resumed"] += 1
                self.out.log("resumed", tid, plugin=plugin, file=shown(entry.file.path), status=done.get("status"))
                self.finish(entry, plugin, tid, done)
            else:
                entry.plugins[plugin] = {"status": "pending"}
                self.pending.append((entry, plugin, tid))

    def submit_args(self, entry: Entry, plugin: str, tid: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if plugin == HASH_TASK:
            return hash_files, ([absolute(p) for p in entry.file.files],)
        spec = _spec(self.opts, self.out, entry.file, plugin, tid)
        return execute, (spec, self.opts.timeout, self.opts.cache_mib)

    def finish(self, entry: Entry, plugin: str, tid: str, result: dict[str, Any]) -> None:
        if plugin == HASH_TASK:
            by_shown = {r.get("path"): r for r in result.get("rows") or []}
            for p in entry.file.files:
                row = by_shown.get(shown(absolute(p)))
                entry.evidence[p] = (
                    {k: row.get(k) for k in ("size", "mtime", "sha256")}
                    if row
                    else {**_stat_identity(p), "error": result.get("error")}
                )
            return
        entry.plugins[plugin] = result
        if entry.probing and plugin in (plugin_sets.PROBE, plugin_sets.WINDOWS_PROBE):
            found = result.get("status") == "ok" and bool(result.get("rows"))
            more, family = plugin_sets.after_probe(plugin, found, list(entry.plugins))
            if family:
                entry.os_family, entry.os_from = family, {"linux": "banner", "windows": "kernel"}[family]
            if plugin == plugin_sets.WINDOWS_PROBE or family:
                entry.probing = False
            if not more and family is None:
                entry.os_note = plugin_sets.UNKNOWN_OS_NOTE
            self.want(entry, more)


def _compute(opts: TriageOptions, jobs: _Jobs, stream: TextIO) -> None:
    out = jobs.out
    pool = _Pool(opts)
    progress = TaskProgress(stream=stream, enabled=opts.progress)
    done: queue.Queue[Any] = queue.Queue()
    running: dict[int, tuple[Any, Entry, str, str]] = {}
    try:

        def submit_pending() -> None:
            while jobs.pending:
                entry, plugin, tid = jobs.pending.pop(0)
                fn, args = jobs.submit_args(entry, plugin, tid)
                fut = pool.submit(fn, *args, key=f"vmssd-triage-{tid}")
                running[id(fut)] = (fut, entry, plugin, tid)
                if plugin != HASH_TASK:
                    out.log("submitted", tid, plugin=plugin, file=shown(entry.file.path))
                    progress.add(1)
                fut.add_done_callback(done.put)

        submit_pending()
        idle = 0.0
        while running:
            try:
                fut = done.get(timeout=NO_WORKER_SECONDS / 2)
            except queue.Empty:
                idle = 0.0 if pool.has_workers() else idle + NO_WORKER_SECONDS / 2
                if idle >= NO_WORKER_SECONDS:
                    raise SchedulerError(
                        f"the Dask scheduler at {opts.scheduler} has had no workers for {idle:g} s;"
                        f" {len(running)} task(s) not run (a re-run computes them)"
                    ) from None
                continue
            _, entry, plugin, tid = running.pop(id(fut))
            try:
                result = fut.result()
            except Exception as exc:  # the engine gave up (KilledWorker after repeated losses) or was stopped
                if plugin == HASH_TASK:
                    jobs.finish(entry, plugin, tid, {"status": "failed", "rows": [], "error": f"{type(exc).__name__}"})
                    continue
                jobs.counters["lost"] += 1
                result = {"status": "lost", "columns": [], "rows": [], "error": f"{type(exc).__name__}: {exc}"}
                out.log("lost", tid, plugin=plugin, file=shown(entry.file.path), error=result["error"])
            else:
                out.save(tid, plugin, result)  # before the log line: a logged "computed" task is always on disk
                if plugin == HASH_TASK:
                    out.log("hashed", tid, file=shown(entry.file.path), status=result["status"])
                else:
                    jobs.counters["computed"] += 1
                    out.log(
                        "computed",
                        tid,
                        plugin=plugin,
                        file=shown(entry.file.path),
                        status=result["status"],
                        worker=result.get("worker"),
                        seconds=result.get("seconds"),
                    )
            if plugin != HASH_TASK:
                progress.done(result["status"])
            jobs.finish(entry, plugin, tid, result)
            submit_pending()
    finally:
        progress.close()
        pool.close()


def summary_rows(report: TriageReport) -> list[dict[str, Any]]:
    rows = []
    for e in report.entries:
        f, c = e.file, e.cls
        notes = [n for n in (c.note, e.os_note) if n]
        rows.append(
            {
                "vm_name": f.vm_name,
                "vm_id": f.vm_id,
                "state": f.state,
                "checkpoint_name": f.checkpoint_name,
                "path": shown(f.path),
                "evidence": e.evidence.get(f.path),
                "partner": None if f.partner is None else shown(f.partner),
                "partner_evidence": None if f.partner is None else e.evidence.get(f.partner),
                "class": c.cls,
                "content": c.content,
                "vp_count": c.vp_count,
                "ram_bytes": c.ram_bytes,
                "guest_os": c.guest_os,
                "os_family": e.os_family or ("unknown" if e.plugins else None),
                "os_from": e.os_from,
                "findings": c.findings,
                "note": "; ".join(notes) or None,
                "plugins": {
                    p: {"status": r["status"], "rows": len(r.get("rows") or []), "error": r.get("error")}
                    for p, r in e.plugins.items()
                },
            }
        )
    return rows


def _write_outputs(out: OutDir, report: TriageReport) -> None:
    by_plugin: dict[str, tuple[list[str], list[dict[str, Any]], list[list[str]]]] = {}
    for e in report.entries:
        own = {"vm_name": e.file.vm_name, "vm_id": e.file.vm_id, "file": shown(e.file.path)}
        for plugin, result in e.plugins.items():
            columns, rows, csv_rows = by_plugin.setdefault(plugin, ([], [], []))
            got = list(result.get("columns") or [])
            if not columns and got:
                columns.extend(got)
            for row in result.get("rows") or []:
                rows.append({**own, **row})
            text = result.get("csv_rows")
            if text is None:  # a task file of an earlier version: the JSON values as text
                text = [
                    [str(r.get("tree_depth", 0)), *("" if r.get(c) is None else str(r.get(c)) for c in got)]
                    for r in result.get("rows") or []
                ]
            for line in text:
                csv_rows.append([_cell(own["vm_name"]), _cell(own["vm_id"]), own["file"], *line])
    out.write_results(by_plugin)
    out.write_summary(summary_rows(report), list(by_plugin))


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def human_summary(report: TriageReport) -> str:
    """A few lines for the terminal: what was found, what ran, what failed, where the outputs are."""
    classes = Counter(e.cls.cls for e in report.entries)
    vms = {(e.file.vm_id, e.file.vm_home) for e in report.entries if e.file.vm_id}
    analysed = sum(1 for e in report.entries if e.plugins)
    counts = report.counts()
    lines = [
        f"{len(report.entries)} file(s) of {len(vms)} VM(s); {analysed} saved state(s) analysed"
        + (f"; {report.skipped_files} other file(s) under the folders skipped" if report.skipped_files else ""),
        "  classes: " + ", ".join(f"{k} {v}" for k, v in sorted(classes.items())),
        f"  tasks: {sum(counts.values())} ({report.computed} computed, {report.resumed} from an earlier run): "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    ]
    for path, why in report.problems[:10]:
        lines.append(f"  not read: {shown(path)}: {why}")
    if len(report.problems) > 10:
        lines.append(f'  ... and {len(report.problems) - 10} more not read (tasks.log, event "problem")')
    lines.extend(f"  warning: {w}" for w in report.warnings[:10])
    problems = [
        (e, p, r) for e in report.entries for p, r in e.plugins.items() if r.get("status") not in ("ok", "pending")
    ]
    for e, p, r in problems[:10]:
        lines.append(f"  {r['status']}: {p} on {shown(e.file.path)}: {r.get('error')}")
    if len(problems) > 10:
        lines.append(f"  ... and {len(problems) - 10} more (summary.csv)")
    unknown = [e for e in report.entries if e.os_note]
    for e in unknown[:5]:
        lines.append(f"  unknown OS: {shown(e.file.path)}: {e.os_note}")
    damaged = [e for e in report.entries if e.cls.cls == "damaged"]
    for e in damaged[:5]:
        first = e.cls.findings[0] if e.cls.findings else "no detail"
        lines.append(
            f"  damaged: {shown(e.file.path)}: {first}"
            + (f" (+{len(e.cls.findings) - 1})" if e.cls.findings[1:] else "")
        )
    lines.append(
        f"  outputs: {shown(report.out / 'summary.csv')}, summary.jsonl, results/<plugin>.jsonl and .csv, tasks.log"
    )
    return "\n".join(lines)
