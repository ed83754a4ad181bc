"""Guest-physical memory of a Hyper-V saved state as a Volatility 3 layer.

The layer sits on the FileLayer of the memory file (a ``.vmrs``, or the ``.bin`` of a legacy pair,
plus an optional second FileLayer for the ``.vsv``) and serves reads through
:class:`~volatility3_vmssd.interface.SavedState` (either backend), which keeps decoded 1 MiB blocks in an LRU.
It is deliberately *not* a ``LinearlyMappedLayer``: scanners would then read the file underneath
directly and see compressed page records.

Volatility rebuilds layers from their configuration alone (stacking runs in a cloned context), so
everything the layer needs is a requirement: the file layers, the forced VTL, and the kernel page
table the Intel stacker validated.  No open handle is pickled; the provider reopens lazily.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from volatility3.framework import constants, exceptions, interfaces
from volatility3.framework.configuration import requirements

from ..errors import UnmappedAddressError, VmssdError
from ..files import evidence_location, signature_kind
from ..interface import SavedState
from ..provider import open_saved_state
from .options import option

vollog = logging.getLogger(__name__)

__all__ = ["HyperVSavedStateLayer", "NoSavedMemoryError"]

#: Reads up to this size go through a small per-layer LRU: page-table walks and structure reads
#: repeat the same few bytes many times, and a cache hit is far cheaper than a provider lookup.
SMALL_READ = 0x1000
SMALL_READ_CACHE = 4096


class NoSavedMemoryError(exceptions.LayerException):
    """The file is a HyperVStorage container without RamBlocks: a .vmcx, a runtime-state .vmrs or a .vsv.

    ``has_ram_map`` tells a ``.vsv`` (RAM map, memory elsewhere) from a file with no memory at all;
    ``explanation`` says what the file is and what to collect instead.
    """

    def __init__(self, layer_name: str, has_ram_map: bool, explanation: str) -> None:
        super().__init__(layer_name, explanation)
        self.has_ram_map = has_ram_map
        self.explanation = explanation


_WARNED: set[tuple[str, ...]] = set()  # layers are rebuilt several times per run: warn once per file set


def _warn_if_damaged(provider: SavedState) -> None:
    """Say once, at normal verbosity, that a saved state lacks RAM: plugins would otherwise just find less."""
    damage = provider.ramblock_damage()
    key = tuple(provider.paths)
    if not damage.missing or key in _WARNED:
        return
    _WARNED.add(key)
    parts = [f"{n} absent" for n in [damage.absent] if n] + [
        f"{n} cut short by the end of the file" for n in [damage.cut] if n
    ]
    vollog.warning(
        f"{' + '.join(provider.paths)} is truncated or damaged: {damage.missing} of the {damage.used} RamBlocks"
        f" (1 MiB each) its RAM map uses are missing ({', '.join(parts)}): up to {damage.missing} MiB of guest RAM"
        " cannot be read, so results may be incomplete ('vmssd convert' lists the exact ranges)"
    )


_LAYERS = (
    ("base_layer", False, "The memory file: a .vmrs or a legacy .bin"),
    ("vsv_layer", True, "The .vsv of a legacy pair (CPU state and RAM map)"),
)
"""The layers the saved state is read from: (name, optional, description)."""
_OPTIONS: tuple[tuple[str, type[interfaces.configuration.RequirementInterface], str], ...] = (
    ("vtl", requirements.IntRequirement, "Force this virtual trust level on every VP"),
    ("backend", requirements.StringRequirement, "Provider backend: native (default), dll or auto"),
    ("page_map_offset", requirements.IntRequirement, "Kernel DTB validated from a saved CR3"),
    ("kernel_architecture", requirements.StringRequirement, "Intel32 or Intel64 (with page_map_offset)"),
    ("kernel_pae", requirements.BooleanRequirement, "PAE paging (with page_map_offset)"),
    ("kernel_vp", requirements.IntRequirement, "The VP whose CR3 gave page_map_offset"),
    ("kernel_vtl", requirements.IntRequirement, "The VTL of that VP whose CR3 gave page_map_offset"),
)
"""The layer's optional settings: (name, requirement class, description)."""


class HyperVSavedStateLayer(interfaces.layers.TranslationLayerInterface):
    """Guest-physical memory of a Hyper-V saved state (.vmrs, or a legacy .bin with its .vsv)."""

    _version = (1, 0, 0)

    def __init__(
        self,
        context: interfaces.context.ContextInterface,
        config_path: str,
        name: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._base_layer: str = self.config["base_layer"]
        self._vsv_layer: str | None = self.config.get("vsv_layer", None)
        self._lock = threading.Lock()
        self._provider: SavedState | None = None
        self._small: Callable[[int, int, bool], bytes] | None = None
        provider = self.provider  # open now: a file without saved RAM must fail stacking here
        bounds = provider.gpa_bounds() if provider.has_saved_memory() else None
        if bounds is None:
            has_map, why = bool(provider.memory_map()), provider.memory_absence() or "no saved guest memory"
            provider.close()
            self._provider = None
            raise NoSavedMemoryError(name, has_map, why)
        self._minimum, self._maximum = bounds
        _warn_if_damaged(provider)
        self._metadata.update(
            {
                "hyperv_file_kind": provider.kind,
                "hyperv_vp_count": provider.vp_count(),
            }
        )
        dtb = self.config.get("page_map_offset", None)
        if dtb is not None:
            self._metadata.update(self._kernel_metadata())

    # ------------------------------------------------------------------ configuration
    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        layers = [
            requirements.TranslationLayerRequirement(name=name, optional=optional, description=text)
            for name, optional, text in _LAYERS
        ]
        return layers + [kind(name=name, optional=True, description=text) for name, kind, text in _OPTIONS]

    def _kernel_metadata(self) -> dict[str, Any]:
        return {
            "os": "Windows",
            "architecture": self.config.get("kernel_architecture", None) or "Intel64",
            "pae": bool(self.config.get("kernel_pae", False)),
            "page_map_offset": self.config["page_map_offset"],
            "hyperv_kernel_vp": self.config.get("kernel_vp", None),
            "hyperv_kernel_vtl": self.config.get("kernel_vtl", None),
        }

    def set_kernel_page_table(self, *, vp: int, vtl: int | None, dtb: int, architecture: str, pae: bool) -> None:
        """Record a validated kernel DTB in the config (so it survives reconstruction) and publish it.

        Publishing ``os``/``architecture``/``pae``/``page_map_offset`` lets upstream's
        WindowsIntelStacker take its metadata fast path too (when ours is filtered out by
        ``--stackers``), and tells plugins such as ``windows.info`` whether the kernel uses PAE.
        """
        values = {
            "page_map_offset": dtb,
            "kernel_architecture": architecture,
            "kernel_pae": pae,
            "kernel_vp": vp,
            "kernel_vtl": vtl,
        }
        for key, value in values.items():
            if value is None:
                continue
            self.context.config[interfaces.configuration.path_join(self.config_path, key)] = value
        self.config_path = self.config_path  # the setter drops the cached copy of our config branch
        self._metadata.update(self._kernel_metadata())

    # ------------------------------------------------------------------ the provider
    def _file_path(self, layer_name: str) -> str:
        layer = self.context.layers[layer_name]
        location = getattr(layer, "location", None)
        path = evidence_location(location) if isinstance(location, str) else None
        if path is None:
            raise exceptions.LayerException(
                self.name, f"layer {layer_name} is neither a local file nor a URL we read ({location!r})"
            )
        return str(path)

    def _open(self) -> SavedState:
        memory_path = self._file_path(self._base_layer)
        vsv_path = self._file_path(self._vsv_layer) if self._vsv_layer else None
        head = self.context.layers[self._base_layer].read(0, 8, pad=True)
        if signature_kind(head) is None:
            raise exceptions.LayerException(self.name, f"{memory_path} is not a Hyper-V saved-state file")
        try:
            # The stacker already chose the partner (or chose none): the layer never looks for one.
            # --hyperv-cache-blocks is global, so that stacking's cloned context bounds its copy too.
            limit = option(self.context, "hyperv_cache_blocks")
            cache: dict[str, int] = {} if limit is None else {"cache_limit": int(limit)}
            provider = open_saved_state(
                memory_path,
                vsv=vsv_path,
                partner=False,
                backend=self.config.get("backend", None) or "native",
                **cache,
            )
        except (OSError, VmssdError) as exc:
            raise exceptions.LayerException(self.name, f"cannot open {memory_path}: {exc}") from exc
        vtl = self.config.get("vtl", None)
        if vtl is not None:
            try:
                for vp in range(provider.vp_count()):
                    provider.force_active_virtual_trust_level(vp, vtl)
            except (ValueError, VmssdError) as exc:
                provider.close()
                raise exceptions.LayerException(self.name, f"cannot force VTL {vtl}: {exc}") from exc
        vollog.log(constants.LOGLEVEL_VVVV, f"{self.name}: opened {provider.kind} {provider.paths}")
        return provider

    @property
    def provider(self) -> SavedState:
        """The opened saved state (reopened on first use after unpickling)."""
        provider = self._provider
        if provider is None:
            with self._lock:
                if self._provider is None:
                    self._provider = self._open()
                provider = self._provider
        return provider

    def destroy(self) -> None:
        with self._lock:
            if self._provider is not None:
                self._provider.close()
                self._provider = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_provider"] = None
        state["_small"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ layer interface
    @property
    def dependencies(self) -> list[str]:
        return [self._base_layer] + ([self._vsv_layer] if self._vsv_layer else [])

    @property
    def minimum_address(self) -> int:
        return self._minimum

    @property
    def maximum_address(self) -> int:
        """The last backed guest-physical byte (inclusive), as layerwriter expects."""
        return self._maximum

    def is_valid(self, offset: int, length: int = 1) -> bool:
        """Whether every byte is backed by saved RAM; consults the index only, reads nothing."""
        if length <= 0:
            raise ValueError("Length must be positive")
        return self.provider.is_backed(offset, length)

    def mapping(
        self, offset: int, length: int, ignore_errors: bool = False
    ) -> Iterable[tuple[int, int, int, int, str]]:
        """One ``(gpa, length, raw offset, length, base layer)`` per contiguous backed run.

        The mapped offset is the run's offset in *raw saved memory* (the DLL's term): informational,
        as for upstream's compressed layers; data must be read through this layer.
        """
        if length <= 0:
            return
        pos = offset
        for gpa, raw, size in self.provider.backed_runs(offset, length):
            if gpa > pos and not ignore_errors:
                raise exceptions.InvalidAddressException(self.name, pos, f"GPA {pos:#x} is not backed by saved RAM")
            yield gpa, size, raw, size, self._base_layer
            pos = gpa + size
        if pos < offset + length and not ignore_errors:
            raise exceptions.InvalidAddressException(self.name, pos, f"GPA {pos:#x} is not backed by saved RAM")

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        """Guest-physical bytes; holes raise InvalidAddressException, or read as zeros with ``pad``.

        Whole ranges go to the provider in one call (it walks its RAM map and decoded-block cache),
        so a 16 MiB scanner chunk or a 5 MiB layerwriter block costs one call, not 4096.
        """
        if length <= 0:
            if length < 0:
                raise ValueError("Length must not be negative")
            return b""
        if length <= SMALL_READ:
            small = self._small
            if small is None:
                small = self._small = functools.lru_cache(maxsize=SMALL_READ_CACHE)(self._read)
            return small(offset, length, pad)
        return self._read(offset, length, pad)

    def _read(self, offset: int, length: int, pad: bool) -> bytes:
        provider = self.provider
        if offset < 0:
            if not pad:
                raise exceptions.InvalidAddressException(self.name, offset, "negative guest-physical address")
            head = min(-offset, length)
            return bytes(head) + (self._read(0, length - head, True) if length > head else b"")
        if pad:
            return provider.read_guest_physical_address_padded(offset, length)
        try:
            data = provider.read_guest_physical_address(offset, length)
        except UnmappedAddressError as exc:
            raise exceptions.InvalidAddressException(self.name, offset, str(exc)) from None
        except VmssdError as exc:  # a missing RamBlock or a page that does not decode
            raise exceptions.InvalidAddressException(self.name, offset, str(exc)) from None
        if len(data) < length:
            bad = offset + len(data)
            raise exceptions.InvalidAddressException(
                self.name, bad, f"GPA {bad:#x} is not backed by saved RAM (read of {length:#x} at {offset:#x})"
            )
        return data

    def write(self, offset: int, data: bytes) -> None:
        """Saved states are evidence: the layer is read-only."""
        raise exceptions.LayerException(self.name, "Hyper-V saved-state layers are read-only")
