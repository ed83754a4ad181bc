"""``vmssd convert`` and ``vmssd create`` driven as an analyst drives them (subprocesses): no silent
zeros for RAM a cut copy lacks, one-line errors, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from shared_data import REPO
from terminal import foreground

from volatility3_vmssd import open_saved_state
from volatility3_vmssd.errors import VmssdError

CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
MIB = 1 << 20


def vmssd(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, check=False)


@pytest.fixture(scope="module")
def half_guest(guest_vmrs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real guest's .vmrs cut to half its size (what an interrupted copy leaves)."""
    cut = tmp_path_factory.mktemp("cut") / "half.vmrs"
    with open(guest_vmrs, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(os.path.getsize(guest_vmrs) // 2))
    return cut


def test_convert_of_a_cut_copy_fails_naming_the_missing_ranges(half_guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.raw"
    r = vmssd("convert", half_guest, "-o", out, "--format", "raw")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    error = r.stderr.splitlines()[-1]
    assert error.startswith(f"vmssd convert: error: {half_guest}: ") and "could not be read" in error
    assert f"{out} not written (--allow-missing" in error
    assert "  missing GPA 0x" in r.stderr and "is missing or does not decode" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no image, no .partial, no sidecar


@pytest.mark.parametrize("fmt", ["raw", "elf"])
def test_convert_allow_missing_writes_and_records_the_ranges(half_guest: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"half.{fmt}"
    r = vmssd("convert", half_guest, "-o", out, "--format", fmt, "--allow-missing")
    assert r.returncode == 0, r.stderr
    assert "vmssd convert: warning:" in r.stderr and f"listed in {out}.missing.json" in r.stderr
    doc = json.loads(Path(f"{out}.missing.json").read_text())
    assert doc["format"] == "vmssd-missing/1" and doc["image"] == out.name and doc["image_format"] == fmt
    ranges = doc["ranges"]
    assert ranges and doc["missing_bytes"] == sum(m["size"] for m in ranges)
    with open_saved_state(half_guest) as p:
        page, chunks = p.get_guest_physical_memory_chunks()
        ends = {c.guest_physical_start_page_index * page + c.page_count * page for c in chunks}
        readable = 0
        for m in ranges:  # every recorded range starts on data that cannot be read, right after data that can
            with pytest.raises(VmssdError):
                p.read_guest_physical_address(m["gpa"], 1)
            with pytest.raises(VmssdError):
                p.read_guest_physical_address(m["gpa"] + m["size"] - 1, 1)
            assert len(p.read_guest_physical_address(m["gpa"] - 1, 1)) == 1
            if m["gpa"] + m["size"] not in ends:
                assert len(p.read_guest_physical_address(m["gpa"] + m["size"], 1)) == 1
        for c in chunks:  # and nothing else is missing: every page outside the ranges reads
            for gpa in range(
                c.guest_physical_start_page_index * page, (c.guest_physical_start_page_index + c.page_count) * page, MIB
            ):
                if not any(m["gpa"] <= gpa < m["gpa"] + m["size"] for m in ranges):
                    p.read_guest_physical_address(gpa, page)
                    readable += page
    assert readable > 0
    if fmt == "raw":
        with open(out, "rb") as fh:
            first = ranges[0]
            fh.seek(first["gpa"])
            assert fh.read(first["size"]) == bytes(first["size"])


# ---------------------------------------------------------------------------------------------- create


def _children(pid: int) -> set[int]:
    try:
        return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_create(
    guest_elf: Path, guest_registers: dict, tmp_path: Path
) -> tuple[subprocess.Popen[str], Path, set[int]]:
    """``vmssd create`` of the real guest with two workers, once both workers run and its temporary file exists."""
    regs = tmp_path / "regs.json"
    regs.write_text(json.dumps(guest_registers))
    out = tmp_path / "guest.vmrs"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        foreground(
            [*CLI, "create", "--memory", str(guest_elf), "--registers", str(regs), "-o", str(out), "--jobs", "2"]
        ),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while not (list(tmp_path.glob(f"{out.name}.*.partial")) and len(workers) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "create never started its workers"
        workers = _children(proc.pid)
        time.sleep(0.05)
    time.sleep(0.3)
    return proc, out, workers


def _wait_gone(pids: set[int], seconds: float = 10) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = {p for p in pids if _alive(p)}
        if not left:
            return left
        time.sleep(0.1)
    return {p for p in pids if _alive(p)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
@pytest.mark.parametrize(("how", "code", "said"), [("ctrl-c", 130, "interrupted"), ("sigterm", 143, "SIGTERM")])
def test_interrupted_create_leaves_nothing_and_no_worker(
    guest_elf: Path, guest_registers: dict, tmp_path: Path, how: str, code: int, said: str
) -> None:
    proc, _, workers = _start_create(guest_elf, guest_registers, tmp_path)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole process group
    else:
        proc.send_signal(signal.SIGTERM)  # what timeout(1) sends: the parent only
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert said in stderr and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regs.json"]
    assert not _wait_gone(workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads worker pids from /proc")
def test_killed_create_leaves_no_file_under_the_final_name_and_its_workers_end(
    guest_elf: Path, guest_registers: dict, tmp_path: Path
) -> None:
    proc, out, workers = _start_create(guest_elf, guest_registers, tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    assert not out.exists()  # only OUT.<random>.partial, which nothing takes for a saved state
    assert not _wait_gone(workers), "encoding workers outlived their killed parent"


def test_create_mistakes_are_one_line_errors(guest_vmrs: Path, tmp_path: Path) -> None:
    ram = tmp_path / "ram.raw"
    ram.write_bytes(bytes(range(256)) * (2 * MIB // 256))
    regs = tmp_path / "regs.json"
    regs.write_text(json.dumps({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rip": "0x1"}}}]}))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"cr33": "0x1"}}}]}))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "something/2"}))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\xff\xfe" * 10)
    xz = tmp_path / "ram.raw.xz"
    xz.write_bytes(b"\xfd7zXZ\x00" + bytes(100))
    out = tmp_path / "vm.vmrs"
    cases = [
        (["--memory", ram, "--registers", binary], f"{binary} at offset 0x7: not a registers JSON file (binary"),
        (["--memory", ram, "--registers", typo], f"{typo}: registers JSON: VP 0 VTL 0:"),
        (["--memory", ram, "--registers", wrong], f"{wrong}: registers JSON: format 'something/2', expected"),
        (["--memory", xz, "--registers", regs], f"{xz} at offset 0x0: xz-compressed; decompress it first (xz -dk"),
        (["--memory", guest_vmrs, "--registers", regs], f"{guest_vmrs} at offset 0x0: a HyperVStorage container"),
    ]
    for args, expected in cases:
        r = vmssd("create", *args, "-o", out)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith(f"vmssd create: error: {expected}"), (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and not out.exists()
    assert "cr33" in vmssd("create", "--memory", ram, "--registers", typo, "-o", out).stderr
    r = vmssd("create", "--memory", ram, "--registers", regs, "-o", out)
    assert r.returncode == 0 and out.exists(), r.stderr
    r = vmssd("create", "--memory", ram, "--registers", regs, "-o", out)
    assert (r.returncode, r.stderr) == (1, f"vmssd create: error: {out} exists (use --force to overwrite it)\n")
    assert not list(tmp_path.glob("*.partial"))


def test_progress_bar_never_cuts_a_word() -> None:
    from volatility3_vmssd.cli.progress import ProgressBar

    bar = ProgressBar(256 * MIB, label="convert raw", enabled=False)
    bar.start -= 2
    bar.done = 100 * MIB
    now = bar.start + 2
    words = set(bar.line(now, width=200).replace("[", " ").replace("]", " ").split())
    for width in range(4, 121):
        line = bar.line(now, width=width)
        assert len(line) <= width, (width, line)
        assert "%" in line, (width, line)
        for word in line.split():
            assert word in words or set(word) <= set("[#.]"), (width, line)
    assert "ETA" in bar.line(now, width=79) and "[" in bar.line(now, width=79)


@pytest.mark.slow
def test_verbose_after_the_sub_command_and_wrapped_help(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.vmrs"
    quiet = vmssd("info", missing)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    for args in (("-v", "info", missing), ("info", missing, "-v")):
        r = vmssd(*args)
        assert r.returncode == 1 and "Traceback" in r.stderr and r.stderr.endswith(f"{missing}'\n"), r.stderr
    env_cols = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="60")
    for command in ("convert", "create", "info"):
        r = subprocess.run([*CLI, command, "--help"], capture_output=True, text=True, cwd=REPO, env=env_cols)
        assert r.returncode == 0
        description = r.stdout.split("\n\n")[1]  # usage, then the description paragraph
        assert max(len(line) for line in description.splitlines()) <= 60, description
