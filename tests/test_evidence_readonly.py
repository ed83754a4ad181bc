"""Evidence safety: every open of an input file is read-only, and committing a journal writes only ``dst``.

The inputs are chmod 0444, but the tests run as root (who may write anyway), so ``builtins.open``,
``io.open`` and ``os.open`` are wrapped during each call and every open of an input is checked for
write, append, create or truncate flags.  File hashes and timestamps are compared before and after.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from builders import add_journal_entries

from volatility3_vmssd import SavedStateProvider
from volatility3_vmssd.cpu.cpustate import PartitionState, VpState
from volatility3_vmssd.cpu.registers import PrologVendor
from volatility3_vmssd.errors import Findings, VmssdError
from volatility3_vmssd.images.memoryimage import MemoryImage
from volatility3_vmssd.memory.geometry import BLOCK_SIZE
from volatility3_vmssd.memory.legacy_bin import BinFile
from volatility3_vmssd.memory.ramblock import index_block
from volatility3_vmssd.storage import HyperVStorage
from volatility3_vmssd.vmrs.writer import write_bin_vsv, write_vmrs

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_MODE_WRITES = set("wax+")


def _state() -> PartitionState:
    regs = {"cr0": 0x80050033, "cr3": 0x1000, "cr4": 0x6F8, "efer": 0xD01, "rip": 0x1234}
    return PartitionState(processor_vendor=PrologVendor.INTEL, vps=[VpState(0, registers={0: regs})])


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A .vmrs, the same with a pending journal, and a .bin + .vsv pair, all chmod 0444."""
    d = tmp_path_factory.mktemp("evidence")
    ram = d / "ram.raw"
    ram.write_bytes(b"".join(bytes([i]) * 4096 + bytes(4096 * 3) for i in range(128)))  # 2 MiB
    with MemoryImage.open(ram) as image:
        write_vmrs(d / "vm.vmrs", image, _state())
        write_bin_vsv(d / "vm.bin", d / "vm.vsv", image, _state())
    shutil.copyfile(d / "vm.vmrs", d / "journal.vmrs")
    with HyperVStorage.open(d / "journal.vmrs") as s:
        table = s.key_tables[0].offset
    add_journal_entries(d / "journal.vmrs", pending=[(table, bytes(64))])
    files = {p.name: p for p in (d / "vm.vmrs", d / "journal.vmrs", d / "vm.bin", d / "vm.vsv")}
    for p in files.values():
        p.chmod(0o444)
    return files


class OpenLog:
    """Every open() / io.open() / os.open() made while active, as (path, what, write?)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def opened(self, path: Path) -> list[tuple[str, str, bool]]:
        real = os.path.realpath(path)
        return [c for c in self.calls if c[0] == real]


def _real(file: object) -> str | None:
    if isinstance(file, int):
        try:
            return os.path.realpath(f"/proc/self/fd/{file}")
        except OSError:
            return None
    try:
        return os.path.realpath(os.fspath(file))  # type: ignore[arg-type]
    except TypeError:
        return None


@contextmanager
def watch_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenLog]:
    log = OpenLog()
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def wrap(inner: Callable[..., object]) -> Callable[..., object]:
        def opener(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            path = _real(file)
            if path is not None:
                log.calls.append((path, f"open({mode!r})", bool(_MODE_WRITES & set(str(mode)))))
            return inner(file, mode, *args, **kwargs)

        return opener

    def os_opener(path: object, flags: int, *args: object, **kwargs: object) -> int:
        real = _real(path)
        if real is not None:
            log.calls.append((real, f"os.open(flags={flags:#x})", bool(flags & WRITE_FLAGS)))
        return real_os_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "open", wrap(real_open))
    monkeypatch.setattr(io, "open", wrap(real_io_open))
    monkeypatch.setattr(os, "open", os_opener)
    try:
        yield log
    finally:
        monkeypatch.undo()


def _fingerprint(paths: list[Path]) -> dict[str, tuple[str, int, int]]:
    out = {}
    for p in paths:
        st = p.stat()
        out[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def _assert_read_only(log: OpenLog, inputs: list[Path]) -> None:
    for p in inputs:
        calls = log.opened(p)
        assert calls, f"{p.name} was never opened through the watched functions (is the watch working?)"
        writes = [c for c in calls if c[2]]
        assert not writes, f"{p.name} opened for writing: {writes}"


def _read_some(provider: SavedStateProvider) -> None:
    provider.summary()
    for gpa in (0, 0x1000, 0x100000, 0x1FF000):
        provider.read_guest_physical_address_padded(gpa, 0x2000)


LOADERS: dict[str, tuple[list[str], Callable[[dict[str, Path]], SavedStateProvider]]] = {
    "load_vmrs": (["vm.vmrs"], lambda f: SavedStateProvider.load_vmrs(f["vm.vmrs"])),
    "load_vmrs journal": (["journal.vmrs"], lambda f: SavedStateProvider.load_vmrs(f["journal.vmrs"])),
    "load_bin": (["vm.bin"], lambda f: SavedStateProvider.load_bin(f["vm.bin"])),
    "load_bin_vsv": (["vm.bin", "vm.vsv"], lambda f: SavedStateProvider.load_bin_vsv(f["vm.bin"], f["vm.vsv"])),
}


@pytest.mark.parametrize("name", list(LOADERS))
def test_provider_loads_open_inputs_read_only(
    name: str, evidence: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    names, load = LOADERS[name]
    inputs = [evidence[n] for n in names]
    before = _fingerprint(inputs)
    with watch_opens(monkeypatch) as log:
        with load(evidence) as provider:
            _read_some(provider)
        if name == "load_vmrs journal":
            assert any(f.kind == "journal" for f in provider.findings())
    _assert_read_only(log, inputs)
    assert _fingerprint(inputs) == before


def test_storage_and_bin_readers_open_read_only(evidence: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = [evidence["journal.vmrs"], evidence["vm.vsv"], evidence["vm.bin"]]
    before = _fingerprint(inputs)
    with watch_opens(monkeypatch) as log:
        for path in inputs[:2]:
            with HyperVStorage.open(path) as s:
                for key in s.walk():
                    if key.is_file_object:
                        key.read(allow_partial=True)
                    else:
                        _ = key.value
        with BinFile.open(evidence["vm.bin"]) as b:
            for n in sorted(b.blocks):
                value = b.read_block_value(n)
                index_block(value, path=b.path, file_offset=b.block_location(n)[0], findings=Findings())
            memory = b.guest_memory()
            assert len(memory.read_gpa_padded(0, BLOCK_SIZE + 10)) == BLOCK_SIZE + 10
    _assert_read_only(log, inputs)
    assert _fingerprint(inputs) == before


def test_the_watch_sees_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above are only as good as the wrappers: each kind of write open must show."""
    target = tmp_path / "x.bin"
    target.write_bytes(b"x")
    with watch_opens(monkeypatch) as log:
        with open(target, "ab"):
            pass
        with io.open(target, "r+b"):  # noqa: UP020 - io.open is wrapped on its own
            pass
        os.close(os.open(target, os.O_WRONLY))
        with open(target, "rb"):
            pass
    assert [c[2] for c in log.opened(target)] == [True, True, True, False]


