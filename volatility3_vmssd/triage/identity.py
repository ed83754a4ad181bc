"""Which VM a saved state belongs to, from the VM's configuration file (``<GUID>.vmcx``).

A saved state carries no VM name or ID; the ``.vmcx`` beside it does (:mod:`volatility3_vmssd.vmconfig`
reads its settings for ``hyperv.info``; this adds what grouping needs).  Only keys seen in a real
``.vmcx`` (configuration version 9.0, see docs/triage.md) are read: ``properties/name``,
``properties/global_id`` (the ID of this configuration: the VM's, or a checkpoint's own),
``settings/global/logical_id`` (the VM the configuration belongs to; a checkpoint keeps its VM's
ID here) and ``properties/type_id``.  Any of them may be absent.  No Volatility import.
"""

from __future__ import annotations

import dataclasses
import os

from ..errors import VmssdError
from ..storage import HyperVStorage
from ..vmconfig import VMCX_FIELDS

__all__ = ["VmConfig", "read_vm_config"]

_KEYS = {label: key for label, key, _ in VMCX_FIELDS}
_NAME = _KEYS["VM name"]
_GLOBAL_ID = _KEYS["VM ID"]
_LOGICAL_ID = "/configuration/settings/global/logical_id"
_TYPE_ID = "/configuration/properties/type_id"


@dataclasses.dataclass(frozen=True)
class VmConfig:
    path: str
    name: str | None
    global_id: str | None
    logical_id: str | None
    type_id: str | None
    error: str | None = None

    @property
    def vm_id(self) -> str | None:
        """The VM's ID: a checkpoint's configuration names its VM in ``logical_id``."""
        return _upper(self.logical_id or self.global_id)

    @property
    def is_checkpoint(self) -> bool | None:
        """True when the configuration is a checkpoint's (its own ID differs from its VM's); None if unknown."""
        if self.logical_id and self.global_id:
            return self.logical_id.strip("{}").upper() != self.global_id.strip("{}").upper()
        if self.type_id:
            return self.type_id.lower() == "snapshots"
        return None


def _upper(text: str | None) -> str | None:
    return None if not text else text.strip("{}").upper()


def _text(storage: HyperVStorage, path: str) -> str | None:
    key = storage.find(path)
    value = None if key is None else key.value
    return value if isinstance(value, str) and value else None


def read_vm_config(path: str | os.PathLike[str]) -> VmConfig:
    """Name and IDs from a ``.vmcx``; an unreadable file gives a config with ``error`` set, not an exception."""
    p = os.fspath(path)
    try:
        with HyperVStorage.open(p) as storage:
            return VmConfig(
                p,
                _text(storage, _NAME),
                _text(storage, _GLOBAL_ID),
                _text(storage, _LOGICAL_ID),
                _text(storage, _TYPE_ID),
            )
    except (OSError, VmssdError) as exc:
        return VmConfig(p, None, None, None, None, error=str(exc))
