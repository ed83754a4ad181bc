"""One triage task, as a Dask worker runs it: a child process runs the plugin, under a time limit.

The child (``python -m volatility3_vmssd.triage.runner``) is started with :mod:`subprocess`, not
:mod:`multiprocessing` (Dask's worker processes are daemonic and may not have multiprocessing
children).  It dies with the worker (docs/triage.md, "Faults"), so a killed worker leaves nothing
running and the engine's retry of the task starts from scratch elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["execute", "worker_cache_blocks"]


def worker_cache_blocks(per_worker: int) -> int:
    """This task's share of the worker's block-cache bound: tasks running at once on a worker split it."""
    threads = 1
    try:
        from distributed import get_worker

        threads = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass  # not on a Dask worker (a direct call): the task has the whole bound
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
    with tempfile.TemporaryDirectory(prefix="vmssd-triage-") as tmp:
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
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = None
        if code is None:
            result: dict[str, Any] = {
                "status": "timeout",
                "columns": [],
                "rows": [],
                "error": f"no result within the time limit of {timeout:g} s; the plugin was stopped",
            }
        elif result_path.is_file():
            result = json.loads(result_path.read_text())
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
