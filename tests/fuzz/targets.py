"""The fuzz targets: one function per parser, each taking the raw input bytes.

A target may let only its *documented* exceptions escape (``Target.allowed``); anything else is a
crash.  Targets also check invariants that need no oracle (a decoded block is 1 MiB, a page decodes
the same alone and in its block, a padded read returns exactly what was asked, our XPRESS encoder's
output decodes back), raising :class:`InvariantError` when one fails.

File-based targets write the input to one scratch file (on tmpfs when there is one) and open it by
path, exactly as a user's file would be opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from volatility3_vmssd.codecs import _xpress_python, xpress
from volatility3_vmssd.cpu.chunkparser import parse_partition_state
from volatility3_vmssd.cpu.cpumode import architecture, is_la57, paging_levels, paging_mode
from volatility3_vmssd.errors import Findings, VmssdError
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from volatility3_vmssd.memory.legacy_bin import BinFile
from volatility3_vmssd.memory.pagedecode import decode_pages
from volatility3_vmssd.memory.ramblock import index_block, plan_block
from volatility3_vmssd.provider import SavedStateProvider
from volatility3_vmssd.storage import HyperVStorage

from .crcfix import fix_crcs
from .seeds import XPRESS_SIZE

#: Keys walked and values read per container (bounded so one input stays well under a second).
MAX_KEYS = 4096
#: Bytes read per padded guest read and reads per input in the layer/provider targets.
READ_SIZE = 0x3000
#: One read larger than a block per input, for the batch path (plan_block, decompress_many, scan ring).
SCAN_SIZE = 2 * BLOCK_SIZE + 0x1800


class InvariantError(AssertionError):
    """A target's self-check failed: wrong output rather than an exception."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...]
    max_len: int  # libFuzzer -max_len: a little above the largest seed


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvariantError(message)


class Scratch:
    """The one file a file-based target writes each input to (tmpfs when available)."""

    _dir: str | None = None

    @classmethod
    def path(cls, name: str) -> str:
        if cls._dir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            cls._dir = tempfile.mkdtemp(prefix="vmssd-fuzz-", dir=base)
        return os.path.join(cls._dir, name)

    @classmethod
    def cleanup(cls) -> None:
        """Remove the scratch directory (the driver calls this before it exits)."""
        if cls._dir is not None:
            shutil.rmtree(cls._dir, ignore_errors=True)
            cls._dir = None

    @classmethod
    def write(cls, name: str, data: bytes) -> str:
        path = cls.path(name)
        with open(path, "wb") as fh:
            fh.write(data)
        return path


# ------------------------------------------------------------------------------------ container
def exercise_storage(storage: HyperVStorage) -> None:
    """Walk every key, decode every value (file objects with allow_partial), print every finding."""
    for n, key in enumerate(storage.walk()):
        if n >= MAX_KEYS:
            break
        _ = (key.path, key.type_label, key.node_info, key.data_location, key.size, repr(key))
        if key.is_file_object:
            data = key.read(allow_partial=True)
            _check(len(data) <= key.size, f"{key.path}: read {len(data)} bytes of a {key.size}-byte value")
            if key.size > 2:
                key.read(1, 16, allow_partial=True)
        else:
            with contextlib.suppress(VmssdError):
                _ = key.value
        storage.find(key.path)
    _ = (storage.stats(), [str(f) for f in storage.findings], storage.replay_log, storage.key_tables)


def run_storage(data: bytes) -> None:
    """HyperVStorage.open + every key and value, on the input and on the input with its CRCs fixed."""
    variants = [data]
    fixed = fix_crcs(data)
    if fixed != data:
        variants.append(fixed)
    for i, variant in enumerate(variants):
        path = Scratch.write("storage.vmrs", variant)
        for strict in (False, True) if i == len(variants) - 1 else (False,):
            try:
                with HyperVStorage.open(path, strict=strict) as storage:
                    exercise_storage(storage)
            except VmssdError:
                pass


# ------------------------------------------------------------------------------------ legacy .bin
def run_bin(data: bytes) -> None:
    """BinFile.open, each RamBlock indexed and decoded, then the provider's view (load_bin + reads)."""
    path = Scratch.write("fuzz.bin", data)
    with BinFile.open(path) as b:
        _ = repr(b), b.other_entries
        for n in sorted(b.blocks)[:8]:
            value = b.read_block_value(n)
            findings = Findings()
            index = index_block(value, path=path, file_offset=b.block_location(n)[0], findings=findings)
            errors: list[tuple[int, VmssdError]] = []
            block = b"".join(decode_pages(value, index, errors=errors))  # type: ignore[arg-type]
            _check(len(block) == BLOCK_SIZE, f"RamBlock {n} decoded to {len(block)} bytes")
    with SavedStateProvider.load_bin(path, cache_limit=0) as provider:  # the page-by-page read path
        exercise_provider(provider)


