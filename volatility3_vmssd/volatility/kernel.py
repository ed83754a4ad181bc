"""Kernel page tables from saved CR3 values, accepted only when the tables prove they are Windows' kernel's.

A saved state holds every VP's CR3 and paging mode, so a Windows kernel layer can be built without
scanning for self-referential page-map pages.  The saved CR3 is whatever the VP was running with: a
process DTB (fine: Windows maps the kernel in every process), but also a KVA-shadow *user* CR3 (the
user half and KUSER_SHARED_DATA, no kernel image), a Linux task's tables, VTL1's secure kernel, or
5-level tables Volatility cannot walk.  So each candidate must pass ``cpu/kernel_dtb.py``'s proof
(the self-referencing entry and the NT kernel image reachable through it, docs/windows.md) and then
Volatility's own ``Intel64LayerCheck``/``Intel32LayerCheck`` before anything is published; when none
does, the stacker steps aside and Volatility's DTB scan runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.automagic import windows as windows_automagic
from volatility3.framework.layers import intel

from ..cpu.cpumode import paging_levels
from ..cpu.kernel_dtb import KernelDtbVerdict, check_kernel_dtb, register_hints
from ..errors import VmssdError
from ..interface import SavedState

vollog = logging.getLogger(__name__)

__all__ = [
    "KernelCandidate",
    "build_kernel_layer",
    "kernel_candidates",
    "prove_candidate",
    "refusal_summary",
    "validate_candidate",
]

#: CR3 address bits per paging mode; the low bits hold PCID (long mode) or PWT/PCD flags.
LONG_MODE_CR3_MASK = 0x000F_FFFF_FFFF_F000
PAE_CR3_MASK = 0xFFFF_FFE0
BIT32_CR3_MASK = 0xFFFF_F000


#: (code addresses, IDT bases) in the kernel, from the saved registers
Hints = tuple[tuple[int, ...], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class KernelCandidate:
    """What one VP's saved state says about its page tables; ``reason`` is set when it is unusable."""

    vp: int
    vtl: int | None = None
    levels: int = 0
    cr3: int | None = None
    dtb: int | None = None
    layer_class: type[intel.Intel] | None = None
    check: type[windows_automagic.Intel32LayerCheck] | None = None
    architecture: str | None = None
    pae: bool = False
    reason: str | None = None
    #: kernel addresses from every saved bank (code addresses, IDT bases): where the kernel image is sought
    hints: Hints = ((), ())
    #: the VP was saved in user mode (CPL 3), where a KVA-shadow CR3 is expected
    user_mode: bool = False


#: page-table depth -> (CR3 mask, layer class, Volatility's check, architecture, PAE)
_LAYOUTS: dict[int, tuple[int, type[intel.Intel], type[windows_automagic.Intel32LayerCheck], str, bool]] = {
    4: (LONG_MODE_CR3_MASK, intel.WindowsIntel32e, windows_automagic.Intel64LayerCheck, "Intel64", False),
    3: (PAE_CR3_MASK, intel.WindowsIntelPAE, windows_automagic.Intel32LayerCheck, "Intel32", True),
    2: (BIT32_CR3_MASK, intel.WindowsIntel, windows_automagic.Intel32LayerCheck, "Intel32", False),
}


def _user_mode(regs: dict[str, Any]) -> bool:
    """Saved at CPL 3 (the saved CPL, else CS's RPL): where Windows runs on a KVA-shadow table."""
    cpl = regs.get("cpl")
    if isinstance(cpl, int) and cpl:
        return cpl == 3
    selector = getattr(regs.get("cs"), "selector", None)
    return isinstance(selector, int) and selector & 3 == 3


def _candidate(vp: int, vtl: int, regs: dict[str, Any], hints: Hints) -> KernelCandidate:
    """What one register bank says about its page tables (x86 only: Volatility's Windows layers are Intel)."""
    levels = paging_levels(regs)
    cr3 = regs.get("cr3")
    user = _user_mode(regs)
    if not isinstance(cr3, int):
        return KernelCandidate(vp, vtl, levels, reason="no CR3 saved", user_mode=user)
    if levels == 5:
        return KernelCandidate(
            vp,
            vtl,
            levels,
            cr3,
            reason="5-level paging (CR4.LA57): Volatility 3 has no 5-level Intel layer",
            user_mode=user,
        )
    layout = _LAYOUTS.get(levels)
    if layout is None:
        return KernelCandidate(
            vp, vtl, levels, cr3, reason="paging is off (or not an x86 register bank)", user_mode=user
        )
    mask, layer_class, check, arch, pae = layout
    return KernelCandidate(vp, vtl, levels, cr3, cr3 & mask, layer_class, check, arch, pae, None, hints, user)


