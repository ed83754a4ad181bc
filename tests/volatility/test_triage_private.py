"""``vmssd triage``'s own pool while plugins run: nobody else can reach it, and nothing outlives it.

The local pool listens on no port (no Dask scheduler, no HTTP server), so another local user (uid
65534) has nothing to submit work to; a time limit ends what the plugin started; a run killed with
SIGKILL leaves a scratch folder that the next run removes; task files edited between runs are
recomputed, not trusted.  Every test runs real plugins (slow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vol_helpers import MIB, REPO, mixed_image, require_volatility, write_vmrs

require_volatility()
psutil = pytest.importorskip("psutil", reason="psutil is not installed")

sys.path.insert(0, str(REPO / "tests"))
from test_triage_cli import as_nobody, leftovers  # noqa: E402
from triage_tree import VM_A, WINDOWS_ID, _state  # noqa: E402

pytestmark = [pytest.mark.slow]

TEST_PLUGINS = Path(__file__).resolve().parent / "triage_plugins"


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ev") / "Virtual Machines"
    folder.mkdir()
    return write_vmrs(folder / f"{VM_A}.vmrs", mixed_image(2 * MIB, seed=5), _state(WINDOWS_ID))


def start(out: Path, paths: list[Path], *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "triage", "--out", str(out), "--no-progress"]
    cmd += ["--offline", "-p", str(TEST_PLUGINS), *extra, *map(str, paths)]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def runners(pid: int) -> list:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for k in kids:
        try:
            if "volatility3_vmssd.triage.runner" in " ".join(k.cmdline()):
                found.append(k)
        except psutil.Error:
            continue
    return found


def wait_for_runner(proc: subprocess.Popen[str], deadline: float = 120) -> list:
    end = time.monotonic() + deadline
    while time.monotonic() < end and proc.poll() is None:
        found = runners(proc.pid)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no plugin process seen (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


def listening(pid: int) -> list:
    """Every listening socket (TCP, UDP bound, Unix) of ``pid`` and its children."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = []
    for p in procs:
        try:
            conns = p.net_connections(kind="all")
        except psutil.Error:
            continue
        found += [c for c in conns if c.status == psutil.CONN_LISTEN or (c.type == 2 and c.laddr)]
    return found


def _nobody_submits(ports: list[int]) -> int:
    """As uid 65534: 0 when no port took a Dask client and ran a task, 1 when one did."""
    from distributed import Client

    for port in ports:
        try:
            with Client(f"tcp://127.0.0.1:{port}", timeout=3) as client:
                if client.submit(os.getuid).result(timeout=5) is not None:
                    return 1
        except Exception:
            continue
    return 0


def test_the_local_pool_listens_nowhere_and_another_user_cannot_submit(saved_state: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="the other user's attempt uses Dask's client")
    import distributed  # noqa: F401 - loaded before the fork: the other user cannot read the standard library

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = start(
        tmp_path / "out",
        [saved_state],
        "--plugins",
        "triagetest.stuck.Sleep",
        "--timeout",
        "300",
        env={"TMPDIR": str(scratch)},
    )
    try:
        (runner,) = wait_for_runner(proc)
        socks = listening(proc.pid)
        assert socks == [], socks  # no scheduler port, no HTTP server, no Unix socket: nothing to connect to
        ports = [c.laddr.port for c in socks if c.laddr and hasattr(c.laddr, "port")]
        assert as_nobody(_nobody_submits, ports) == 0
        proc.send_signal(signal.SIGTERM)  # stopping the run stops its plugins
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    assert not psutil.pid_exists(runner.pid) or runner.status() == psutil.STATUS_ZOMBIE
    assert list(scratch.iterdir()) == []


def test_a_time_limit_ends_what_the_plugin_started(saved_state: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    out = tmp_path / "out"
    proc = start(
        out,
        [saved_state],
        "--plugins",
        "triagetest.stuck.SpawnSleep",
        "--timeout",
        "20",
        env={"TRIAGETEST_PIDFILE": str(pidfile)},
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "timeout: triagetest.stuck.SpawnSleep" in stdout
    grandchild = int(pidfile.read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert leftovers(out) == []


def test_a_killed_run_leaves_scratch_that_the_next_run_removes(saved_state: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {"TMPDIR": str(scratch)}
    proc = start(tmp_path / "out", [saved_state], "--plugins", "triagetest.stuck.Sleep", env=env)
    (runner,) = wait_for_runner(proc)
    proc.kill()  # kill -9: no chance to clean up
    proc.communicate(timeout=60)
    runner.wait(30)  # the plugin process dies with the run (PR_SET_PDEATHSIG)
    (left,) = list(scratch.iterdir())
    assert left.name.startswith(f"vmssd-triage-{proc.pid}-")
    again = start(tmp_path / "out2", [saved_state], "--plugins", "hyperv.info", env=env)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert list(scratch.iterdir()) == []


def test_edited_task_files_are_recomputed_not_trusted(saved_state: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = start(out, [saved_state], "--plugins", "hyperv.info")
    assert first.communicate(timeout=300) and first.returncode == 0
    results = (out / "results" / "hyperv.info.jsonl").read_bytes()
    (task,) = [p for p in (out / "tasks").glob("*.json") if ".hyperv.info." in p.name]
    doc = json.loads(task.read_text())
    doc["rows"][0]["planted"] = "x"  # a column the plugin never had
    task.write_text(json.dumps(doc))
    second = start(out, [saved_state], "--plugins", "hyperv.info")
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    assert "(1 computed, 0 from an earlier run)" in stdout
    log = [json.loads(line) for line in (out / "tasks.log").read_text().splitlines()]
    (invalid,) = [e for e in log if e["event"] == "invalid"]
    assert invalid["error"] == "a row has a column the task did not declare"
    assert (out / "results" / "hyperv.info.jsonl").read_bytes() == results
