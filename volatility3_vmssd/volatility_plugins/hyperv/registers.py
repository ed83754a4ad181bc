"""hyperv.registers: saved registers of every VP and VTL (a thin shim over volatility3_vmssd.volatility)."""

from volatility3.framework import interfaces

from volatility3_vmssd.volatility import plugin_impl


class Registers(plugin_impl.RegistersPlugin, interfaces.plugins.PluginInterface):
    """Lists the saved registers of each virtual processor and virtual trust level.

    Segment registers show the selector as the value and base/limit/attributes as details; GDTR/IDTR
    show the base. Use --vp to pick one virtual processor.
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)
