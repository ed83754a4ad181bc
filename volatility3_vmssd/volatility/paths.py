"""Locations for the Volatility glue: ``file:`` URLs to paths and back, partner files, the VM's .vmcx.

Volatility hands layers URLs (``-f`` becomes ``Path.as_uri()``-style ``file:`` URLs with ``%20`` and
UTF-8 escapes), while the provider opens local paths.  Hyper-V names the files of one saved state
after the VM (or snapshot) GUID, and extension case varies between hosts, so partners are matched on
disk case-insensitively.  Nothing here imports Volatility, so it is testable on its own.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..savedstate.legacy_bin import BIN_SIGNATURE
from ..storage.defs import FILE_SIGNATURE

__all__ = [
    "BIN_SIGNATURE",
    "STORAGE_SIGNATURE",
    "find_partner",
    "find_vmcx",
    "path_to_url",
    "signature_kind",
    "url_to_path",
]

STORAGE_SIGNATURE = FILE_SIGNATURE  # 0x01282014: .vmrs, .vmcx and modern .vsv files
_U32 = struct.Struct("<I")


def signature_kind(head: bytes) -> str | None:
    """'storage' (HyperVStorage), 'bin' (legacy memory file) or None, from a file's first bytes."""
    if len(head) < 4:
        return None
    return {STORAGE_SIGNATURE: "storage", BIN_SIGNATURE: "bin"}.get(_U32.unpack_from(head)[0])


def url_to_path(location: str) -> Path | None:
    """The local path behind a Volatility location, or None for anything that is not a local file.

    ``file:`` URLs are parsed (not sliced) so that ``%20``, non-ASCII names, ``localhost`` hosts and
    Windows drive letters come out right; a bare path (no scheme, or a drive letter) is accepted too.
    """
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc and parsed.netloc.lower() != "localhost":
            if os.name != "nt":
                return None
            return Path(url2pathname(f"//{parsed.netloc}{parsed.path}"))  # UNC share
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(location)
    return None


def path_to_url(path: str | os.PathLike[str]) -> str:
    """A ``file:`` URL as Volatility builds them (absolute, percent-encoded)."""
    return Path(os.path.abspath(path)).as_uri()


def _listing(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def find_partner(path: Path, extensions: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """The file beside ``path`` with the same base name and one of ``extensions`` (any case).

    Returns the partner (an exact base-name match is preferred over a case-insensitive one, earlier
    extensions over later ones) and the paths looked at, for a warning that tells the user where the
    partner has to be.
    """
    looked = [path.with_suffix(ext) for ext in extensions]
    names = [n for n in _listing(path.parent) if n != path.name]
    for fold in (False, True):
        for ext in extensions:
            for name in names:
                cand = Path(name)
                if cand.suffix.lower() != ext.lower():
                    continue
                same = cand.stem.casefold() == path.stem.casefold() if fold else cand.stem == path.stem
                if same and (path.parent / name).is_file():
                    return path.parent / name, looked
    return None, looked


def find_vmcx(path: Path) -> Path | None:
    """The VM configuration (``<GUID>.vmcx``) that belongs to a saved state, if it is on disk.

    Hyper-V keeps ``<VM GUID>.vmcx`` beside ``<VM GUID>.vmrs`` in ``Virtual Machines/`` and
    ``<snapshot GUID>.vmcx`` beside the snapshot's ``.vmrs`` in ``Snapshots/``; a copied evidence set
    may have either layout, so the sibling folder of the other name is tried as well.
    """
    found, _ = find_partner(path, [".vmcx"])
    if found is not None:
        return found
    parent = path.parent
    for other in ("Virtual Machines", "Snapshots"):
        for folder in (parent / other, parent.parent / other):
            if folder != parent and folder.is_dir():
                found, _ = find_partner(folder / path.name, [".vmcx"])
                if found is not None:
                    return found
    return None
