"""The documentation is true when pasted: every ``$ command`` in the docs' console blocks whose input files
exist here is run in a folder holding them, and its output must be the one the docs show.

What legitimately varies is normalised (the folder's path, durations and rates, Volatility's version); a
doc line that is only ``…`` stands for lines left out.  Commands whose inputs are not here (a cut copy, a
16 GiB file, gdb on a core) are skipped one by one; with ``-m slow`` and the shared data the real guest's
``guest.vmrs`` is there too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import add_journal_entries
from shared_data import REAL, REPO

from volatility3_vmssd.storage import HyperVStorage

DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
SAMPLE = REPO / "tests" / "data" / "sample.vmrs"
BLOCK = re.compile(r"^```(console|sh|text)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INPUT = re.compile(r"[\w./-]+\.(?:vmrs|vmcx|vsv|bin|elf|lime|raw|dmp|json)\b", re.IGNORECASE)
WRITES = {"-o", "--output", ">"}
ELIDED = {"…", "..."}
TOOLS = {"vmssd", "vol", "echo", "jq", "grep", "head", "sed", "ls", "du", "readelf"}


def commands(text: str) -> Iterator[tuple[int, str, list[str]]]:
    """(block number, command, the output lines shown after it) for every ``$`` line of a block."""
    for number, match in enumerate(BLOCK.finditer(text)):
        lines = match.group(2).splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            command = lines[i][2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            i += 1
            shown = []
            while i < len(lines) and not lines[i].startswith("$ "):
                shown.append(lines[i])
                i += 1
            yield number, command, shown


def inputs(command: str) -> list[str]:
    """The files a command reads: every file-like word that is not the target of -o or >."""
    words = list(shlex.shlex(command, posix=True, punctuation_chars=True))
    found = []
    for before, word in zip(["", *words], words, strict=False):
        if before in WRITES:
            continue
        found += INPUT.findall(word)
    return found


#: Names a doc uses for a file other than the one of that name here (crashdump.md's guest is the Windows one).
OTHER_FILES = {"crashdump.md": {"guest.vmrs"}}


def runnable(command: str, folder: Path, doc: str = "") -> str | None:
    """Why ``command`` cannot run here (None: it can)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    words, first = list(lexer), True
    for word in words:
        if first and word not in TOOLS:
            return f"{word} is not run by this test"
        if first and word != "vmssd" and shutil.which(word) is None:
            return f"{word} is not installed"
        first = word in ("|", ";", "&&", "||")
    missing = [f for f in inputs(command) if not (folder / f).exists() or f in OTHER_FILES.get(doc, ())]
    if missing:
        return f"needs {', '.join(missing)}"
    if re.search(r"\bvol\b.*\s-s\s", command):
        return "needs a symbol folder"
    return None


def normalise(text: str, folder: Path) -> str:
    text = text.replace(f"{folder}/", "").replace(str(folder), ".")
    text = re.sub(r"in \d+:\d\d \((?:[\d.]+ [KMGT]?i?B|-)/s\)", "in <time> (<rate>/s)", text)
    text = re.sub(r"Volatility 3 Framework \d+\.\d+\.\d+", "Volatility 3 Framework <version>", text)
    return text.rstrip()


