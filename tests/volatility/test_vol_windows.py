"""Windows guests end to end through ``vol`` (subprocess, as a user runs it), built from real kernel ISFs.

For each shared kernel ISF (Windows 10 19041, Server 2022 20348) and each VP context the builder
knows (kernel idle, user mode, KVA shadow on every VP, VBS with a VTL1 bank), the guest is wrapped
by ``vmssd create`` as a ``.vmrs``, as openvmm's raw-block ``.vmrs`` and as a legacy pair;
``windows.info``, ``windows.pslist`` and ``windows.pstree`` on each must equal the LiME form of the
same memory (which Volatility reads with its own DTB scan), and the process list must be the one
the builder wrote.  ``hyperv.info`` must name where the kernel DTB came from.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vol_helpers import REPO, SHARED, output_rows, preseed_isf_validation, require_volatility, run_vol

require_volatility()
sys.path.insert(0, str(REPO / "tests"))
from windows_guest import CONTEXTS, FORMS, WindowsGuest, build_windows_guest, shared_isfs, wrap  # noqa: E402

SYMBOLS = SHARED / "data" / "windows-symbols"
ISFS = shared_isfs(SHARED)
PLUGINS = ("windows.info", "windows.pslist", "windows.pstree")
#: windows.info rows naming the layer stack ("memory_layer  1 LimeLayer"): they differ by design.
LAYER_ROW = re.compile(r"^\S+\t\d+ \w+$")
SEED = 23


def isf_id(path: Path) -> str:
    return path.name.split("-", 1)[0][:8]


needs_isf = pytest.mark.skipif(not ISFS, reason=f"needs the Windows symbol tables under {SYMBOLS}; not present")


@pytest.fixture(scope="module")
def win_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("xdg-cache-win")
    preseed_isf_validation(cache, ISFS)
    return cache


class WindowsRuns:
    """Builds each (ISF, context) guest once and runs the vol plan over its forms, two runs at a time."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.cache = cache
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], tuple[WindowsGuest, dict[str, Path], dict[str, str]]] = {}

    def get(self, isf: Path, context: str) -> tuple[WindowsGuest, dict[str, Path], dict[str, str]]:
        key = (isf.name, context)
        with self._lock:
            if key not in self._done:
                self._done[key] = self._build(isf, context)
            return self._done[key]

    def _build(self, isf: Path, context: str) -> tuple[WindowsGuest, dict[str, Path], dict[str, str]]:
        out = self.root / f"{isf_id(isf)}-{context}"
        guest = build_windows_guest(isf, context, SEED, out, ram_size=32 << 20)
        files = {"lime": guest.lime, **{form: wrap(guest, form, out) for form in FORMS}}
        plan = {f"{form}:{plugin}": ["-f", str(path), plugin] for form, path in files.items() for plugin in PLUGINS}
        plan["vmrs:hyperv.info"] = ["-r", "json", "-f", str(files["vmrs"]), "hyperv.info"]
        plan["legacy:hyperv.info"] = ["-r", "json", "-f", str(files["legacy"]), "hyperv.info"]
        plan["vmrs:hyperv.registers"] = ["-r", "json", "-f", str(files["vmrs"]), "hyperv.registers"]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(self._vol, args) for name, args in plan.items()}
            results = {name: future.result() for name, future in futures.items()}
        return guest, files, results

    def _vol(self, args: list[str]) -> str:
        done: subprocess.CompletedProcess[str] = run_vol(
            ["-q", "--offline", "-s", str(SYMBOLS), *args], cache=self.cache
        )
        assert done.returncode == 0, f"vol {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
        return done.stdout


@pytest.fixture(scope="module")
def windows_runs(tmp_path_factory: pytest.TempPathFactory, win_cache: Path) -> WindowsRuns:
    return WindowsRuns(tmp_path_factory.mktemp("windows-guests"), win_cache)


def info_rows(text: str) -> dict[str, str]:
    rows = [line.split("\t", 1) for line in output_rows(text) if "\t" in line and not LAYER_ROW.match(line)]
    return {k: v for k, v in rows if k != "Variable"}


def table(text: str) -> list[list[str]]:
    return [line.split("\t") for line in output_rows(text) if line.strip()]


# ------------------------------------------------------------------------------------------- tests

