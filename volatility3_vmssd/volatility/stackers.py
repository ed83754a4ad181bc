"""Stackers: recognise Hyper-V saved states under ``-f``, then use their saved CR3 for Windows.

``HyperVSavedStateStacker`` (order 15: after the cheap magic-based stackers, before VMware's and
long before the OS scanners) looks at the first bytes of a FileLayer only, so any other file costs
one 8-byte read.  It accepts a ``.vmrs`` with saved RAM, a legacy ``.bin`` (with its ``.vsv`` found
beside it, or given with ``--hyperv-vsv-location``) and a ``.vsv`` given with ``-f`` (its ``.bin``
found beside it), adding a second FileLayer for the partner as upstream's VMware stacker does.

``HyperVIntelStacker`` (order 30: before the Linux (34/35) and Windows (40) scanners) builds the
Windows Intel layer straight from a VP's saved CR3 when its tables prove a kernel DTB (the
self-reference and the kernel image, ``volatility/kernel.py``) and Volatility's own check accepts it,
and otherwise steps aside so the normal scanners run (a KVA-shadow user CR3 must not hide the kernel).
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import Any

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.layers import physical

from ..codecs import xpress
from ..files import evidence_location, find_partner, path_to_url, read_head, signature_kind
from ..sources import base_name, suffix
from .diagnose import vsv_problem
from .kernel import KernelCandidate, kernel_candidates, refusal_summary, validate_candidate
from .layer import HyperVSavedStateLayer, NoSavedMemoryError
from .options import option

vollog = logging.getLogger(__name__)

__all__ = ["HyperVIntelStacker", "HyperVSavedStateStacker"]


class _OnLayer(abc.ABC):
    """What our stackers share: Volatility's ``stack`` signature, declared once, and the one layer class
    (``on``) a stacker looks at; :meth:`stack_on` does the work.

    A mixin, not a ``StackerLayerInterface`` itself: Volatility runs every subclass of that interface.
    """

    on: type[interfaces.layers.DataLayerInterface]

    @classmethod
    def stack(
        cls,
        context: interfaces.context.ContextInterface,
        layer_name: str,
        progress_callback: constants.ProgressCallback = None,
    ) -> interfaces.layers.DataLayerInterface | None:
        base = context.layers[layer_name]
        return cls.stack_on(context, layer_name, base) if isinstance(base, cls.on) else None

    @classmethod
    @abc.abstractmethod
    def stack_on(
        cls, context: interfaces.context.ContextInterface, layer_name: str, base: Any
    ) -> interfaces.layers.DataLayerInterface | None:
        """The layer stacked on ``base`` (an instance of ``on``), or None to step aside."""


class HyperVSavedStateStacker(_OnLayer, interfaces.automagic.StackerLayerInterface):
    """Stacks HyperVSavedStateLayer on a .vmrs, a legacy .bin (+ .vsv) or a .vsv given with -f."""

    stack_order = 15
    exclusion_list: list[str] = []
    on = physical.FileLayer

    @classmethod
    def stack_on(
        cls, context: interfaces.context.ContextInterface, layer_name: str, base: physical.FileLayer
    ) -> interfaces.layers.DataLayerInterface | None:
        try:
            head = base.read(0, 8)
        except exceptions.InvalidAddressException:
            return None  # shorter than any header
        kind = signature_kind(head)
        path = evidence_location(base.location)
        if kind is None and not (path is not None and suffix(path).lower() == ".vsv"):
            return None
        if path is None or read_head(path) != head:
            vollog.warning(
                f"{base.location} looks like a Hyper-V saved state, but it is neither a plain local file nor an"
                " object URL we read (s3://, gs://, az://, http(s)://: docs/remote.md); it may be compressed and"
                " unpacked by Volatility on the fly: save it uncompressed and pass that path or URL with -f"
            )
            return None
        vtl = option(context, "hyperv_vtl")
        try:
            if kind == "bin":
                layer = cls._stack_bin(context, layer_name, path, vtl)
            elif kind == "storage":
                layer = cls._stack_storage(context, layer_name, path, vtl)
            else:  # an old-format .vsv (not HyperVStorage): its .bin still holds the memory
                layer = cls._stack_vsv(context, layer_name, path, vtl)
        except exceptions.LayerException as exc:  # the signature matched, so say why it is not used
            vollog.warning(f"{path} is a Hyper-V saved-state file but cannot be used: {exc}")
            return None
        if layer is not None and xpress.active_decoder() == "python":
            vollog.info("Hyper-V saved state: no native XPRESS decoder (libfwnt-python) is installed")
            cls.stacker_slow_warning()
        return layer

    # -- the three entry points ---------------------------------------------------------------------

    @classmethod
    def _stack_storage(
        cls, context: interfaces.context.ContextInterface, layer_name: str, path: Path | str, vtl: int | None
    ) -> HyperVSavedStateLayer | None:
        """A HyperVStorage file: a .vmrs with RAM, a modern .vsv, or something without memory.

        The layer itself finds out (opening the container once): a probe first would index a large
        .vmrs twice for nothing.
        """
        try:
            layer = cls._build(context, layer_name, None, vtl)
        except NoSavedMemoryError as exc:
            if exc.has_ram_map or suffix(path).lower() == ".vsv":
                return cls._stack_vsv(context, layer_name, path, vtl)
            vollog.warning(f"{path}: {exc.explanation}")
            return None
        vollog.log(constants.LOGLEVEL_VV, f"HyperVSavedStateStacker: {base_name(path)} is a .vmrs with saved RAM")
        return layer

    @classmethod
    def _stack_bin(
        cls, context: interfaces.context.ContextInterface, layer_name: str, path: Path | str, vtl: int | None
    ) -> HyperVSavedStateLayer | None:
        """A legacy .bin: its .vsv from --hyperv-vsv-location, or beside it; else memory only."""
        override = option(context, "hyperv_vsv_location")
        vsv: Path | str | None = None
        if override:
            vsv = evidence_location(override)
            problem = f"{override} is not a file we can read" if vsv is None else vsv_problem(path, vsv)
            if problem is not None:  # named explicitly: refuse it rather than read the .bin without CPU state
                vollog.error(f"--hyperv-vsv-location: {problem}; {base_name(path)} is not read")
                return None
        else:
            vsv, looked = find_partner(path, [".vsv"])
            if vsv is None:
                vollog.warning(
                    f"No .vsv found for the legacy Hyper-V memory file {path}: looked for"
                    f" {', '.join(str(p) for p in looked)} (extension in any case). Without it there is no CPU"
                    " state and the RAM is read as one range from GPA 0 (memory only). Put the .vsv beside the"
                    " .bin with the same base name, or pass --hyperv-vsv-location."
                )
        if vsv is not None:
            vollog.log(constants.LOGLEVEL_VV, f"HyperVSavedStateStacker: {base_name(path)} with its .vsv {vsv}")
            vsv_layer = cls._add_file_layer(context, vsv, "HyperVVsvLayer")
            if vsv_layer is not None:
                try:
                    return cls._build(context, layer_name, vsv_layer, vtl)
                except exceptions.LayerException as exc:
                    vollog.warning(f"{vsv} cannot be used ({exc}); reading {base_name(path)} alone (memory only)")
        return cls._build(context, layer_name, None, vtl)

    @classmethod
    def _stack_vsv(
        cls, context: interfaces.context.ContextInterface, layer_name: str, path: Path | str, vtl: int | None
    ) -> HyperVSavedStateLayer | None:
        """A .vsv given with -f: the memory is in the .bin beside it."""
        bin_path, looked = find_partner(path, [".bin"])
        if bin_path is not None and signature_kind(read_head(bin_path)) != "bin":
            vollog.warning(f"{bin_path} is not a legacy Hyper-V .bin (wrong signature); ignoring it")
            bin_path = None
        if bin_path is None:
            vollog.warning(
                f"{path} is the .vsv (CPU state) of a legacy Hyper-V saved state; the memory is in its .bin, but"
                f" none was found: looked for {', '.join(str(p) for p in looked)} (extension in any case). Put"
                " the .bin beside the .vsv with the same base name, or pass the .bin with -f"
                " (and this file with --hyperv-vsv-location)."
            )
            return None
        vollog.log(constants.LOGLEVEL_VV, f"HyperVSavedStateStacker: {base_name(path)} with its .bin {bin_path}")
        bin_layer = cls._add_file_layer(context, bin_path, "HyperVBinLayer")
        if bin_layer is None:
            return None
        return cls._build(context, bin_layer, layer_name, vtl)

    # -- helpers ------------------------------------------------------------------------------------

    @staticmethod
    def _add_file_layer(context: interfaces.context.ContextInterface, path: Path | str, prefix: str) -> str | None:
        """A FileLayer for a partner file, configured by URL so that the stack can be rebuilt."""
        name = context.layers.free_layer_name(prefix)
        config_path = interfaces.configuration.path_join("automagic", "layer_stacker", "stack", name)
        context.config[interfaces.configuration.path_join(config_path, "location")] = path_to_url(path)
        try:
            context.layers.add_layer(physical.FileLayer(context, config_path, name))
        except OSError as exc:
            vollog.warning(f"cannot open {path}: {exc}")
            return None
        return name

    @staticmethod
    def _build(
        context: interfaces.context.ContextInterface, memory_layer: str, vsv_layer: str | None, vtl: int | None
    ) -> HyperVSavedStateLayer:
        name = context.layers.free_layer_name("HyperVSavedStateLayer")
        config_path = interfaces.configuration.path_join("automagic", "layer_stacker", "stack", name)
        backend = option(context, "hyperv_backend")
        values = {
            "base_layer": memory_layer,
            "vsv_layer": vsv_layer,
            "vtl": None if vtl is None else int(vtl),
            "backend": None if backend in (None, "native") else str(backend),
        }
        for key, value in values.items():
            full = interfaces.configuration.path_join(config_path, key)
            if value is not None:
                context.config[full] = value
            elif full in context.config:  # left over from an attempt that failed under the same name
                del context.config[full]
        return HyperVSavedStateLayer(context, config_path, name)


class HyperVIntelStacker(_OnLayer, interfaces.automagic.StackerLayerInterface):
    """Builds the Windows Intel layer from a saved CR3 whose tables prove a Windows kernel DTB."""

    stack_order = 30
    exclusion_list = ["linux", "mac"]
    on = HyperVSavedStateLayer

    @classmethod
    def stack_on(
        cls, context: interfaces.context.ContextInterface, layer_name: str, base: HyperVSavedStateLayer
    ) -> interfaces.layers.DataLayerInterface | None:
        tried: set[tuple[int, type]] = set()
        refused: list[tuple[KernelCandidate, str]] = []
        candidates = kernel_candidates(base.provider)
        five_level = [c.vp for c in candidates if c.levels == 5]
        if five_level:
            vollog.warning(
                f"VP(s) {', '.join(map(str, five_level))} use 5-level paging (CR4.LA57); Volatility 3 cannot walk"
                " 5-level page tables, so their saved CR3 is not used"
            )
        for candidate in candidates:
            if candidate.reason is not None:
                refused.append((candidate, candidate.reason))
                vollog.log(
                    constants.LOGLEVEL_VVV,
                    f"HyperVIntelStacker: VP {candidate.vp}: saved CR3 not usable: {candidate.reason}",
                )
                continue
            assert candidate.dtb is not None and candidate.layer_class is not None
            key = (candidate.dtb, candidate.layer_class)
            if key in tried:
                continue
            tried.add(key)
            layer, why = validate_candidate(context, layer_name, candidate)
            if layer is None:
                refused.append((candidate, why))
                vollog.log(
                    constants.LOGLEVEL_VVV,
                    f"HyperVIntelStacker: VP {candidate.vp} VTL {candidate.vtl} CR3 {candidate.cr3:#x}"
                    f" (DTB {candidate.dtb:#x}, {candidate.layer_class.__name__}): {why}",
                )
                continue
            base.set_kernel_page_table(
                vp=candidate.vp,
                vtl=candidate.vtl,
                dtb=candidate.dtb,
                architecture=candidate.architecture or "Intel64",
                pae=candidate.pae,
            )
            vollog.log(
                constants.LOGLEVEL_VV,
                f"HyperVIntelStacker: using VP {candidate.vp} VTL {candidate.vtl} CR3 {candidate.cr3:#x}: DTB"
                f" {candidate.dtb:#x} for {candidate.layer_class.__name__} ({why}); no DTB scan needed",
            )
            return layer
        vollog.log(
            constants.LOGLEVEL_VV,
            f"HyperVIntelStacker: no saved CR3 maps the kernel ({refusal_summary(refused)}); leaving it to the"
            " scanners",
        )
        return None
