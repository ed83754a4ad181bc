"""The guest's Windows kernel for a crash-dump header: where its image is loaded and what its symbols say.

The kernel image is found the way its own code points at it: the saved ``LSTAR`` (the system-call
entry) and the IDT's first handlers lie inside ``ntoskrnl``, so the image's ``MZ`` header is the
nearest one at or below them (searched page by page through the kernel page tables, at most
:data:`KERNEL_SCAN_LIMIT` down).  Its CodeView record names the PDB and its GUID and age, which
name the symbol table (ISF) in a Volatility symbol directory, ``windows/<pdb>/<GUID-age>.json.xz``.
Why this way and not another: docs/crashdump.md.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..cpu.registers import PagingMode, TableRegister
from ..cpu.translate import translate_with_size
from ..errors import VmssdError
from .crashdump import DTB_MASK, PAGE_SIZE, KernelSymbols

ReadPhysical = Callable[[int, int], bytes]
ReadVirtual = Callable[[int, int], "bytes | None"]

KERNEL_SCAN_LIMIT = 64 << 20
KERNEL_HALF = 0xFFFF_8000_0000_0000
KERNEL_PDBS = ("ntkrnlmp.pdb", "ntoskrnl.pdb", "ntkrnlpa.pdb", "ntkrpamp.pdb")
ISF_SUFFIXES = (".json.xz", ".json.gz", ".json")
IDT_SEEDS = 4  # the first vectors' handlers (divide error, debug, NMI, breakpoint)
MAX_IMAGE_SIZE = 1 << 30
IMAGE_DEBUG_TYPE_CODEVIEW = 2
KUSER_SHARED_DATA = 0xFFFF_F780_0000_0000  # its fixed kernel address on x64
KUSER_FIELDS = ("NtBuildNumber", "NtProductType", "SystemTime", "InterruptTime")
DEBUG_DIRECTORY = struct.Struct("<IIHHIIII")
HEADER_SYMBOLS = ("KdDebuggerDataBlock", "PsLoadedModuleList", "PsActiveProcessHead", "MmPfnDatabase", "NtBuildNumber")


@dataclasses.dataclass(frozen=True)
class KernelImage:
    base: int
    size: int
    pdb_name: str
    guid_age: str  # "<GUID>-<age>", as Volatility names symbol tables


def virtual_reader(read_physical: ReadPhysical, dtb: int) -> ReadVirtual:
    """Read guest-virtual bytes through the 4-level tables at ``dtb``; None when any page is not there."""

    def read(va: int, size: int) -> bytes | None:
        out = bytearray()
        while len(out) < size:
            try:
                gpa, left = translate_with_size(read_physical, va + len(out), mode=PagingMode.LONG, cr3=dtb)
                take = min(left, size - len(out))
                data = read_physical(gpa, take)
            except VmssdError:
                return None
            if len(data) != take:
                return None
            out += data
        return bytes(out)

    return read


def kernel_seeds(regs: Mapping[str, object], read_virtual: ReadVirtual) -> list[int]:
    """Kernel-code addresses one VP's registers point at: LSTAR, the first IDT handlers, RIP in the kernel half."""
    seeds = []
    lstar = regs.get("lstar")
    if isinstance(lstar, int):
        seeds.append(lstar)
    idtr = regs.get("idtr")
    if isinstance(idtr, TableRegister) and idtr.base >= KERNEL_HALF:
        gates = read_virtual(idtr.base, 16 * IDT_SEEDS)
        for i in range(IDT_SEEDS if gates else 0):
            lo, mid, hi = struct.unpack_from("<H4xHI", gates, 16 * i)  # type: ignore[arg-type]
            seeds.append(lo | mid << 16 | hi << 32)
    rip = regs.get("rip")
    if isinstance(rip, int):
        seeds.append(rip)
    return list(dict.fromkeys(s for s in seeds if s >= KERNEL_HALF))