pytestmark = [pytest.mark.slow, needs_isf]


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("isf", ISFS, ids=isf_id)
def test_every_form_equals_the_lime_form(windows_runs: WindowsRuns, isf: Path, context: str) -> None:
    guest, _files, results = windows_runs.get(isf, context)
    lime_ps = table(results["lime:windows.pslist"])
    header, rows = lime_ps[0], lime_ps[1:]
    # the LiME form (Volatility alone) finds exactly the processes the builder wrote
    got = sorted(
        (int(r[header.index("PID")]), int(r[header.index("PPID")]), r[header.index("ImageFileName")]) for r in rows
    )
    assert got == sorted((p.pid, p.ppid, p.name) for p in guest.processes)
    lime_info = info_rows(results["lime:windows.info"])
    assert int(lime_info["Kernel Base"], 16) == guest.kernel_base & 0xFFFF_FFFF_FFFF
    assert int(lime_info["DTB"], 16) == guest.dtb
    for form in FORMS:
        assert table(results[f"{form}:windows.pslist"]) == lime_ps, form
        assert table(results[f"{form}:windows.pstree"]) == table(results["lime:windows.pstree"]), form
        info = info_rows(results[f"{form}:windows.info"])
        # the DTB is the saved CR3's when one proves the kernel (a process's own table in user mode)
        assert int(info.pop("DTB"), 16) == (guest.saved_cr3_dtb if guest.saved_cr3_dtb is not None else guest.dtb)
        expected = dict(lime_info)
        del expected["DTB"]
        assert info == expected, form


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("isf", ISFS[:1], ids=isf_id)
def test_hyperv_info_names_the_dtb_source(windows_runs: WindowsRuns, isf: Path, context: str) -> None:
    guest, _files, results = windows_runs.get(isf, context)
    for form in ("vmrs", "legacy"):
        rows = {r["Variable"]: r for r in json.loads(results[f"{form}:hyperv.info"])}
        dtb = rows["Kernel DTB"]
        if guest.saved_cr3_source is not None:
            vp, vtl = guest.saved_cr3_source
            assert dtb["Value"].startswith(f"{guest.saved_cr3_dtb:#x} from the saved CR3 of VP {vp} VTL {vtl}")
            assert dtb["Number"] == guest.saved_cr3_dtb
        else:
            assert dtb["Value"] == (
                f"{guest.dtb:#x}: no saved CR3 maps the kernel (user-mode shadow tables on every VP):"
                f" Volatility's scan found {guest.dtb:#x}"
            )
            assert dtb["Number"] == guest.dtb


@pytest.mark.parametrize("isf", ISFS[:1], ids=isf_id)
def test_refused_shadow_cr3_vps_are_still_listed_with_their_registers(windows_runs: WindowsRuns, isf: Path) -> None:
    guest, _files, results = windows_runs.get(isf, "kvashadow")
    saved = json.loads(guest.registers.read_text())
    rows = json.loads(results["vmrs:hyperv.registers"])
    cr3 = {r["VP"]: r["Value"] for r in rows if r["Register"] == "cr3"}
    assert cr3 == {vp["vp_index"]: int(vp["vtls"]["0"]["cr3"], 16) for vp in saved["vps"]}
    assert all(value & ~0xFFF != guest.dtb for value in cr3.values())  # shadow tables, not the kernel's


@pytest.mark.parametrize("isf", ISFS[:1], ids=isf_id)
def test_triage_picks_the_windows_plugins_from_the_guest_os_id(
    windows_runs: WindowsRuns, isf: Path, tmp_path: Path, win_cache: Path
) -> None:
    pytest.importorskip("distributed", reason="dask/distributed are not installed (pip install '.[triage]')")
    from volatility3_vmssd.triage import plugins

    guest, files, _results = windows_runs.get(isf, "kernel")
    folder = tmp_path / "host"
    folder.mkdir()
    (folder / files["vmrs"].name).symlink_to(files["vmrs"])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "volatility3_vmssd.cli.main", "triage", "--out", str(out), "--offline", "-s"]
    cmd += [str(SYMBOLS), "--cache-path", str(win_cache / "volatility3"), "--no-progress", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(win_cache)}
    done = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert summary["os_family"] == "windows"
    assert list(summary["plugins"]) == plugins.initial_plugins("windows", None)
    assert summary["plugins"]["windows.pslist"]["status"] == "ok"
    rows = [json.loads(line) for line in (out / "results" / "windows.pslist.jsonl").read_text().splitlines()]
    assert sorted((r["PID"], r["PPID"], r["ImageFileName"]) for r in rows) == sorted(
        (p.pid, p.ppid, p.name) for p in guest.processes
    )
