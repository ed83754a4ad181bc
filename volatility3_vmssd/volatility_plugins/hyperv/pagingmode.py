"""hyperv.pagingmode: paging state of every VP (a thin shim over volatility3_vmssd.volatility)."""

from volatility3.framework import interfaces

from volatility3_vmssd.volatility import plugin_impl


class PagingMode(plugin_impl.PagingModePlugin, interfaces.plugins.PluginInterface):
    """Shows each VP's used VTL, architecture, paging mode, CR0/CR3/CR4/EFER and whether its CR3 is a kernel DTB.

    The CR3 check is Volatility's own Windows check (KUSER_SHARED_DATA mapped in both halves of the
    address space), the one the Hyper-V Intel stacker uses to skip DTB scanning.
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)
