"""Finding ``vmsavedstatedumpprovider.dll`` and vetting it with pefile *before* it is loaded.

Order: an explicit path (argument, then ``VMSSD_DUMP_PROVIDER_DLL``), then the Windows SDK folders
``<Kits root>\\bin\\<version>\\<arch>\\`` newest version first, then the normal DLL search (the bare
name, resolved along ``PATH`` so that it too can be vetted first).  An explicit path that fails the
vetting is an error, never a silent fallback: the analyst asked for that file.

Vetting reads the PE header and the version resource (no code runs):

* versions older than 10.0.18362 are refused: they cannot load several saved-state files in
  sequence on one handle (the bug rafawo/vmsavedstatetodump-rs documents, fixed in SDK 10.0.18362),
  which a cross-check that opens files repeatedly would hit;
* a DLL built for another machine than the running Python (i386 for a 64-bit Python, x64 vs
  ARM64, ...) is refused, since loading it could only fail with an opaque WinError 193.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import os
import platform
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import BackendUnavailableError
from .binding import DLL_NAME, abi_for_version

ENV_VAR = "VMSSD_DUMP_PROVIDER_DLL"
MINIMUM_VERSION = (10, 0, 18362, 0)

IMAGE_FILE_MACHINE_I386 = 0x014C
IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_FILE_MACHINE_ARM64 = 0xAA64
IMAGE_FILE_MACHINE_ARMNT = 0x01C4
MACHINE_NAMES = {
    IMAGE_FILE_MACHINE_I386: "i386",
    IMAGE_FILE_MACHINE_AMD64: "x64",
    IMAGE_FILE_MACHINE_ARM64: "ARM64",
    IMAGE_FILE_MACHINE_ARMNT: "ARM",
}
# The SDK's per-architecture folder under bin\<version>\.
KITS_ARCH_FOLDER = {
    IMAGE_FILE_MACHINE_I386: "x86",
    IMAGE_FILE_MACHINE_AMD64: "x64",
    IMAGE_FILE_MACHINE_ARM64: "arm64",
    IMAGE_FILE_MACHINE_ARMNT: "arm",
}
_VERSION_DIR = re.compile(r"^\d+(\.\d+){1,3}$")


@dataclasses.dataclass(frozen=True)
class DllInfo:
    """A vetted DLL: where it is, its file version, machine type and the ABI to call it with."""

    path: str
    version: tuple[int, int, int, int]
    machine: int
    abi: str

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "version": self.version_text, "machine": machine_name(self.machine), "abi": self.abi}


def machine_name(machine: int) -> str:
    return MACHINE_NAMES.get(machine, f"machine {machine:#06x}")


def python_machine() -> int:
    """The PE machine type a DLL must have to load into this Python process."""
    bits = struct.calcsize("P") * 8
    arch = platform.machine().lower()
    if arch in ("arm64", "aarch64"):
        return IMAGE_FILE_MACHINE_ARM64 if bits == 64 else IMAGE_FILE_MACHINE_ARMNT
    if arch.startswith("arm"):
        return IMAGE_FILE_MACHINE_ARMNT
    return IMAGE_FILE_MACHINE_AMD64 if bits == 64 else IMAGE_FILE_MACHINE_I386


def read_pe(path: str | os.PathLike[str]) -> tuple[tuple[int, int, int, int] | None, int]:
    """(file version from VS_FIXEDFILEINFO or None, COFF machine) without loading the DLL."""
    import pefile  # a declared dependency; imported here so that the package imports without it

    try:
        pe = pefile.PE(os.fspath(path), fast_load=True)
    except (OSError, pefile.PEFormatError) as exc:
        raise BackendUnavailableError(f"{os.fspath(path)} is not a readable PE file: {exc}") from exc
    try:
        machine = pe.FILE_HEADER.Machine
        pe.parse_data_directories(directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_RESOURCE"]])
        fixed = getattr(pe, "VS_FIXEDFILEINFO", None)
        if not fixed:
            return None, machine
        ms, ls = fixed[0].FileVersionMS, fixed[0].FileVersionLS
        return (ms >> 16, ms & 0xFFFF, ls >> 16, ls & 0xFFFF), machine
    finally:
        pe.close()


def vet(path: str | os.PathLike[str], *, machine: int | None = None) -> DllInfo:
    """Accept ``path`` or raise BackendUnavailableError saying why it cannot be used."""
    spath = os.fspath(path)
    if not os.path.isfile(spath):
        raise BackendUnavailableError(f"{spath}: no such file")
    version, pe_machine = read_pe(spath)
    want = python_machine() if machine is None else machine
    if pe_machine != want:
        raise BackendUnavailableError(
            f"{spath} is a {machine_name(pe_machine)} DLL but this Python is {machine_name(want)}"
            f" ({struct.calcsize('P') * 8}-bit); use the SDK's {KITS_ARCH_FOLDER.get(want, '?')} folder"
        )
    if version is None:
        raise BackendUnavailableError(
            f"{spath} has no version resource, so its ABI generation cannot be told; refusing to load it"
        )
    if version < MINIMUM_VERSION:
        v = ".".join(map(str, version))
        raise BackendUnavailableError(
            f"{spath} is version {v}; versions older than 10.0.18362 cannot load several saved-state files in"
            " sequence on one handle (a DLL bug fixed in Windows SDK 10.0.18362, documented by"
            " rafawo/vmsavedstatetodump-rs); install a newer Windows SDK"
        )
    return DllInfo(spath, version, pe_machine, abi_for_version(version))


def default_kits_roots(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    roots = []
    for var in ("ProgramFiles(x86)", "ProgramFiles"):
        base = env.get(var)
        if base:
            root = Path(base) / "Windows Kits" / "10"
            if root not in roots:
                roots.append(root)
    return roots


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split("."))


def kits_candidates(roots: Iterable[str | os.PathLike[str]], *, machine: int | None = None) -> list[Path]:
    """``<root>/bin/<version>/<arch>/vmsavedstatedumpprovider.dll`` that exist, newest version first."""
    arch = KITS_ARCH_FOLDER.get(python_machine() if machine is None else machine, "x64")
    found: list[tuple[tuple[int, ...], Path]] = []
    for root in roots:
        bin_dir = Path(root) / "bin"
        try:
            entries = list(bin_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            if _VERSION_DIR.match(entry.name):
                dll = entry / arch / DLL_NAME
                if dll.is_file():
                    found.append((_version_key(entry.name), dll))
    found.sort(key=lambda item: item[0], reverse=True)
    return [p for _, p in found]


def search_path_candidate() -> str | None:
    """The bare name resolved the way ``ctypes.util.find_library`` does (PATH on Windows)."""
    if os.name != "nt":
        return None
    return ctypes.util.find_library(DLL_NAME)


def candidates(
    explicit: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    kits_roots: Iterable[str | os.PathLike[str]] | None = None,
    machine: int | None = None,
    search_path: bool = True,
) -> list[tuple[str, str]]:
    """Every place tried, in order, as (origin, path): "explicit", "env", "kits", "search"."""
    env = os.environ if env is None else env
    out: list[tuple[str, str]] = []
    if explicit is not None:
        out.append(("explicit", os.fspath(explicit)))
    if env.get(ENV_VAR):
        out.append(("env", env[ENV_VAR]))
    roots = default_kits_roots(env) if kits_roots is None else list(kits_roots)
    out.extend(("kits", os.fspath(p)) for p in kits_candidates(roots, machine=machine))
    if search_path:
        found = search_path_candidate()
        if found:
            out.append(("search", found))
    return out


def find_dll(
    explicit: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    kits_roots: Iterable[str | os.PathLike[str]] | None = None,
    machine: int | None = None,
    search_path: bool = True,
) -> DllInfo:
    """The first acceptable DLL.  An explicit path (argument or env var) is final: if it is refused,
    that refusal is raised.  Otherwise refused SDK copies are skipped and all reasons reported."""
    tried = candidates(explicit, env=env, kits_roots=kits_roots, machine=machine, search_path=search_path)
    reasons: list[str] = []
    for origin, path in tried:
        if origin in ("explicit", "env"):
            source = "the --dll argument" if origin == "explicit" else f"${ENV_VAR}"
            try:
                return vet(path, machine=machine)
            except BackendUnavailableError as exc:
                raise BackendUnavailableError(f"{exc} (from {source})") from None
        try:
            return vet(path, machine=machine)
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
    roots = default_kits_roots(env) if kits_roots is None else list(kits_roots)
    where = ", ".join(os.fspath(r) for r in roots) or "no Windows Kits root"
    detail = ("; refused: " + "; ".join(reasons)) if reasons else ""
    raise BackendUnavailableError(
        f"{DLL_NAME} not found: pass --dll/dll_path, set {ENV_VAR}, or install the Windows SDK"
        f" (looked under {where}\\bin\\<version>\\<arch> and on PATH){detail}"
    )
