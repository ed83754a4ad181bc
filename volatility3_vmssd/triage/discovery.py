"""Find every saved state under some paths and say which VM each belongs to, reading no RAM.

A Hyper-V host keeps one folder per configuration store (docs/triage.md):
``Virtual Machines/<VM ID>.vmcx`` + ``.vmrs`` + ``.vmgs`` for the current state,
``Snapshots/<checkpoint ID>.vmcx`` + ``.vmrs`` + ``.vmgs`` for checkpoints, and on 2012 R2 hosts the
legacy ``<ID>/<ID>.bin`` + ``<ID>.vsv`` in a folder named after the configuration.  Exported VMs keep
the same layout under their export folder; loose copies may have any name, so files are also
recognised by their first bytes.  Partners are matched by base name, case-insensitively (extension
case differs between hosts and copies).

Each folder is listed once (:func:`list_folder`, the one place that reads a folder: a remote lister
can stand in for it); pairing and the search for a ``.vmcx`` work on those listings, so a folder of
10,000 saved states costs one listing, not one per file.  What cannot be listed, read or is not a
regular file is reported in :attr:`Discovery.problems`, never silently left out.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

from ..files import HEAD_SIZE, partner_candidates, signature_kind
from ..files import sniff as remote_sniff
from ..sources import base_name, folder_of, is_remote, redact
from ..sources.remote import list_remote_detail
from ..vmconfig import VmConfig, read_vm_config

__all__ = [
    "HYPERV_EXTENSIONS",
    "Discovery",
    "FolderEntry",
    "SavedStateFile",
    "absolute",
    "discover",
    "list_any",
    "list_folder",
    "shown",
    "sniff",
]

#: Extensions a Hyper-V host uses for VM configuration and state; anything else needs a signature.
HYPERV_EXTENSIONS = (".vmrs", ".vmcx", ".vmgs", ".bin", ".vsv")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")
_CHECKPOINT_FOLDER = "snapshots"
_CURRENT_FOLDER = "virtual machines"
_STORE_FOLDERS = ("Virtual Machines", "Snapshots")


def shown(path: str | os.PathLike[str]) -> str:
    """A path as text that can always be printed and written as UTF-8: bytes that are not UTF-8 (a name
    made on another system) appear as ``\\xNN`` instead of ending the run with UnicodeEncodeError."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def absolute(path: str | os.PathLike[str]) -> str:
    """``os.path.abspath`` for a local path; a URL (docs/remote.md) as it is (abspath would mangle ``//``)."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.abspath(text)


def list_any(folder: str) -> list[FolderEntry]:
    """:func:`list_folder` for a local folder; one listing of a remote prefix (objects and sub-prefixes)."""
    if not is_remote(folder):
        return list_folder(folder)
    entries = [
        FolderEntry(name, "file" if is_object else "dir", size)
        for name, (is_object, size) in list_remote_detail(folder).items()
    ]
    entries.sort(key=lambda x: x.name)
    return entries


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


@dataclasses.dataclass(frozen=True)
class FolderEntry:
    """One name in a folder: ``kind`` is "file" (regular, symlinks followed), "dir", "dir-link" (a symlink
    to a folder: not followed, so no loop), "special" (FIFO, device, socket) or "error" (cannot stat)."""

    name: str
    kind: str
    size: int | None = None
    ident: tuple[int, int] | None = None  # (device, inode): the same file reached twice is listed once
    error: str | None = None


def list_folder(folder: str) -> list[FolderEntry]:
    """Every entry of ``folder``, sorted by name.  OSError (unreadable, gone, path too long) propagates."""
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False):
                    entries.append(FolderEntry(e.name, "dir"))
                    continue
                st = e.stat()
            except OSError as exc:
                entries.append(FolderEntry(e.name, "error", error=_reason(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                entries.append(FolderEntry(e.name, "dir-link"))
            elif stat.S_ISREG(st.st_mode):
                entries.append(FolderEntry(e.name, "file", st.st_size, (st.st_dev, st.st_ino)))
            else:
                entries.append(FolderEntry(e.name, "special"))
    entries.sort(key=lambda x: x.name)
    return entries


Lister = Callable[[str], list[FolderEntry]]


def _read_head(path: str) -> bytes:
    """The first bytes of a regular file; OSError propagates.  O_NONBLOCK: a file swapped for a FIFO
    after listing cannot block the run."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(fd, HEAD_SIZE)
    finally:
        os.close(fd)


