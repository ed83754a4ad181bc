"""Find out what a file is and open it with its partner: one place for the CLI (and anyone else).

Hyper-V names both files of a legacy pair after the VM (or snapshot) GUID: ``<GUID>.bin`` and
``<GUID>.vsv`` in the same folder.  Extension case varies between hosts, so partners are matched
case-insensitively on disk.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .errors import FormatError
from .provider import SavedStateProvider
from .storage.defs import FILE_SIGNATURE

BIN_SIGNATURE = 0x02182003


def sniff(path: str | os.PathLike[str]) -> str:
    """'hvs' (HyperVStorage: .vmrs/.vmcx/.vsv), 'bin' (legacy memory file) or 'unknown'."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if len(head) < 4:
        return "unknown"
    sig = struct.unpack("<I", head)[0]
    return {FILE_SIGNATURE: "hvs", BIN_SIGNATURE: "bin"}.get(sig, "unknown")


def find_partner(path: str | os.PathLike[str], extension: str) -> tuple[Path | None, list[Path]]:
    """The file beside ``path`` with the same stem and ``extension`` (any case), and where we looked."""
    p = Path(path)
    looked = [p.with_suffix(extension)]
    try:
        for candidate in p.parent.iterdir():
            if candidate.stem == p.stem and candidate.suffix.lower() == extension.lower() and candidate != p:
                return candidate, looked
    except OSError:
        pass
    return None, looked


def open_saved_state(
    path: str | os.PathLike[str], *, vsv: str | os.PathLike[str] | None = None, strict: bool = False
) -> SavedStateProvider:
    """Open a .vmrs, a .bin (with its .vsv when found) or a .vsv (with its .bin)."""
    kind = sniff(path)
    if kind == "bin":
        partner = Path(vsv) if vsv is not None else find_partner(path, ".vsv")[0]
        if partner is None:
            provider = SavedStateProvider.load_bin(path, strict=strict)
            _, looked = find_partner(path, ".vsv")
            provider._findings[0].add(
                os.fspath(path), None, "no-partner", f"no .vsv found beside it (looked for {looked[0]}, any case)"
            )
            return provider
        return SavedStateProvider.load_bin_vsv(path, partner, strict=strict)
    if kind == "hvs":
        if Path(path).suffix.lower() == ".vsv" or vsv is not None:
            bin_path, looked = find_partner(path, ".bin")
            if bin_path is None:
                raise FormatError(
                    os.fspath(path), None, f"a .vsv needs its .bin: none found (looked for {looked[0]}, any case)"
                )
            return SavedStateProvider.load_bin_vsv(bin_path, path, strict=strict)
        return SavedStateProvider.load_vmrs(path, strict=strict)
    raise FormatError(
        os.fspath(path),
        0,
        f"not a Hyper-V saved state: expected signature {FILE_SIGNATURE:#010x} (.vmrs/.vsv) or"
        f" {BIN_SIGNATURE:#010x} (legacy .bin)",
    )
