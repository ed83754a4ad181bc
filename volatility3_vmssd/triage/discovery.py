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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from ..savedstate.legacy_bin import BIN_SIGNATURE
from ..storage.defs import FILE_SIGNATURE
from .vmconfig import VmConfig, read_vm_config

__all__ = ["HYPERV_EXTENSIONS", "Discovery", "SavedStateFile", "discover", "sniff"]

#: Extensions a Hyper-V host uses for VM configuration and state; anything else needs a signature.
HYPERV_EXTENSIONS = (".vmrs", ".vmcx", ".vmgs", ".bin", ".vsv")
_GUID = re.compile(r"^\{?[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}?$")
_CHECKPOINT_FOLDER = "snapshots"
_CURRENT_FOLDER = "virtual machines"


def sniff(path: str | os.PathLike[str]) -> str:
    """'storage' (HyperVStorage: .vmrs, .vmcx, modern .vsv), 'bin' (legacy memory file), 'empty',
    'unreadable' or 'other', from the first four bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return "unreadable"
    if len(head) < 4:
        return "empty" if not head else "other"
    sig = int.from_bytes(head, "little")
    return {FILE_SIGNATURE: "storage", BIN_SIGNATURE: "bin"}.get(sig, "other")


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


def _stem_key(path: Path) -> tuple[str, str]:
    return os.path.normcase(str(path.parent)), path.stem.casefold()


def _config_candidates(f: SavedStateFile) -> Iterable[Path]:
    """Where the ``.vmcx`` of a saved state may be: beside it, beside its legacy folder, or in the
    sibling ``Virtual Machines``/``Snapshots`` folder of a copied evidence set."""
    p = Path(f.path)
    yield p.with_suffix(".vmcx")
    if _GUID.match(p.parent.name):  # legacy <ID>/<ID>.bin: the configuration sits beside the folder
        yield p.parent.parent / (p.parent.name + ".vmcx")
    for other in ("Virtual Machines", "Snapshots"):
        for folder in (p.parent.parent / other, p.parent.parent.parent / other):
            yield folder / (p.stem + ".vmcx")


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

    # Pair each .bin with the .vsv of the same base name in the same folder (any case).
    vsvs = {_stem_key(Path(f.path)): f for f in found if f.role == "vsv"}
    paired: set[int] = set()
    for f in found:
        if f.role == "bin":
            vsv = vsvs.get(_stem_key(Path(f.path)))
            if vsv is not None and id(vsv) not in paired:
                f.partner = vsv.path
                paired.add(id(vsv))
    files = [f for f in found if id(f) not in paired]

    # The VM each file belongs to, from its .vmcx (read once each).
    configs: dict[str, VmConfig] = {}

    def config_at(p: Path) -> VmConfig | None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in configs:
            match = _existing_case_insensitive(p)
            if match is None:
                return None
            configs[key] = read_vm_config(match)
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


def _existing_case_insensitive(p: Path) -> Path | None:
    if p.is_file():
        return p
    try:
        names = os.listdir(p.parent)
    except OSError:
        return None
    wanted = p.name.casefold()
    for name in sorted(names):
        if name.casefold() == wanted and (p.parent / name).is_file():
            return p.parent / name
    return None


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
