"""What ``vmssd info`` and ``hyperv.info`` show of a saved state: the view model, apart from the provider.

A :class:`Summary` is built by the provider (``SavedState.summary()``) without reading guest RAM and
rendered here once, as labelled rows or as JSON, so both commands print the same words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from .errors import Finding, count_findings, summarize

__all__ = ["FILE_KIND_TEXT", "SUMMARY_LABELS", "Summary", "VpTrustLevels"]


@dataclasses.dataclass(frozen=True)
class VpTrustLevels:
    """The VTLs one VP saved registers for, and the one analysis uses (rule above, or forced)."""

    vp: int
    saved: tuple[int, ...]
    used: int | None
    forced: bool = False

    def text(self) -> str:
        """``VTL0 (used), VTL1``: every saved VTL, the used one marked."""
        used = " (used, forced)" if self.forced else " (used)"
        return ", ".join(f"VTL{v}{used if v == self.used else ''}" for v in self.saved) or "none saved"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What ``vmssd info`` and ``hyperv.info`` show; built without reading guest RAM.

    ``None`` means "this backend or file cannot say", never zero.  :meth:`as_dict` is the JSON form
    (``vmssd info --json``); :meth:`rows` the labelled form both commands print.
    """

    file_kind: str
    files: tuple[str, ...]
    backend: str
    vp_count: int
    ram_bytes: int
    chunk_count: int
    raw_saved_memory_bytes: int
    decoder: str
    container_version: str | None = None
    vm_version: str | None = None
    saved_state_type: str | None = None
    processor_vendor: str | None = None
    architecture: str | None = None
    paging_mode: str | None = None
    guest_os: str | None = None
    memory: str | None = None
    vtls: tuple[VpTrustLevels, ...] = ()
    ramblock_count: int | None = None
    cache_limit_blocks: int | None = None
    journal: dict[str, int] | None = None
    dll: dict[str, Any] | None = None
    findings: tuple[Finding, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["files"] = list(self.files)
        out["findings"] = [str(f) for f in self.findings]
        out["vtls"] = [{"vp": v.vp, "saved": list(v.saved), "used": v.used, "forced": v.forced} for v in self.vtls]
        if self.dll is None:
            del out["dll"]
        return out

    def vtl_text(self) -> str | None:
        """One line for every VP when they all agree (the usual case), else one entry per VP."""
        if not self.vtls:
            return None
        texts = {v.text() for v in self.vtls}
        if len(texts) == 1:
            return f"{texts.pop()} on every VP" if len(self.vtls) > 1 else self.vtls[0].text()
        return "; ".join(f"VP {v.vp}: {v.text()}" for v in self.vtls)

    def rows(self) -> Iterator[tuple[str, str]]:
        """``(label, text)`` in :data:`SUMMARY_LABELS` order, skipping what is unknown; findings last."""
        for key, label in SUMMARY_LABELS:
            if key == "files":
                yield from (("File", path) for path in self.files)
                continue
            text = _label_text(self, key)
            if text is not None:
                yield label, text
        yield "Findings", str(count_findings(self.findings)) if self.findings else "none"
        for line in summarize(self.findings):  # a few per kind, then a count (docs/robustness.md)
            yield "Finding", line


#: The one label table of a summary (``vmssd info`` and ``hyperv.info``).
SUMMARY_LABELS: tuple[tuple[str, str], ...] = (
    ("file_kind", "File kind"),
    ("files", "File"),
    ("backend", "Backend"),
    ("container_version", "Container version"),
    ("vm_version", "VM version"),
    ("saved_state_type", "Saved-state type"),
    ("vp_count", "Virtual processors"),
    ("processor_vendor", "Processor vendor"),
    ("architecture", "Architecture (VP 0)"),
    ("paging_mode", "Paging mode (VP 0)"),
    ("vtls", "VTLs"),
    ("guest_os", "Guest OS"),
    ("memory", "Saved memory"),
    ("ram_bytes", "Guest RAM"),
    ("chunk_count", "GPA chunks"),
    ("ramblock_count", "RamBlocks"),
    ("raw_saved_memory_bytes", "Raw saved memory"),
    ("decoder", "XPRESS decoder"),
    ("cache_limit_blocks", "Block cache limit"),
    ("journal", "Replay log"),
    ("dll", "DLL"),
)

FILE_KIND_TEXT = {
    "vmrs": ".vmrs",
    "bin+vsv": "legacy .bin + .vsv",
    "bin": "legacy .bin alone (memory only, no CPU state)",
}


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / (1 << 20):,.1f} MiB)"


def _label_text(summary: Summary, key: str) -> str | None:
    if key == "vtls":
        return summary.vtl_text()
    value = getattr(summary, key)
    if value is None:
        return None
    if key == "file_kind":
        if value == "vmrs" and summary.memory is not None:  # a .vmcx, a runtime state: not a saved state
            return "HyperVStorage container without saved memory"
        return FILE_KIND_TEXT.get(value, str(value))
    if key in ("ram_bytes", "raw_saved_memory_bytes"):
        return _size(value)
    if key == "cache_limit_blocks":
        return f"{value} blocks of 1 MiB"
    if isinstance(value, tuple | list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
    return str(value)
