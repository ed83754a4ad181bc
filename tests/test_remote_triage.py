"""``vmssd triage s3://bucket/host42/``: discovery by listing, identity from the .vmcx, the same classes and
results as the local run; and on a Dask cluster (``dask scheduler`` + two ``dask worker`` processes, each
started in its own empty folder) with the evidence only in the bucket: each worker opens the URLs itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_store import S3, SECRET_KEY
from shared_data import REAL, REPO, need

pytest.importorskip("s3fs", reason="s3fs is not installed (the remote extra)")
pytestmark = pytest.mark.slow

GUID = "5F3C2A1E-0D4B-4C6A-9E1F-2B3A4C5D6E7F"
SAMPLE = REPO / "tests" / "data" / "sample.vmrs"
PLUGINS = "hyperv.info,hyperv.memmap"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host's evidence folder: a .vmrs with its .vmcx, a lone .bin and a mixed-case legacy pair."""
    root = tmp_path_factory.mktemp("host42")
    vms = root / "Virtual Machines"
    vms.mkdir()
    shutil.copyfile(SAMPLE, vms / f"{GUID}.vmrs")
    shutil.copyfile(need(REAL / "test.vmcx"), vms / f"{GUID}.vmcx")
    legacy = root / "legacy"
    legacy.mkdir()
    shutil.copyfile(need(REAL / "test_file.bin"), legacy / "Lone.BIN")
    return root


@pytest.fixture(scope="module")
def s3(host: Path) -> Iterator[S3]:
    store = S3()
    for path in sorted(p for p in host.rglob("*") if p.is_file()):
        store.upload("triage-evidence", f"host42/{path.relative_to(host).as_posix()}", path)
    yield store
    store.close()


def _triage(out: Path, target: str, env: dict[str, str], *extra: str, cwd: Path | None = None) -> str:
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "triage", "--out", str(out), "--no-progress"]
    proc = subprocess.run(
        [*cmd, "--plugins", PLUGINS, *extra, target], env=env, capture_output=True, text=True, timeout=900, cwd=cwd
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _normal(out: Path, root: str) -> dict[str, list[dict]]:
    """summary.jsonl and results/*.jsonl with the evidence root named alike and run-specific fields dropped
    (modification times differ between a copy and its upload; timings and worker names between runs)."""
    docs: dict[str, list[dict]] = {}
    for path in [out / "summary.jsonl", *sorted((out / "results").glob("*.jsonl"))]:
        rows = [json.loads(line.replace(root, "<root>")) for line in path.read_text().splitlines() if line.strip()]
        for row in rows:
            for key in ("evidence", "partner_evidence"):
                if isinstance(row.get(key), dict):
                    row[key].pop("mtime", None)
            for key in ("seconds", "worker", "task"):
                row.pop(key, None)
        docs[path.name] = sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
    return docs


def _assert_same(got: dict[str, list[dict]], want: dict[str, list[dict]]) -> None:
    """Equal documents; else the first row and keys that differ (the whole documents are too long to read)."""
    assert sorted(got) == sorted(want)
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for g, w in zip(got[name], want[name], strict=True):
            keys = sorted(k for k in set(g) | set(w) if g.get(k) != w.get(k))
            assert not keys, f"{name}: {[(k, g.get(k), w.get(k)) for k in keys]}"


@pytest.fixture(scope="module")
def local_run(host: Path, s3: S3, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("triage-local") / "out"
    _triage(out, str(host), s3.env)
    return _normal(out, str(host))


def test_triage_of_a_prefix_equals_the_local_run(s3: S3, local_run: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s3.proxy.take_log()
    _triage(out, "s3://triage-evidence/host42/", s3.env)
    log = s3.proxy.take_log()
    got = _normal(out, "s3://triage-evidence/host42")
    _assert_same(got, local_run)
    summary = got["summary.jsonl"]
    assert {r["class"] for r in summary} >= {"saved-memory", "configuration", "bin-without-vsv"}
    assert any(r.get("vm_name") for r in summary)  # identity from the .vmcx
    assert {r.method for r in log} <= {"GET", "HEAD"}
    everything = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    assert SECRET_KEY not in everything


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask_bin(name: str) -> str:
    found = shutil.which("dask", path=str(Path(sys.executable).parent)) or shutil.which("dask")
    if found is None:
        pytest.skip("the dask command is not installed (the triage extra)")
    return found


@pytest.fixture
def cluster(s3: S3, tmp_path: Path) -> Iterator[str]:
    """``dask scheduler`` and two ``dask worker`` processes on loopback, each in its own empty folder,
    with the store's credentials in their environment (their own, as on a real cluster)."""
    pytest.importorskip("distributed", reason="distributed is not installed (the triage extra)")
    dask = _dask_bin("dask")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**s3.env, "PYTHONPATH": str(REPO)}
    procs = []
    try:
        folder = tmp_path / "scheduler"
        folder.mkdir()
        procs.append(subprocess.Popen(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0",
             "--no-show"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        for i in range(2):
            folder = tmp_path / f"worker{i}"
            folder.mkdir()
            procs.append(subprocess.Popen(
                [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                 "--local-directory", str(folder)],
                cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        from distributed import Client

        deadline = time.monotonic() + 120
        while True:
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info()["workers"]) >= 2:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the Dask cluster did not come up within 120 s")
            time.sleep(1)
        yield address
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_triage_on_a_cluster_sharing_no_disk(s3: S3, host: Path, local_run: dict, cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "client" / "out"
    out.parent.mkdir()
    away = host.with_name(host.name + ".away")
    host.rename(away)  # the evidence is only in the bucket while the cluster runs
    try:
        _triage(out, "s3://triage-evidence/host42/", s3.env, "--scheduler", cluster, cwd=out.parent)
    finally:
        away.rename(host)
    got = _normal(out, "s3://triage-evidence/host42")
    _assert_same(got, local_run)
    workers = set()
    for path in (out / "tasks").rglob("*.json"):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("worker"):
            workers.add(doc["worker"])
    assert workers and all(not w.endswith(f":{os.getpid()}") for w in workers)  # computed on the workers