def _codeview(read_virtual: ReadVirtual, base: int) -> KernelImage | None:
    """The PE image at ``base``: its size and CodeView (RSDS) record, or None if it is not a PE32+ with one."""
    dos = read_virtual(base, 0x40)
    if dos is None or dos[:2] != b"MZ":
        return None
    (lfanew,) = struct.unpack_from("<I", dos, 0x3C)
    if lfanew > PAGE_SIZE - 0x108:
        return None
    nt = read_virtual(base + lfanew, 0x108)
    if nt is None or nt[:4] != b"PE\0\0" or struct.unpack_from("<H", nt, 0x18)[0] != 0x20B:
        return None
    size = struct.unpack_from("<I", nt, 0x18 + 56)[0]
    count = struct.unpack_from("<I", nt, 0x18 + 108)[0]
    if count <= 6 or not 0 < size <= MAX_IMAGE_SIZE:
        return None
    rva, length = struct.unpack_from("<II", nt, 0x18 + 112 + 6 * 8)
    if not 0 < length <= 16 * DEBUG_DIRECTORY.size or rva + length > size:
        return None
    table = read_virtual(base + rva, length)
    for off in range(0, len(table or b"") - DEBUG_DIRECTORY.size + 1, DEBUG_DIRECTORY.size):
        entry = DEBUG_DIRECTORY.unpack_from(table, off)  # type: ignore[arg-type]
        kind, data_size, data_rva = entry[4], entry[5], entry[6]
        if kind != IMAGE_DEBUG_TYPE_CODEVIEW or not 24 < data_size <= 0x200 or data_rva + data_size > size:
            continue
        record = read_virtual(base + data_rva, data_size)
        if record is None or record[:4] != b"RSDS":
            continue
        d1, d2, d3, d4, age = struct.unpack_from("<IHH8sI", record, 4)
        name = record[24:].split(b"\0", 1)[0].decode("ascii", "replace")
        guid = f"{d1:08X}{d2:04X}{d3:04X}{d4.hex().upper()}"
        return KernelImage(base, size, os.path.basename(name.replace("\\", "/")).lower(), f"{guid}-{age}")
    return None


def find_kernel(read_virtual: ReadVirtual, seeds: Iterable[int], limit: int = KERNEL_SCAN_LIMIT) -> KernelImage | None:
    """The kernel image containing one of ``seeds``: the nearest PE at a page at or below it naming a kernel PDB."""
    tried: set[int] = set()
    for seed in seeds:
        page = seed & ~(PAGE_SIZE - 1)
        for va in range(page, max(KERNEL_HALF, page - limit), -PAGE_SIZE):
            if va in tried:
                break  # this stretch was searched from an earlier seed
            tried.add(va)
            head = read_virtual(va, 2)
            if head != b"MZ":
                continue
            image = _codeview(read_virtual, va)
            if image is not None and image.pdb_name in KERNEL_PDBS and va + image.size > seed:
                return image
    return None


