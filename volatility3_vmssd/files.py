"""What a file is, and which files belong with it: one rule for the CLI, the stackers, the layer and triage.

Hyper-V names the files of one saved state after the VM (or snapshot) GUID: ``<GUID>.vmrs``, or the
legacy pair ``<GUID>.bin`` + ``<GUID>.vsv``, with ``<GUID>.vmcx`` beside them.  Extension case varies
between hosts and copies, so partners are matched on disk: an exact base name first, then one that
differs only in case.  Only regular files pair; a directory named ``a.VSV`` is never a partner.

Volatility hands locations around as ``file:`` URLs, so the two conversions live here too.  Nothing
here imports Volatility (see ``docs/format.md`` for the signatures).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from .errors import VmssdError
from .memory.legacy_bin import BIN_SIGNATURE
from .sources import base_name, folder_of, hint_reads, is_remote, join, list_folder, open_binary
from .storage import HyperVStorage
from .storage.defs import FILE_SIGNATURE, OPEN_REGION
from .vmrs.reader import PARTITION_STATE_PATHS, ram_block_keys

__all__ = [
    "BIN_SIGNATURE",
    "STORAGE_SIGNATURE",
    "evidence_location",
    "find_partner",
    "find_vmcx",
    "partner_candidates",
    "path_to_url",
    "read_head",
    "signature_kind",
    "sniff",
    "url_to_path",
    "vsv_problem",
]

STORAGE_SIGNATURE = FILE_SIGNATURE  # .vmrs, .vmcx, .vmgs and modern .vsv files
_U32 = struct.Struct("<I")
HEAD_SIZE = 8


def signature_kind(head: bytes) -> str | None:
    """'storage' (HyperVStorage container), 'bin' (legacy memory file) or None, from a file's first bytes."""
    if len(head) < 4:
        return None
    return {STORAGE_SIGNATURE: "storage", BIN_SIGNATURE: "bin"}.get(_U32.unpack_from(head)[0])


def read_head(path: str | os.PathLike[str]) -> bytes:
    """The first bytes of a file (b"" when it cannot be read): enough for :func:`signature_kind`."""
    try:
        with open_binary(path) as fh:
            return fh.read(HEAD_SIZE)
    except OSError:
        return b""


def sniff(path: str | os.PathLike[str]) -> str | None:
    """:func:`signature_kind` of a file (or remote object); OSError (missing, a directory, unreadable) propagates."""
    with open_binary(path) as fh:
        hint_reads(fh, [(0, OPEN_REGION)])  # the open that follows reads these pages first: one request
        return signature_kind(fh.read(HEAD_SIZE))


def _listing(directory: Path) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def partner_candidates(name: str, names: Sequence[str], extensions: Sequence[str]) -> Iterator[str]:
    """The one pairing rule, on a folder's listing: the names in ``names`` (sorted) with ``name``'s base
    name and one of ``extensions``, best first: an exact base-name match before a case-insensitive one,
    earlier extensions before later ones.  Triage applies it to the listing it made once per folder
    (regular files only, so the first candidate is the partner); :func:`find_partner` to a fresh listing."""
    stem = Path(name).stem
    for fold in (False, True):
        for ext in extensions:
            for other in names:
                if other == name:
                    continue
                cand = Path(other)
                if cand.suffix.lower() != ext.lower():
                    continue
                if (cand.stem.casefold() == stem.casefold()) if fold else (cand.stem == stem):
                    yield other


def find_partner(path: str | os.PathLike[str], extensions: Sequence[str]) -> tuple[Path | str | None, list[Path | str]]:
    """The regular file beside ``path`` with the same base name and one of ``extensions`` (any case).

    Returns the partner (the first of :func:`partner_candidates` that is a regular file) and the paths
    looked at, for a message that tells the user where the partner has to be.  A URL's partner is found
    in one listing of its folder (prefix), by the same rule, and returned as a URL (a local one as a
    :class:`Path`).
    """
    if is_remote(path):
        folder, name = folder_of(path), base_name(path)
        stem = os.path.splitext(name)[0]
        listing = list_folder(folder)
        files = sorted(n for n, is_object in listing.items() if is_object)
        found = next(partner_candidates(name, files, extensions), None)
        looked: list[Path | str] = [join(folder, stem + ext) for ext in extensions]
        return (join(folder, found) if found is not None else None), looked
    path = Path(path)
    local_looked: list[Path | str] = [path.with_suffix(ext) for ext in extensions]
    for name in partner_candidates(path.name, _listing(path.parent), extensions):
        if (path.parent / name).is_file():
            return path.parent / name, local_looked
    return None, local_looked


