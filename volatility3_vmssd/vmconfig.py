"""The VM's own description from its configuration file (``<GUID>.vmcx``), for ``vmssd info`` and ``hyperv.info``.

A saved state says nothing about the VM's name or settings; the ``.vmcx`` beside it does.  Only keys
seen in a real ``.vmcx`` (Hyper-V configuration version 9.0) are read; any of them may be absent.
"""

from __future__ import annotations

import datetime
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import VmssdError
from .files import find_vmcx
from .sources import SourceError, is_remote, suffix
from .storage import HyperVStorage
from .vmrs.reader import version_text

__all__ = ["find_vm_config", "read_vm_config"]

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

_FILETIME_EPOCH = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)


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


def read_vm_config(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(label, text)`` rows for the settings found in a ``.vmcx``; empty if it cannot be read."""
    rows: list[tuple[str, str]] = []
    try:
        with HyperVStorage.open(path) as storage:
            for label, key_path, kind in VMCX_FIELDS:
                key = storage.find(key_path)
                text = _format(kind, None if key is None else key.value)
                if text is not None:
                    rows.append((label, text))
    except SourceError:
        raise  # a fetch that failed for good ends the command (docs/remote.md), it is not "no settings"
    except (OSError, VmssdError):
        return []
    return rows


def find_vm_config(paths: Iterable[str | os.PathLike[str]]) -> tuple[Path | str | None, list[tuple[str, str]]]:
    """The ``.vmcx`` of a saved state's files (see :func:`~volatility3_vmssd.files.find_vmcx`) and its rows.

    A ``.vmcx`` given itself is its own configuration.
    """
    for path in paths:
        vmcx = (Path(path) if not is_remote(path) else path) if suffix(path).lower() == ".vmcx" else find_vmcx(path)
        if vmcx is not None:
            return vmcx, read_vm_config(vmcx)
    return None, []
