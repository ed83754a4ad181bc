"""The code behind the ``hyperv.*`` plugins, as mixins without a plugin base class.

Volatility names a plugin after the module that defines its class and lists every imported
``PluginInterface`` subclass, so the classes themselves are defined in the thin shim modules
(``volatility3/plugins/hyperv/*.py``: listed as ``hyperv.info.Info`` and so on) and combine one of
these mixins with ``PluginInterface``.  A mixin is not a plugin, so nothing is listed twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from volatility3.framework import exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.layers import intel
from volatility3.framework.renderers import format_hints

from ..cpu.cpumode import architecture, paging_mode
from ..cpu.registers import SegmentRegister, TableRegister
from ..errors import VmssdError
from ..memory.rammap import flag_names
from ..summary import SUMMARY_LABELS
from ..vmconfig import find_vm_config
from .kernel import KernelCandidate, kernel_candidates, refusal_summary, validate_candidate
from .layer import HyperVSavedStateLayer
from .plugin_requirements import SavedStateContents, SavedStateLayerRequirement, find_saved_state_layer

vollog = logging.getLogger(__name__)

__all__ = [
    "InfoPlugin",
    "MemmapPlugin",
    "PagingModePlugin",
    "RegistersPlugin",
    "find_saved_state_layer",
]


def _primary_requirement() -> SavedStateLayerRequirement:
    return SavedStateLayerRequirement(name="primary")


class _SavedStatePlugin:
    """Gives the plugin our layer; its requirements guarantee there is one (else vol fails before run)."""

    def _saved_state_layer(self) -> HyperVSavedStateLayer:
        context: interfaces.context.ContextInterface = self.context  # type: ignore[attr-defined]
        primary: str = self.config["primary"]  # type: ignore[attr-defined]
        layer = find_saved_state_layer(context, primary)
        if layer is None:  # only when a caller skipped the requirement checks
            raise exceptions.LayerException(primary, f"{primary} is not a Hyper-V saved-state layer")
        return layer


# ---------------------------------------------------------------------------------------------- info


#: A row of ``hyperv.info``: label, text, and the number behind the text (None when it is not a number).
InfoRow = tuple[str, str, int | None]
_SUMMARY_KEYS = {label: key for key, label in SUMMARY_LABELS}


def info_rows(layer: HyperVSavedStateLayer, top: str | None = None) -> Iterator[tuple[str, str]]:
    """``(variable, value)`` rows of ``hyperv.info``; reads no guest RAM (but page tables when the kernel
    DTB was scanned for: see :func:`info_table`)."""
    for label, text, _ in info_table(layer, top):
        yield label, text


def _scanned_windows_dtb(layer: HyperVSavedStateLayer, top: str | None) -> int | None:
    """The DTB of a Windows Intel layer Volatility's scan stacked on ours (``top``), if that is what happened."""
    if top is None or top not in layer.context.layers:
        return None
    above = layer.context.layers[top]
    if not isinstance(above, (intel.WindowsIntel, intel.WindowsIntelPAE, intel.WindowsIntel32e)):
        return None
    if layer.name not in getattr(above, "dependencies", []):
        return None
    dtb = above.config.get("page_map_offset", None)
    return dtb if isinstance(dtb, int) else None


def _windows_guest(provider: Any) -> bool:
    """VTL0's guest OS id says Windows NT (Microsoft, closed-source layout): the kernel DTB is worth a scan."""
    try:
        info = provider.get_guest_os_info(0) if provider.has_cpu_state() else None
    except VmssdError:
        return False
    return info is not None and info.os_family == "windows"


def _scan_windows_dtb(layer: HyperVSavedStateLayer) -> int | None:
    """What Volatility's own Windows DTB scan finds on our layer (hyperv.* runs skip the OS stackers)."""
    from volatility3.framework.automagic import windows as windows_automagic

    found = windows_automagic.WindowsIntelStacker.stack(layer.context, layer.name)
    dtb = found.config.get("page_map_offset", None) if found is not None else None
    return dtb if isinstance(dtb, int) else None


def _refusals(layer: HyperVSavedStateLayer) -> str:
    """Why no saved CR3 was used (the stacker's verdicts again: a few page-table walks)."""
    scratch = interfaces.configuration.path_join("IntelHelper", f"{layer.name}_info_check")
    refused: list[tuple[KernelCandidate, str]] = []
    for candidate in kernel_candidates(layer.provider):
        if candidate.reason is not None:
            refused.append((candidate, candidate.reason))
            continue
        kernel, why = validate_candidate(
            layer.context, layer.name, candidate, name=f"{layer.name}_info_check", config_path=scratch
        )
        if kernel is None:
            refused.append((candidate, why))
    return refusal_summary(refused)