def find_vmcx(path: str | os.PathLike[str]) -> Path | str | None:
    """The VM configuration (``<GUID>.vmcx``) that belongs to a saved state, if it is there.

    Hyper-V keeps ``<VM GUID>.vmcx`` beside ``<VM GUID>.vmrs`` in ``Virtual Machines/`` and
    ``<snapshot GUID>.vmcx`` beside the snapshot's ``.vmrs`` in ``Snapshots/``; a copied evidence set
    may have either layout, so the sibling folder of the other name is tried as well.
    """
    found, _ = find_partner(path, [".vmcx"])
    if found is not None:
        return found
    if is_remote(path):
        parent = folder_of(path)
        grand = folder_of(parent)
        for other in ("Virtual Machines", "Snapshots"):
            for base in (parent, grand):
                if base_name(base) == other or list_folder(base).get(other, True):
                    continue  # the folder itself, or no such sub-prefix (a name listed as a file)
                found, _ = find_partner(join(join(base, other), base_name(path)), [".vmcx"])
                if found is not None:
                    return found
        return None
    local = Path(path)
    parent = local.parent
    for other in ("Virtual Machines", "Snapshots"):
        for folder in (parent / other, parent.parent / other):
            if folder != parent and folder.is_dir():
                found, _ = find_partner(folder / local.name, [".vmcx"])
                if found is not None:
                    return found
    return None


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
    """A ``file:`` URL as Volatility builds them (absolute, percent-encoded); a remote URL as it is."""
    if is_remote(path):
        return os.fspath(path)
    return Path(os.path.abspath(path)).as_uri()


def vsv_problem(bin_path: str | os.PathLike[str], vsv_path: str | os.PathLike[str]) -> str | None:
    """Why ``vsv_path``, named by the user as the ``.vsv`` of the legacy ``bin_path``, cannot be it (None: it can).

    The one rule for ``vmssd --vsv`` and ``vol --hyperv-vsv-location``: a file the user names must
    be a regular, readable HyperVStorage container holding a partition_state (the CPU state and the
    RAM map of the pair), and not the ``.bin`` itself.  Anything else (random bytes, a ``.vmcx``, a
    ``.vmrs`` without CPU state) is refused in one line instead of being read as "no CPU state" with
    an identity map.  A ``.vsv`` found beside the ``.bin`` is not judged here: the reader opens it
    and records what it could not read as findings (docs/format.md, legacy .bin + .vsv).
    """
    name = os.fspath(vsv_path)
    vsv: Path | str = name
    if is_remote(name):  # an object in a store (docs/remote.md): its kind is told by its bytes below
        if name == os.fspath(bin_path):
            return f"{name} is the .bin itself; the .vsv is the other file of the pair"
    else:
        vsv = Path(name)
        if not vsv.exists():
            return f"{name} does not exist"
        if not vsv.is_file():
            return f"{name} is not a regular file"
        try:
            if os.path.samefile(vsv, bin_path):
                return f"{name} is the .bin itself; the .vsv is the other file of the pair"
        except OSError:
            pass
    try:
        kind = sniff(vsv)
    except OSError as exc:
        return f"cannot read {name}: {exc.strerror or exc}"
    if kind != "storage":
        what = "a legacy .bin" if kind == "bin" else f"not a HyperVStorage file (signature {STORAGE_SIGNATURE:#010x})"
        return f"{name} is not the .vsv of {os.fspath(bin_path)}: it is {what}"
    try:
        with HyperVStorage.open(vsv) as storage:
            has_state = any(storage.find(p) is not None for p in PARTITION_STATE_PATHS)
            has_memory = bool(ram_block_keys(storage))
            configuration = storage.find("/configuration") is not None
    except (OSError, VmssdError) as exc:
        return f"{name} cannot be read as the .vsv of {os.fspath(bin_path)}: {exc}"
    if has_memory:
        return f"{name} is not the .vsv of {os.fspath(bin_path)}: it is a saved state with its own memory (a .vmrs)"
    if has_state:
        return None
    what = "a VM configuration (.vmcx)" if configuration or name.lower().endswith(".vmcx") else "a HyperVStorage file"
    return f"{name} is not the .vsv of {os.fspath(bin_path)}: it is {what} without CPU state (no partition_state)"


def evidence_location(location: str) -> Path | str | None:
    """What a Volatility location names for us: a local :class:`Path`, a remote URL we read, or None."""
    try:
        if is_remote(location):
            return location
    except OSError:
        return None  # a scheme we do not read
    return url_to_path(location)
