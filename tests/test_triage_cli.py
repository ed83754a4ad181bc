"""``vmssd triage`` run as a user runs it (a subprocess), against the trees and arguments that broke it:
names that are not UTF-8, FIFOs and devices, paths too long, unreadable folders, one VM ID twice, ``--out``
inside the evidence, a full disk, absurd ``--workers``, ``--scheduler`` at the wrong thing, stale scratch
folders.  Each checks the exit code, one line and no traceback, nothing left behind and the evidence's
hashes unchanged.  The trees hold no saved state with memory, so no Volatility plugin runs (fast); the
runs that need plugins, a Dask scheduler or a second user are marked slow.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.server
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from triage_tree import VM_A, vmcx

REPO = Path(__file__).resolve().parent.parent
TEST_PLUGINS = REPO / "tests" / "volatility" / "triage_plugins"


def vmssd(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None, timeout: float = 120, **kw
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", *map(os.fspath, args)]
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", env=full_env, timeout=timeout, check=False, **kw
    )


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def fingerprints(root: Path) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` (names as bytes: not all are UTF-8)."""
    out = {}
    for folder, _, names in os.walk(os.fsencode(root)):
        for name in names:
            p = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                out[p.decode("utf-8", "backslashreplace")] = hashlib.sha256(
                    Path(os.fsdecode(p)).read_bytes()
                ).hexdigest()
    return out


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".partial"))]


def summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def small_tree(root: Path) -> Path:
    """A store with one VM configuration and one runtime file without memory: nothing for Volatility."""
    vms = root / "Hyper-V" / "Virtual Machines"
    vmcx(vms / f"{VM_A}.vmcx", VM_A, "web01")
    (vms / f"{VM_A}.vmgs").write_bytes(os.urandom(4096))
    return root


