"""Run one Volatility plugin on one saved state through Volatility's Python API, as ``vol`` would.

This module is what a triage task's child process executes (``python -m volatility3_vmssd.triage.runner
SPEC RESULT PARENT_PID``): one process per task, so that a time limit can end it, a crash cannot take
the worker down, and Volatility's process-wide settings (plugin and symbol paths, offline mode) are
set once for it alone.  The rows are typed as Volatility's JSON renderer types them
(``volatility3.cli.text_renderer.JsonRenderer._type_renderers``) and flattened in tree order, with
each row's depth, so that they compare one to one with ``vol -r json`` on the same file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..lifetime import die_with_parent

__all__ = ["grid_rows", "resolve_plugin", "run_plugin"]


def resolve_plugin(name: str, plugin_list: dict[str, Any]) -> Any:
    """The plugin class for ``name`` as vol resolves it: exact name, else the one name containing it."""
    if name in plugin_list:
        return plugin_list[name]
    matches = sorted(p for p in plugin_list if p.startswith(name + "."))
    if not matches:
        matches = sorted(p for p in plugin_list if name in p)
    if len(matches) == 1:
        return plugin_list[matches[0]]
    if not matches:
        raise LookupError(f"no Volatility plugin named {name!r}")
    raise LookupError(f"plugin name {name!r} matches several plugins: {', '.join(matches)}")


def grid_rows(grid: Any) -> tuple[list[str], list[dict[str, Any]], list[list[str]]]:
    """(column names, rows, CSV rows) of a TreeGrid, in tree order.

    ``rows``: one dict per node, values typed as vol's JSON renderer types them, with ``tree_depth``;
    ``CSV rows``: ``[TreeDepth, value, ...]`` as text, as ``vol -r csv`` writes them.
    """
    from volatility3.cli import text_renderer
    from volatility3.framework import interfaces

    renderers = text_renderer.JsonRenderer._type_renderers
    csv_renderers = text_renderer.CSVRenderer._type_renderers
    columns = list(grid.columns)
    rows: list[dict[str, Any]] = []
    csv_rows: list[list[str]] = []

    def visit(node: Any, acc: list[dict[str, Any]]) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"tree_depth": node.path_depth - 1}
        line = [str(max(0, node.path_depth - 1))]
        values = list(node.values)
        for i, column in enumerate(columns):
            renderer = renderers.get(column.type, renderers["default"])
            data = renderer(values[i])
            if isinstance(data, interfaces.renderers.BaseAbsentValue):
                data = None
            row[column.name] = data
            line.append(str(csv_renderers.get(column.type, csv_renderers["default"])(values[i])))
        acc.append(row)
        csv_rows.append(line)
        return acc

    grid.populate(visit, rows)
    # Through JSON and back, as vol writes them: ints stay ints (Hex is an int), tuples become lists.
    return [c.name for c in columns], json.loads(json.dumps(rows)), csv_rows


def _configure(spec: dict[str, Any]) -> None:
    import volatility3.plugins
    import volatility3.symbols
    from volatility3 import framework
    from volatility3.framework import constants

    from ..volatility import plugin_dir

    constants.PARALLELISM = constants.Parallelism.Off
    if spec.get("offline"):
        constants.OFFLINE = True
    if spec.get("cache_path"):
        constants.CACHE_PATH = spec["cache_path"]
    ours = plugin_dir()
    extra = [os.path.abspath(p) for p in spec.get("plugin_dirs") or []]
    volatility3.plugins.__path__ = [*extra, *([str(ours)] if ours else []), *constants.PLUGINS_PATH]
    symbols = [os.path.abspath(p) for p in spec.get("symbol_dirs") or []]
    volatility3.symbols.__path__ = [*symbols, *constants.SYMBOL_BASEPATHS]
    framework.require_interface_version(2, 0, 0)
    framework.import_files(volatility3.plugins, True)


def run_plugin(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec["plugin"]`` on ``spec["file"]`` (with ``spec["vsv"]``); never raises for a plugin failure.

    Returns ``{"status": "ok"|"failed", "columns", "rows", "error", "traceback", "seconds"}``.
    """
    started = time.monotonic()
    try:
        columns, rows, csv_rows = _run(spec)
        return {
            "status": "ok",
            "columns": columns,
            "rows": rows,
            "csv_rows": csv_rows,
            "error": None,
            "seconds": time.monotonic() - started,
        }
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {
            "status": "failed",
            "columns": [],
            "rows": [],
            "error": _one_line(exc),
            "traceback": traceback.format_exc(limit=20),
            "seconds": time.monotonic() - started,
        }


def _one_line(exc: BaseException) -> str:
    from volatility3.framework import exceptions

    if isinstance(exc, exceptions.UnsatisfiedException):
        names = sorted(exc.unsatisfied)
        return f"unsatisfied requirements: {', '.join(names)} (no usable memory layer or symbols for this plugin)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def _run(spec: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], list[list[str]]]:
    _configure(spec)
    from volatility3 import framework
    from volatility3.cli import CommandLine
    from volatility3.framework import automagic, contexts
    from volatility3.framework import plugins as vol_plugins
    from volatility3.framework.automagic import stacker

    from ..files import path_to_url

    plugin = resolve_plugin(spec["plugin"], framework.list_plugins())
    ctx = contexts.Context()
    ctx.config["automagic.LayerStacker.single_location"] = path_to_url(spec["file"])
    if spec.get("vsv"):
        ctx.config["automagic.HyperVSavedStateOptions.hyperv_vsv_location"] = path_to_url(spec["vsv"])
    if spec.get("cache_blocks") is not None:
        ctx.config["automagic.HyperVSavedStateOptions.hyperv_cache_blocks"] = int(spec["cache_blocks"])
    automagics = automagic.choose_automagic(automagic.available(ctx), plugin)
    ctx.config["automagic.LayerStacker.stackers"] = stacker.choose_os_stackers(plugin)
    # vol's own file handler: files a plugin writes (dumps) go to the task's folder, never beside the evidence.
    cli = CommandLine()
    cli.output_dir = spec.get("output_dir") or os.getcwd()
    constructed = vol_plugins.construct_plugin(
        ctx, automagics, plugin, "plugins", None, cli.file_handler_class_factory()
    )
    return grid_rows(constructed.run())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec_path, result_path, parent = Path(args[0]), Path(args[1]), int(args[2])
    die_with_parent(parent, exit_code=3)  # a killed worker must not leave plugins running
    logging.basicConfig(level=logging.ERROR)
    spec = json.loads(spec_path.read_text())
    result = run_plugin(spec)
    tmp = result_path.with_name(result_path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(result))
        os.replace(tmp, result_path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written result behind
    return 0


if __name__ == "__main__":
    sys.exit(main())