_ZERO_HALF = bytes(PAGE_SIZE // 2)


def self_referencing_tables(data: bytes, base: int) -> Iterator[int]:
    """Pages of ``data`` (at guest-physical ``base``, page aligned) whose kernel half has a present entry
    pointing back at the page itself: what a Windows x64 top-level table looks like (candidates only).

    Bytes 2-5 of such an entry are bits 16-47 of the page's own address, so one substring search per
    page finds the few places worth decoding.
    """
    for off in range(0, len(data) - PAGE_SIZE + 1, PAGE_SIZE):
        if data.startswith(_ZERO_HALF, off + PAGE_SIZE // 2):
            continue  # an empty kernel half (most free RAM): the search below would step through it a byte at a time
        pa = base + off
        needle = (pa >> 16 & 0xFFFF_FFFF).to_bytes(4, "little")
        pos = data.find(needle, off + PAGE_SIZE // 2 + 2, off + PAGE_SIZE)
        while pos >= 0:
            slot = pos - 2
            if (slot - off) % 8 == 0:
                (entry,) = struct.unpack_from("<Q", data, slot)
                if entry & 1 and entry & DTB_MASK == pa:
                    yield pa
                    break
            pos = data.find(needle, pos + 1, off + PAGE_SIZE)


def isf_path(symbols_dir: str | os.PathLike[str], image: KernelImage) -> str:
    """The symbol table Volatility would use for ``image`` in ``symbols_dir``; an error names where it looked."""
    stem = os.path.join(os.fspath(symbols_dir), "windows", image.pdb_name, image.guid_age)
    for suffix in ISF_SUFFIXES:
        if os.path.isfile(stem + suffix):
            return stem + suffix
    raise VmssdError(
        f"--symbols {symbols_dir}: no symbol table for the guest kernel {image.pdb_name} {image.guid_age}"
        f" (looked for {stem}{{{','.join(ISF_SUFFIXES)}}})"
    )


def load_isf(path: str) -> dict[str, Any]:
    opener: Any = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            doc = json.load(fh)
    except (OSError, ValueError, EOFError, lzma.LZMAError) as exc:
        raise VmssdError(f"{path}: not a readable symbol table ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("symbols"), dict):
        raise VmssdError(f"{path}: not a Volatility symbol table (no 'symbols')")
    return doc


def symbol_offsets(doc: Mapping[str, Any], path: str) -> dict[str, int]:
    """The header's symbols as offsets from the kernel base; a missing one is an error naming it."""
    out = {}
    for name in HEADER_SYMBOLS:
        entry = doc["symbols"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("address"), int):
            raise VmssdError(f"{path}: symbol {name} is missing")
        out[name] = entry["address"]
    return out


def kuser_offsets(doc: Mapping[str, Any]) -> dict[str, int]:
    """Offsets of the ``_KUSER_SHARED_DATA`` fields the header uses (those the table has)."""
    fields = doc.get("user_types", {}).get("_KUSER_SHARED_DATA", {}).get("fields", {})
    return {name: fields[name]["offset"] for name in KUSER_FIELDS if isinstance(fields.get(name), dict)}


def _u32(data: bytes | None) -> int | None:
    return struct.unpack_from("<I", data)[0] if data else None


def _time(data: bytes | None) -> int:
    """A ``KSYSTEM_TIME`` (low, high1, high2) as a 64-bit count; 0 when unread or caught mid-update."""
    if not data:
        return 0
    low, high1, high2 = struct.unpack("<IiI", data)
    return low | (high1 & 0xFFFF_FFFF) << 32 if high1 & 0xFFFF_FFFF == high2 else 0


def kernel_symbols(
    read_physical: ReadPhysical,
    dtb: int,
    registers: Iterable[Mapping[str, object]],
    symbols_dir: str | os.PathLike[str],
    image: KernelImage | None = None,
) -> KernelSymbols:
    """Resolve the header's symbols for the kernel ``image`` (located through ``dtb`` from the VPs'
    registers when the caller has not located it already)."""
    read_virtual = virtual_reader(read_physical, dtb)
    seeds = [s for regs in registers for s in kernel_seeds(regs, read_virtual)] if image is None else []
    image = image or find_kernel(read_virtual, seeds)
    if image is None:
        raise VmssdError(
            f"--symbols: no Windows kernel image found through DTB {dtb:#x} below the saved LSTAR/IDT handlers"
            f" ({len(seeds)} kernel address(es) tried, {KERNEL_SCAN_LIMIT >> 20} MiB below each)"
        )
    path = isf_path(symbols_dir, image)
    doc = load_isf(path)
    offsets = symbol_offsets(doc, path)
    kuser = kuser_offsets(doc)

    def shared(field: str, size: int) -> bytes | None:
        return read_virtual(KUSER_SHARED_DATA + kuser[field], size) if field in kuser else None

    pfn = read_virtual(image.base + offsets["MmPfnDatabase"], 8)
    build = _u32(read_virtual(image.base + offsets["NtBuildNumber"], 4)) or _u32(shared("NtBuildNumber", 4))
    return KernelSymbols(
        kernel_base=image.base,
        table=image.guid_age,
        kd_debugger_data_block=image.base + offsets["KdDebuggerDataBlock"],
        ps_loaded_module_list=image.base + offsets["PsLoadedModuleList"],
        ps_active_process_head=image.base + offsets["PsActiveProcessHead"],
        pfn_database=struct.unpack("<Q", pfn)[0] if pfn else 0,
        build_number=build & 0xFFFF if build else None,
        product_type=_u32(shared("NtProductType", 4)) or 0,
        system_time=_time(shared("SystemTime", 12)),
        up_time=_time(shared("InterruptTime", 12)),
    )
