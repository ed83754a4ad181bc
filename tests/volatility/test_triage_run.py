"""vmssd triage end to end on Dask: a host-like tree, 2 process workers, rows checked against vol alone.

One local cluster of 2 process workers (threads_per_worker=1) is shared by the runs of this module
through ``--scheduler``; the time-limit test lets ``vmssd triage`` start its own (``--workers 1``).
The real Linux guest joins the tree when ../shared is present.  vol runs use a private cache with the
shared ISF pre-validated (vol_helpers.preseed_isf_validation), and every run passes the same ``-s``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from vol_helpers import LINUX_GUEST, REPO, require_volatility, run_vol

require_volatility()
pytest.importorskip("distributed", reason="dask/distributed are not installed (pip install '.[triage]')")
psutil = pytest.importorskip("psutil", reason="psutil is not installed")

sys.path.insert(0, str(REPO / "tests"))
from triage_tree import VM_A, VM_D, VM_G, build_host  # noqa: E402

pytestmark = [pytest.mark.slow]

TEST_PLUGINS = Path(__file__).resolve().parent / "triage_plugins"
OWN = ("vm_name", "vm_id", "file")


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c,
        Client(c) as client,
    ):
        yield c, client


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    guest = None
    with contextlib.suppress(pytest.skip.Exception):  # no ../shared: the writer's saved states only
        guest = request.getfixturevalue("guest_vmrs")
    root = tmp_path_factory.mktemp("host")
    return root, build_host(root, guest), guest is not None


def symbols() -> list[str]:
    folder = LINUX_GUEST / "symbols"
    return ["-s", str(folder)] if folder.exists() else []


def triage(out: Path, paths: list[Path], cache: Path, *extra: str, scheduler: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "triage", "--out", str(out), "--offline"]
    cmd += ["--cache-path", str(cache / "volatility3"), "--no-progress", *symbols(), *extra]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    env = dict(os.environ, PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(cache))
    return subprocess.Popen(
        [*cmd, *map(str, paths)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"vmssd triage failed ({proc.returncode})\n{stdout}\n{stderr[-4000:]}"
    return stdout


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(host, cluster, vol_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    root = host[0]
    out = tmp_path_factory.mktemp("triage-out")
    stdout = finish(triage(out, [root], vol_cache, scheduler=cluster[0].scheduler_address))
    return out, stdout


def test_summary_classifies_every_file(host, run) -> None:
    root, expected, _ = host
    out, stdout = run
    with open(out / "summary.csv", newline="") as fh:
        rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in csv.DictReader(fh)}
    assert {rel: r["class"] for rel, r in rows.items()} == {rel: cls for rel, (cls, _) in expected.items()}
    for rel, (_, partner) in expected.items():
        got = rows[rel]["partner"]
        assert (Path(got).relative_to(root).as_posix() if got else None) == partner, rel
    json_rows = {Path(r["path"]).relative_to(root).as_posix(): r for r in jsonl(out / "summary.jsonl")}
    assert json_rows.keys() == rows.keys()
    a = json_rows[f"Hyper-V/Virtual Machines/{VM_A}.vmrs"]
    assert (a["vm_name"], a["vm_id"], a["vp_count"], a["ram_bytes"]) == ("web01", VM_A, 2, 2 << 20)
    assert a["plugins"]["hyperv.info"]["status"] == "ok" and set(a["plugins"]) == {
        "hyperv.info",
        "windows.info",
        "windows.pslist",
        "windows.cmdline",
        "windows.netscan",
    }
    assert json_rows[f"Hyper-V/Virtual Machines/{VM_D}.vmrs"]["findings"]  # damaged: its findings are listed
    for rel, r in rows.items():  # evidence identity, computed here from the files themselves
        path = Path(r["path"])
        assert r["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), rel
        assert int(r["size"]) == path.stat().st_size, rel
        if r["partner"]:
            assert r["partner_sha256"] == hashlib.sha256(Path(r["partner"]).read_bytes()).hexdigest(), rel
    assert rows[f"Hyper-V/Virtual Machines/{VM_A}.vmrs"]["os_family"] == "windows"
    assert rows[f"Hyper-V/Virtual Machines/{VM_A}.vmrs"]["os_from"] == "guest-os-id"
    # No guest OS id, no Linux banner, no Windows kernel: said so, and no more OS plugins run into failures.
    unknown = json_rows["loose/memory.bin"]
    assert list(unknown["plugins"]) == ["hyperv.info", "banners.Banners", "windows.info"]
    assert unknown["os_family"] == "unknown" and "guest OS unknown" in unknown["note"]
    assert "unknown OS: " in stdout
    for event in jsonl(out / "tasks.log"):
        assert datetime.fromisoformat(event["time"]).tzinfo is not None, event
    for rel, r in json_rows.items():
        if r["class"] in ("configuration", "guest-state", "no-memory", "vsv-without-bin", "not-hyperv"):
            assert r["plugins"] == {}, rel  # nothing to analyse
    assert "file(s) of" in stdout and "outputs:" in stdout


def test_real_linux_guest_gets_the_linux_set(host, run) -> None:
    if not host[2]:
        pytest.skip(f"needs {LINUX_GUEST} (the shared real-data folder); not present here")
    out, _ = run
    row = next(r for r in jsonl(out / "summary.jsonl") if r["path"].endswith(f"{VM_G}.vmrs"))
    # The QEMU-made guest never set HV_GUEST_OS_ID: banners.Banners decided, and found Linux.
    assert (row["os_family"], row["os_from"]) == ("linux", "banner")
    assert list(row["plugins"]) == ["hyperv.info", "banners.Banners", "linux.pslist", "linux.sockstat"]
    assert row["plugins"]["banners.Banners"]["rows"] > 0
    assert row["plugins"]["linux.pslist"]["status"] == "ok" and row["plugins"]["linux.pslist"]["rows"] > 10


def flatten(tree: list[dict], depth: int = 0) -> list[dict]:
    """vol -r json's nested rows in tree order, with the depth triage records."""
    rows = []
    for node in tree:
        children = node.pop("__children", [])
        rows.append({"tree_depth": depth, **node})
        rows.extend(flatten(children, depth + 1))
    return rows


