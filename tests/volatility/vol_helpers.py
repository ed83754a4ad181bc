"""Helpers for the Volatility integration tests: where things are, small saved states, stacking, vol runs.

Nothing here imports Volatility at module level, so a test file can skip cleanly (with a reason)
when volatility3 is not installed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from shared_data import LINUX_GUEST, REAL, REPO, SHARED, need  # noqa: F401 - re-used by the vol tests

PLUGIN_DIR = REPO / "volatility3_vmssd" / "volatility_plugins"
PAGE = 0x1000
MIB = 1 << 20


def require_volatility() -> None:
    pytest.importorskip("volatility3", reason="volatility3 is not installed (pip install volatility3)")


# ------------------------------------------------------------------------------------ saved states


def mixed_image(size: int, seed: int = 1) -> bytearray:
    """Memory-like bytes: zero pages (fill records), text (XPRESS) and random pages (stored raw)."""
    rng = random.Random(seed)
    out = bytearray(size)
    for page in range(size // PAGE):
        kind = page % 4
        lo = page * PAGE
        if kind == 1:
            text = f"page {page:#x} of a synthetic guest; ".encode() * 200
            out[lo : lo + PAGE] = text[:PAGE]
        elif kind == 2:
            out[lo : lo + PAGE] = rng.randbytes(PAGE)
        elif kind == 3:
            out[lo : lo + PAGE] = bytes([page & 0xFF]) * PAGE
    return out


def state_json(vps: Sequence[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A ``vmssd-registers/1`` document; each VP is ``{"0": {register: value}}`` (VTL -> registers)."""
    return {
        "format": "vmssd-registers/1",
        "vps": [{"vp_index": i, "vtls": vtls} for i, vtls in enumerate(vps)],
        **extra,
    }


def long_mode_vp(cr3: int, **regs: Any) -> dict[str, Any]:
    """Registers of a VP in 4-level long mode (CR0.PG|PE, CR4.PAE, EFER.LME|LMA)."""
    return {"0": {"cr0": "0x80050033", "cr3": hex(cr3), "cr4": "0x6f0", "efer": "0xd01", "rip": "0x1000", **regs}}


