"""Finding and vetting the DLL, on real PE files with version resources (tests/dll/fixtures)."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from volatility3_vmssd.dll import discovery as d
from volatility3_vmssd.errors import BackendUnavailableError

FIXTURES = Path(__file__).resolve().parent / "fixtures"
AMD64, I386, ARM64 = d.IMAGE_FILE_MACHINE_AMD64, d.IMAGE_FILE_MACHINE_I386, d.IMAGE_FILE_MACHINE_ARM64


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_file():
        pytest.skip(f"{path} is missing: rebuild it with tests/dll/fixtures/build.sh (Debian: mingw-w64)")
    return path


OLD = "fake-10.0.17763.1-x64.dll"
MIN = "fake-10.0.18362.1-x64.dll"
NEW = "fake-10.0.22621.1-x64.dll"
X86 = "fake-10.0.22621.1-x86.dll"


def with_machine(src: Path, dst: Path, machine: int) -> Path:
    """A copy of ``src`` whose COFF header claims another machine (the rest of the PE is untouched)."""
    data = bytearray(src.read_bytes())
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    struct.pack_into("<H", data, pe + 4, machine)
    dst.write_bytes(bytes(data))
    return dst


# --------------------------------------------------------------------------- pefile reading
@pytest.mark.parametrize(
    ("name", "version", "machine"),
    [
        (OLD, (10, 0, 17763, 1), AMD64),
        (MIN, (10, 0, 18362, 1), AMD64),
        (NEW, (10, 0, 22621, 1), AMD64),
        (X86, (10, 0, 22621, 1), I386),
    ],
)
def test_fixture_versions_and_machines_are_read_without_loading(name: str, version: tuple, machine: int) -> None:
    assert d.read_pe(fixture(name)) == (version, machine)
    assert fixture(name).stat().st_size < 16 * 1024  # tiny, as committed


def test_version_gate_refuses_dlls_older_than_18362_and_says_why() -> None:
    with pytest.raises(BackendUnavailableError) as exc:
        d.vet(fixture(OLD), machine=AMD64)
    msg = str(exc.value)
    assert "10.0.17763.1" in msg and "10.0.18362" in msg and "in sequence" in msg and "one handle" in msg


@pytest.mark.parametrize(("name", "abi"), [(MIN, "old"), (NEW, "new")])
def test_accepted_versions_carry_their_abi(name: str, abi: str) -> None:
    info = d.vet(fixture(name), machine=AMD64)
    assert info.abi == abi and info.machine == AMD64 and info.path == str(fixture(name))
    assert info.to_json()["machine"] == "x64"


def test_i386_dll_is_refused_by_a_64_bit_python_and_accepted_by_a_32_bit_one() -> None:
    with pytest.raises(BackendUnavailableError, match=r"i386 DLL but this Python is x64"):
        d.vet(fixture(X86), machine=AMD64)
    assert d.vet(fixture(X86), machine=I386).version == (10, 0, 22621, 1)


def test_arm64_and_x64_refuse_each_other(tmp_path: Path) -> None:
    arm = with_machine(fixture(NEW), tmp_path / "arm64.dll", ARM64)
    with pytest.raises(BackendUnavailableError, match="ARM64 DLL but this Python is x64"):
        d.vet(arm, machine=AMD64)
    assert d.vet(arm, machine=ARM64).machine == ARM64
    with pytest.raises(BackendUnavailableError, match="x64 DLL but this Python is ARM64"):
        d.vet(fixture(NEW), machine=ARM64)


def test_the_running_python_is_one_of_the_known_machines() -> None:
    assert d.python_machine() in d.MACHINE_NAMES


def test_not_a_pe_and_missing_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "vmsavedstatedumpprovider.dll"
    junk.write_bytes(b"MZ" + bytes(100))
    with pytest.raises(BackendUnavailableError, match="not a readable PE"):
        d.vet(junk, machine=AMD64)
    with pytest.raises(BackendUnavailableError, match="no such file"):
        d.vet(tmp_path / "absent.dll", machine=AMD64)


# --------------------------------------------------------------------------- discovery order
@pytest.fixture
def kits(tmp_path: Path) -> Path:
    """A fake ``Windows Kits\\10`` with several SDK versions, newest one holding a too-old DLL."""
    root = tmp_path / "Windows Kits" / "10"

    def put(version: str, arch: str, name: str) -> None:
        folder = root / "bin" / version / arch
        folder.mkdir(parents=True)
        shutil.copyfile(fixture(name), folder / d.DLL_NAME)

    put("10.0.26100.0", "x64", OLD)  # newest folder, refused content: must be skipped
    put("10.0.22621.0", "x64", NEW)
    put("10.0.19041.0", "x64", MIN)
    put("10.0.9600.0", "x64", NEW)  # numerically older: lexical sorting would put it first
    put("10.0.30000.0", "x86", X86)  # another architecture's folder only
    (root / "bin" / "x64").mkdir()  # the unversioned tools folder is ignored
    return root


def test_kits_folders_are_tried_newest_version_first(kits: Path) -> None:
    found = d.kits_candidates([kits], machine=AMD64)
    assert [p.parent.parent.name for p in found] == ["10.0.26100.0", "10.0.22621.0", "10.0.19041.0", "10.0.9600.0"]
    assert [p.parent.parent.name for p in d.kits_candidates([kits], machine=I386)] == ["10.0.30000.0"]


def test_first_acceptable_kits_dll_wins(kits: Path) -> None:
    info = d.find_dll(env={}, kits_roots=[kits], machine=AMD64, search_path=False)
    assert Path(info.path) == kits / "bin" / "10.0.22621.0" / "x64" / d.DLL_NAME


def test_explicit_path_wins_over_env_and_kits(kits: Path) -> None:
    env = {d.ENV_VAR: str(fixture(NEW))}
    info = d.find_dll(fixture(MIN), env=env, kits_roots=[kits], machine=AMD64, search_path=False)
    assert info.path == str(fixture(MIN)) and info.abi == "old"
    origins = [o for o, _ in d.candidates(fixture(MIN), env=env, kits_roots=[kits], machine=AMD64, search_path=False)]
    assert origins == ["explicit", "env", "kits", "kits", "kits", "kits"]


def test_env_var_wins_over_kits(kits: Path) -> None:
    info = d.find_dll(env={d.ENV_VAR: str(fixture(MIN))}, kits_roots=[kits], machine=AMD64, search_path=False)
    assert info.path == str(fixture(MIN))


def test_a_refused_explicit_path_is_an_error_not_a_fallback(kits: Path) -> None:
    with pytest.raises(BackendUnavailableError, match=r"17763.*from the --dll argument"):
        d.find_dll(fixture(OLD), env={}, kits_roots=[kits], machine=AMD64, search_path=False)
    with pytest.raises(BackendUnavailableError, match=rf"i386.*from \${d.ENV_VAR}"):
        d.find_dll(env={d.ENV_VAR: str(fixture(X86))}, kits_roots=[kits], machine=AMD64, search_path=False)


def test_nothing_acceptable_lists_every_refusal(tmp_path: Path) -> None:
    root = tmp_path / "Kits"
    folder = root / "bin" / "10.0.17763.0" / "x64"
    folder.mkdir(parents=True)
    shutil.copyfile(fixture(OLD), folder / d.DLL_NAME)
    with pytest.raises(BackendUnavailableError) as exc:
        d.find_dll(env={}, kits_roots=[root], machine=AMD64, search_path=False)
    msg = str(exc.value)
    assert "not found" in msg and d.ENV_VAR in msg and "refused" in msg and "17763" in msg


def test_default_kits_roots_come_from_program_files() -> None:
    roots = d.default_kits_roots({"ProgramFiles(x86)": "C:/PF86", "ProgramFiles": "C:/PF"})
    assert roots == [Path("C:/PF86/Windows Kits/10"), Path("C:/PF/Windows Kits/10")]
    assert d.default_kits_roots({}) == []
