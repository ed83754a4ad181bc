"""The VM's own description from its configuration file (``<GUID>.vmcx``): one reader for info, vol and triage.

A saved state says nothing about the VM's name or settings; the ``.vmcx`` beside it does.  Only keys
seen in a real ``.vmcx`` (Hyper-V configuration version 9.0, see docs/triage.md) are read; any of them
may be absent: ``properties/name``, ``properties/global_id`` (the ID of this configuration: the VM's,
or a checkpoint's own), ``settings/global/logical_id`` (the VM the configuration belongs to; a
checkpoint keeps its VM's ID here), ``properties/type_id``, and the settings ``hyperv.info`` shows.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import VmssdError
from .files import find_vmcx
from .sources import is_remote, suffix
from .storage import HyperVStorage
from .vmrs.reader import version_text

__all__ = ["VmConfig", "find_vm_config", "read_vm_config"]

#: (label, key path, formatter name): the rows ``hyperv.info`` shows, in order.
VMCX_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("VM name", "/configuration/properties/name", "str"),
    ("VM ID", "/configuration/properties/global_id", "str"),
    ("VM configuration version", "/configuration/properties/version", "version"),
    ("VM created", "/configuration/properties/creation_time", "filetime"),
    ("VM notes", "/configuration/properties/notes", "str"),
    ("VM memory (startup)", "/configuration/settings/memory/bank/size", "mib"),
    ("VM dynamic memory", "/configuration/settings/memory/bank/dynamic_memory_enabled", "bool"),
    ("VM memory minimum", "/configuration/settings/memory/bank/reservation", "mib"),
    ("VM memory maximum", "/configuration/settings/memory/bank/limit", "mib"),
    ("VM processors", "/configuration/settings/processors/count", "int"),
)

_LOGICAL_ID = "/configuration/settings/global/logical_id"
_TYPE_ID = "/configuration/properties/type_id"
_FILETIME_EPOCH = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass(frozen=True)
class VmConfig:
    """What one ``.vmcx`` says: the VM's identity (for grouping) and its settings (``rows``, for display).

    ``error`` is set, and everything else empty, when the file could not be read.
    """

    path: str
    name: str | None = None
    global_id: str | None = None
    logical_id: str | None = None
    type_id: str | None = None
    rows: tuple[tuple[str, str], ...] = ()
    error: str | None = None

    @property
    def vm_id(self) -> str | None:
        """The VM's ID: a checkpoint's configuration names its VM in ``logical_id``."""
        return _upper(self.logical_id or self.global_id)

    @property
    def is_checkpoint(self) -> bool | None:
        """True when the configuration is a checkpoint's (its own ID differs from its VM's); None if unknown."""
        if self.logical_id and self.global_id:
            return _upper(self.logical_id) != _upper(self.global_id)
        if self.type_id:
            return self.type_id.lower() == "snapshots"
        return None


def _upper(text: str | None) -> str | None:
    return None if not text else text.strip("{}").upper()


def _text(storage: HyperVStorage, path: str) -> str | None:
    key = storage.find(path)
    value = None if key is None else key.value
    return value if isinstance(value, str) and value else None


def _format(kind: str, value: object) -> str | None:
    if value is None:
        return None
    if kind == "version" and isinstance(value, int):
        return version_text(value)
    if kind == "mib" and isinstance(value, int) and not isinstance(value, bool):
        return f"{value} MiB"
    if kind == "bool" and isinstance(value, bool):
        return "yes" if value else "no"
    if kind == "filetime" and isinstance(value, bytes) and len(value) == 8:
        ticks = struct.unpack("<Q", value)[0]
        if not ticks:
            return None
        try:
            when = _FILETIME_EPOCH + datetime.timedelta(microseconds=ticks // 10)
        except OverflowError:
            return None
        return when.strftime("%Y-%m-%d %H:%M:%S UTC")
    if kind == "str" and isinstance(value, str):
        return value or None
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def read_vm_config(path: str | os.PathLike[str]) -> VmConfig:
    """Identity and settings from a ``.vmcx``; an unreadable file gives a config with ``error`` set, never raises."""
    p = os.fspath(path)
    try:
        with HyperVStorage.open(p) as storage:
            rows = []
            for label, key_path, kind in VMCX_FIELDS:
                key = storage.find(key_path)
                text = _format(kind, None if key is None else key.value)
                if text is not None:
                    rows.append((label, text))
            return VmConfig(
                p,
                name=_text(storage, VMCX_FIELDS[0][1]),
                global_id=_text(storage, VMCX_FIELDS[1][1]),
                logical_id=_text(storage, _LOGICAL_ID),
                type_id=_text(storage, _TYPE_ID),
                rows=tuple(rows),
            )
    except (OSError, VmssdError) as exc:
        return VmConfig(p, error=str(exc))


def find_vm_config(paths: Iterable[str | os.PathLike[str]]) -> VmConfig | None:
    """The configuration in the ``.vmcx`` of a saved state's files (see :func:`~volatility3_vmssd.files.find_vmcx`).

    A ``.vmcx`` given itself is its own configuration.
    """
    for path in paths:
        given = path if is_remote(path) else Path(path)  # Path() would fold a URL's "//"
        vmcx = given if suffix(path).lower() == ".vmcx" else find_vmcx(path)
        if vmcx is not None:
            return read_vm_config(vmcx)
    return None