def matches(shown: list[str], actual: list[str]) -> bool:
    """``shown`` equals ``actual`` where a line that is only ``…`` stands for any number of lines."""
    if not shown:
        return not actual
    if shown[0].strip() in ELIDED:
        return any(matches(shown[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and shown[0].rstrip() == actual[0].rstrip() and matches(shown[1:], actual[1:])


def make_journal(path: Path) -> None:
    """``sample.vmrs`` with one pending replay-log entry, as docs/cli.md describes journal.vmrs."""
    shutil.copyfile(SAMPLE, path)
    with HyperVStorage.open(path) as s:
        key = s.get("/savedstate/RamBlock1")
        assert key is not None and key.data_location is not None
        offset = key.data_location[0]
    add_journal_entries(path, pending=[(offset, bytes(4096))])


def run_docs(folder: Path) -> tuple[int, list[str], list[str]]:
    """Run every runnable command of every doc in ``folder``; (commands run, failures, skipped reasons)."""
    env = dict(
        os.environ, PYTHONUNBUFFERED="1", COLUMNS="80", PYTHONPATH=str(REPO), XDG_CACHE_HOME=str(folder / ".cache")
    )
    shims = folder / ".bin"  # vol as installed from the wheel: with the hyperv plugins (here: the checkout's)
    shims.mkdir(exist_ok=True)
    vol = shims / "vol"
    plugins = REPO / "volatility3_vmssd" / "volatility_plugins"
    main = "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; main()"
    vol.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{main}" -p "{plugins}" "$@"\n')
    vol.chmod(0o755)
    env["PATH"] = os.pathsep.join([str(shims), str(Path(sys.executable).parent), env.get("PATH", "")])
    ran, failures, skipped = 0, [], []
    for doc in DOCS:
        for block, command, shown in commands(doc.read_text(encoding="utf-8")):
            why = runnable(command, folder, doc.name)
            if why is not None:
                skipped.append(f"{doc.name} block {block}: $ {command}: {why}")
                continue
            proc = subprocess.run(
                ["bash", "-c", f"{{ {command}\n}} 2>&1"],
                capture_output=True,
                text=True,
                cwd=folder,
                env=env,
                check=False,
            )
            ran += 1
            actual = normalise(proc.stdout, folder).splitlines()
            expected = [normalise(line, folder) for line in shown]
            while expected and not expected[-1].strip():
                expected.pop()
            if not matches(expected, actual):
                failures.append(
                    f"{doc.name} block {block}: $ {command}\n--- docs\n" + "\n".join(expected) + "\n--- today\n"
                    + "\n".join(actual)
                )  # fmt: skip
    return ran, failures, skipped


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    shutil.copyfile(SAMPLE, tmp_path / "sample.vmrs")
    make_journal(tmp_path / "journal.vmrs")
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copyfile(SAMPLE, tmp_path / "tests" / "data" / "sample.vmrs")
    (tmp_path / "random.bin").write_bytes(bytes.fromhex("cf4f597b") + bytes(4092))  # volatility.md's not-a-state
    for name in ("test.VMRS", "test.vmcx", "test_file.bin"):  # the real files, when the shared data is here
        if (REAL / name).exists():
            shutil.copyfile(REAL / name, tmp_path / name)
    return tmp_path


@pytest.mark.slow
def test_every_runnable_command_in_the_docs_prints_what_the_docs_show(
    folder: Path, request: pytest.FixtureRequest
) -> None:
    try:
        guest = request.getfixturevalue("guest_vmrs")  # the real Linux guest, when the shared data is here
    except pytest.skip.Exception:
        guest = None
    if guest is not None:
        os.symlink(guest, folder / "guest.vmrs")
    ran, failures, skipped = run_docs(folder)
    assert ran >= 15, (ran, skipped)  # the sample's commands at least
    assert not failures, "\n\n".join(failures)


def test_the_docs_matcher() -> None:
    assert matches(["a", "…", "d"], ["a", "b", "c", "d"]) and matches(["…"], []) and matches(["a", "…"], ["a"])
    assert not matches(["a", "d"], ["a", "b", "d"]) and not matches(["a"], ["a", "b"]) and not matches(["a"], [])
    assert inputs("vmssd convert x.vmrs -o y.raw --format raw") == ["x.vmrs"]
    assert inputs("vmssd keys --json a.vmcx | jq '.[0]'") == ["a.vmcx"]
    text = "```console\n$ vmssd info a.vmrs\nline 1\n$ echo \\\n  hi\nhi\n```\n"
    assert list(commands(text)) == [(0, "vmssd info a.vmrs", ["line 1"]), (0, "echo  hi", ["hi"])]
