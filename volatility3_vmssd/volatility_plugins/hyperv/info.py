"""hyperv.info: what a Hyper-V saved state holds (a thin shim over volatility3_vmssd.volatility)."""

from volatility3.framework import interfaces

from volatility3_vmssd.volatility import plugin_impl


class Info(plugin_impl.InfoPlugin, interfaces.plugins.PluginInterface):
    """Summarises a Hyper-V saved state: files, versions, VPs, RAM, decoder, findings and the VM's settings.

    Works on a .vmrs with saved memory and on a legacy .bin + .vsv pair. When the VM's configuration
    (<GUID>.vmcx) sits beside the saved state, its name, ID and memory/processor settings are shown too.
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)
