"""The ``--out`` folder: one result file per task (so a re-run resumes), the task log and the summaries.

Every file is written under a temporary name in the same folder and renamed into place, so a run
that is killed leaves either a whole file or none; a task's result file existing is what "this task
finished" means to the next run.  Layout (docs/triage.md, "Outputs")::

    tasks/<task id>.json       one finished task: status, error, columns, rows, seconds, worker
    tasks.log                  one JSON line per event (computed, resumed, lost), appended
    files/<task id>/           files a plugin wrote (dumps), never beside the evidence
    results/<plugin>.jsonl     every row of that plugin, with vm_name, vm_id and file
    summary.csv, summary.jsonl one row per discovered file (a legacy pair is one row)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..outputs import partial_output

__all__ = ["OutDir", "atomic_write", "task_id"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
        st = os.stat(f)
        h.update(f"\0{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    stem = _SAFE.sub("_", Path(first or "none").stem)[:40]
    return f"{stem}.{_SAFE.sub('_', plugin)}.{h.hexdigest()[:12]}"


class OutDir:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tasks = self.root / "tasks"
        self.results = self.root / "results"
        self.tasks.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "tasks.log"

    def files_dir(self, tid: str) -> Path:
        return self.root / "files" / tid

    def load(self, tid: str) -> dict[str, Any] | None:
        """The finished task's result, or None when it has not finished (or its file is unreadable)."""
        try:
            return json.loads((self.tasks / f"{tid}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def save(self, tid: str, result: dict[str, Any]) -> None:
        atomic_write(self.tasks / f"{tid}.json", json.dumps(result))

    def log(self, event: str, tid: str | None, **fields: Any) -> None:
        """Append one event: "run" (a run starts), "submitted", "computed", "resumed" or "lost"."""
        line = json.dumps({"time": time.time(), "event": event, "task": tid, **fields})
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        try:
            text = self.log_path.read_text(encoding="utf-8")
        except OSError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def write_results(self, by_plugin: dict[str, list[dict[str, Any]]]) -> None:
        for plugin, rows in by_plugin.items():
            text = "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows)
            atomic_write(self.results / f"{_SAFE.sub('_', plugin)}.jsonl", text)

    def write_summary(self, rows: list[dict[str, Any]], plugins: list[str]) -> None:
        atomic_write(self.root / "summary.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        fields = [
            "vm_name",
            "vm_id",
            "state",
            "checkpoint_name",
            "path",
            "partner",
            "class",
            "content",
            "vp_count",
            "ram_bytes",
            "guest_os",
            "finding_count",
            "findings",
            "note",
        ] + [f"plugin:{p}" for p in plugins]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            flat["finding_count"] = len(r["findings"])
            flat["findings"] = "; ".join(r["findings"])
            for p in plugins:
                st = r["plugins"].get(p)
                flat[f"plugin:{p}"] = "" if st is None else st["status"]
            writer.writerow({k: ("" if v is None else v) for k, v in flat.items()})
        atomic_write(self.root / "summary.csv", buf.getvalue())
