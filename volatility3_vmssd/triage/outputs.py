"""The ``--out`` folder: one result file per task (so a re-run resumes), the task log and the summaries.

Every file is written under a temporary name in the same folder and renamed into place, so a run
that is killed leaves either a whole file or none; a task's result file existing is what "this task
finished" means to the next run.  Layout (docs/triage.md, "Outputs")::

    tasks/<task id>.json       one finished task: status, error, columns, rows, seconds, worker
    tasks.log                  one JSON line per event (computed, resumed, lost), appended, ISO 8601 times
    files/<task id>/           files a plugin wrote (dumps), never beside the evidence
    results/<plugin>.jsonl     every row of that plugin, with vm_name, vm_id and file
    results/<plugin>.csv       the same rows as ``vol -r csv`` writes them, headers even when no row
    summary.csv, summary.jsonl one row per discovered file (a legacy pair is one row)

A task file is read back only when it is one (validated: a hand-edited or planted file is recomputed,
not trusted), and temporary files that a killed run left behind are removed by the next run.
File names are written as :func:`~volatility3_vmssd.triage.discovery.shown` prints them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..outputs import partial_output
from ..sources import is_remote, object_identity
from .discovery import shown
from .evidence import iso_time
from .tasks import pid_alive

__all__ = ["MAX_TASK_FILE", "OWN_COLUMNS", "STATUSES", "OutDir", "atomic_write", "task_id", "task_problem"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: the temporary names of :func:`volatility3_vmssd.outputs.partial_output`: ``NAME.PID.TOKEN.partial``
_STALE_TMP = re.compile(r"^.+\.(\d+)\.[0-9a-f]{8}\.partial$")
#: A task file larger than this is not read back (recomputed instead): bounds what a planted file costs.
MAX_TASK_FILE = 1 << 30
STATUSES = frozenset({"ok", "failed", "timeout"})
OWN_COLUMNS = ("vm_name", "vm_id", "file")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary name and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with partial_output(path, force=True) as fh:
        fh.write(text.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def task_id(files: Iterable[str], plugin: str) -> str:
    """A name for (saved state, plugin) that changes when a file does (path, size, modification time)."""
    h = hashlib.sha256(plugin.encode())
    first = None
    for f in files:
        first = first or f
        if is_remote(f):  # an object: its size and ETag (docs/remote.md)
            size, version = object_identity(f)
            h.update(b"\0" + f.encode() + f"\0{size}\0{version}".encode())
            continue
        st = os.stat(f)
        h.update(b"\0" + os.fsencode(os.path.abspath(f)) + f"\0{st.st_size}\0{st.st_mtime_ns}".encode())
    stem = _SAFE.sub("_", shown(os.path.splitext(os.path.basename(first or "none"))[0]))[:40]
    return f"{stem}.{_SAFE.sub('_', plugin)}.{h.hexdigest()[:12]}"


def task_problem(doc: Any, tid: str, plugin: str) -> str | None:
    """Why ``doc`` is not a finished task's result for ``tid`` (None when it is one)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("task") != tid or doc.get("plugin") != plugin:
        return "written for another task"
    if doc.get("status") not in STATUSES:
        return f"unknown status {doc.get('status')!r}"
    columns, rows = doc.get("columns"), doc.get("rows")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        return "columns are not a list of names"
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return "rows are not a list of objects"
    allowed = {"tree_depth", *columns}
    if any(not set(r) <= allowed for r in rows):
        return "a row has a column the task did not declare"
    csv_rows = doc.get("csv_rows")
    if csv_rows is not None and (
        not isinstance(csv_rows, list)
        or len(csv_rows) != len(rows)
        or any(not isinstance(r, list) or len(r) != len(columns) + 1 for r in csv_rows)
        or any(not isinstance(v, str) for r in csv_rows for v in r)
    ):
        return "CSV rows do not match the rows"
    if not isinstance(doc.get("error"), (str, type(None))):
        return "error is not text"
    return None