def sniff(path: str | os.PathLike[str]) -> str:
    """'storage' (HyperVStorage: .vmrs, .vmcx, modern .vsv), 'bin' (legacy memory file) or 'other'
    (including empty files), from the first bytes (:mod:`volatility3_vmssd.files`); OSError propagates."""
    if is_remote(path):
        return remote_sniff(path) or "other"
    return signature_kind(_read_head(os.fspath(path))) or "other"


@dataclasses.dataclass
class SavedStateFile:
    """One row of the summary: a file, or a legacy ``.bin`` with its ``.vsv`` (``partner``)."""

    path: str
    signature: str  # from sniff()
    role: str  # vmrs, vmcx, vmgs, bin, vsv or other: what the extension (or, failing that, the signature) says
    partner: str | None = None
    folder_state: str | None = None  # "current" / "checkpoint" from the folder names, None if they say nothing
    config: VmConfig | None = None
    vm_id: str | None = None
    vm_name: str | None = None
    state: str | None = None  # "current" / "checkpoint": the config's word, else the folder's
    checkpoint_name: str | None = None
    vm_home: str | None = None  # the configuration store (folder holding Virtual Machines/Snapshots) of the VM
    size: int | None = None

    @property
    def files(self) -> list[str]:
        return [self.path] + ([self.partner] if self.partner else [])


@dataclasses.dataclass
class Discovery:
    files: list[SavedStateFile]
    skipped: int  # files under the folders that are neither named nor shaped like Hyper-V files
    missing: list[str]  # paths given that do not exist
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why it was left out)
    warnings: list[str] = dataclasses.field(default_factory=list)  # e.g. one VM ID in two configurations
    listings: int = 0  # folders listed (each once)


