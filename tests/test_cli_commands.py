"""``vmssd registers / memmap / read / convert / apply-log`` driven as a user would: subprocesses, exit
codes, JSON parsed back, images opened by Volatility, Ctrl-C, and a 16 GiB guest in bounded memory."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import add_journal_entries
from shared_data import LINUX_GUEST, REPO, need
from terminal import foreground

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.cpujson import register_to_json, state_from_json
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.storage import HyperVStorage
from volatility3_vmssd.vmrs.writer import write_fill_vmrs

SAMPLE = REPO / "tests" / "data" / "sample.vmrs"
CLI = [sys.executable, "-m", "volatility3_vmssd.cli.main"]
MIB, GIB = 1 << 20, 1 << 30
GUEST_RAM_OFFSET = 0x7C8  # PT_LOAD 1 of guest.elf: 256 MiB of RAM from GPA 0 (data README)
BIOS_ROM = (0xFFFC0000, 0x1_0000_0000)


def vmssd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=REPO)


def sha256(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        left = size if size is not None else os.path.getsize(path) - offset
        while left > 0:
            data = fh.read(min(16 * MIB, left))
            assert data, f"{path} ends early"
            h.update(data)
            left -= len(data)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def guest(guest_vmrs: Path, guest_elf: Path) -> tuple[Path, Path]:
    """(guest.vmrs, guest.elf): the real Linux guest (conftest's, so its tests are in the slow tier)."""
    return guest_vmrs, guest_elf


@pytest.fixture(scope="session")
def large_vmrs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .vmrs describing 16 GiB (3 GiB below the 32-bit MMIO gap, the rest from 4 GiB), all fill pages."""
    path = tmp_path_factory.mktemp("large") / "large.vmrs"
    state = state_from_json({"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"efer": "0xd01"}}}]})
    write_fill_vmrs(path, 16 * GIB, state)
    return path


@pytest.fixture(scope="session")
def isf_hash() -> str:
    """The schema-validation hash of the guest's ISF, to seed each fresh Volatility cache with.

    jsonschema over the 38 MB ISF takes about two minutes on a slow machine; seeding its verdict
    keeps each `vol` run at ~10 s while everything else (identifier cache, layers) starts cold.
    """
    from volatility3 import schemas

    isf = next((need(LINUX_GUEST / "symbols") / "linux").glob("*.json.xz"))
    with lzma.open(isf) as fh:
        digest = schemas.create_json_hash(json.load(fh))
    assert digest is not None
    return digest


def vol(image: Path, plugin: str, cache: Path, isf_digest: str) -> list[str]:
    """`vol -q -s symbols -f image plugin` with a fresh XDG_CACHE_HOME; the rows (banner line dropped)."""
    (cache / "volatility3").mkdir(parents=True)
    (cache / "volatility3" / "valid_isf.hashcache").write_text(json.dumps([isf_digest]))
    # volatility3 2.28.2 has no volatility3.cli.__main__, so `-m volatility3.cli` cannot run it; this is `vol`.
    runner = "import sys; from volatility3.cli import main; sys.argv[0] = 'vol'; main()"
    symbols = LINUX_GUEST / "symbols"
    r = subprocess.run(
        [sys.executable, "-c", runner, "-q", "-s", str(symbols), "-f", str(image), plugin],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(cache)},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()[1:]


def expected(name: str) -> list[str]:
    return (LINUX_GUEST / "expected" / name).read_text().splitlines()[1:]


# ------------------------------------------------------------------------------------------ registers
def test_registers_text_lists_every_register_with_fields() -> None:
    r = vmssd("registers", SAMPLE)
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["VP 0  VTL 0 (used)", "VP 1  VTL 0 (used)"]
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        names = list(p.get_registers(1))
    lines = blocks[1].splitlines()[1:]
    assert [line.split()[0] for line in lines] == names
    text = dict(line.split(None, 1) for line in lines)
    assert text["rip"] == "0xfffff80000001010" and text["rcx"] == "0x0000000000000001"
    assert text["xmm0"] == "0x" + "0" * 32
    assert text["cs"] == (
        "selector 0x0010  base 0x0000000000000000  limit 0xffffffff  attributes 0xa09b (type 0xb, DPL 0, S, P, L, G)"
    )
    assert text["gdtr"] == "base 0xfffff80000003000  limit 0x007f"


def test_registers_json_is_the_create_format_and_round_trips(tmp_path: Path) -> None:
    r = vmssd("registers", "--json", SAMPLE)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        assert [vp["vp_index"] for vp in doc["vps"]] == list(range(p.vp_count()))
        for vp in range(p.vp_count()):
            banks = {str(v): {n: register_to_json(x) for n, x in p.get_registers(vp, v).items()} for v in (0,)}
            assert doc["vps"][vp]["vtls"] == json.loads(json.dumps(banks))
    regs = tmp_path / "regs.json"
    regs.write_text(r.stdout)
    raw = tmp_path / "ram.raw"
    raw.write_bytes(bytes(MIB))
    out = tmp_path / "copy.vmrs"
    assert vmssd("create", "--memory", raw, "--registers", regs, "-o", out, "--jobs", "1").returncode == 0
    again = json.loads(vmssd("registers", "--json", out).stdout)
    assert again["vps"] == doc["vps"]

    one = json.loads(vmssd("registers", "--json", "--vp", "1", "--vtl", "0", SAMPLE).stdout)
    assert [vp["vp_index"] for vp in one["vps"]] == [1] and list(one["vps"][0]["vtls"]) == ["0"]
    assert one["vps"][0]["vtls"]["0"]["rcx"] == "0x1"


def test_registers_errors_are_one_line() -> None:
    for args, message in (
        (["--vp", "7"], "VP 7 does not exist"),
        (["--vtl", "1"], "no register bank for VTL 1"),
    ):
        r = vmssd("registers", SAMPLE, *args)
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------------------------------ memmap
def test_memmap_text_and_json() -> None:
    r = vmssd("memmap", SAMPLE)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1:] == [
        "0x0000000000000000  0x000000000009ffff   640.0 KiB  0x0000000000000000  0",
        "0x00000000000a0000  0x00000000000fffff   384.0 KiB  -                   (hole)",
        "0x0000000000100000  0x00000000007fffff     7.0 MiB  0x0000000000100000  1-7",
        "2 range(s), 7,995,392 bytes (7.6 MiB) of RAM in 8 RamBlock(s)",
    ]
    ranges = json.loads(vmssd("memmap", "--json", SAMPLE).stdout)
    assert ranges == [
        {"gpa_start": 0, "size": 0xA0000, "raw_offset": 0, "first_ramblock": 0, "last_ramblock": 0}
        | {"ramblocks_present": 1, "flags": 0},
        {"gpa_start": 0x100000, "size": 0x700000, "raw_offset": 0x100000, "first_ramblock": 1, "last_ramblock": 7}
        | {"ramblocks_present": 7, "flags": 0},
    ]


# ------------------------------------------------------------------------------------------ read
HEXLINE = re.compile(
    r"^([0-9a-f]{8,16})  ((?:[0-9a-f]{2} ){7}[0-9a-f]{2})  ((?:[0-9a-f]{2} ){7}[0-9a-f]{2})  \|(.{16})\|$"
)


def parse_hexdump(text: str) -> tuple[int, bytes]:
    """(first address, bytes) of a hexdump; every line must be a full 16-byte line but the last."""
    lines = text.splitlines()
    data = b""
    first = None
    for i, line in enumerate(lines):
        m = HEXLINE.match(line)
        if m is None:  # a short last line
            assert i == len(lines) - 1, line
            addr, rest = line.split("  ", 1)
            hexpart, ascii_part = rest.rsplit("  |", 1)
            chunk = bytes.fromhex(hexpart.replace("  ", " "))
            assert ascii_part.endswith("|") and len(ascii_part) == len(chunk) + 1
        else:
            addr = m[1]
            chunk = bytes.fromhex(m[2] + m[3])
            assert m[4] == "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        if first is None:
            first = int(addr, 16)
        assert int(addr, 16) == first + len(data)
        data += chunk
    assert first is not None
    return first, data


def test_read_hexdump_format() -> None:
    r = vmssd("read", SAMPLE, "0x100000", "0x25")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(len(line) == len(lines[0]) for line in lines[:2])
    assert lines[0].startswith("00100000  ") and lines[2].startswith("00100020  ")
    first, data = parse_hexdump(r.stdout)
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        assert (first, data) == (0x100000, p.read_guest_physical_address(0x100000, 0x25))
    # the same line layout as `hexdump -C`: two groups of 8, then the ASCII column
    assert re.match(r"^00100000  ([0-9a-f]{2} ){7}[0-9a-f]{2}  ([0-9a-f]{2} ){7}[0-9a-f]{2}  \|.{16}\|$", lines[0])
    assert vmssd("read", SAMPLE, "1M", "37").stdout == r.stdout  # suffixes and decimal


def test_read_into_a_hole_keeps_what_it_read(tmp_path: Path) -> None:
    r = vmssd("read", SAMPLE, "0x9fff0", "0x40")
    assert r.returncode == 0
    assert parse_hexdump(r.stdout)[0] == 0x9FFF0 and len(parse_hexdump(r.stdout)[1]) == 0x10
    assert "stopped after 0x10 of 0x40 bytes" in r.stderr and "GPA 0xa0000 is not backed" in r.stderr
    r = vmssd("read", SAMPLE, "0xa0000", "16")
    assert r.returncode == 1 and r.stdout == "" and "nothing read at GPA 0xa0000" in r.stderr
    out = tmp_path / "part.bin"
    r = vmssd("read", SAMPLE, "0x9f000", "0x2000", "-o", out)
    assert r.returncode == 0 and "stopped after 0x1000" in r.stderr
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        assert out.read_bytes() == p.read_guest_physical_address(0x9F000, 0x1000)
    r = vmssd("read", SAMPLE, "0xa0000", "16", "-o", tmp_path / "none.bin")
    assert r.returncode == 1 and not list(tmp_path.glob("none.bin*"))


def test_read_raw_offset_and_to_a_file(tmp_path: Path) -> None:
    out = tmp_path / "raw.bin"
    r = vmssd("read", SAMPLE, "0xa0000", "0x1000", "--raw-offset", "-o", out)
    assert r.returncode == 0, r.stderr
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        assert out.read_bytes() == p.read_guest_raw_saved_memory(0xA0000, 0x1000)
        size = p.get_guest_raw_saved_memory_size()
    r = vmssd("read", SAMPLE, hex(size - 16), "64", "--raw-offset")
    assert r.returncode == 0 and len(parse_hexdump(r.stdout)[1]) == 16 and "past the end" in r.stderr
    r = vmssd("read", SAMPLE, "0", "16", "-o", out)
    assert r.returncode == 1 and "exists" in r.stderr
    r = vmssd("read", SAMPLE, "0", "16", "-o", SAMPLE)
    assert r.returncode == 1 and "it is an input" in r.stderr


def paged_image() -> tuple[bytes, dict]:
    """2 MiB of RAM with 4-level page tables at 0x1000 mapping VA 0x400000 -> GPA 0x100000 (one page)."""
    ram = bytearray(2 * MIB)
    struct.pack_into("<Q", ram, 0x1000, 0x2000 | 3)  # PML4[0] -> PDPT
    struct.pack_into("<Q", ram, 0x2000, 0x3000 | 3)  # PDPT[0] -> PD
    struct.pack_into("<Q", ram, 0x3000 + 2 * 8, 0x4000 | 3)  # PD[2] (VA 0x400000) -> PT
    struct.pack_into("<Q", ram, 0x4000, 0x100000 | 3)  # PT[0] -> GPA 0x100000; PT[1] not present
    ram[0x100000:0x101000] = bytes(range(256)) * 16
    regs = {"cr0": "0x80000011", "cr3": "0x1000", "cr4": "0x20", "efer": "0x500", "rip": "0x400ff0"}
    return bytes(ram), {"format": "vmssd-registers/1", "vps": [{"vtls": {"0": regs}}]}


def test_read_virtual_stops_at_an_unmapped_page(tmp_path: Path) -> None:
    ram, regs = paged_image()
    (tmp_path / "ram.raw").write_bytes(ram)
    (tmp_path / "regs.json").write_text(json.dumps(regs))
    vm = tmp_path / "paged.vmrs"
    r = vmssd(
        "create", "--memory", tmp_path / "ram.raw", "--registers", tmp_path / "regs.json", "-o", vm, "--jobs", "1"
    )
    assert r.returncode == 0, r.stderr
    r = vmssd("read", vm, "0x400ff0", "0x40", "--virtual")
    assert r.returncode == 0, r.stderr
    first, data = parse_hexdump(r.stdout)
    assert first == 0x400FF0 and data == ram[0x100FF0:0x101000]
    assert r.stdout.startswith("0000000000400ff0  ")  # virtual addresses are printed 16 wide
    assert "stopped after 0x10 of 0x40 bytes" in r.stderr and "0x401000" in r.stderr
    r = vmssd("read", vm, "0x401000", "16", "--virtual", "--vp", "0")
    assert r.returncode == 1 and "nothing read at VA 0x401000 (VP 0)" in r.stderr


@pytest.mark.slow
def test_read_virtual_on_the_real_guest(guest: tuple[Path, Path], tmp_path: Path) -> None:
    vmrs, elf = guest
    with SavedStateProvider.load_vmrs(vmrs) as p:
        rip = p.get_register_value(0, "rip")
        assert isinstance(rip, int)
        gpa = p.guest_virtual_to_physical(0, rip)
    r = vmssd("read", vmrs, hex(rip), "0x100", "--virtual", "--vp", "0")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    first, virtual = parse_hexdump(r.stdout)
    assert first == rip and r.stdout.startswith(f"{rip:016x}  ")
    r = vmssd("read", vmrs, hex(gpa), "0x100")
    assert r.returncode == 0, r.stderr
    assert parse_hexdump(r.stdout) == (gpa, virtual)
    with open(elf, "rb") as fh:
        fh.seek(GUEST_RAM_OFFSET + gpa)
        assert fh.read(0x100) == virtual
    # a longer read crosses pages: each page translated on its own, the same bytes as page-wise lookups
    out = tmp_path / "text.bin"
    assert vmssd("read", vmrs, hex(rip), "0x3000", "--virtual", "-o", out).returncode == 0
    with SavedStateProvider.load_vmrs(vmrs) as p:
        want = b""
        va = rip
        while len(want) < 0x3000:
            pa, left = p.guest_virtual_to_physical_with_size(0, va)
            take = min(left, 0x3000 - len(want))
            want += p.read_guest_physical_address(pa, take)
            va += take
    assert out.read_bytes() == want


# ------------------------------------------------------------------------------------------ convert
@pytest.mark.shared
@pytest.mark.slow
def test_convert_real_guest_elf_and_lime_open_in_volatility(
    guest: tuple[Path, Path], isf_hash: str, tmp_path: Path
) -> None:
    vmrs, _ = guest
    want = expected("linux.pslist.txt")
    for fmt in ("elf", "lime"):
        out = tmp_path / f"guest.{fmt}"
        r = vmssd("convert", vmrs, "-o", out, "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert r.stderr.startswith(f"wrote {out}: {fmt}, 1 GPA range(s), 268,435,456 bytes of RAM")
        assert "\r" not in r.stderr  # stderr is not a terminal: no progress bar
        assert vol(out, "linux.pslist", tmp_path / f"cache-{fmt}", isf_hash) == want
    with MemoryImage.open(tmp_path / "guest.elf") as image:  # one NT_PRSTATUS per VP, pids 1 and 2
        prstatus = [n for n in image.notes if n.type == 1]
        assert [struct.unpack_from("<i", n.desc, 32)[0] for n in prstatus] == [1, 2]


@pytest.mark.shared
def test_convert_raw_is_the_guest_ram_byte_for_byte(guest: tuple[Path, Path], tmp_path: Path) -> None:
    vmrs, elf = guest
    out = tmp_path / "guest.raw"
    r = vmssd("convert", vmrs, "-o", out, "--format", "raw", "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert out.stat().st_size == 256 * MIB
    assert sha256(out) == sha256(elf, GUEST_RAM_OFFSET, 256 * MIB)
    assert not list(tmp_path.glob("*.partial"))


def peak_rss_mib(proc: subprocess.Popen[bytes]) -> float | None:
    """Wait for ``proc``, sampling its VmHWM (the high-water RSS of its own address space) meanwhile.

    Not ``wait4``'s ``ru_maxrss``: Linux folds the RSS of the forked test process into that.
    """
    status = Path(f"/proc/{proc.pid}/status")
    peak = None
    while proc.poll() is None:
        try:
            m = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        except OSError:
            m = None
        if m:
            peak = max(peak or 0, int(m[1]) / 1024)
        time.sleep(0.02)
    return peak


@pytest.mark.slow
def test_convert_16_gib_in_bounded_memory_to_a_sparse_file(large_vmrs: Path, tmp_path: Path) -> None:
    out = tmp_path / "large.raw"
    start = time.monotonic()
    proc = subprocess.Popen([*CLI, "convert", str(large_vmrs), "-o", str(out), "--format", "raw"], cwd=REPO)
    peak = peak_rss_mib(proc)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0
    assert out.stat().st_size == 17 * GIB  # flat from GPA 0: RAM resumes at 4 GiB, above the 1 GiB gap
    on_disk = out.stat().st_blocks * 512
    assert on_disk < 16 * MIB  # all fill pages of zeros: the file is one big hole
    print(f"\n16 GiB raw convert: {elapsed:.1f} s, peak RSS {peak or 0:.0f} MiB, {on_disk:,} bytes on disk")
    if peak is not None:
        assert peak < 200, f"peak RSS {peak:.0f} MiB: memory grows with the image"
    with open(out, "rb") as fh:
        fh.seek(0xC0000000 - 8)
        assert fh.read(16) == bytes(16)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "terminated by SIGTERM"),
        (signal.SIGHUP, 129, "SIGHUP"),
    ],
)
def test_signals_during_convert_leave_nothing_behind(
    large_vmrs: Path, tmp_path: Path, signum: int, code: int, said: str
) -> None:
    """Ctrl-C, and SIGTERM/SIGHUP as ``timeout`` or a job scheduler send them: exit 128 + N, no file left."""
    out = tmp_path / "large.elf"
    proc = subprocess.Popen(
        foreground([*CLI, "convert", str(large_vmrs), "-o", str(out), "--format", "elf"]),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob("large.elf.*.partial")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "convert never created its .partial file"
        time.sleep(0.02)
    time.sleep(0.3)  # well into the copy
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert said in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []  # neither the temporary file nor the image


def legacy_pair(tmp_path: Path) -> tuple[Path, Path, bytes]:
    ram = bytes(range(256)) * 8192  # 2 MiB
    (tmp_path / "ram.raw").write_bytes(ram)
    regs = {"format": "vmssd-registers/1", "vps": [{"vtls": {"0": {"rip": "0x1234", "efer": "0xd01"}}}]}
    (tmp_path / "regs.json").write_text(json.dumps(regs))
    bin_path = tmp_path / "vm.bin"
    r = vmssd(
        "create", "--memory", tmp_path / "ram.raw", "--registers", tmp_path / "regs.json", "--legacy", "-o", bin_path
    )
    assert r.returncode == 0, r.stderr
    return bin_path, tmp_path / "vm.vsv", ram


@pytest.mark.slow
def test_legacy_pairs_everywhere(tmp_path: Path) -> None:
    bin_path, vsv, ram = legacy_pair(tmp_path)
    out = tmp_path / "vm.lime"
    assert vmssd("convert", bin_path, "-o", out, "--format", "lime", "-q").returncode == 0  # .vsv found beside
    with MemoryImage.open(out) as image:
        assert image.read(0, len(ram)) == ram
    assert json.loads(vmssd("registers", "--json", vsv).stdout)["vps"][0]["vtls"]["0"]["rip"] == "0x1234"
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = other / "renamed.vsv"
    vsv.rename(moved)
    r = vmssd("registers", bin_path, "--vsv", moved)
    assert r.returncode == 0 and "rip               0x0000000000001234" in r.stdout
    assert json.loads(vmssd("memmap", "--json", bin_path, "--vsv", moved).stdout)[0]["size"] == 2 * MIB
    r = vmssd("read", bin_path, "0x100", "0x10", "--vsv", moved)
    assert parse_hexdump(r.stdout) == (0x100, ram[0x100:0x110])
    r = vmssd("convert", bin_path, "--vsv", moved, "-o", moved, "--format", "raw", "--force")
    assert r.returncode == 1 and "it is an input" in r.stderr
    r = vmssd("registers", bin_path)  # without its .vsv a .bin has no CPU state
    assert r.returncode == 1 and "no CPU state" in r.stderr


@pytest.mark.slow
def test_convert_refuses_inputs_and_existing_outputs(tmp_path: Path) -> None:
    vm = tmp_path / "vm.vmrs"
    shutil.copy(SAMPLE, vm)
    os.link(vm, tmp_path / "hardlink.vmrs")
    for target in (vm, tmp_path / "hardlink.vmrs", tmp_path / "." / "vm.vmrs"):
        r = vmssd("convert", vm, "-o", target, "--format", "raw", "--force")
        assert r.returncode == 1 and "it is an input" in r.stderr, r.stderr
    assert sha256(vm) == sha256(SAMPLE)
    out = tmp_path / "out.raw"
    out.write_bytes(b"keep me")
    r = vmssd("convert", vm, "-o", out, "--format", "raw")
    assert r.returncode == 1 and "exists" in r.stderr and out.read_bytes() == b"keep me"
    assert vmssd("convert", vm, "-o", out, "--format", "raw", "--force", "-q").returncode == 0
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        assert out.read_bytes() == p.read_guest_physical_address_padded(0, 8 * MIB)
    r = vmssd("convert", vm, "-o", tmp_path / "no" / "such" / "dir.raw", "--format", "elf")
    assert r.returncode == 1 and "No such file" in r.stderr and r.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hardlink.vmrs", "out.raw", "vm.vmrs"]


# ------------------------------------------------------------------------------------------ apply-log
@pytest.mark.slow
def test_apply_log_commits_a_copy(tmp_path: Path) -> None:
    vm = tmp_path / "journal.vmrs"
    shutil.copy(SAMPLE, vm)
    with HyperVStorage.open(vm) as s:
        key = s.get("/savedstate/RamBlock1")
        assert key is not None and key.data_location is not None
        offset = key.data_location[0]
    add_journal_entries(vm, pending=[(offset, bytes(4096))])
    digest = sha256(vm)
    assert json.loads(vmssd("info", "--json", vm).stdout)["journal"]["pending"] == 1
    out = tmp_path / "committed.vmrs"
    r = vmssd("apply-log", vm, "-o", out)
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == ("", f"applied 1 pending journal entry; wrote {out}\n")  # reported as convert does
    assert sha256(vm) == digest  # the input is only read
    info = json.loads(vmssd("info", "--json", out).stdout)
    assert info["journal"]["pending"] == 0 and info["findings"] == []
    assert vmssd("read", out, "0x100000", "0x1000").stdout == vmssd("read", SAMPLE, "0x100000", "0x1000").stdout
    r = vmssd("apply-log", vm, "-o", vm)
    assert r.returncode == 1 and "it is an input" in r.stderr
    r = vmssd("apply-log", vm, "-o", out)
    assert r.returncode == 1 and "exists" in r.stderr
    r = vmssd("apply-log", out, "-o", tmp_path / "again.vmrs")
    assert r.returncode == 0 and "no pending journal entries: nothing to apply" in r.stderr
    assert not (tmp_path / "again.vmrs").exists()
    bin_path, _, _ = legacy_pair(tmp_path)
    r = vmssd("apply-log", bin_path, "-o", tmp_path / "x.bin")
    assert r.returncode == 1 and "its .vsv" in r.stderr


# ------------------------------------------------------------------------------------------ errors and usage
@pytest.mark.slow
@pytest.mark.parametrize("command", ["registers", "memmap", "read", "convert", "apply-log"])
def test_bad_paths_are_one_line_errors(command: str, tmp_path: Path) -> None:
    extra = {"read": ["0", "16"], "convert": ["-o", str(tmp_path / "o"), "--format", "raw"]}.get(command, [])
    if command == "apply-log":
        extra = ["-o", str(tmp_path / "o")]
    for path, message in (
        (tmp_path / "missing.vmrs", "No such file"),
        (tmp_path / "no-dir" / "vm.vmrs", "No such file"),
        (tmp_path, "directory"),
    ):
        r = vmssd(command, path, *extra)
        assert r.returncode == 1, (command, path, r.stderr)
        assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    junk = tmp_path / "junk.vmrs"
    junk.write_bytes(b"\0" * 5000)
    r = vmssd(command, junk, *extra)
    assert r.returncode == 1 and str(junk) in r.stderr
    assert "Traceback" in vmssd("-v", command, junk, *extra).stderr


def test_unreadable_file(tmp_path: Path) -> None:
    locked = tmp_path / "locked.vmrs"
    shutil.copy(SAMPLE, locked)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reads (directories and missing paths are tested)")
        r = vmssd("memmap", locked)
        assert r.returncode == 1 and "Permission denied" in r.stderr
    finally:
        locked.chmod(0o600)


@pytest.mark.parametrize(
    "args",
    [
        ["registers"],
        ["registers", str(SAMPLE), "--vp", "x"],
        ["read", str(SAMPLE), "0x1000"],
        ["read", str(SAMPLE), "zz", "16"],
        ["read", str(SAMPLE), "0", "16", "--virtual", "--raw-offset"],
        ["read", str(SAMPLE), "0", "16", "--vp", "1"],
        ["convert", str(SAMPLE), "--format", "raw"],
        ["convert", str(SAMPLE), "-o", "x", "--format", "vmdk"],
        ["apply-log", str(SAMPLE)],
        ["memmap", str(SAMPLE), "--bogus"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    r = vmssd(*args)
    assert r.returncode == 2 and r.stdout == "" and "error" in r.stderr, r.stderr


@pytest.mark.slow
def test_every_command_has_help_with_examples() -> None:
    top = vmssd("--help")
    assert top.returncode == 0
    for command in ("registers", "memmap", "read", "convert", "apply-log", "create", "info", "keys"):
        assert command in top.stdout
        r = vmssd(command, "--help")
        assert r.returncode == 0 and f"vmssd {command} " in r.stdout.split("examples:", 1)[1], command
