"""What each discovered file is, through the provider's public API only, reading no RAM.

Opening a saved state builds indexes (key tables, RAM map, CPU state); no RamBlock is decoded.  The
classes, and what each means for analysis, are the table in docs/triage.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from ..errors import VmssdError
from ..provider import open_saved_state
from .discovery import SavedStateFile

__all__ = ["CLASSES", "DAMAGE_KINDS", "Classification", "classify"]

#: class -> one line for the human summary and the docs.
CLASSES: dict[str, str] = {
    "saved-memory": "saved state with memory (.vmrs): analysed",
    "legacy-pair": "legacy .bin + .vsv pair, complete: analysed",
    "bin-without-vsv": "legacy .bin without its .vsv: memory only (no CPU state), analysed",
    "vsv-without-bin": "legacy .vsv without its .bin: CPU state and RAM map only, no memory to analyse",
    "no-memory": "HyperVStorage container without saved memory (runtime state, or a production checkpoint)",
    "configuration": "VM configuration (.vmcx): names the VM, holds no state",
    "guest-state": "VM guest state (.vmgs): firmware variables and virtual TPM, not memory",
    "damaged": "damaged: could not be opened, or opened with damage findings (analysed if memory is left)",
    "not-hyperv": "not a Hyper-V file",
}

#: Finding kinds that mean the bytes are not what was written (as opposed to notes such as a pending
#: journal applied in memory, or a .bin opened without CPU state).
DAMAGE_KINDS = frozenset(
    {
        "crc",
        "truncated",
        "key-table",
        "object-table",
        "key-entry",
        "bad-entry",
        "bad-page",
        "bad-header",
        "header",
        "header-size",
        "missing-block",
    }
)

GUEST_STATE_NOTE = (
    "guest-state file (.vmgs): UEFI variables and the virtual TPM's state live here, not in RAM; a VM with a"
    " vTPM may keep disk keys (BitLocker) sealed to it, and the memory of a shielded or isolated (VBS, SEV-SNP,"
    " TDX) VM may be encrypted, so RAM analysis of its saved states can find little; not read"
)


@dataclasses.dataclass
class Classification:
    cls: str
    content: str  # what the file holds, damaged or not (equal to cls unless cls is "damaged")
    analyse: bool
    kind: str | None = None  # the provider's kind (vmrs, bin+vsv, bin)
    vp_count: int | None = None
    ram_bytes: int | None = None
    guest_os: str | None = None
    os_family: str | None = None  # "windows", "linux" or None (unknown): picks the default plugins
    findings: list[str] = dataclasses.field(default_factory=list)
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _os_family(info: Any) -> str | None:
    """From a decoded HV_GUEST_OS_ID (or None when none was saved): "windows", "linux" or None."""
    return None if info is None else info.os_family


def _no_memory_note(f: SavedStateFile) -> str:
    if f.state == "checkpoint":
        return "a checkpoint without memory: a production checkpoint (or one of a VM that was off) saves none"
    return "runtime state of a running (or stopped) VM: no memory is saved until the VM is saved or checkpointed"


def classify(f: SavedStateFile) -> Classification:
    """Open the file (or pair) without reading RAM and say what it is."""
    if f.role == "vmgs":
        return Classification("guest-state", "guest-state", False, note=GUEST_STATE_NOTE)
    if f.role == "vmcx":
        if f.signature != "storage":
            return Classification("not-hyperv", "not-hyperv", False, note="named .vmcx, but not a HyperVStorage file")
        c = f.config
        if c is not None and c.error:
            return Classification("damaged", "configuration", False, findings=[c.error])
        return Classification("configuration", "configuration", False, note="VM configuration")
    if f.role == "vsv" and f.partner is None:
        return Classification(
            "vsv-without-bin",
            "vsv-without-bin",
            False,
            note="the .bin holding the memory is not beside it (same base name, any case)",
        )
    if f.signature not in ("storage", "bin"):
        return Classification("not-hyperv", "not-hyperv", False, note=f"signature: {f.signature}")
    try:
        provider = open_saved_state(f.path, vsv=f.partner)
    except (OSError, VmssdError) as exc:
        return Classification("damaged", _expected_content(f), False, findings=[str(exc)], note="cannot be opened")
    try:
        return _from_provider(f, provider)
    finally:
        provider.close()


def _expected_content(f: SavedStateFile) -> str:
    if f.signature == "bin":
        return "legacy-pair" if f.partner else "bin-without-vsv"
    return "saved-memory"


def _from_provider(f: SavedStateFile, provider: Any) -> Classification:
    summary = provider.summary()  # reads no guest RAM
    has_memory = provider.has_saved_memory()
    if f.signature == "bin":
        content = "legacy-pair" if f.partner else "bin-without-vsv"
    else:
        content = "saved-memory" if has_memory else "no-memory"
    info = None
    if provider.has_cpu_state():
        with contextlib.suppress(VmssdError):
            info = provider.get_guest_os_info(0)
    damaged = [x for x in provider.findings() if x.kind in DAMAGE_KINDS]
    note = None
    if not has_memory:  # the folder tells a checkpoint's missing memory from a running VM's
        note = _no_memory_note(f) if f.state == "checkpoint" else provider.memory_absence() or _no_memory_note(f)
    return Classification(
        cls="damaged" if damaged else content,
        content=content,
        analyse=has_memory,
        kind=summary.file_kind,
        vp_count=summary.vp_count,
        ram_bytes=summary.ram_bytes,
        guest_os=summary.guest_os,
        os_family=_os_family(info),
        findings=[str(f) for f in summary.findings],
        note=note,
    )