def test_a_name_that_is_not_utf8_gives_a_summary(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    raw = os.fsencode(tree / "Hyper-V" / "Virtual Machines") + b"/caf\xe9-\xff.vmrs"
    with open(raw, "wb") as fh:
        fh.write(os.urandom(4096))
    before = fingerprints(tree)
    out = tmp_path / "out"
    r = vmssd("triage", "--out", out, "--no-progress", tree)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {Path(row["path"]).name: row for row in summary(out)}
    assert rows["caf\\xe9-\\xff.vmrs"]["class"] == "not-hyperv"  # shown with the bytes escaped
    assert rows["caf\\xe9-\\xff.vmrs"]["sha256"] == hashlib.sha256(Path(os.fsdecode(raw)).read_bytes()).hexdigest()
    paths = [json.loads(line)["path"] for line in (out / "summary.jsonl").read_text(encoding="utf-8").splitlines()]
    assert any(p.endswith("/caf\\xe9-\\xff.vmrs") for p in paths)
    assert leftovers(out) == [] and fingerprints(tree) == before


def test_fifos_devices_and_long_paths_are_reported_and_fail_the_run(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    os.mkfifo(tree / "Hyper-V" / "pipe.vmrs")
    fifo = tmp_path / "given.vmrs"
    os.mkfifo(fifo)
    long_path = tmp_path.joinpath(*["d" * 250] * 20, "z.vmrs")
    out = tmp_path / "out"
    r = vmssd("triage", "--out", out, "--no-progress", tree, fifo, "/dev/null", long_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    not_read = [line for line in r.stdout.splitlines() if line.startswith("  not read: ")]
    assert len(not_read) == 4, r.stdout
    assert f"  not read: {fifo}: not a regular file (a FIFO): not read" in not_read
    assert "  not read: /dev/null: not a regular file (a device): not read" in not_read
    assert any(line.endswith("File name too long") for line in not_read)
    assert len(summary(out)) == 2  # the readable files are still summarised
    problems = [e for e in map(json.loads, (out / "tasks.log").read_text().splitlines()) if e["event"] == "problem"]
    assert len(problems) == 4 and leftovers(out) == []


def as_nobody(fn, *args) -> int:  # type: ignore[no-untyped-def]
    """Run ``fn(*args)`` in a forked child as uid/gid 65534 (the interpreter is already loaded: the
    child needs no file under /root); returns its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = int(fn(*args))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def world_readable_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmssd-test-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user (uid 65534)")
def test_an_unreadable_folder_is_reported_to_the_user_who_cannot_read_it() -> None:
    import concurrent.futures.thread  # noqa: F401 - loaded now: the child cannot read the standard library

    from volatility3_vmssd.cli.main import main

    with world_readable_tmp() as tmp:
        tree = small_tree(tmp / "ev")
        locked = tree / "locked"
        locked.mkdir()
        (locked / "x.vmrs").write_bytes(b"\0" * 64)
        for folder, dirs, _ in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(folder, d), 0o755)
        os.chmod(locked, 0o700)  # root's: uid 65534 cannot list it
        out = tmp / "out"
        out.mkdir()
        os.chown(out, 65534, 65534)
        log = tmp / "stdout.txt"
        log.touch()
        os.chown(log, 65534, 65534)

        def run() -> int:
            with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                return main(["triage", "--out", str(out), "--no-progress", str(tree)])

        assert as_nobody(run) == 1
        text = log.read_text()
        assert f"  not read: {locked}: folder cannot be listed: Permission denied" in text, text
        assert "Traceback" not in text and len(summary(out)) == 2 and leftovers(out) == []


def test_one_vm_id_in_two_stores_is_two_vms_with_a_warning(tmp_path: Path) -> None:
    for host, name in (("host1", "web01"), ("host2", "web01-copy")):
        vmcx(tmp_path / "ev" / host / "Hyper-V" / "Virtual Machines" / f"{VM_A}.vmcx", VM_A, name)
    out = tmp_path / "out"
    r = vmssd("triage", "--out", out, "--no-progress", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("2 file(s) of 2 VM(s)")
    (warning,) = [line for line in r.stdout.splitlines() if line.startswith("  warning: ")]
    assert f"VM ID {VM_A} is claimed by 2 VM configurations" in warning
    assert sorted(row["vm_name"] for row in summary(out)) == ["web01", "web01-copy"]


def test_out_inside_the_scanned_folder_is_refused(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    before = fingerprints(tree)
    line = one_line_error(vmssd("triage", "--out", tree / "Hyper-V" / "triage", tree))
    assert "is inside the folder being scanned" in line
    assert not (tree / "Hyper-V" / "triage").exists() and fingerprints(tree) == before


def _limit_file_size() -> None:  # a disk that fills up: writes past 4 KiB fail (EFBIG), as ENOSPC would
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_full_disk_leaves_no_temporary_file_and_earlier_ones_are_removed(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    for i in range(40):  # enough rows for summary.jsonl to pass the limit
        (tree / f"junk-{i:02}.vmrs").write_bytes(b"x" * 100)
    out = tmp_path / "out"
    (out / "tasks").mkdir(parents=True)
    dead = 4_000_000_000  # no process has this id (beyond any pid_max)
    (out / f"summary.csv.{dead}.0badf00d.partial").write_text("left by a run that was killed")
    (out / "tasks" / f"x.json.{dead}.0badf00d.partial").write_text("{")
    alive = out / f"summary.csv.{os.getpid()}.0badf00d.partial"  # its writer (this test) is alive: kept
    alive.write_text("in use")
    line = one_line_error(
        vmssd("triage", "--out", out, "--no-progress", "--no-hash", tree, preexec_fn=_limit_file_size)
    )
    assert "File too large" in line
    assert leftovers(out) == [alive.name]


def test_absurd_workers_are_capped_in_one_line(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    r = vmssd("triage", "--out", tmp_path / "out", "--no-progress", "--workers", "99999999999", tree)
    assert r.returncode == 0, r.stderr
    cores = len(os.sched_getaffinity(0))
    assert r.stderr.strip().splitlines() == [
        f"vmssd triage: --workers 99999999999 is more than the {cores} usable core(s): using {cores}"
    ]
    assert "at least 1" in one_line_error(vmssd("triage", "--out", tmp_path / "o2", "--workers", "0", tree))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("http://127.0.0.1:8786", "is not a Dask scheduler address"),
        ("tcp://[zz", "is not a Dask scheduler address"),
        ("tcp://127.0.0.1:notaport", "is not a Dask scheduler address"),
        ("FREE", "no Dask scheduler at tcp://127.0.0.1:"),
    ],
)
def test_scheduler_addresses_that_cannot_work_get_one_line(tmp_path: Path, address: str, expected: str) -> None:
    pytest.importorskip("distributed", reason="dask/distributed are not installed (pip install '.[triage]')")
    tree = small_tree(tmp_path / "ev")
    address = f"tcp://127.0.0.1:{free_port()}" if address == "FREE" else address
    line = one_line_error(vmssd("triage", "--out", tmp_path / "out", "--scheduler", address, tree, timeout=30))
    assert expected in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("scheme", "expected"), [("tcp", "is not a Dask scheduler"), ("tls", "cannot connect to the Dask scheduler")]
)
@pytest.mark.slow
def test_scheduler_at_an_http_port_answers_promptly(tmp_path: Path, scheme: str, expected: str) -> None:
    pytest.importorskip("distributed", reason="dask/distributed are not installed (pip install '.[triage]')")
    tree = small_tree(tmp_path / "ev")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        # The hang guard: Dask's own client waits forever on such a port; ours must answer well before 10 s.
        line = one_line_error(vmssd("triage", "--out", tmp_path / "out", "--scheduler", address, tree, timeout=10))
    finally:
        server.shutdown()
        server.server_close()
    assert expected in line and address in line


@pytest.mark.slow
def test_scheduler_without_workers_answers(tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="dask/distributed are not installed (pip install '.[triage]')")
    tree = small_tree(tmp_path / "ev")
    port = free_port()
    cmd = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
    sched = subprocess.Popen([*cmd, "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.1)
        address = f"tcp://127.0.0.1:{port}"
        line = one_line_error(vmssd("triage", "--out", tmp_path / "out", "--scheduler", address, tree, timeout=60))
    finally:
        sched.terminate()
        sched.wait(30)
    assert f"the Dask scheduler at {address} has no workers" in line


def test_every_file_is_identified_by_size_time_and_sha256(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    out = tmp_path / "out"
    assert vmssd("triage", "--out", out, "--no-progress", tree).returncode == 0
    rows = summary(out)
    assert len(rows) == 2
    for row in rows:
        p = Path(row["path"])
        st = p.stat()
        assert row["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert int(row["size"]) == st.st_size
        from datetime import datetime

        assert datetime.fromisoformat(row["mtime"]).timestamp() == pytest.approx(st.st_mtime, abs=1e-5)
    for event in map(json.loads, (out / "tasks.log").read_text().splitlines()):
        from datetime import datetime

        assert datetime.fromisoformat(event["time"]).tzinfo is not None  # ISO 8601 with the zone
    # A second run reads the hashes back instead of reading the evidence again.
    assert vmssd("triage", "--out", out, "--no-progress", tree).returncode == 0
    log = [e["event"] for e in map(json.loads, (out / "tasks.log").read_text().splitlines())]
    assert log.count("hashed") == 2 and log.count("hash-resumed") == 2


def test_info_hash_prints_the_evidence_identity() -> None:
    sample = REPO / "tests" / "data" / "sample.vmrs"
    r = vmssd("info", "--hash", sample)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256(sample.read_bytes()).hexdigest()
    assert f"SHA-256                {digest}  {sample}" in r.stdout.splitlines()
    doc = json.loads(vmssd("info", "--hash", "--json", sample).stdout)
    assert doc["evidence"] == [
        {"path": str(sample), "size": sample.stat().st_size, "mtime": doc["evidence"][0]["mtime"], "sha256": digest}
    ]


def test_scratch_folders_of_dead_runs_are_removed_and_no_others(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    dead = scratch / "vmssd-triage-4000000000-abc"
    alive = scratch / f"vmssd-triage-{os.getpid()}-abc"
    foreign = scratch / "vmssd-triage-4000000001-abc"
    unrelated = scratch / "vmssd-triage-old"
    for d in (dead, alive, foreign, unrelated):
        d.mkdir()
        (d / "spec.json").write_text("{}")
    os.chown(foreign, 65534, 65534)  # another user's: never touched
    tree = small_tree(tmp_path / "ev")
    r = vmssd("triage", "--out", tmp_path / "out", "--no-progress", tree, env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in scratch.iterdir()) == sorted([alive.name, foreign.name, unrelated.name])


def test_a_local_run_needs_no_dask(tmp_path: Path) -> None:
    tree = small_tree(tmp_path / "ev")
    code = (
        "import sys; from volatility3_vmssd.cli.main import main;"
        f" rc = main(['triage', '--out', {str(tmp_path / 'out')!r}, '--no-progress', {str(tree)!r}]);"
        " bad = [m for m in ('dask', 'distributed') if m in sys.modules]; assert rc == 0 and not bad, (rc, bad)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
