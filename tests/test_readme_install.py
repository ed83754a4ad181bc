"""The README's commands, run literally where a user runs them: in a fresh copy of the checkout, with a
``python3`` that refuses ``pip install`` outside a virtual environment (PEP 668, as on Debian and Ubuntu).

The "system" Python is a scratch prefix around this interpreter (its standard library linked in, pip
from ensurepip, then an ``EXTERNALLY-MANAGED`` marker), so nothing outside the test's folder changes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from shared_data import REPO

README = REPO / "README.md"


def readme_commands() -> list[str]:
    """The command lines of the README's first ``sh`` block (comments left out), in order."""
    block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no sh block"
    return [line for line in block[1].splitlines() if line.strip() and not line.startswith("#")]


def test_the_second_readme_command_is_what_ci_runs() -> None:
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [readme_commands()[1]]


def externally_managed_python(root: Path) -> Path:
    """A ``bin/python3`` (with pip) whose ``pip install`` fails with externally-managed-environment."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    stdlib = Path(sysconfig.get_path("stdlib"))
    lib = root / "lib" / version
    (lib / "site-packages").mkdir(parents=True)
    for entry in stdlib.iterdir():
        if entry.name != "site-packages":
            (lib / entry.name).symlink_to(entry)
    (root / "bin").mkdir()
    python = root / "bin" / "python3"
    shutil.copy2(os.path.realpath(sys.executable), python)
    env = clean_env()
    probe = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True, env=env)
    if probe.returncode or Path(probe.stdout.strip()) != root:
        pytest.skip(f"this interpreter cannot be relocated into a scratch prefix: {probe.stdout}{probe.stderr}")
    subprocess.run([python, "-m", "ensurepip"], check=True, capture_output=True, env=env)
    (lib / "EXTERNALLY-MANAGED").write_text("[externally-managed]\nError=managed by the system (simulated)\n")
    refused = subprocess.run(
        [python, "-m", "pip", "install", "--dry-run", "pefile"], capture_output=True, text=True, env=env
    )
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr, refused.stderr
    return python


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX shell command")
def test_the_first_readme_command_works_on_an_externally_managed_python(tmp_path: Path) -> None:
    python = externally_managed_python(tmp_path / "system")
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, checkout / name)
    env = clean_env(PATH=f"{python.parent}{os.pathsep}{os.environ['PATH']}", XDG_CACHE_HOME=str(tmp_path / "cache"))
    first = readme_commands()[0]
    r = subprocess.run(["bash", "-c", first], cwd=checkout, capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Virtual processors     2" in r.stdout  # vmssd info
    assert "Virtual processors\t2\t2" in r.stdout  # vol ... hyperv.info
    assert (checkout / ".venv" / "bin" / "vmssd").exists()