def test_plugin_rows_equal_vol_on_each_file_alone(host, run, vol_cache: Path) -> None:
    """Every finished task against vol -r json on that file alone; a failed task: vol fails too."""
    out, _ = run
    summary = jsonl(out / "summary.jsonl")
    checks: list[tuple[str, str, str]] = []
    failed_seen: set[str] = set()
    for r in summary:
        for plugin, st in r["plugins"].items():
            if st["status"] == "ok":
                checks.append((r["path"], plugin, "ok"))
            elif plugin not in failed_seen:  # one vol run per plugin that fails, to keep the suite short
                failed_seen.add(plugin)
                checks.append((r["path"], plugin, st["status"]))
    assert any(c[2] == "ok" for c in checks) and failed_seen

    def vol(check: tuple[str, str, str]) -> tuple[tuple[str, str, str], subprocess.CompletedProcess[str]]:
        path, plugin, _ = check
        return check, run_vol(["-q", "--offline", "-r", "json", *symbols(), "-f", path, plugin], cache=vol_cache)

    results = {}
    for p in (out / "results").glob("*.jsonl"):
        for row in jsonl(p):
            results.setdefault((row["file"], p.stem), []).append({k: v for k, v in row.items() if k not in OWN})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for (path, plugin, status), done in pool.map(vol, checks):
            if status == "ok":
                assert done.returncode == 0, f"{plugin} on {path}: vol failed\n{done.stderr[-2000:]}"
                assert results.get((path, plugin), []) == flatten(json.loads(done.stdout)), (plugin, path)
            else:
                assert done.returncode != 0, f"{plugin} on {path} failed in triage ({status}) but not in vol"


def _runner_processes(worker_pids: set[int]) -> list:
    found = []
    for pid in worker_pids:
        try:
            for child in psutil.Process(pid).children():
                if "volatility3_vmssd.triage.runner" in " ".join(child.cmdline()):
                    found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def test_killed_worker_loses_nothing_and_a_rerun_computes_nothing(host, cluster, vol_cache: Path, tmp_path) -> None:
    root, _, _ = host
    c, client = cluster
    paths = [root / "Legacy", root / "loose", root / "Hyper-V" / "Snapshots", root / "Hyper-V" / "Virtual Machines"]
    paths[-1:] = [
        root / "Hyper-V" / "Virtual Machines" / f"{VM_A}.vmrs",
        root / "Hyper-V" / "Virtual Machines" / f"{VM_D}.vmrs",
    ]
    out = tmp_path / "out"
    proc = triage(out, paths, vol_cache, "--plugins", "hyperv.info,banners.Banners", scheduler=c.scheduler_address)
    workers = set(client.run(os.getpid).values())
    victim = None
    deadline = time.monotonic() + 300
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        for child in _runner_processes(workers):
            try:  # the task may end between listing and reading its spec: then wait for the next one
                worker_pid = child.ppid()
                spec = json.loads(Path(child.cmdline()[-3]).read_text())
            except (OSError, ValueError, psutil.Error):
                continue
            os.kill(worker_pid, signal.SIGKILL)
            victim = child
            break
        time.sleep(0.05)
    assert victim is not None, "no task was seen running"
    finish(proc)
    # The plugin process died with its worker (it is never left running on its own).
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    log = jsonl(out / "tasks.log")
    computed = [e for e in log if e["event"] == "computed"]
    assert not [e for e in log if e["event"] == "lost"]
    assert len(computed) == 10 and {e["status"] for e in computed} == {"ok"}  # 5 saved states x 2 plugins
    # The task that was running on the killed worker was computed again, by another worker process.
    again = [e for e in computed if e["plugin"] == spec["plugin"] and os.path.samefile(e["file"], spec["file"])]
    assert len(again) == 1 and not again[0]["worker"].endswith(f":{worker_pid}")
    before = {p.name: p.read_bytes() for p in (out / "results").iterdir()}

    finish(triage(out, paths, vol_cache, "--plugins", "hyperv.info,banners.Banners", scheduler=c.scheduler_address))
    log = jsonl(out / "tasks.log")
    second = log[max(i for i, e in enumerate(log) if e["event"] == "run") :]
    assert [e["event"] for e in second].count("resumed") == 10
    assert not [e for e in second if e["event"] in ("submitted", "computed", "lost")]
    assert {p.name: p.read_bytes() for p in (out / "results").iterdir()} == before