def info_table(layer: HyperVSavedStateLayer, top: str | None = None) -> Iterator[InfoRow]:
    """``(variable, text, number)`` rows of ``hyperv.info``; the number is what ``-r json`` carries.

    The summary rows are the ones ``vmssd info`` prints (one label table, in the provider interface);
    the layer adds what only Volatility knows: the forced VTL and the kernel page table in use, and
    where it came from: a saved CR3, or Volatility's scan when ``top`` (the plugin's primary layer)
    is a Windows Intel layer found by scanning because no saved CR3 maps the kernel.
    """
    provider = layer.provider
    summary = provider.summary()
    rows = [(label, text, _number(summary, label)) for label, text in summary.rows()]
    findings = [row for row in rows if row[0] in ("Findings", "Finding")]
    yield from (row for row in rows if row[0] not in ("Findings", "Finding"))
    vtl = layer.config.get("vtl", None)
    if vtl is not None:
        yield "Forced VTL", str(vtl), int(vtl)
    meta = layer.metadata
    if meta.get("page_map_offset") is not None:
        vtl_used = meta.get("hyperv_kernel_vtl")
        yield (
            "Kernel DTB",
            f"{meta['page_map_offset']:#x} from the saved CR3 of VP {meta.get('hyperv_kernel_vp')}"
            + (f" VTL {vtl_used}" if vtl_used is not None else "")
            + f" ({meta.get('architecture')}{', PAE' if meta.get('pae') else ''}; validated)",
            format_hints.Hex(meta["page_map_offset"]),
        )
    elif _windows_guest(provider) or _scanned_windows_dtb(layer, top) is not None:
        scanned = _scanned_windows_dtb(layer, top)
        if scanned is None:
            scanned = _scan_windows_dtb(layer)
        why = f"no saved CR3 maps the kernel ({_refusals(layer)})"
        if scanned is None:
            yield "Kernel DTB", f"none: {why}, and Volatility's DTB scan found none", None
        else:
            yield "Kernel DTB", f"{scanned:#x}: {why}: Volatility's scan found {scanned:#x}", format_hints.Hex(scanned)
    config = find_vm_config(provider.paths)
    vmcx, settings = (None, ()) if config is None else (config.path, config.rows)
    if vmcx is not None:
        yield "VM configuration", str(vmcx), None
        for label, text in settings:
            yield label, text, None
    yield from findings


def _number(summary: Any, label: str) -> int | None:
    """The integer behind a summary row, if it has one (counts and sizes; not versions or names)."""
    if label == "Findings":
        return len(summary.findings)
    value = getattr(summary, _SUMMARY_KEYS.get(label, ""), None)
    if isinstance(value, dict):  # the replay log: its pending entries are what matters
        value = value.get("pending")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class InfoPlugin(_SavedStatePlugin):
    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [_primary_requirement()]

    def _generator(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        layer = self._saved_state_layer()
        na = renderers.NotApplicableValue()
        for variable, value, number in info_table(layer, self.config["primary"]):  # type: ignore[attr-defined]
            yield 0, (variable, value, na if number is None else number)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid([("Variable", str), ("Value", str), ("Number", int)], self._generator())


# ----------------------------------------------------------------------------------------- registers


def _register_cells(value: object) -> tuple[int, str]:
    if isinstance(value, SegmentRegister):
        return value.selector, f"base={value.base:#x} limit={value.limit:#x} attributes={value.attributes:#06x}"
    if isinstance(value, TableRegister):
        return value.base, f"limit={value.limit:#x}"
    if isinstance(value, int):
        return value, ""
    to_int = getattr(value, "to_int", None)
    return (to_int() if callable(to_int) else 0), str(value)


class RegistersPlugin(_SavedStatePlugin):
    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            _primary_requirement(),
            SavedStateContents(layer="primary", cpu_state=True, vp_option="vp"),
            requirements.IntRequirement(name="vp", description="Only this virtual processor", optional=True),
        ]

    def _generator(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        layer = self._saved_state_layer()
        provider = layer.provider
        only = self.config.get("vp", None)  # type: ignore[attr-defined]
        for vp in range(provider.vp_count()):
            if only is not None and vp != only:
                continue
            try:
                active = provider.get_active_virtual_trust_level(vp)
            except VmssdError:
                active = None
            for vtl in provider.get_virtual_trust_levels(vp):
                try:
                    bank = provider.get_registers(vp, vtl)
                except VmssdError as exc:
                    vollog.warning(f"VP {vp} VTL {vtl}: {exc}")
                    continue
                for name, value in bank.items():
                    number, details = _register_cells(value)
                    yield 0, (vp, vtl, vtl == active, name, format_hints.Hex(number), details)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [
                ("VP", int),
                ("VTL", int),
                ("Used", bool),  # the VTL analysis uses: "(used)" in vmssd registers and info, too
                ("Register", str),
                ("Value", format_hints.Hex),
                ("Details", str),
            ],
            self._generator(),
        )