# ------------------------------------------------------------------------------------ RamBlock
def run_ramblock(data: bytes) -> None:
    """index_block + the page decoder, cross-checked: a page must decode alike alone, in a range and in its block."""
    findings = Findings()
    index = index_block(data, path="<fuzz>", file_offset=0x10000, findings=findings)
    _ = [str(f) for f in findings], index.missing_pages, index.stats
    errors: list[tuple[int, VmssdError]] = []
    pages = decode_pages(data, index, errors=errors)  # type: ignore[arg-type]
    _check(len(pages) == PAGES_PER_BLOCK and all(len(p) == PAGE_SIZE for p in pages), "decode_pages gave a bad block")
    block = b"".join(pages)
    bad = {p for p, _ in errors} | set(index.missing_pages)
    first, stop = sorted((data[0] if data else 0, data[-1] + 1 if data else 256))
    stop = min(stop, PAGES_PER_BLOCK)
    _check(
        b"".join(decode_pages(data, index, first, stop, errors=[])) == block[first * PAGE_SIZE : stop * PAGE_SIZE],
        f"decode_pages({first}, {stop}) differs from the whole block",
    )
    # A page of a variable run decoded alone re-expands the whole run (ranges walk each run once),
    # so with pieces only a sample of pages is checked one by one.
    checked = range(PAGES_PER_BLOCK) if index.piece_out is None else sorted({0, 1, first, stop - 1, 128, 255})
    for page in checked:
        lo = page * PAGE_SIZE
        try:
            alone = decode_pages(data, index, page, page + 1)[0]
        except VmssdError:
            _check(page in bad or block[lo : lo + PAGE_SIZE] == bytes(PAGE_SIZE), f"page {page}: error alone only")
            continue
        if page in index.missing_pages:
            _check(alone == bytes(PAGE_SIZE), f"missing page {page} does not read as zeros")
            continue
        _check(page not in bad, f"page {page} decodes alone but is bad in its block")
        _check(alone == block[lo : lo + PAGE_SIZE], f"page {page} decodes differently alone and in its block")
    with contextlib.suppress(VmssdError):
        index_block(data, path="<fuzz>", file_offset=None, findings=Findings(strict=True))
    plan = plan_block(data)
    if plan is not None:  # the fast path takes only what the careful one finds nothing wrong with
        quiet = Findings()  # an early end marker is sound when the map needs no page after it
        again = index_block(data, path="<fuzz>", file_offset=0x10000, findings=quiet, needed=plan.covered >> 12)
        _check(not quiet and again.covered == plan.covered, "plan_block took a stream index_block complains about")
        decoded = xpress.decompress_many(plan.streams, plan.sizes, threads=2)
        clean = all(isinstance(d, bytes) for d in decoded)
        _check(not clean or not errors, "a batch decoded pages that the careful path rejects")
        if clean:
            _check(b"".join(plan.finish(decoded)) == block, "plan_block + decompress_many differ from decode_pages")


# ------------------------------------------------------------------------------------ XPRESS
def run_xpress(data: bytes) -> None:
    """The pure-Python decoder on hostile streams (u16 size prefix), and our encoder's round trip."""
    if len(data) < XPRESS_SIZE.size:
        return
    (size,) = XPRESS_SIZE.unpack_from(data)
    stream = data[XPRESS_SIZE.size :]
    out: bytes | None = None
    try:
        out = xpress.decompress_python(stream, size)
        _check(len(out) == size, f"decoder returned {len(out)} bytes for {size}")
    except xpress.XpressError:
        pass
    try:  # the production path: libfwnt first (fuzzed here too), the reference decoder on failure
        auto = xpress.decompress(stream, size)
        _check(out is None or auto == out, "the native decoder and the reference disagree on a valid stream")
    except xpress.XpressError:
        _check(out is None, "decompress() rejects a stream the reference decoder accepts")
    packed = _xpress_python.compress(stream)
    _check(xpress.decompress_python(packed, len(stream)) == stream, "compress/decompress round trip failed")
    native = xpress._native("pyfwnt")
    if native is not None:  # the encoder promises output every decoder reads (libfwnt included)
        _check(native(packed, len(stream))[: len(stream) + 1] == stream, "our encoder's output fails in libfwnt")


# ------------------------------------------------------------------------------------ partition_state
def run_partition_state(data: bytes) -> None:
    """parse_partition_state and everything describe() derives from it (vendor, paging, guest OS)."""
    for strict in (False, True):
        findings = Findings(strict=strict)
        try:
            state = parse_partition_state(data, path="<fuzz>", base_offset=0x3000, findings=findings)
        except VmssdError:
            continue
        _ = (state.vendor, state.is_arm, state.enabled_vtls_bitmap(), state.vp_count, [str(f) for f in findings])
        if state.guest_os_info is not None:
            _ = state.guest_os_info.description
        for vp in state.vps[:64]:
            regs = vp.active_registers()
            _ = vp.active_vtl(), vp.enabled_vtls_bitmap()
            _ = architecture(regs, state.processor_vendor), paging_mode(regs, state.processor_vendor), is_la57(regs)
            with contextlib.suppress(VmssdError):
                paging_levels(regs, state.processor_vendor)