def test_time_limit_and_crash_are_results_and_the_others_finish(host, vol_cache: Path, tmp_path: Path) -> None:
    root, _, _ = host
    target = root / "Hyper-V" / "Virtual Machines" / f"{VM_A}.vmrs"
    plugins = "hyperv.info,triagetest.stuck.Sleep,triagetest.stuck.Crash"
    out = tmp_path / "out"
    stdout = finish(
        triage(
            out, [target], vol_cache, "--workers", "1", "--timeout", "15", "-p", str(TEST_PLUGINS), "--plugins", plugins
        )
    )
    (row,) = jsonl(out / "summary.jsonl")
    st = row["plugins"]
    assert st["hyperv.info"]["status"] == "ok"
    assert (
        st["triagetest.stuck.Sleep"]["status"] == "timeout"
        and "time limit of 15 s" in st["triagetest.stuck.Sleep"]["error"]
    )
    assert (
        st["triagetest.stuck.Crash"]["status"] == "failed"
        and "exited with code 9" in st["triagetest.stuck.Crash"]["error"]
    )
    assert "timeout: triagetest.stuck.Sleep" in stdout


def test_plugin_csv_has_headers_and_the_rows_of_vol_csv(host, run, vol_cache: Path) -> None:
    out, _ = run
    summary = jsonl(out / "summary.jsonl")
    ran = {p for r in summary for p in r["plugins"]}
    for plugin in ran:
        with open(out / "results" / f"{plugin}.csv", newline="") as fh:
            table = list(csv.reader(fh))
        assert table[0][:4] == ["vm_name", "vm_id", "file", "TreeDepth"], plugin  # even with no rows
        assert len(table) - 1 == len(jsonl(out / "results" / f"{plugin}.jsonl")), plugin
    # One file and plugin against vol -r csv on that file alone: the same table after our three columns.
    target = next(r for r in summary if r["path"].endswith(f"{VM_A}.vmrs") and "Snapshots" not in r["path"])
    done = run_vol(["-q", "--offline", "-r", "csv", "-f", target["path"], "hyperv.info"], cache=vol_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    vol_table = [row for row in csv.reader(done.stdout.splitlines(), escapechar="\\") if row]
    with open(out / "results" / "hyperv.info.csv", newline="") as fh:
        ours = [row for row in csv.reader(fh)]
    assert [ours[0][3:]] + [row[3:] for row in ours[1:] if row[2] == target["path"]] == vol_table


def test_the_pandas_recipe_in_the_docs_runs_as_written(host, run, tmp_path: Path) -> None:
    pytest.importorskip("pandas", reason="pandas is not installed")
    if not host[2]:
        pytest.skip(f"the recipe reads linux.pslist rows: needs {LINUX_GUEST} (the shared real-data folder)")
    out, _ = run
    doc = (REPO / "docs" / "triage.md").read_text()
    section = doc[doc.index("### Loading the outputs in pandas") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    (tmp_path / "triage").symlink_to(out)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The recipe as written, then checks that what it loaded is the run's (not an empty frame).
    n_rows = len(jsonl(out / "summary.jsonl"))
    n_procs = len(jsonl(out / "results" / "linux.pslist.jsonl"))
    checks = f"""
assert len(summary) == len(full) == len(status) == {n_rows}
assert len(procs) == {n_procs} > 10 and "COMM" in procs.columns
assert summary["sha256"].notna().all()
"""
    done = subprocess.run(
        [sys.executable, "-c", code + checks], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