# ---------------------------------------------------------------------------------------- pagingmode


class PagingModePlugin(_SavedStatePlugin):
    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [_primary_requirement(), SavedStateContents(layer="primary", cpu_state=True)]

    def _generator(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        layer = self._saved_state_layer()
        provider = layer.provider
        context: interfaces.context.ContextInterface = self.context  # type: ignore[attr-defined]
        # Trial layers are configured where upstream's Intel stackers put theirs, never added to the context.
        scratch = interfaces.configuration.path_join("IntelHelper", f"{layer.name}_cr3_check")
        na = renderers.NotApplicableValue()
        for candidate in kernel_candidates(provider):
            vp = candidate.vp
            try:
                used = provider.get_active_virtual_trust_level(vp)
                regs = provider.get_registers(vp, candidate.vtl)
                if candidate.vtl in (None, used):
                    arch, mode = provider.get_architecture(vp).name, provider.get_paging_mode(vp).name
                else:  # another saved VTL of the VP: read its own bank (x86 rules; the stacker is Intel only)
                    arch, mode = architecture(regs, None).name, paging_mode(regs, None).name
            except VmssdError as exc:
                yield 0, (vp, na, na, str(exc), na, na, na, na, na, "no", False)
                continue
            if candidate.levels:
                mode = f"{mode} ({candidate.levels}-level)"

            def reg(name: str, regs: dict[str, Any] = regs) -> Any:
                value = regs.get(name)
                return format_hints.Hex(value) if isinstance(value, int) else na

            if candidate.reason is not None:
                verdict = f"no: {candidate.reason}"
            else:
                kernel, why = validate_candidate(
                    context, layer.name, candidate, name=f"{layer.name}_cr3_check", config_path=scratch
                )
                verdict = f"yes: {why}" if kernel is not None else f"no: {why}"
            dtb = format_hints.Hex(candidate.dtb) if candidate.dtb is not None else na
            yield (
                0,
                (
                    vp,
                    candidate.vtl if candidate.vtl is not None else na,
                    arch,
                    mode,
                    reg("cr0"),
                    reg("cr3"),
                    reg("cr4"),
                    reg("efer"),
                    dtb,
                    verdict,
                    candidate.vtl == used,
                ),
            )

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [
                ("VP", int),
                ("VTL", int),
                ("Architecture", str),
                ("Paging mode", str),
                ("CR0", format_hints.Hex),
                ("CR3", format_hints.Hex),
                ("CR4", format_hints.Hex),
                ("EFER", format_hints.Hex),
                ("DTB", format_hints.Hex),
                ("Kernel page table", str),
                ("VTL used", bool),
            ],
            self._generator(),
        )


# -------------------------------------------------------------------------------------------- memmap


class MemmapPlugin(_SavedStatePlugin):
    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [_primary_requirement()]

    def _generator(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        layer = self._saved_state_layer()
        provider = layer.provider
        for rng in provider.memory_map():
            first, last, have = rng.first_ramblock, rng.last_ramblock, rng.ramblocks_present
            yield (
                0,
                (
                    format_hints.Hex(rng.gpa_start),
                    format_hints.Hex(rng.gpa_start + rng.size - 1),
                    format_hints.Hex(rng.size),
                    format_hints.Hex(rng.raw_offset),
                    first,
                    last,
                    f"{have}/{last - first + 1}",
                    "?" if rng.flags is None else " ".join(flag_names(rng.flags)),
                ),
            )

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [
                ("GPA start", format_hints.Hex),
                ("GPA end", format_hints.Hex),
                ("Size", format_hints.Hex),
                ("Raw offset", format_hints.Hex),
                ("First RamBlock", int),
                ("Last RamBlock", int),
                ("RamBlocks present", str),
                ("Flags", str),
            ],
            self._generator(),
        )