# ------------------------------------------------------------------------------------ journal commit
def _listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_apply_pending_replay_log_writes_only_dst(
    evidence: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = evidence["journal.vmrs"]
    dst = tmp_path / "committed.vmrs"
    src_dir_before, dst_dir_before = _listing(src.parent), _listing(tmp_path)
    before = _fingerprint([src])
    with watch_opens(monkeypatch) as log:
        applied = SavedStateProvider.apply_pending_replay_log(src, dst)
    assert applied == 1
    _assert_read_only(log, [src])
    written = {c[0] for c in log.calls if c[2]}
    temporary = {
        w for w in written if re.fullmatch(re.escape(f"{os.path.realpath(dst)}.") + r"\d+\.[0-9a-f]{8}\.partial", w)
    }
    assert len(temporary) <= 1 and written - temporary <= {os.path.realpath(dst)}, written
    assert _fingerprint([src]) == before
    assert _listing(src.parent) == src_dir_before  # nothing new beside the evidence
    assert _listing(tmp_path) == sorted([*dst_dir_before, dst.name])  # dst only: no temp file left
    with HyperVStorage.open(dst) as committed, HyperVStorage.open(src) as original:
        assert committed.replay_log is not None and committed.replay_log.pending_count == 0
        assert [k.path for k in committed.walk()] == [k.path for k in original.walk()]


def test_apply_pending_replay_log_refuses_its_input(
    evidence: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = evidence["journal.vmrs"]
    before = _fingerprint([src])
    listing = _listing(src.parent)
    link = tmp_path / "same.vmrs"
    os.link(src, link)  # another name for the same file
    spellings = [src, Path(str(src)), src.parent / "." / src.name, link]
    with watch_opens(monkeypatch) as log:
        for dst in spellings:
            with pytest.raises(VmssdError, match="refusing"):
                SavedStateProvider.apply_pending_replay_log(src, dst)
    assert not [c for c in log.calls if c[2]]
    assert _fingerprint([src]) == before
    assert _listing(src.parent) == listing


def test_failed_commit_leaves_no_temp_file(evidence: dict[str, Path], tmp_path: Path) -> None:
    src = evidence["journal.vmrs"]
    dst = tmp_path / "missing-dir" / "out.vmrs"
    with pytest.raises(OSError):
        SavedStateProvider.apply_pending_replay_log(src, dst)
    garbage = tmp_path / "garbage.vmrs"
    garbage.write_bytes(b"\0" * 0x3000)
    out = tmp_path / "out.vmrs"
    with pytest.raises(VmssdError):
        SavedStateProvider.apply_pending_replay_log(garbage, out)
    assert _listing(tmp_path) == ["garbage.vmrs"]