def kernel_candidates(provider: SavedState) -> list[KernelCandidate]:
    """One candidate per VP and per VTL whose registers were saved: every VP's VTL0 first, then higher VTLs.

    The saved state does not say which VTL was executing (``docs/format.md``, "Which VTL is analysed"),
    so each saved bank is a candidate; a VTL forced on a VP (``--hyperv-vtl``) is that VP's only one.
    """
    banks: list[tuple[int, int]] = []  # (VTL, VP): sorted, every VP's VTL0 comes first
    out: list[KernelCandidate] = []
    for vp in range(provider.vp_count()):
        try:
            vtls = (
                [provider.get_active_virtual_trust_level(vp)]
                if provider.is_active_virtual_trust_level_forced(vp)
                else provider.get_virtual_trust_levels(vp)
            )
        except VmssdError as exc:
            out.append(KernelCandidate(vp, reason=str(exc)))
            continue
        if not vtls:
            out.append(KernelCandidate(vp, reason="no registers saved for any VTL"))
        banks.extend((vtl, vp) for vtl in vtls)
    saved: list[tuple[int, int, dict[str, Any]]] = []
    for vtl, vp in sorted(banks):
        try:
            saved.append((vp, vtl, provider.get_registers(vp, vtl)))
        except VmssdError as exc:
            out.append(KernelCandidate(vp, vtl, reason=str(exc)))
    # LSTAR and the IDT are the same on every VP, and one VP in the kernel is enough: hints come from all banks
    code, idts = register_hints(regs for _, vtl, regs in saved if vtl == 0)
    higher = register_hints(regs for _, vtl, regs in saved if vtl != 0)
    for vp, vtl, regs in saved:
        hints = (tuple(code), tuple(idts)) if vtl == 0 else (tuple(higher[0]), tuple(higher[1]))
        out.append(_candidate(vp, vtl, regs, hints))
    return out


def build_kernel_layer(
    context: interfaces.context.ContextInterface,
    memory_layer: str,
    candidate: KernelCandidate,
    *,
    name: str | None = None,
    config_path: str | None = None,
) -> intel.Intel:
    """A Windows Intel layer over ``memory_layer`` with the candidate's DTB (not added to the context).

    The configuration is exactly what upstream's WindowsIntelStacker writes (``memory_layer`` and
    ``page_map_offset`` under ``IntelHelper``), so reconstruction and ``--save-config`` are unchanged.
    """
    assert candidate.layer_class is not None and candidate.dtb is not None
    name = name or context.layers.free_layer_name("IntelLayer")
    config_path = config_path or interfaces.configuration.path_join("IntelHelper", name)
    context.config[interfaces.configuration.path_join(config_path, "memory_layer")] = memory_layer
    context.config[interfaces.configuration.path_join(config_path, "page_map_offset")] = candidate.dtb
    return candidate.layer_class(context, config_path=config_path, name=name, metadata={"os": "Windows"})


def prove_candidate(
    context: interfaces.context.ContextInterface, memory_layer: str, candidate: KernelCandidate
) -> KernelDtbVerdict:
    """The page-table proof of ``cpu/kernel_dtb.py`` for one candidate, reading the saved RAM below us."""
    layer = context.layers[memory_layer]

    def read(address: int, length: int) -> bytes | None:
        try:
            return layer.read(address, length)
        except exceptions.InvalidAddressException:
            return None

    assert candidate.dtb is not None
    return check_kernel_dtb(read, candidate.dtb, candidate.levels, *candidate.hints)


def refusal_summary(refused: list[tuple[KernelCandidate, str]]) -> str:
    """Why no saved CR3 was used, in a few words: the common KVA-shadow case by name, else each bank's reason."""
    low = [(c, why) for c, why in refused if c.vtl in (0, None)]
    if low and all(c.user_mode and "no PML4 entry points back" in why for c, why in low):
        return "user-mode shadow tables on every VP"
    parts = [f"VP {c.vp}" + (f" VTL {c.vtl}" if c.vtl is not None else "") + f": {why}" for c, why in refused]
    return "; ".join(parts) if parts else "no VP has a saved CR3"


def validate_candidate(
    context: interfaces.context.ContextInterface,
    memory_layer: str,
    candidate: KernelCandidate,
    *,
    name: str | None = None,
    config_path: str | None = None,
) -> tuple[intel.Intel | None, str]:
    """``(layer, why)``: the Intel layer if the candidate proves a kernel DTB and passes Volatility's Windows
    check, else None."""
    if candidate.reason is not None or candidate.check is None or candidate.dtb is None:
        return None, candidate.reason or "no usable CR3"
    check_name = candidate.check.__name__
    if not context.layers[memory_layer].is_valid(candidate.dtb, 32 if candidate.pae else 0x1000):
        return None, f"DTB {candidate.dtb:#x} is not backed by saved RAM"
    verdict = prove_candidate(context, memory_layer, candidate)
    if not verdict.ok:
        return None, verdict.reason
    layer = build_kernel_layer(context, memory_layer, candidate, name=name, config_path=config_path)
    try:
        ok = bool(candidate.check.check(layer))
    except Exception as exc:  # the check walks guest page tables: anything may be garbage
        vollog.log(constants.LOGLEVEL_VVVV, f"VP {candidate.vp}: {check_name} raised {exc!r}")
        ok = False
    if not ok:
        return None, f"{check_name} failed: KUSER_SHARED_DATA is not mapped as in a Windows kernel"
    return layer, f"{verdict.reason}; {check_name} passed"
