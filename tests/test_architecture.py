"""The house rules of the package's structure, checked from its own import statements.

Data flows one way: errors/outputs/lifetime -> storage -> codecs -> memory -> cpu -> images -> vmrs ->
provider layer (the interface, both backends, file recognition, the factory, the summary view model) ->
Volatility glue / CLI / verify / triage (ranks in RANKS below).  A module may import
only from its own layer or lower ones, nothing outside the glue imports Volatility, and the module
graph has no circle.  Every import counts, also those inside functions or under TYPE_CHECKING: a lazy
import is still an arrow a maintainer has to follow.
"""

from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "volatility3_vmssd"
ROOT = "volatility3_vmssd"

#: first dotted part below the package -> rank (higher may import lower, never the reverse)
RANKS = {
    "errors": 0,
    "outputs": 0,
    "host": 0,
    "sources": 0,
    "lifetime": 0,
    "storage": 1,
    "codecs": 2,
    "memory": 3,
    "cpu": 4,
    "images": 5,
    "vmrs": 6,
    "summary": 7,
    "interface": 7,
    "files": 7,
    "native": 7,
    "dll": 7,
    "provider": 7,
    "vmconfig": 7,
    "verify": 8,
    "volatility": 8,
    "volatility_plugins": 8,
    "cli": 8,
    "triage": 8,
}
GLUE = ("volatility", "volatility_plugins")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: Collection[str] = ()) -> set[str]:
    """Absolute names of everything ``name`` imports: ``from pkg import mod`` counts as ``pkg.mod`` only."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{alias.name}" for alias in node.names]
            submodules = [n for n in names if n in modules]
            out.update(submodules or [mod])
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for imported in _imports(name, path, modules):
            # "from . import binding" names a module; "from .x import y" names x.
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            # A module's own packages are imported by Python before it anyway: no arrow of its making.
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def _rank(module: str) -> int | None:
    parts = module.split(".")
    return RANKS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer() -> None:
    """A new top-level module or subpackage must be placed in a layer (and added to RANKS) on purpose."""
    unplaced = [m for m in _modules() if m != ROOT and _rank(m) is None]
    assert unplaced == []


def test_no_import_runs_back_up() -> None:
    upward = [
        f"{src} ({_rank(src)}) -> {dst} ({_rank(dst)})"
        for src, targets in _graph().items()
        for dst in targets
        if _rank(src) is not None and _rank(dst) is not None and _rank(dst) > _rank(src)  # type: ignore[operator]
    ]
    assert upward == []


def test_no_import_circle() -> None:
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


@pytest.mark.parametrize(
    "layer",
    [
        "errors",
        "outputs",
        "storage",
        "codecs",
        "memory",
        "cpu",
        "images",
        "vmrs",
        "interface",
        "native",
        "dll",
        "files",
    ],
)
def test_nothing_below_the_glue_imports_volatility(layer: str) -> None:
    offenders = [
        name
        for name, path in _modules().items()
        if _rank(name) is not None
        and name.split(".")[1] == layer
        and any(i == "volatility3" or i.startswith("volatility3.") for i in _imports(name, path))
    ]
    assert offenders == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rules above must be able to fail: an upward import in a scratch tree is found."""
    fake = tmp_path / ROOT
    (fake / "storage").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "storage" / "__init__.py").write_text("")
    (fake / "storage" / "bad.py").write_text("from ..provider import open_saved_state\n")
    (fake / "provider.py").write_text("from .storage import bad\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, fake
    try:
        graph = _graph()
    finally:
        PACKAGE = saved
    assert graph[f"{ROOT}.storage.bad"] == {f"{ROOT}.provider"}
    assert graph[f"{ROOT}.provider"] == {f"{ROOT}.storage.bad"}
    assert _rank(f"{ROOT}.provider") > _rank(f"{ROOT}.storage.bad")  # type: ignore[operator]


def room_lines() -> dict[str, int]:
    """Lines of code per room: each top-level subpackage or module of the package."""
    rooms: dict[str, int] = {}
    for name, path in _modules().items():
        parts = name.split(".")
        if len(parts) > 1:
            rooms[parts[1]] = rooms.get(parts[1], 0) + len(path.read_text(encoding="utf-8").splitlines())
    return rooms


def test_no_room_holds_more_than_a_quarter_of_the_package() -> None:
    """A room that grows past a quarter of the package mixes jobs: split it by what it holds."""
    rooms = room_lines()
    total = sum(rooms.values())
    assert {room: n for room, n in rooms.items() if n > total / 4} == {}
