"""One triage task, as a Dask worker runs it: a child process runs the plugin, under a time limit.

The child (``python -m volatility3_vmssd.triage.runner``) is started with :mod:`subprocess`, not
:mod:`multiprocessing` (Dask's worker processes are daemonic and may not have multiprocessing
children).  It dies with the worker (docs/triage.md, "Faults"), so a killed worker leaves nothing
running and the engine's retry of the task starts from scratch elsewhere.  The child leads its own
process group: a time-out, or the end of the task, ends whatever the plugin started as well.  Each
task's scratch folder is named after the process that made it, so a later run removes the folders of
processes that were killed (``kill -9``) and can no longer remove their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["SCRATCH_PREFIX", "execute", "kill_running", "pid_alive", "remove_stale_scratch", "worker_cache_blocks"]

#: ``vmssd-triage-<pid>-<random>``: the pid says whether the folder is still in use.
SCRATCH_PREFIX = "vmssd-triage-"
_SCRATCH = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-")
_RUNNING: set[subprocess.Popen[bytes]] = set()
_RUNNING_LOCK = threading.Lock()
_CLEANED = False


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts); an id no system gives out does not."""
    if not 0 < pid < 1 << 22:  # Linux's PID_MAX_LIMIT; a name carrying a larger one was not made by a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_scratch(folder: str | None = None) -> int:
    """Remove the scratch folders of triage processes that are gone (killed before they could), only
    those of this user, real folders (not symlinks), whose process no longer exists.  Returns how many."""
    folder = folder or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        m = _SCRATCH.match(name)
        if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(folder, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)
            removed += not os.path.lexists(path)
    return removed


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End the child and everything it started (its process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def kill_running() -> None:
    """End every task child of this process (the run is being stopped)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        _kill_group(proc)


def worker_cache_blocks(per_worker: int) -> int:
    """This task's share of the worker's block-cache bound: tasks running at once on a worker split it."""
    threads = 1
    if "distributed" in sys.modules:  # never imported by the local pool: only a Dask worker has it loaded
        try:
            from distributed import get_worker

            threads = max(1, int(get_worker().state.nthreads))
        except (ImportError, ValueError, AttributeError):
            pass  # not on a Dask worker (a direct call, or the local pool): the task has the whole bound
    return max(1, per_worker // threads)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def execute(spec: dict[str, Any], timeout: float | None, cache_mib_per_worker: int) -> dict[str, Any]:
    """Run ``spec`` (see :func:`volatility3_vmssd.triage.runner.run_plugin`) in a child; never raises.

    Returns the runner's result, or ``status`` "timeout" / "failed" when the child was ended or died,
    with the worker's host name and process id (so a run's log shows which worker did what).
    """
    started = time.monotonic()
    spec = dict(spec, cache_blocks=worker_cache_blocks(cache_mib_per_worker))
    env = dict(os.environ)
    global _CLEANED
    if not _CLEANED:  # once per worker process
        _CLEANED = True
        remove_stale_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as tmp:
        spec_path, result_path, err_path = Path(tmp, "spec.json"), Path(tmp, "result.json"), Path(tmp, "stderr.txt")
        spec_path.write_text(json.dumps(spec))
        cmd = [
            sys.executable,
            "-m",
            "volatility3_vmssd.triage.runner",
            str(spec_path),
            str(result_path),
            str(os.getpid()),
        ]
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                cwd=tmp,
                start_new_session=True,  # its own process group: ended whole below
            )
            with _RUNNING_LOCK:
                _RUNNING.add(proc)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)  # what the plugin started and left behind goes with it
                proc.wait()
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc)
        if code is None:
            result: dict[str, Any] = {
                "status": "timeout",
                "columns": [],
                "rows": [],
                "error": f"no result within the time limit of {timeout:g} s; the plugin was stopped",
            }
        elif result_path.is_file():
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError) as exc:
                result = {"status": "failed", "columns": [], "rows": [], "error": f"unreadable result: {exc}"}
        else:
            result = {
                "status": "failed",
                "columns": [],
                "rows": [],
                "error": f"the plugin process exited with code {code} and no result: {_tail(err_path)}",
            }
    result["seconds"] = time.monotonic() - started
    result["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return result