def _remove_stale_tmp(folder: Path) -> None:
    """Remove ``<name>.<pid>.<token>.partial`` files of writers (this user's) that are gone."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        m = _STALE_TMP.match(name)
        if m is None or pid_alive(int(m.group(1))):  # its writer (this process included) is still running
            continue
        path = folder / name
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                path.unlink()


class OutDir:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tasks = self.root / "tasks"
        self.results = self.root / "results"
        self.tasks.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "tasks.log"
        for folder in (self.root, self.tasks, self.results):
            _remove_stale_tmp(folder)

    def files_dir(self, tid: str) -> Path:
        return self.root / "files" / tid

    def write(self, path: Path, text: str) -> None:
        """:func:`atomic_write` (which leaves no temporary file behind when it fails, a full disk included)."""
        atomic_write(path, text)

    def load(self, tid: str, plugin: str) -> dict[str, Any] | None:
        """The finished task's result, or None when it has not finished; a task file that is not a valid
        result for this task (edited, planted, from another version) is logged and ignored."""
        path = self.tasks / f"{tid}.json"
        try:
            st = os.lstat(path)
        except OSError:
            return None
        why = None
        if not stat.S_ISREG(st.st_mode):
            why = "not a regular file"
        elif st.st_size > MAX_TASK_FILE:
            why = f"larger than {MAX_TASK_FILE} bytes"
        else:
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                why = task_problem(doc, tid, plugin)
            except (OSError, ValueError) as exc:
                why = f"unreadable: {exc}"
        if why is not None:
            self.log("invalid", tid, plugin=plugin, error=why)
            return None
        return doc

    def save(self, tid: str, plugin: str, result: dict[str, Any]) -> None:
        self.write(self.tasks / f"{tid}.json", json.dumps({**result, "task": tid, "plugin": plugin}))

    def log(self, event: str, tid: str | None, **fields: Any) -> None:
        """Append one event: "run" (a run starts), "submitted", "computed", "resumed", "lost", "invalid",
        "problem"; ``time`` in ISO 8601 (UTC)."""
        line = json.dumps({"time": iso_time(time.time()), "event": event, "task": tid, **fields})
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        try:
            text = self.log_path.read_text(encoding="utf-8")
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_results(self, by_plugin: dict[str, tuple[list[str], list[dict[str, Any]], list[list[str]]]]) -> None:
        """``results/<plugin>.jsonl`` and ``.csv`` for every plugin that ran: (columns, rows, CSV rows);
        each CSV row is ``vm_name, vm_id, file, TreeDepth, columns...`` (a plugin with no rows: headers)."""
        for plugin, (columns, rows, csv_rows) in by_plugin.items():
            name = _SAFE.sub("_", plugin)
            self.write(self.results / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow([*OWN_COLUMNS, "TreeDepth", *columns])
            writer.writerows(csv_rows)
            self.write(self.results / f"{name}.csv", buf.getvalue())

    def write_summary(self, rows: list[dict[str, Any]], plugins: list[str]) -> None:
        self.write(self.root / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        fields = [
            "vm_name",
            "vm_id",
            "state",
            "checkpoint_name",
            "path",
            "size",
            "mtime",
            "sha256",
            "partner",
            "partner_size",
            "partner_mtime",
            "partner_sha256",
            "class",
            "content",
            "vp_count",
            "ram_bytes",
            "guest_os",
            "os_family",
            "os_from",
            "finding_count",
            "findings",
            "note",
        ] + [f"plugin:{p}" for p in plugins]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            for prefix, key in (("", "evidence"), ("partner_", "partner_evidence")):
                ev = r.get(key) or {}
                for k in ("size", "mtime", "sha256"):
                    flat[prefix + k] = ev.get(k)
            flat["finding_count"] = len(r["findings"])
            flat["findings"] = "; ".join(r["findings"])
            for p in plugins:
                st = r["plugins"].get(p)
                flat[f"plugin:{p}"] = "" if st is None else st["status"]
            writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})
        self.write(self.root / "summary.csv", buf.getvalue())