def _role(path: str, signature: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in HYPERV_EXTENSIONS:
        return ext[1:]
    return {"storage": "vmrs", "bin": "bin"}.get(signature, "other")


def _folder_state(path: Path) -> str | None:
    for parent in path.parents:
        name = parent.name.casefold()
        if name == _CHECKPOINT_FOLDER:
            return "checkpoint"
        if name == _CURRENT_FOLDER:
            return "current"
    return None


def _store(path: str) -> str:
    """The configuration store a file belongs to: the folder holding ``Virtual Machines``/``Snapshots``
    (a legacy ``<ID>/`` folder counts as part of its ``Virtual Machines``), else the file's own folder."""
    # string operations, not Path: a URL's "//" must survive (docs/remote.md)
    p = os.path.dirname(absolute(path))
    if _GUID.match(os.path.basename(p)) and os.path.basename(os.path.dirname(p)).casefold() == _CURRENT_FOLDER:
        p = os.path.dirname(p)
    return os.path.dirname(p) if os.path.basename(p).casefold() in (_CURRENT_FOLDER, _CHECKPOINT_FOLDER) else p


@dataclasses.dataclass
class _Index:
    """A listing as discovery looks things up in it: regular files by case-folded base name, folder names."""

    entries: list[FolderEntry]
    files_by_stem: dict[str, list[str]]
    folders: set[str]

    @classmethod
    def of(cls, entries: list[FolderEntry]) -> _Index:
        by_stem: dict[str, list[str]] = {}
        for e in entries:
            if e.kind == "file":
                by_stem.setdefault(os.path.splitext(e.name)[0].casefold(), []).append(e.name)
        return cls(entries, by_stem, {e.name for e in entries if e.kind in ("dir", "dir-link")})


class _Folders:
    """Listings by folder, each made at most once; a folder that cannot be listed is remembered as such."""

    def __init__(self, lister: Lister) -> None:
        self.lister = lister
        self.cache: dict[str, _Index | OSError] = {}

    def get(self, folder: str) -> _Index | OSError:
        key = absolute(folder)
        if key not in self.cache:
            try:
                self.cache[key] = _Index.of(self.lister(key))
            except OSError as exc:
                self.cache[key] = exc
        return self.cache[key]

    def has_listing(self, folder: str) -> bool:
        """Whether ``folder`` lists anything (a remote prefix exists only while it holds objects)."""
        got = self.get(folder)
        return not isinstance(got, OSError) and bool(got.entries)

    def has_folder(self, folder: str, name: str) -> bool:
        got = self.get(folder)
        return not isinstance(got, OSError) and name in got.folders

    def partner(self, path: str, extensions: Sequence[str]) -> str | None:
        """files.partner_candidates on the names that can match at all (same base name, any case)."""
        folder, name = os.path.split(absolute(path))
        got = self.get(folder)
        if isinstance(got, OSError):
            return None
        same_stem = got.files_by_stem.get(os.path.splitext(name)[0].casefold(), [])
        first = next(partner_candidates(name, same_stem, extensions), None)
        return None if first is None else os.path.join(folder, first)


class _Walk:
    def __init__(self, folders: _Folders) -> None:
        self.folders = folders
        self.seen: set[object] = set()
        self.found: list[tuple[str, bool, int | None]] = []  # (path, given by name, size)
        self.problems: list[tuple[str, str]] = []
        self.skipped_special = 0

    def _once(self, key: object) -> bool:
        if key in self.seen:
            return False
        self.seen.add(key)
        return True

    def given(self, item: str) -> bool:
        """One path from the command line; False when it does not exist."""
        if is_remote(item):
            return self._given_remote(item)
        try:
            st = os.stat(item)
        except FileNotFoundError:
            return False
        except OSError as exc:  # too long, permission denied on a parent, a symlink loop
            self.problems.append((item, f"cannot be read: {_reason(exc)}"))
            return True
        if stat.S_ISDIR(st.st_mode):
            self.folder(item)
        elif stat.S_ISREG(st.st_mode):
            if self._once((st.st_dev, st.st_ino)):
                self.found.append((item, True, st.st_size))
        else:
            self.problems.append((item, f"not a regular file ({_special_kind(st.st_mode)}): not read"))
        return True

    def _given_remote(self, item: str) -> bool:
        """A URL: a prefix (listed like a folder) or an object; OSError from the store is a problem."""
        try:
            if item.endswith("/") or self.folders.has_listing(item):
                self.folder(item.rstrip("/"))
                return True
            got = self.folders.get(folder_of(item))
            entry = (
                None if isinstance(got, OSError) else next((e for e in got.entries if e.name == base_name(item)), None)
            )
        except OSError as exc:
            self.problems.append((redact(item), f"cannot be read: {_reason(exc)}"))
            return True
        if entry is None or entry.kind != "file":
            return False
        if self._once(item):
            self.found.append((item, True, entry.size))
        return True

    def folder(self, top: str) -> None:
        stack = [top]
        while stack:
            folder = stack.pop()
            got = self.folders.get(folder)
            if isinstance(got, OSError):
                self.problems.append((folder, f"folder cannot be listed: {_reason(got)}"))
                continue
            subfolders = []
            for e in got.entries:
                path = os.path.join(folder, e.name)
                if e.kind == "dir":
                    subfolders.append(path)
                elif e.kind == "file":
                    if self._once(e.ident if e.ident is not None else absolute(path)):
                        self.found.append((path, False, e.size))
                elif e.kind == "error":
                    self.problems.append((path, f"cannot be read: {e.error}"))
                elif e.kind == "special" and os.path.splitext(e.name)[1].lower() in HYPERV_EXTENSIONS:
                    self.problems.append((path, "named like a Hyper-V file but not a regular file: not read"))
                elif e.kind == "special":
                    self.skipped_special += 1
            stack.extend(reversed(subfolders))  # depth first, in name order (as os.walk top-down)


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def discover(inputs: Sequence[str | os.PathLike[str]], lister: Lister = list_any) -> Discovery:
    """Every Hyper-V file under ``inputs`` (files or folders, recursive), paired and assigned to its VM.

    Files given explicitly are always listed (a random file given by name is reported as not
    Hyper-V); under folders, a file is listed when its extension or its signature is Hyper-V's.
    """
    folders = _Folders(lister)
    walk = _Walk(folders)
    missing = [os.fspath(p) for p in inputs if not walk.given(os.fspath(p))]
    found: list[SavedStateFile] = []
    skipped = walk.skipped_special
    for path, explicit, size in walk.found:
        try:
            signature = sniff(path)
        except OSError as exc:
            walk.problems.append((path, f"cannot be read: {_reason(exc)}"))
            continue
        role = _role(path, signature)
        if role == "other" and not explicit:
            skipped += 1
            continue
        found.append(SavedStateFile(path, signature, role, folder_state=_folder_state(Path(path)), size=size))

    # Pair each .bin with its .vsv (the one pairing rule, files.partner_candidates, on the folder's listing).
    by_path = {absolute(f.path): f for f in found}
    paired: set[int] = set()
    for f in found:
        if f.role == "bin":
            vsv_path = folders.partner(f.path, [".vsv"])
            vsv = None if vsv_path is None else by_path.get(vsv_path)
            if vsv is not None and id(vsv) not in paired:
                f.partner = vsv.path
                paired.add(id(vsv))
    files = [f for f in found if id(f) not in paired]

    # The VM each file belongs to, from its .vmcx (read once each).
    configs: dict[str, VmConfig] = {}

    def config_at(p: str | None) -> VmConfig | None:
        if p is None:
            return None
        key = absolute(p)
        if key not in configs:
            configs[key] = read_vm_config(p)
        return configs[key]

    for f in files:
        if f.role == "vmcx":
            f.config = config_at(f.path)
        else:
            f.config = next((c for c in map(config_at, _config_candidates(folders, f)) if c is not None), None)
    warnings = _assign_all(files, configs)
    problems = sorted(walk.problems, key=lambda x: x[0])
    return Discovery(files, skipped, missing, problems, warnings, listings=len(folders.cache))


def _config_candidates(folders: _Folders, f: SavedStateFile):  # type: ignore[no-untyped-def]
    """The ``.vmcx`` of a saved state, as :func:`~volatility3_vmssd.files.find_vmcx` finds it (beside it,
    else in the sibling ``Virtual Machines``/``Snapshots`` folder), or beside its legacy ``<ID>/`` folder."""
    path = absolute(f.path)
    yield folders.partner(path, [".vmcx"])
    parent, name = os.path.split(path)
    for other in _STORE_FOLDERS:
        for base in (parent, os.path.dirname(parent)):
            folder = os.path.join(base, other)
            if folder != parent and folders.has_folder(base, other):
                yield folders.partner(os.path.join(folder, name), [".vmcx"])
    if _GUID.match(os.path.basename(parent)):  # legacy <ID>/<ID>.bin: the configuration sits beside the folder
        yield folders.partner(parent, [".vmcx"])


def _assign_all(files: list[SavedStateFile], configs: dict[str, VmConfig]) -> list[str]:
    """VM IDs, names and stores for every file; a warning for each VM ID that two VM configurations claim
    (a VM copied or exported twice): their files stay apart, by configuration store."""
    own = [c for c in configs.values() if c.vm_id and c.is_checkpoint is False and not c.error]
    names: dict[tuple[str, str], str | None] = {}
    homes: dict[str, set[str]] = {}
    for c in own:
        assert c.vm_id is not None
        names[(_store(c.path), c.vm_id)] = c.name
        homes.setdefault(c.vm_id, set()).add(_store(c.path))
    warnings = []
    for vm_id, stores in sorted(homes.items()):
        if len(stores) > 1:
            paths = sorted(shown(c.path) for c in own if c.vm_id == vm_id)
            warnings.append(
                f"VM ID {vm_id} is claimed by {len(paths)} VM configurations ({', '.join(paths)}):"
                " their files are kept apart by folder"
            )
    for f in files:
        _assign_vm(f, names, homes)
    return warnings


def _assign_vm(f: SavedStateFile, names: dict[tuple[str, str], str | None], homes: dict[str, set[str]]) -> None:
    c = f.config
    checkpoint = None if c is None or c.error else c.is_checkpoint
    f.state = {True: "checkpoint", False: "current"}.get(checkpoint) if checkpoint is not None else f.folder_state
    f.vm_home = _store(c.path if c is not None and not c.error else f.path)
    if c is not None and not c.error and c.vm_id:
        f.vm_id = c.vm_id
        if f.state == "checkpoint":
            f.checkpoint_name = c.name
            stores = homes.get(c.vm_id, set())
            home = f.vm_home if f.vm_home in stores else (next(iter(stores)) if len(stores) == 1 else None)
            f.vm_name = None if home is None else names.get((home, c.vm_id))
            f.vm_home = home or f.vm_home
        else:
            f.vm_name = c.name
        return
    # No configuration: a GUID-named file or legacy folder still says which VM (or checkpoint) it is.
    p = Path(f.path)
    for candidate in (p.stem, p.parent.name):
        if _GUID.match(candidate):
            f.vm_id = candidate.strip("{}").upper()
            return
