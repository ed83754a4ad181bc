"""What the ``hyperv.*`` plugins require, checked the way Volatility checks requirements.

Volatility fails a plugin (one "Unsatisfied requirement PATH: DESCRIPTION" line, exit code 1) when a
requirement is not met before it runs; a plugin that starts and then finds nothing to show exits 0.
So every precondition of our plugins is a requirement: a layer that is (or sits on) a
``HyperVSavedStateLayer``, CPU state where registers are shown, a ``--vp`` that exists.  An unmet one
is returned with the reason as its description, so the line Volatility prints says *why*.

:class:`HyperVPluginStackers` keeps ``hyperv.*`` runs fast: these plugins need only the saved-state
layer, so for them the layer stacker runs our two stackers instead of every OS scanner (plain
configuration, set before the stacker runs; nothing in Volatility is patched).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from typing import Any

from volatility3.framework import constants, interfaces
from volatility3.framework.configuration import requirements

from ..files import url_to_path
from .diagnose import vsv_problem, why_not_a_saved_state
from .layer import HyperVSavedStateLayer
from .options import LOCATION_PATH, Context, HyperVAutomagic, Requirement, option

vollog = logging.getLogger(__name__)

__all__ = [
    "HyperVPluginStackers",
    "SavedStateContents",
    "SavedStateLayerRequirement",
    "find_saved_state_layer",
    "input_location",
]

#: The stackers a ``hyperv.*`` plugin needs: the saved-state layer and the saved-CR3 Intel layer.
PLUGIN_STACKERS = ("HyperVSavedStateStacker", "HyperVIntelStacker")
STACKERS_PATH = interfaces.configuration.path_join(constants.AUTOMAGIC_CONFIG_PATH, "LayerStacker", "stackers")


def find_saved_state_layer(
    context: interfaces.context.ContextInterface, layer_name: str
) -> HyperVSavedStateLayer | None:
    """Our layer at or below ``layer_name`` (breadth first through ``dependencies``).

    The ``primary`` requirement may be satisfied by an Intel layer stacked on top of ours, and a
    context may hold several stacks, so walk down from the one the plugin was given.
    """
    queue, seen = [layer_name], set()
    while queue:
        name = queue.pop(0)
        if name in seen or name not in context.layers:
            continue
        seen.add(name)
        layer = context.layers[name]
        if isinstance(layer, HyperVSavedStateLayer):
            return layer
        queue.extend(getattr(layer, "dependencies", []))
    return None


def input_location(context: interfaces.context.ContextInterface, layer_name: str) -> str | None:
    """The location (URL) of the file under a layer, or None."""
    queue = [layer_name]
    while queue:
        name = queue.pop(0)
        if name not in context.layers:
            continue
        location = getattr(context.layers[name], "location", None)
        if isinstance(location, str):
            return location
        queue.extend(getattr(context.layers[name], "dependencies", []))
    return None


def _unmet(requirement: interfaces.configuration.RequirementInterface, path: str, why: str) -> dict[str, Any]:
    """``{path: a copy of requirement described by why}``: what Volatility prints as the reason."""
    shown = copy.copy(requirement)
    shown._description = why  # the description is the text vol prints for an unsatisfied requirement
    return {path: shown}


def _explain_location(context: interfaces.context.ContextInterface, location: str | None) -> str:
    local = url_to_path(location) if location else None
    if local is None:
        return f"{location} is not a local file" if location else "no file given (use -f)"
    override = option(context, "hyperv_vsv_location")
    vsv = url_to_path(override) if override else None
    if override and local.suffix.lower() != ".vsv":
        problem = f"{override} is not a local file" if vsv is None else vsv_problem(local, vsv)
        if problem is not None:
            return f"--hyperv-vsv-location: {problem}"
    return why_not_a_saved_state(local)


class SavedStateLayerRequirement(requirements.TranslationLayerRequirement):
    """A translation layer that is, or sits on, a Hyper-V saved state."""

    def __init__(self, name: str = "primary", **kwargs: Any) -> None:
        kwargs.setdefault("description", "Memory layer of the Hyper-V saved state")
        super().__init__(name, **kwargs)

    def unsatisfied(self, context: interfaces.context.ContextInterface, config_path: str) -> dict[str, Any]:
        path = interfaces.configuration.path_join(config_path, self.name)
        layer_name = self.config_value(context, path, None)
        unmet = super().unsatisfied(context, config_path)
        if unmet:
            if isinstance(layer_name, str) and layer_name in context.layers:
                return unmet  # the base class's own reason (OS or architecture)
            return _unmet(self, path, _explain_location(context, context.config.get(LOCATION_PATH, None)))
        if not isinstance(layer_name, str):
            return {}  # optional and not given
        if find_saved_state_layer(context, layer_name) is None:
            return _unmet(self, path, _explain_location(context, input_location(context, layer_name)))
        return {}


class SavedStateContents(interfaces.configuration.RequirementInterface):
    """What the saved state under the sibling ``layer`` requirement must hold for the plugin to run.

    With ``cpu_state`` it must have registers; with ``vp_option`` the plugin's integer option of that
    name (optional, so Volatility never checks it) must name an existing VP.  Not an option itself:
    vol's command line skips requirement types it does not know.
    """

    def __init__(
        self, name: str = "saved_state", *, layer: str = "primary", cpu_state: bool = False, vp_option: str = ""
    ) -> None:
        super().__init__(name, description="What the Hyper-V saved state holds", optional=False)
        self.layer = layer
        self.cpu_state = cpu_state
        self.vp_option = vp_option

    def unsatisfied(self, context: interfaces.context.ContextInterface, config_path: str) -> dict[str, Any]:
        path = interfaces.configuration.path_join(config_path, self.name)
        layer_name = context.config.get(interfaces.configuration.path_join(config_path, self.layer), None)
        layer = find_saved_state_layer(context, layer_name) if isinstance(layer_name, str) else None
        if layer is None:
            return {}  # the layer requirement says why
        provider = layer.provider
        if self.cpu_state and provider.vp_count() == 0:
            return _unmet(
                self,
                path,
                f"{' + '.join(provider.paths)} has no CPU state (a legacy .bin without its .vsv): no registers or"
                " paging mode; put the .vsv beside the .bin with the same base name, or pass --hyperv-vsv-location",
            )
        if self.vp_option:
            vp = context.config.get(interfaces.configuration.path_join(config_path, self.vp_option), None)
            count = provider.vp_count()
            if isinstance(vp, int) and not 0 <= vp < count:
                have = f"VPs 0-{count - 1}" if count > 1 else "VP 0"
                return _unmet(self, path, f"--{self.vp_option} {vp}: this saved state has {count} VP(s) ({have})")
        return {}


def _saved_state_requirements(
    requirement: interfaces.configuration.RequirementInterface, config_path: str
) -> Iterator[tuple[str, SavedStateLayerRequirement]]:
    """Our layer requirements in a plugin's requirement tree, with the config path each is checked under."""
    if isinstance(requirement, SavedStateLayerRequirement):
        yield config_path, requirement
        return
    child_path = interfaces.configuration.path_join(config_path, requirement.name)
    for child in requirement.requirements.values():
        yield from _saved_state_requirements(child, child_path)


class HyperVPluginStackers(HyperVAutomagic, interfaces.automagic.AutomagicInterface):
    """For ``hyperv.*`` plugins, runs only the Hyper-V stackers (before the layer stacker, priority 10).

    The plugins read the saved-state layer only; the OS scanners (DTB and banner scans over all of
    RAM) would cost seconds for nothing.  A ``--stackers`` list without any Hyper-V stacker is left
    alone; one that names some of ours keeps just those.
    """

    priority = 5

    def run(self, context: Context, config_path: str, requirement: Requirement) -> None:
        found = _saved_state_requirements(requirement, config_path)
        if not [path for path, req in found if req.unsatisfied(context, path)]:
            return
        configured = context.config.get(STACKERS_PATH, None) or list(PLUGIN_STACKERS)
        ours = [name for name in configured if name in PLUGIN_STACKERS]
        if ours:
            context.config[STACKERS_PATH] = ours
            vollog.log(constants.LOGLEVEL_VV, f"HyperVPluginStackers: stacking with {', '.join(ours)} only")
