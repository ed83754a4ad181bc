"""Command-line options for Hyper-V saved states, carried by a do-nothing automagic.

Volatility turns every automagic requirement into a global option (``vol -h`` shows them), and the
stackers see the values in their (cloned) config under ``automagic.HyperVSavedStateOptions``.  This is
the only way to give stackers options: they are classes with no configuration of their own.
"""

from __future__ import annotations

import abc
from typing import Any

from volatility3.framework import constants, interfaces
from volatility3.framework.configuration import requirements

from ..files import url_to_path

__all__ = ["OPTIONS_PATH", "HyperVAutomagic", "HyperVSavedStateOptions", "option"]

OPTIONS_PATH = interfaces.configuration.path_join(constants.AUTOMAGIC_CONFIG_PATH, "HyperVSavedStateOptions")
LOCATION_PATH = interfaces.configuration.path_join(constants.AUTOMAGIC_CONFIG_PATH, "LayerStacker", "single_location")


Context = interfaces.context.ContextInterface
Requirement = interfaces.configuration.RequirementInterface


class DirectoryGiven(SystemExit):
    """``vol -f`` named a folder: no plugin can run, so vol ends with this one line (exit status 1)."""


class HyperVAutomagic(abc.ABC):
    """What our automagics share: Volatility's call signature, declared once; :meth:`run` does the work.

    A mixin, not an ``AutomagicInterface`` itself: Volatility instantiates every subclass of that
    interface it finds, and an abstract one would fail.
    """

    exclusion_list: list[str] = []

    def __call__(
        self,
        context: Context,
        config_path: str,
        requirement: Requirement,
        progress_callback: constants.ProgressCallback = None,
    ) -> list[Any] | None:
        self.run(context, config_path, requirement)
        return None

    @abc.abstractmethod
    def run(self, context: Context, config_path: str, requirement: Requirement) -> None:
        """Check or adjust the configuration before the stackers run."""


class HyperVSavedStateOptions(HyperVAutomagic, interfaces.automagic.AutomagicInterface):
    """Holds --hyperv-vsv-location, --hyperv-backend, --hyperv-vtl and --hyperv-cache-blocks for the Hyper-V
    stackers and layer; and, running first, stops ``vol -f FOLDER`` with one line."""

    priority = 0

    def run(self, context: Context, config_path: str, requirement: Requirement) -> None:
        # vol's LayerStacker would open a folder as a file and fail with "Automagic exception occurred:
        # URLError ... Is a directory" followed by every unmet requirement; nothing can run on a folder.
        location = context.config.get(LOCATION_PATH, None)
        local = url_to_path(location) if isinstance(location, str) else None
        if local is not None and local.is_dir():
            raise DirectoryGiven(
                f"vol: error: {local} is a directory, not a memory image: give one file with -f (a .vmrs, or a"
                f" legacy .bin with its .vsv beside it); 'vmssd triage {local}' finds every saved state in a folder"
            )

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            # A string, not a URIRequirement: vol raises a bare FileNotFoundError (a traceback) for a URI
            # option naming a missing file; the stacker says which file is wrong and why instead.
            requirements.StringRequirement(
                name="hyperv_vsv_location",
                description="Hyper-V: the .vsv of a legacy .bin saved state (a path or a file: URL), when it is"
                " not beside the .bin with the same base name",
                optional=True,
            ),
            requirements.ChoiceRequirement(
                name="hyperv_backend",
                choices=["native", "dll", "auto"],
                default="native",
                description="Hyper-V: read the saved state natively (default), with Microsoft's"
                " vmsavedstatedumpprovider.dll (Windows with the SDK), or with the DLL when one is found",
                optional=True,
            ),
            requirements.IntRequirement(
                name="hyperv_vtl",
                description="Hyper-V: read registers and CR3 of this virtual trust level on every VP instead of"
                " the one used by default (VTL0 when saved, else the lowest saved)",
                optional=True,
            ),
            requirements.IntRequirement(
                name="hyperv_cache_blocks",
                description="Hyper-V: keep at most this many decoded 1 MiB blocks per opened saved state (default 256)",
                optional=True,
            ),
        ]


def option(context: interfaces.context.ContextInterface, name: str) -> Any:
    """The value of one of our options in ``context`` (None when not given)."""
    return context.config.get(interfaces.configuration.path_join(OPTIONS_PATH, name), None)
