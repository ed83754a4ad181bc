"""Packaging: the wheel installs the plugin shims as volatility3/plugins/hyperv/ and nothing of volatility3's own.

Builds the wheel from a copy of the sources (so no build/ or egg-info lands in the checkout), checks
its file list against the source tree, installs it into a fresh venv, shows that plain vol lists the
four plugins and runs one, and that uninstalling removes them again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from vol_helpers import MIB, REPO, long_mode_vp, mixed_image, require_volatility, state_json, vol_command, write_vmrs

require_volatility()

pytestmark = pytest.mark.slow

SHIMS = {"__init__.py", "info.py", "registers.py", "pagingmode.py", "memmap.py"}
PLUGIN_NAMES = [
    "hyperv.info.Info",
    "hyperv.registers.Registers",
    "hyperv.pagingmode.PagingMode",
    "hyperv.memmap.Memmap",
]


def _version(dist: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version(dist).split(".")[:2] if p.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return ()


def build_wheel(tmp_path: Path) -> Path:
    pytest.importorskip("build", reason="the 'build' package is not installed")
    # The project's metadata uses an SPDX license expression (PEP 639): setuptools >= 77 needed.
    if _version("setuptools") < (77,) or not _version("wheel"):
        pytest.skip(
            "a --no-isolation build needs the build backend installed: pip install 'setuptools>=77' wheel"
            f" (found setuptools {importlib.metadata.version('setuptools')})"
        )
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE-MIT", "LICENSE-APACHE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "volatility3_vmssd", src / "volatility3_vmssd", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    return wheel


def source_packages() -> set[str]:
    """Every package directory of volatility3_vmssd in the checkout, except the shim directory."""
    root = REPO / "volatility3_vmssd"
    found = set()
    for init in root.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if "volatility_plugins" in rel.parts or "__pycache__" in rel.parts:
            continue
        found.add(".".join(rel.parts))
    return found


def test_wheel_installs_plugins_that_plain_vol_lists(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)

    # -- the file list -------------------------------------------------------------------------------
    names = zipfile.ZipFile(wheel).namelist()
    v3 = sorted(n for n in names if n.startswith("volatility3/"))
    assert v3 == sorted(f"volatility3/plugins/hyperv/{f}" for f in SHIMS), v3
    assert "volatility3/__init__.py" not in names and "volatility3/plugins/__init__.py" not in names
    assert not [n for n in names if "volatility_plugins" in n]  # the shims exist under one module name only
    packaged = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("/__init__.py")}
    missing = source_packages() - packaged
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml"

    # -- a fresh environment that shares volatility3's dependencies ----------------------------------
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # vol finds plugins under the volatility3 package it runs from, so the wheel must land in the
    # site-packages that holds volatility3 (pip install / pipx inject arrange that). The system one is
    # not ours to write to: give the venv its own copy of the installed volatility3 distribution.
    import volatility3

    v3_dir = Path(volatility3.__file__).parent
    shutil.copytree(v3_dir, site / "volatility3", ignore=shutil.ignore_patterns("__pycache__"))
    dist_info = importlib.metadata.distribution("volatility3")._path  # type: ignore[attr-defined]
    shutil.copytree(dist_info, site / Path(dist_info).name)
    init_md5 = hashlib.md5((site / "volatility3/plugins/__init__.py").read_bytes()).hexdigest()

    def pip(*args: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    work = tmp_path / "work"  # not the checkout: the installed package must be what is imported
    work.mkdir()

    def vol(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*vol_command(python), *args], capture_output=True, text=True, env=env, cwd=work, check=False
        )

    # --ignore-installed: CI has installed the checkout system-wide, which the venv can see
    pip("install", "--no-deps", "--no-index", "--ignore-installed", str(wheel))
    shims = site / "volatility3" / "plugins" / "hyperv"
    assert {p.name for p in shims.glob("*.py")} == SHIMS
    located = subprocess.run(
        [str(python), "-c", "import volatility3_vmssd; print(volatility3_vmssd.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        check=True,
    ).stdout
    assert Path(located.strip()).is_relative_to(site)

    listing = vol("-h")
    assert listing.returncode == 0, listing.stderr[-2000:]
    for name in PLUGIN_NAMES:
        assert name in listing.stdout, listing.stdout
    assert "--hyperv-vsv-location" in listing.stdout and "--hyperv-vtl" in listing.stdout
    if "could not be loaded" in listing.stdout:  # vol's epilog lists plugin modules that failed to import
        assert "hyperv" not in listing.stdout.split("could not be loaded")[-1]

    image = write_vmrs(work / "small.vmrs", mixed_image(2 * MIB), state_json([long_mode_vp(0x1000)]))
    run = vol("-q", "-r", "json", "-f", str(image), "hyperv.memmap")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)[0]["Size"] == 2 * MIB

    # -- uninstall ---------------------------------------------------------------------------------
    pip("uninstall", "-y", "volatility3-vmssd")
    assert not shims.exists() or not list(shims.glob("*.py"))
    assert hashlib.md5((site / "volatility3/plugins/__init__.py").read_bytes()).hexdigest() == init_md5
    after = vol("-h")
    assert after.returncode == 0
    assert not [n for n in PLUGIN_NAMES if n in after.stdout]