# ------------------------------------------------------------------------------------ provider / layer
def exercise_provider(provider: SavedStateProvider) -> None:
    """describe(), findings, and padded reads at the edges of every mapped range and across holes."""
    info = provider.summary()
    _ = [str(f) for f in provider.findings()], info
    ram_map = provider.memory.ram_map
    points = {0, ram_map.minimum_gpa, max(ram_map.maximum_gpa - 0x10, 0)}
    for gpa, _raw, length in ram_map.segments()[:8]:
        points.update({gpa, gpa + length - 0x800, gpa + length})
    for gpa in sorted(points)[:24]:
        data = provider.read_guest_physical_address_padded(gpa, READ_SIZE)
        _check(len(data) == READ_SIZE, f"padded read at {gpa:#x} returned {len(data)} bytes")
        try:
            got = provider.read_guest_physical_address(gpa, READ_SIZE)
            _check(got == data[: len(got)], f"plain and padded reads differ at {gpa:#x}")
        except VmssdError:
            pass
    start = ram_map.minimum_gpa + 0x800
    big = provider.read_guest_physical_address_padded(start, SCAN_SIZE)
    _check(len(big) == SCAN_SIZE, f"padded read of {SCAN_SIZE:#x} at {start:#x} returned {len(big)} bytes")
    for offset in (0, 0x1000, BLOCK_SIZE - 0x20, SCAN_SIZE - 0x40):
        small = provider.read_guest_physical_address_padded(start + offset, 0x40)
        _check(small == big[offset : offset + 0x40], f"large and small padded reads differ at {start + offset:#x}")
    for vp in range(min(provider.vp_count(), 4)):
        with contextlib.suppress(VmssdError):
            provider.guest_virtual_to_physical(vp, 0xFFFFF80000001000)


def run_layer(data: bytes) -> None:
    """HyperVSavedStateLayer over the input: construction, mapping(), is_valid() and read()."""
    from volatility3.framework import contexts, exceptions
    from volatility3.framework.layers import physical

    from volatility3_vmssd.files import path_to_url
    from volatility3_vmssd.volatility.layer import HyperVSavedStateLayer

    path = Scratch.write("layer.vmrs", data)
    context = contexts.Context()
    context.config["fuzz.base.location"] = path_to_url(path)
    context.layers.add_layer(physical.FileLayer(context, "fuzz.base", "base"))
    context.config["fuzz.hv.base_layer"] = "base"
    try:
        layer = HyperVSavedStateLayer(context, "fuzz.hv", "hv")
    except exceptions.LayerException:
        return
    try:
        lo, hi = layer.minimum_address, layer.maximum_address
        mapped = list(layer.mapping(lo, min(hi - lo + 1, 1 << 40), ignore_errors=True))[:16]
        points = {lo, max(hi - 0x10, 0), -0x100}
        for gpa, length, _raw, _len, _layer in mapped:
            points.update({gpa, gpa + length - 0x800, gpa + length})
        for gpa in sorted(points)[:24]:
            padded = layer.read(gpa, READ_SIZE, pad=True)
            _check(len(padded) == READ_SIZE, f"layer padded read at {gpa:#x} returned {len(padded)} bytes")
            small = layer.read(gpa, 0x40, pad=True)
            _check(small == padded[:0x40], f"small and large padded reads differ at {gpa:#x}")
            with contextlib.suppress(exceptions.InvalidAddressException):
                _check(layer.read(gpa, READ_SIZE) == padded, f"plain and padded layer reads differ at {gpa:#x}")
            if gpa >= 0:
                layer.is_valid(gpa, READ_SIZE)
                with contextlib.suppress(exceptions.InvalidAddressException):
                    list(layer.mapping(gpa, READ_SIZE))
        exercise_provider(layer.provider)
    finally:
        layer.destroy()


def _layer_allowed() -> tuple[type[BaseException], ...]:
    from volatility3.framework import exceptions

    return (exceptions.InvalidAddressException, exceptions.LayerException)


def targets() -> dict[str, Target]:
    return {
        t.name: t
        for t in (
            Target("storage", run_storage, (VmssdError,), 400_000),
            Target("bin", run_bin, (VmssdError,), 400_000),
            Target("ramblock", run_ramblock, (VmssdError,), 300_000),
            Target("xpress", run_xpress, (), 10_000),  # streams of pages and short runs
            Target("partition_state", run_partition_state, (), 20_000),
            Target("layer", run_layer, _layer_allowed(), 400_000),
        )
    }


def seed_files(seed_dir: Path, target: str) -> list[Path]:
    d = seed_dir / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []
