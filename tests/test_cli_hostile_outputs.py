"""Issue 26, the CLI half: outputs that never replace what we did not create, errors that name the user's
file, bounded options, no traceback for closed stdout or odd numbers, one ``--vsv`` rule, and the polish
items, each driven as a user drives it (subprocesses: exit code, one line on stderr, nothing left behind,
evidence unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import add_journal_entries
from shared_data import REAL, REPO, need

from volatility3_vmssd import outputs
from volatility3_vmssd.cli.main import build_parser
from volatility3_vmssd.errors import VmssdError
from volatility3_vmssd.files import vsv_problem
from volatility3_vmssd.host import usable_cores
from volatility3_vmssd.storage import HyperVStorage, HyperVStorageWriter

SAMPLE = REPO / "tests" / "data" / "sample.vmrs"
CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
MIB = 1 << 20
LINUX = sys.platform.startswith("linux")


def vmssd(*args: str | Path, cwd: Path = REPO, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, check=False, **kwargs
    )


def one_error(r: subprocess.CompletedProcess[str], command: str, code: int = 1) -> str:
    """The single stderr line of a failed command (and the checks every failure must pass)."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"vmssd {command}: error: "), lines[0]
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def identity(path: str | Path) -> tuple[int, int, int, int]:
    """What must not change about a target we refuse: inode, device, type and device number (lstat)."""
    st = os.lstat(path)
    return st.st_ino, st.st_dev, stat.S_IFMT(st.st_mode), st.st_rdev


@pytest.fixture()
def work(tmp_path: Path) -> dict[str, Path]:
    """A copy of the sample, a 2 MiB memory image, its registers JSON, and a .vmrs with one pending journal entry."""
    sample = tmp_path / "evidence" / "sample.vmrs"
    sample.parent.mkdir()
    shutil.copyfile(SAMPLE, sample)
    ram = tmp_path / "evidence" / "ram.raw"
    ram.write_bytes(bytes(range(256)) * (2 * MIB // 256))
    regs = tmp_path / "evidence" / "regs.json"
    regs.write_text(json.dumps({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rip": "0x1234"}}}]}))
    journal = tmp_path / "evidence" / "journal.vmrs"
    shutil.copyfile(SAMPLE, journal)
    with HyperVStorage.open(journal) as s:
        key = s.get("/savedstate/RamBlock1")
        assert key is not None and key.data_location is not None
        offset = key.data_location[0]
    add_journal_entries(journal, pending=[(offset, bytes(4096))])
    out = tmp_path / "out"
    out.mkdir()
    return {"sample": sample, "ram": ram, "regs": regs, "journal": journal, "out": out}


def writers(work: dict[str, Path], target: str | Path) -> dict[str, list[str | Path]]:
    """Every command that writes a file, aimed at ``target`` with --force."""
    return {
        "read": ["read", work["sample"], "0", "4K", "-o", target, "--force"],
        "convert": ["convert", work["sample"], "-o", target, "--format", "raw", "-q", "--force"],
        "apply-log": ["apply-log", work["journal"], "-o", target, "--force"],
        "create": ["create", "--memory", work["ram"], "--registers", work["regs"], "-o", target, "--force", "-q"],
    }


def evidence_hashes(work: dict[str, Path]) -> dict[str, str]:
    return {p.name: sha256(p) for p in work["sample"].parent.iterdir()}


# ------------------------------------------------------------------------ item 1: devices, links, FIFOs
@pytest.mark.skipif(not LINUX, reason="/dev/full and /proc/self/fd are Linux")
@pytest.mark.parametrize("command", ["read", "convert", "apply-log", "create"])
def test_force_never_replaces_a_device_a_symlink_or_a_fifo(work: dict[str, Path], command: str) -> None:
    link = work["out"] / "stdout-link"
    link.symlink_to("/proc/self/fd/1")
    fifo = work["out"] / "pipe"
    os.mkfifo(fifo)
    before = evidence_hashes(work)
    targets = {"/dev/full": "a character device", link: "a symbolic link", fifo: "a FIFO (named pipe)"}
    for target, kind in targets.items():
        was = identity(target)
        r = vmssd(*writers(work, target)[command])
        line = one_error(r, command)
        assert line == (
            f"vmssd {command}: error: refusing to write {target}: it is {kind};"
            " outputs only ever replace regular files, --force or not"
        )
        assert identity(target) == was  # the same inode, type and device: untouched
        assert r.stdout == ""
    assert os.readlink(link) == "/proc/self/fd/1"
    assert sorted(p.name for p in work["out"].iterdir()) == ["pipe", "stdout-link"]  # no temporary file left
    assert evidence_hashes(work) == before


@pytest.mark.parametrize("command", ["read", "convert", "apply-log", "create"])
def test_force_replaces_a_regular_file_and_leaves_nothing_else(work: dict[str, Path], command: str) -> None:
    target = work["out"] / ("x.vmrs" if command in ("apply-log", "create") else "x.raw")
    target.write_bytes(b"old")
    before = evidence_hashes(work)
    r = vmssd(*writers(work, target)[command])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert target.stat().st_size > 3 and stat.S_ISREG(os.lstat(target).st_mode)
    assert [p.name for p in work["out"].iterdir()] == [target.name]
    assert evidence_hashes(work) == before


def test_a_planted_file_with_the_old_temporary_name_is_not_touched(work: dict[str, Path]) -> None:
    """Temporary names are random and created with O_EXCL: a link planted at OUT.partial is never followed."""
    victim = work["out"] / "victim"
    victim.write_bytes(b"keep me")
    target = work["out"] / "ram.raw"
    (work["out"] / "ram.raw.partial").symlink_to(victim)
    r = vmssd("convert", work["sample"], "-o", target, "--format", "raw", "-q")
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"keep me" and os.readlink(work["out"] / "ram.raw.partial") == str(victim)
    assert sorted(p.name for p in work["out"].iterdir()) == ["ram.raw", "ram.raw.partial", "victim"]


def test_partial_output_names_are_unique_and_beside_the_target(tmp_path: Path) -> None:
    target = tmp_path / "o.bin"
    with outputs.partial_output(target, force=True) as a, outputs.partial_output(target) as b:
        temps = sorted(p for p in tmp_path.iterdir())
        assert len(temps) == 2 and all(
            re.fullmatch(rf"o\.bin\.{os.getpid()}\.[0-9a-f]{{8}}\.partial", p.name) for p in temps
        )
        a.write(b"first")
        b.write(b"second")
    assert target.read_bytes() == b"first" and list(tmp_path.iterdir()) == [target]  # b renamed, then a over it
    long_name = tmp_path / ("n" * 250)  # the temporary name must still fit in NAME_MAX
    with outputs.partial_output(long_name) as fh:
        fh.write(b"x")
    assert long_name.read_bytes() == b"x" and sorted(tmp_path.iterdir()) == sorted([target, long_name])


def test_a_target_that_appears_while_writing_is_never_replaced(tmp_path: Path) -> None:
    target = tmp_path / "o.bin"
    with (
        pytest.raises(VmssdError, match="appeared while it was being written; not replaced"),
        outputs.partial_output(target) as fh,
    ):
        fh.write(b"new")
        target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's" and list(tmp_path.iterdir()) == [target]
    if LINUX:
        with (
            pytest.raises(VmssdError, match="it is a symbolic link"),
            outputs.partial_output(tmp_path / "l", force=True),
        ):
            (tmp_path / "l").symlink_to("/dev/null")
        assert os.readlink(tmp_path / "l") == "/dev/null" and len(list(tmp_path.iterdir())) == 2


# ------------------------------------------------------------ item 1/9: a full disk, told as the user's file
def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
@pytest.mark.parametrize("command", ["read", "convert", "apply-log", "create"])
def test_a_write_that_fails_names_the_output_and_leaves_nothing(work: dict[str, Path], command: str) -> None:
    target = work["out"] / ("x.vmrs" if command in ("apply-log", "create") else "x.raw")
    before = evidence_hashes(work)
    args = [a for a in writers(work, target)[command] if a != "--force"]
    if command == "read":
        args[args.index("4K")] = "3M"
    if command == "create":
        args.append("--no-compress")  # 2 MiB stored raw: past the limit
    r = vmssd(*args, preexec_fn=lambda: _limit_file_size(256 * 1024))
    line = one_error(r, command)
    assert line == f"vmssd {command}: error: File too large writing {target}", line
    assert list(work["out"].iterdir()) == []
    assert evidence_hashes(work) == before


def _tmpfs_available(folder: Path) -> bool:
    if not LINUX or shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs '{folder}'"], capture_output=True, check=False
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("command", ["read", "convert", "apply-log", "create"])
def test_disk_full_on_a_small_tmpfs(work: dict[str, Path], command: str) -> None:
    """A private 512 KiB tmpfs (own mount namespace: nothing outside sees it) filled by a real command."""
    mnt = work["out"]
    if not _tmpfs_available(mnt):
        pytest.skip("cannot mount a private tmpfs here (needs unshare -m and mount rights)")
    target = mnt / ("x.vmrs" if command in ("apply-log", "create") else "x.raw")
    args = [str(a) for a in writers(work, target)[command] if a != "--force"]
    if command == "read":
        args[args.index("4K")] = "3M"
    if command == "create":
        args.append("--no-compress")  # 2 MiB stored raw: more than the tmpfs holds
    before = evidence_hashes(work)
    script = (
        f"mount -t tmpfs -o size=512k tmpfs '{mnt}' || exit 99; "
        f"PYTHONPATH='{REPO}' \"$@\"; code=$?; ls -A '{mnt}' >&2; exit $code"
    )
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *CLI, *args], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"vmssd {command}: error: No space left on device writing {target}\n"  # ls listed nothing
    assert evidence_hashes(work) == before


# --------------------------------------------------------------------------------- item 4: --jobs
def _max_children(proc: subprocess.Popen[str]) -> int:
    """The most child processes seen while ``proc`` runs (polled from /proc)."""
    most = 0
    while proc.poll() is None:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            kids = []
        most = max(most, len(kids))
        time.sleep(0.005)
    return most


def test_usable_cores_follows_the_affinity_mask() -> None:
    if not hasattr(os, "sched_getaffinity"):
        assert usable_cores() == max(1, os.cpu_count() or 1)
        return
    mask = os.sched_getaffinity(0)
    assert usable_cores() == len(mask)
    one = {min(mask)}
    code = f"import os; os.sched_setaffinity(0, {one!r}); import volatility3_vmssd.host as h; print(h.usable_cores())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    assert r.stdout.strip() == "1", r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads child processes from /proc and sets the CPU affinity")
def test_create_jobs_beyond_the_usable_cores_is_capped(work: dict[str, Path]) -> None:
    cores = usable_cores()
    out = work["out"] / "vm.vmrs"
    jobs = max(64, 4 * cores)  # absurd for this machine, and still harmless if the cap were missing
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [*CLI, "create", "--memory", str(work["ram"]), "--registers", str(work["regs"]), "-o", str(out)]
    proc = subprocess.Popen([*cmd, "--jobs", str(jobs)], cwd=REPO, env=env, text=True, stderr=subprocess.PIPE)
    most = _max_children(proc)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert stderr.splitlines()[0] == (
        f"vmssd create: note: --jobs {jobs} is more than the {cores} usable CPU core(s); using {cores}"
    )
    assert most <= cores, most
    # under an affinity mask of one CPU the cap is 1: the encoding runs in this process, no worker at all
    out.unlink()
    mask = {min(os.sched_getaffinity(0))}
    proc = subprocess.Popen(
        [*cmd, "--jobs", str(jobs)],
        cwd=REPO,
        env=env,
        text=True,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.sched_setaffinity(0, mask),
    )
    most = _max_children(proc)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0 and "usable CPU core(s); using 1\n" in stderr, stderr
    assert most == 0
    for bad in ("0", "-3", "many"):
        r = vmssd(*cmd[len(CLI) :], "--jobs", bad)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "--jobs" in r.stderr, r.stderr
    assert [p.name for p in work["out"].iterdir()] == ["vm.vmrs"]  # the capped run's output, nothing else


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads child processes from /proc")
def test_sigterm_stops_create_and_its_capped_workers(tmp_path: Path) -> None:
    ram = tmp_path / "ram.raw"
    ram.write_bytes(os.urandom(96 * MIB))  # random pages: slow to encode, so the signal lands mid-run
    regs = tmp_path / "regs.json"
    regs.write_text(json.dumps({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rip": "0x1"}}}]}))
    out = tmp_path / "vm.vmrs"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [*CLI, "create", "--memory", str(ram), "--registers", str(regs), "-o", str(out), "--jobs", "1000", "-q"],
        cwd=REPO,
        env=env,
        text=True,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("vm.vmrs.*.partial")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) <= usable_cores()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.splitlines()[-1] == "vmssd: terminated by SIGTERM; partial outputs removed", stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ram.raw", "regs.json"]
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


# ------------------------------------------------------------------------------ item 6: no tracebacks
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["read", SAMPLE, "0", "16", "--virtual", "--vtl", "-1"], "argument --vtl: '-1': a VTL is 0..15"),
        (["read", SAMPLE, "0", "16", "--virtual", "--vtl", str(2**64)], f"argument --vtl: '{2**64}': a VTL is 0..15"),
        (["read", SAMPLE, str(2**64), "16"], f"argument address: '{2**64}' is beyond 64 bits"),
        (["read", SAMPLE, "0", "0x1_0000_0000_0000_0000"], "argument length: '0x1_0000_0000_0000_0000' is beyond"),
        (
            ["create", "--memory", SAMPLE, "--registers", SAMPLE, "-o", "x.vmrs", "--alignment", "0x1001"],
            "argument --alignment: '0x1001': the data alignment must be a power of two from 0x1000 to 0x10000",
        ),
    ],
)
def test_odd_numbers_are_one_line_usage_errors(args: list[str | Path], said: str, tmp_path: Path) -> None:
    r = vmssd(*args, cwd=tmp_path)
    command = str(args[0])
    line = one_error(r, command, code=2)
    assert line.startswith(f"vmssd {command}: error: {said}") and line.endswith(f"(see 'vmssd {command} --help')")
    assert list(tmp_path.iterdir()) == []


def _close_stdout() -> None:
    os.close(1)


@pytest.mark.skipif(not LINUX, reason="closes fd 1 in the child")
@pytest.mark.parametrize(
    "args",
    [
        ["keys", SAMPLE],
        ["registers", SAMPLE],
        ["memmap", SAMPLE],
        ["read", SAMPLE, "0", "64"],
        ["info", SAMPLE],
        ["triage", "--out", "{tmp}/triage", SAMPLE],
    ],
)
def test_closed_stdout_is_an_error_not_silence(args: list[str | Path], tmp_path: Path) -> None:
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    r = vmssd(*args, preexec_fn=_close_stdout)
    line = one_error(r, args[0])
    assert line.endswith("standard output is closed; nothing to print to (redirect it to a file or to /dev/null)")
    assert list(tmp_path.iterdir()) == []  # triage did not start


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_stdout_on_a_full_device_names_it(tmp_path: Path) -> None:
    for args in (["info", SAMPLE], ["read", SAMPLE, "0", "1M"]):
        with open("/dev/full", "w") as full:
            r = subprocess.run(
                [*CLI, *map(str, args)],
                stdout=full,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                check=False,
            )
        assert one_error(r, args[0]) == f"vmssd {args[0]}: error: No space left on device writing standard output"


def test_a_file_written_with_closed_stdout_still_works(work: dict[str, Path]) -> None:
    out = work["out"] / "low.bin"
    r = vmssd("read", work["sample"], "0", "4K", "-o", out, preexec_fn=_close_stdout if LINUX else None)
    assert r.returncode == 0 and out.stat().st_size == 4096, r.stderr


# ------------------------------------------------------------------------------ item 7: one --vsv rule
@pytest.fixture()
def pair(tmp_path: Path, work: dict[str, Path]) -> dict[str, Path]:
    """A legacy pair written by ``vmssd create --legacy``, a .bin alone, and files that are not its .vsv."""
    folder = tmp_path / "pair"
    folder.mkdir()
    r = vmssd("create", "--memory", work["ram"], "--registers", work["regs"], "--legacy", "-o", folder / "vm.bin")
    assert r.returncode == 0, r.stderr
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(folder / "vm.bin", alone / "vm.bin")
    random_file = tmp_path / "random.vsv"
    random_file.write_bytes(bytes([0x5A, 0x17, 0x99, 0x03]) * 1024)
    vmcx = tmp_path / "vm.vmcx"
    with HyperVStorageWriter(vmcx) as w:
        w.set("/configuration/properties/name", "Test VM")
    return {"bin": folder / "vm.bin", "vsv": folder / "vm.vsv", "alone": alone / "vm.bin", "random": random_file,
            "vmcx": vmcx, "vmrs": work["sample"]}  # fmt: skip


@pytest.mark.slow
def test_vsv_that_is_not_a_vsv_is_refused_by_every_command(pair: dict[str, Path], tmp_path: Path) -> None:
    before = {k: sha256(p) for k, p in pair.items()}
    expected = {
        "random": f"{pair['random']} is not the .vsv of {pair['bin']}: it is not a HyperVStorage file",
        "vmcx": f"{pair['vmcx']} is not the .vsv of {pair['bin']}: it is a VM configuration (.vmcx)",
        "vmrs": f"{pair['vmrs']} is not the .vsv of {pair['bin']}: it is a saved state with its own memory",
        "bin": f"{pair['bin']} is the .bin itself",
    }
    for name, why in expected.items():
        problem = vsv_problem(pair["bin"], pair[name])
        assert problem is not None and problem.startswith(why), problem
        for command, extra in (("memmap", []), ("info", []), ("read", ["0", "16"]), ("registers", [])):
            r = vmssd(command, pair["bin"], *extra, "--vsv", pair[name])
            assert one_error(r, command) == f"vmssd {command}: error: --vsv: {problem}"
        out = tmp_path / "x.raw"
        r = vmssd("convert", pair["bin"], "--vsv", pair[name], "-o", out, "--format", "raw")
        assert one_error(r, "convert") == f"vmssd convert: error: --vsv: {problem}" and not out.exists()
    assert vsv_problem(pair["bin"], pair["vsv"]) is None
    r = vmssd("memmap", pair["alone"], "--vsv", pair["vsv"])
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert {k: sha256(p) for k, p in pair.items()} == before


@pytest.mark.slow
@pytest.mark.parametrize("command", ["memmap", "convert", "read"])
def test_a_bin_without_its_vsv_warns_in_every_command(pair: dict[str, Path], command: str, tmp_path: Path) -> None:
    extra = {"convert": ["-o", tmp_path / "x.raw", "--format", "raw", "-q"], "read": ["0", "16"]}.get(command, [])
    r = vmssd(command, pair["alone"], *extra)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    (warning,) = r.stderr.splitlines()
    assert warning.startswith(f"vmssd {command}: warning: {pair['alone']}: no .vsv found beside it (looked for")
    assert "RAM is read as one range from GPA 0" in warning
    r = vmssd(command, pair["bin"], *extra, *(["--force"] if command == "convert" else []))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    info = vmssd("info", pair["alone"])
    assert info.returncode == 0 and "[no-partner]" in info.stdout and info.stderr == ""


@pytest.mark.slow
# -------------------------------------------------------------------------------------- item 9: polish
def test_help_keeps_one_example_per_line() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    env = dict(os.environ, PYTHONPATH=str(REPO), COLUMNS="40")
    for name, command in sub.choices.items():
        r = subprocess.run([*CLI, name, "--help"], capture_output=True, text=True, cwd=REPO, env=env, check=False)
        assert r.returncode == 0
        shown = r.stdout.splitlines()
        for line in command.epilog.splitlines():
            assert line in shown, (name, line)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-o", "{out}/vm.bin"], "-o {out}/vm.bin: the name says a legacy .bin, but this writes a .vmrs"),
        (["--legacy", "-o", "{out}/x.vmrs"], "-o {out}/x.vmrs: the name says a .vmrs saved state, but this writes a"),
        (["--legacy", "-o", "{out}/x.bin", "--vsv", "{out}/y.vmrs"], "--vsv {out}/y.vmrs: the name says a .vmrs"),
        (["-o", "{out}/x.VSV"], "-o {out}/x.VSV: the name says a legacy .vsv"),
    ],
)
def test_create_checks_the_output_name_against_the_format(work: dict[str, Path], args: list[str], said: str) -> None:
    args = [a.replace("{out}", str(work["out"])) for a in args]
    r = vmssd("create", "--memory", work["ram"], "--registers", work["regs"], *args)
    line = one_error(r, "create")
    assert line.startswith("vmssd create: error: " + said.replace("{out}", str(work["out"]))), line
    assert list(work["out"].iterdir()) == []


