"""Find every saved state under some paths and say which VM each belongs to, reading no RAM.

A Hyper-V host keeps one folder per configuration store (docs/triage.md):
``Virtual Machines/<VM ID>.vmcx`` + ``.vmrs`` + ``.vmgs`` for the current state,
``Snapshots/<checkpoint ID>.vmcx`` + ``.vmrs`` + ``.vmgs`` for checkpoints, and on 2012 R2 hosts the
legacy ``<ID>/<ID>.bin`` + ``<ID>.vsv`` in a folder named after the configuration.  Exported VMs keep
the same layout under their export folder; loose copies may have any name, so files are also
recognised by their first bytes.  Partners are matched by base name, case-insensitively (extension
case differs between hosts and copies).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..files import find_partner, find_vmcx, read_head, signature_kind
from ..vmconfig import VmConfig, read_vm_config

__all__ = ["HYPERV_EXTENSIONS", "Discovery", "SavedStateFile", "discover", "sniff"]

#: Extensions a Hyper-V host uses for VM configuration and state; anything else needs a signature.
HYPERV_EXTENSIONS = (".vmrs", ".vmcx", ".vmgs", ".bin", ".vsv")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")
_CHECKPOINT_FOLDER = "snapshots"
_CURRENT_FOLDER = "virtual machines"


def sniff(path: str | os.PathLike[str]) -> str:
    """'storage' (HyperVStorage: .vmrs, .vmcx, modern .vsv), 'bin' (legacy memory file) or 'other'
    (including empty and unreadable files), from the first bytes (:mod:`volatility3_vmssd.files`)."""
    return signature_kind(read_head(path)) or "other"


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

    @property
    def files(self) -> list[str]:
        return [self.path] + ([self.partner] if self.partner else [])


@dataclasses.dataclass
class Discovery:
    files: list[SavedStateFile]
    skipped: int  # files under the folders that are neither named nor shaped like Hyper-V files
    missing: list[str]  # paths given that do not exist


def _role(path: Path, signature: str) -> str:
    ext = path.suffix.lower()
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


def _walk(inputs: Sequence[str | os.PathLike[str]]) -> Iterator[tuple[Path, bool]]:
    """``(file, given explicitly)`` for every file, each once, in a stable order."""
    seen: set[str] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    f = Path(root) / name
                    key = os.path.realpath(f)
                    if key not in seen and f.is_file():
                        seen.add(key)
                        yield f, False
        elif p.is_file():
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                yield p, True


def _config_candidates(f: SavedStateFile) -> Iterator[Path | None]:
    """The ``.vmcx`` of a saved state: beside it or in the sibling ``Virtual Machines``/``Snapshots``
    folder (:func:`~volatility3_vmssd.files.find_vmcx`), or beside its legacy ``<ID>/`` folder."""
    p = Path(f.path)
    yield find_vmcx(p)
    if _GUID.match(p.parent.name):  # legacy <ID>/<ID>.bin: the configuration sits beside the folder
        yield find_partner(p.parent, [".vmcx"])[0]


def discover(inputs: Sequence[str | os.PathLike[str]]) -> Discovery:
    """Every Hyper-V file under ``inputs`` (files or folders, recursive), paired and assigned to its VM.

    Files given explicitly are always listed (a random file given by name is reported as not
    Hyper-V); under folders, a file is listed when its extension or its signature is Hyper-V's.
    """
    missing = [os.fspath(p) for p in inputs if not Path(p).exists()]
    found: list[SavedStateFile] = []
    skipped = 0
    for path, explicit in _walk(inputs):
        signature = sniff(path)
        role = _role(path, signature)
        if role == "other" and not explicit:
            skipped += 1
            continue
        found.append(SavedStateFile(os.fspath(path), signature, role, folder_state=_folder_state(path)))

    # Pair each .bin with its .vsv (the one pairing rule: same folder, same base name, any case).
    by_path = {os.path.normcase(os.path.abspath(f.path)): f for f in found}
    paired: set[int] = set()
    for f in found:
        if f.role == "bin":
            vsv_path = find_partner(f.path, [".vsv"])[0]
            vsv = None if vsv_path is None else by_path.get(os.path.normcase(os.path.abspath(vsv_path)))
            if vsv is not None and id(vsv) not in paired:
                f.partner = vsv.path
                paired.add(id(vsv))
    files = [f for f in found if id(f) not in paired]

    # The VM each file belongs to, from its .vmcx (read once each).
    configs: dict[str, VmConfig] = {}

    def config_at(p: Path | None) -> VmConfig | None:
        if p is None:
            return None
        key = os.path.normcase(os.path.abspath(p))
        if key not in configs:
            configs[key] = read_vm_config(p)
        return configs[key]

    for f in files:
        if f.role == "vmcx":
            f.config = config_at(Path(f.path))
        else:
            f.config = next((c for c in map(config_at, _config_candidates(f)) if c is not None), None)
    names = {c.vm_id: c.name for c in configs.values() if c.vm_id and c.is_checkpoint is False and c.name is not None}
    for f in files:
        _assign_vm(f, names)
    return Discovery(files, skipped, missing)


def _assign_vm(f: SavedStateFile, names: dict[str, str]) -> None:
    c = f.config
    checkpoint = None if c is None or c.error else c.is_checkpoint
    f.state = {True: "checkpoint", False: "current"}.get(checkpoint) if checkpoint is not None else f.folder_state
    if c is not None and not c.error and c.vm_id:
        f.vm_id = c.vm_id
        if f.state == "checkpoint":
            f.checkpoint_name = c.name
            f.vm_name = names.get(c.vm_id)
        else:
            f.vm_name = c.name
        return
    # No configuration: a GUID-named file or legacy folder still says which VM (or checkpoint) it is.
    p = Path(f.path)
    for candidate in (p.stem, p.parent.name):
        if _GUID.match(candidate):
            f.vm_id = candidate.strip("{}").upper()
            return
