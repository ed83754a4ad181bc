"""HV_GUEST_OS_ID: split into its fields and built from them (the OsId chunk's one value)."""

from __future__ import annotations

import dataclasses
import enum

_U64 = 0xFFFF_FFFF_FFFF_FFFF


class GuestOsVendor(enum.IntEnum):
    UNDEFINED = 0
    MICROSOFT = 1
    HPE = 2
    LANCOM = 0x200


class GuestOsMicrosoftId(enum.IntEnum):
    UNDEFINED = 0
    MSDOS = 1
    WINDOWS_3X = 2
    WINDOWS_9X = 3
    WINDOWS_NT = 4
    WINDOWS_CE = 5


class GuestOsOpenSourceId(enum.IntEnum):
    UNDEFINED = 0
    LINUX = 1
    FREEBSD = 2
    XEN = 3
    ILLUMOS = 4


_VENDOR_NAMES: dict[int, str] = {
    GuestOsVendor.MICROSOFT: "Microsoft",
    GuestOsVendor.HPE: "HPE",
    GuestOsVendor.LANCOM: "LANCOM",
}
_MICROSOFT_OS_NAMES: dict[int, str] = {
    GuestOsMicrosoftId.MSDOS: "MS-DOS",
    GuestOsMicrosoftId.WINDOWS_3X: "Windows 3.x",
    GuestOsMicrosoftId.WINDOWS_9X: "Windows 9x",
    GuestOsMicrosoftId.WINDOWS_NT: "Windows NT",
    GuestOsMicrosoftId.WINDOWS_CE: "Windows CE",
}
_OPEN_SOURCE_OS_NAMES: dict[int, str] = {
    GuestOsOpenSourceId.LINUX: "Linux",
    GuestOsOpenSourceId.FREEBSD: "FreeBSD",
    GuestOsOpenSourceId.XEN: "Xen",
    GuestOsOpenSourceId.ILLUMOS: "illumos",
}
GUEST_OS_OPEN_SOURCE = 1 << 63


@dataclasses.dataclass(frozen=True)
class GuestOsInfo:
    """A decoded HV_GUEST_OS_ID; fields of the other layout are None."""

    value: int
    is_open_source: bool
    os_id: int
    # closed-source layout (bit 63 = 0)
    vendor_id: int | None = None
    major: int | None = None
    minor: int | None = None
    service_version: int | None = None
    build_number: int | None = None
    # open-source layout (bit 63 = 1)
    version: int | None = None
    vendor_specific1: int | None = None
    vendor_specific2: int | None = None

    @property
    def os_family(self) -> str | None:
        """ "windows" (Microsoft's Windows NT id), "linux" (the open-source Linux id) or None: what to analyse it as."""
        if not self.value:
            return None
        if self.is_open_source:
            return "linux" if self.os_id == GuestOsOpenSourceId.LINUX else None
        if self.vendor_id == GuestOsVendor.MICROSOFT and self.os_id == GuestOsMicrosoftId.WINDOWS_NT:
            return "windows"
        return None

    @property
    def vendor_name(self) -> str | None:
        if self.vendor_id is None:
            return None
        return _VENDOR_NAMES.get(self.vendor_id, f"vendor {self.vendor_id:#x}")

    @property
    def os_name(self) -> str:
        if self.is_open_source:
            return _OPEN_SOURCE_OS_NAMES.get(self.os_id, f"open-source OS {self.os_id:#x}")
        if self.vendor_id == GuestOsVendor.MICROSOFT:
            return _MICROSOFT_OS_NAMES.get(self.os_id, f"OS {self.os_id:#x}")
        return f"OS {self.os_id:#x}"

    @property
    def description(self) -> str:
        if self.value == 0:
            return "none (the guest did not set HV_X64_MSR_GUEST_OS_ID)"
        if self.is_open_source:
            version = f"version {self.version:#x}"
            if self.os_id == GuestOsOpenSourceId.LINUX and self.version is not None:
                # Linux writes LINUX_VERSION_CODE here (a << 16 | b << 8 | c) [inf: kernel source].
                v = self.version
                version += f" (kernel {v >> 16 & 0xFF}.{v >> 8 & 0xFF}.{v & 0xFF})"
            extra = ""
            if self.vendor_specific1 or self.vendor_specific2:
                extra = f", vendor-specific {self.vendor_specific1:#x}/{self.vendor_specific2:#x}"
            return f"{self.os_name} (open source) {version}{extra}"
        return (
            f"{self.vendor_name} {self.os_name} {self.major}.{self.minor} build {self.build_number}"
            f" (service version {self.service_version})"
        )

    def encode(self) -> int:
        return self.value


def decode_guest_os_id(value: int) -> GuestOsInfo:
    """Split a guest OS id into its fields (bit 63 picks the layout; docs/format.md#guest-os-id)."""
    value &= _U64
    if value & GUEST_OS_OPEN_SOURCE:
        return GuestOsInfo(
            value=value,
            is_open_source=True,
            os_id=(value >> 56) & 0x7F,
            version=(value >> 16) & 0xFFFF_FFFF,
            vendor_specific1=value & 0xFFFF,
            vendor_specific2=(value >> 48) & 0xFF,
        )
    return GuestOsInfo(
        value=value,
        is_open_source=False,
        os_id=(value >> 40) & 0xFF,
        vendor_id=(value >> 48) & 0x7FFF,
        major=(value >> 32) & 0xFF,
        minor=(value >> 24) & 0xFF,
        service_version=(value >> 16) & 0xFF,
        build_number=value & 0xFFFF,
    )


def encode_guest_os_id(
    *,
    os_id: int,
    open_source: bool = False,
    vendor_id: int = 0,
    major: int = 0,
    minor: int = 0,
    service_version: int = 0,
    build_number: int = 0,
    version: int = 0,
    vendor_specific1: int = 0,
    vendor_specific2: int = 0,
) -> int:
    """The reverse of :func:`decode_guest_os_id`; fields of the other layout must stay 0."""

    def field(name: str, value: int, bits: int, shift: int) -> int:
        if not 0 <= value < 1 << bits:
            raise ValueError(f"guest OS id field {name} = {value!r} does not fit in {bits} bits")
        return value << shift

    if open_source:
        if vendor_id or major or minor or service_version or build_number:
            raise ValueError("closed-source fields given for an open-source guest OS id")
        return (
            GUEST_OS_OPEN_SOURCE
            | field("os_id", os_id, 7, 56)
            | field("vendor_specific2", vendor_specific2, 8, 48)
            | field("version", version, 32, 16)
            | field("vendor_specific1", vendor_specific1, 16, 0)
        )
    if version or vendor_specific1 or vendor_specific2:
        raise ValueError("open-source fields given for a closed-source guest OS id")
    return (
        field("vendor_id", vendor_id, 15, 48)
        | field("os_id", os_id, 8, 40)
        | field("major", major, 8, 32)
        | field("minor", minor, 8, 24)
        | field("service_version", service_version, 8, 16)
        | field("build_number", build_number, 16, 0)
    )