def write_raw(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def write_vmrs(
    path: Path,
    data: bytes | bytearray,
    state: dict[str, Any],
    holes: Iterable[tuple[int, int]] = (),
    **options: Any,
) -> Path:
    """A .vmrs of ``data`` (guest RAM from GPA 0) minus ``[start, end)`` holes."""
    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.images.memoryimage import MemoryImage
    from volatility3_vmssd.vmrs.writer import write_vmrs as _write

    raw = write_raw(path.with_name(path.name + ".raw"), data)
    with MemoryImage.open(raw) as image:
        _write(path, image, state_from_json(state), holes=list(holes), overwrite=True, **options)
    raw.unlink()
    return path


def write_pair(
    bin_path: Path,
    vsv_path: Path,
    data: bytes | bytearray,
    state: dict[str, Any],
    holes: Iterable[tuple[int, int]] = (),
) -> tuple[Path, Path]:
    from volatility3_vmssd.cpu.cpujson import state_from_json
    from volatility3_vmssd.images.memoryimage import MemoryImage
    from volatility3_vmssd.vmrs.writer import write_bin_vsv

    raw = write_raw(bin_path.with_name(bin_path.name + ".raw"), data)
    with MemoryImage.open(raw) as image:
        write_bin_vsv(bin_path, vsv_path, image, state_from_json(state), holes=list(holes), overwrite=True)
    raw.unlink()
    return bin_path, vsv_path


# ------------------------------------------------------------------------------------ in-process vol


def file_context(path: Path, options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """A fresh Volatility context holding a FileLayer over ``path`` (named "base"), as the CLI builds it."""
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    ctx = contexts.Context()
    ctx.config["base.location"] = path.resolve().as_uri()
    for key, value in (options or {}).items():
        ctx.config[f"automagic.HyperVSavedStateOptions.{key}"] = value
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    return ctx, "base"


def stack(
    path: Path, stackers: Sequence[type] | None = None, options: dict[str, Any] | None = None
) -> tuple[Any, list]:
    """``(context, stacked layer names, top first)`` for ``path`` with the given stackers (default: ours)."""
    from volatility3.framework.automagic import stacker

    from volatility3_vmssd.volatility import HyperVIntelStacker, HyperVSavedStateStacker

    ctx, base = file_context(path, options)
    chosen = list(stackers) if stackers is not None else [HyperVSavedStateStacker, HyperVIntelStacker]
    return ctx, stacker.LayerStacker.stack_layer(ctx, base, chosen)


def grid_rows(grid: Any) -> list[tuple[Any, ...]]:
    """The rows of a TreeGrid as tuples of plain values."""
    rows: list[tuple[Any, ...]] = []

    def visit(node: Any, acc: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        acc.append(tuple(node.values))
        return acc

    grid.populate(visit, rows)
    return rows


# ------------------------------------------------------------------------------------ vol subprocess

VOL_MAIN = "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; main()"


def vol_command(python: str | os.PathLike[str] = sys.executable) -> list[str]:
    """vol as a subprocess of a given interpreter (volatility3.cli has no __main__ for ``-m``)."""
    return [os.fspath(python), "-c", VOL_MAIN]


def run_vol(
    args: Sequence[str],
    *,
    cache: Path,
    cwd: Path | None = None,
    python: str | os.PathLike[str] = sys.executable,
    plugin_dir: Path | None = PLUGIN_DIR,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run vol with a private cache; ``plugin_dir`` adds ``-p`` (the checkout's shims) and PYTHONPATH.

    ``env`` adds variables; its ``PYTHONPATH`` is put after the checkout's.
    """
    extra = dict(env or {})
    env = dict(os.environ, XDG_CACHE_HOME=str(cache))
    env.pop("PYTHONPATH", None)
    cmd = vol_command(python)
    paths = [p for p in (extra.pop("PYTHONPATH", None),) if p]
    if plugin_dir is not None:
        paths.insert(0, str(REPO))
        cmd += ["-p", str(plugin_dir)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=env, cwd=cwd or cache, timeout=timeout, check=False
    )


def preseed_isf_validation(cache: Path, isf_paths: Iterable[Path]) -> None:
    """Mark known-good ISFs as already validated in a fresh Volatility cache.

    A fresh cache makes vol re-validate a 38 MB ISF against the JSON schema, about 85 s of pure
    jsonschema work that has nothing to do with what is tested.  Volatility remembers validated
    ISFs by a hash it computes with ``schemas.create_json_hash``; recording that hash here is what
    its first run would do (the shared ISF is checked by the data set's own verify.sh).
    """
    import lzma

    from volatility3 import schemas

    hashes: list[str] = []
    for isf_path in isf_paths:
        opener = lzma.open if isf_path.suffix == ".xz" else open
        with opener(isf_path, "rt") as fh:
            isf = json.load(fh)
        schema_file = Path(schemas.__file__).parent / f"schema-{isf['metadata']['format']}.json"
        schema = json.loads(schema_file.read_text())
        digest = schemas.create_json_hash(isf, schema)
        if digest:
            hashes.append(digest)
    target = cache / "volatility3"
    target.mkdir(parents=True, exist_ok=True)
    (target / "valid_isf.hashcache").write_text(json.dumps(hashes))


def output_rows(text: str) -> list[str]:
    """vol's text output without its first line (the version banner), as verify.sh compares it."""
    return text.splitlines()[1:]


# ------------------------------------------------------------------------------ Windows-like tables

KUSER_KERNEL_64 = 0xFFFFF78000000000
KUSER_KERNEL_32 = 0xFFDF0000
KUSER_USER = 0x7FFE0000
NT_MAJOR_OFFSET = 0x26C
KUSER_PAGE = 0x40000  # physical page holding the synthetic KUSER_SHARED_DATA
ROOT_DEFAULT = 0x10000  # where windows_like_image puts the top-level page table
KERNEL_PAGE = 0x48000  # physical page holding the synthetic kernel's PE header
KERNEL_VA_64 = 0xFFFFF80000400000
KERNEL_VA_32 = 0x80400000
SELF_REF_64 = 0x1ED


class PageTables:
    """Builds x86 page tables in a bytearray: 4-level (long), PAE or 32-bit, 4 KiB pages only."""

    def __init__(self, image: bytearray, mode: str, root: int, next_free: int) -> None:
        self.image = image
        self.mode = mode
        self.root = root
        self._next = next_free

    def _alloc(self) -> int:
        page = self._next
        self._next += PAGE
        return page

    def _entry(self, table: int, index: int, size: int) -> int:
        return int.from_bytes(self.image[table + index * size : table + (index + 1) * size], "little")

    def _set(self, table: int, index: int, size: int, value: int) -> None:
        self.image[table + index * size : table + (index + 1) * size] = value.to_bytes(size, "little")

    def map(self, va: int, pa: int, user: bool = False) -> None:
        flags = 0x7 if user else 0x3
        if self.mode == "long":
            levels, size = [(va >> 39) & 0x1FF, (va >> 30) & 0x1FF, (va >> 21) & 0x1FF], 8
            last = (va >> 12) & 0x1FF
        elif self.mode == "pae":
            levels, size = [(va >> 30) & 0x3, (va >> 21) & 0x1FF], 8
            last = (va >> 12) & 0x1FF
        else:
            levels, size = [(va >> 22) & 0x3FF], 4
            last = (va >> 12) & 0x3FF
        table = self.root
        for depth, index in enumerate(levels):
            entry = self._entry(table, index, size)
            if not entry & 1:
                child = self._alloc()
                # PAE PDPTEs allow only the present bit (and PWT/PCD) among the low flags.
                entry = child | (0x1 if self.mode == "pae" and depth == 0 else flags)
                self._set(table, index, size, entry)
            table = entry & ~0xFFF & ((1 << 52) - 1)
        self._set(table, last, size, pa | flags)


def windows_like_image(mode: str = "long", size: int = 4 * MIB, root: int = ROOT_DEFAULT) -> bytearray:
    """Guest RAM whose tables at ``root`` are a Windows kernel DTB in miniature: the mode's self-reference,
    KUSER_SHARED_DATA at its kernel and user addresses, and a kernel PE header (CodeView ``ntkrnlmp.pdb``)
    at ``KERNEL_VA_*``, which :func:`vp_registers`' LSTAR points into (docs/windows.md, "The kernel DTB")."""
    from windows_guest import pe_header

    image = mixed_image(size, seed=7)
    image[root : root + 0x30000] = bytes(0x30000)  # room for the tables
    image[KUSER_PAGE : KUSER_PAGE + PAGE] = bytes(PAGE)
    image[KUSER_PAGE + NT_MAJOR_OFFSET : KUSER_PAGE + NT_MAJOR_OFFSET + 8] = (10).to_bytes(4, "little") * 2
    tables = PageTables(image, mode, root, root + PAGE)
    tables.map(KUSER_KERNEL_64 if mode == "long" else KUSER_KERNEL_32, KUSER_PAGE)
    tables.map(KUSER_USER, KUSER_PAGE, user=True)
    kernel_va = KERNEL_VA_64 if mode == "long" else KERNEL_VA_32
    image[KERNEL_PAGE : KERNEL_PAGE + PAGE] = pe_header(
        kernel_va, 0x10000, "0123456789ABCDEF0123456789ABCDEF", 1, "ntkrnlmp.pdb", 0x5F000000
    )
    tables.map(kernel_va, KERNEL_PAGE)
    if mode == "long":
        image[root + 8 * SELF_REF_64 : root + 8 * SELF_REF_64 + 8] = (root | 0x63).to_bytes(8, "little")
    elif mode == "pae":  # all four page directories, and the last one mapping them (PTEs at 0xC0000000)
        for quarter in range(4):
            tables.map(quarter << 30 | 0x3FE00000, KUSER_PAGE)
        pds = [int.from_bytes(image[root + 8 * i : root + 8 * i + 8], "little") & ~0xFFF for i in range(4)]
        for i, pd in enumerate(pds):
            image[pds[3] + 8 * i : pds[3] + 8 * i + 8] = (pd | 0x63).to_bytes(8, "little")
    else:
        image[root + 4 * 0x300 : root + 4 * 0x300 + 4] = (root | 0x63).to_bytes(4, "little")
    return image


def vp_registers(mode: str, cr3: int, **regs: Any) -> dict[str, Any]:
    """One VP's VTL-0 registers for a paging mode ("long", "long5", "pae", "32bit")."""
    cr0, cr4, efer = 0x80050033, 0x6F0, 0xD01
    if mode == "long5":
        cr4 |= 1 << 12
    elif mode == "pae":
        efer = 0x800
    elif mode == "32bit":
        cr4, efer = 0x690, 0x0
    kernel = KERNEL_VA_64 if mode.startswith("long") else KERNEL_VA_32
    base = {
        "cr0": hex(cr0),
        "cr3": hex(cr3),
        "cr4": hex(cr4),
        "efer": hex(efer),
        "rip": "0x401000",
        "lstar": hex(kernel + 0x800),  # the syscall entry: a kernel address the DTB proof starts from
    }
    base.update(regs)
    return {"0": base}
