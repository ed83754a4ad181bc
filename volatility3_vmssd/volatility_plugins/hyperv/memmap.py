"""hyperv.memmap: the guest-physical layout of the saved RAM (a thin shim over volatility3_vmssd.volatility)."""

from volatility3.framework import interfaces

from volatility3_vmssd.volatility import plugin_impl


class Memmap(plugin_impl.MemmapPlugin, interfaces.plugins.PluginInterface):
    """Lists the guest-physical ranges of the saved RAM with their raw saved-memory offsets and RamBlocks."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)