@pytest.mark.slow
def test_memmap_read_convert_of_a_vmcx_say_what_it_is(tmp_path: Path) -> None:
    vmcx = need(REAL / "test.vmcx")
    said = f"{vmcx} is the configuration of VM 'Other Location' (a .vmcx: settings, no guest memory)"
    for command, extra in (
        ("memmap", []),
        ("read", ["0", "16"]),
        ("convert", ["-o", tmp_path / "x", "--format", "raw"]),
    ):
        assert one_error(vmssd(command, vmcx, *extra), command).startswith(f"vmssd {command}: error: {said}")
    assert list(tmp_path.iterdir()) == []


def test_memmap_of_a_container_without_memory_or_settings(tmp_path: Path) -> None:
    empty = tmp_path / "state.vmrs"
    with HyperVStorageWriter(empty) as w:
        w.set("/savedstate/VmVersion", 0x900)
    line = one_error(vmssd("memmap", empty), "memmap")
    assert line.startswith(f"vmssd memmap: error: {empty}: the file holds no saved guest memory")


def test_apply_log_with_nothing_pending_writes_no_copy(work: dict[str, Path]) -> None:
    out = work["out"] / "copy.vmrs"
    r = vmssd("apply-log", work["sample"], "-o", out)
    assert r.returncode == 0 and r.stdout == ""
    assert r.stderr == f"{work['sample']} has no pending journal entries: nothing to apply, {out} not written\n"
    assert list(work["out"].iterdir()) == []
    r = vmssd("apply-log", work["journal"], "-o", out)
    assert r.returncode == 0 and r.stderr == f"applied 1 pending journal entry; wrote {out}\n"


@pytest.mark.slow
def test_info_label_column_fits_its_longest_label() -> None:
    vmcx = need(REAL / "test.vmcx")
    for path in (SAMPLE, vmcx):
        r = vmssd("info", path)
        assert r.returncode == 0, r.stderr
        labelled = [line for line in r.stdout.splitlines() if not line.startswith(" ")]
        doc = json.loads(vmssd("info", "--json", path).stdout)
        labels = [lab for lab in ("File kind", "VM configuration version") if lab in r.stdout]
        col = len(labelled[0]) - len(labelled[0][len("File kind") :].lstrip())
        for line in labelled:  # every value starts in the one column, after at least one space
            assert line[col - 1] == " " and line[col] != " ", (line, col)
        assert col > max(len(lab) for lab in labels)
        assert doc["file_kind"]


def test_one_word_for_the_vtl_analysis_uses() -> None:
    r = vmssd("registers", SAMPLE)
    assert r.returncode == 0 and "(used)" in r.stdout and "ctive" not in r.stdout
    assert "(used)" in vmssd("info", SAMPLE).stdout  # and vol's hyperv.registers column: tests/volatility
