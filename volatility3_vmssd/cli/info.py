"""``vmssd info``: what a saved state holds, without reading its RAM."""

from __future__ import annotations

import argparse
import json
import sys

from ..triage.evidence import file_identity
from ..vmconfig import find_vm_config
from .commands import add_command, add_json, add_saved_state
from .opening import open_state

LABEL_WIDTH = 22


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "info",
        run,
        help="summarise a saved state (.vmrs, .bin + .vsv, .bin alone)",
        description=(
            "Summarise a Hyper-V saved state: file kind, versions, VPs, vendor, architecture, paging mode,"
            " guest OS, RAM size and layout, decoder and cache, and every finding (bad CRCs, pending journal,"
            " unknown chunks, truncation). Reads no RAM. A .bin's .vsv (or a .vsv's .bin) is found beside it."
        ),
        examples=["vmssd info vm.vmrs", "vmssd info --json vm.bin --vsv other-name.vsv"],
    )
    add_saved_state(p, "the saved state: .vmrs, .bin (+ .vsv) or .vsv (+ .bin); or a .vmcx")
    add_json(p)
    p.add_argument(
        "--hash",
        action="store_true",
        help="also the size, modification time and SHA-256 of each file read (reads every byte once)",
    )
    p.add_argument(
        "--findings-json",
        action="store_true",
        help="print every finding kept (summaries of repeated ones included) as JSON, and nothing else",
    )


def run(args: argparse.Namespace) -> int:
    with open_state(args, warn=False) as provider:
        if args.findings_json:
            json.dump([f.to_json() for f in provider.findings()], sys.stdout, indent=1)
            print()
            return 0
        summary = provider.summary()
        config = find_vm_config(provider.paths)
        vmcx, settings = (None, ()) if config is None else (config.path, config.rows)
        evidence = [{"path": str(p), **file_identity(p)} for p in provider.paths] if args.hash else []
    if args.json:
        doc = summary.as_dict()
        doc["vm_configuration"] = None if vmcx is None else {"file": str(vmcx), **dict(settings)}
        if args.hash:
            doc["evidence"] = evidence
        json.dump(doc, sys.stdout, indent=1)
        print()
        return 0
    rows = list(summary.rows())
    split = next(i for i, (label, _) in enumerate(rows) if label == "Findings")
    if vmcx is not None:  # the VM's own settings go before the findings, as in hyperv.info
        rows[split:split] = [("VM configuration", str(vmcx)), *settings]
    for ev in evidence:  # evidence identity, sha256sum's layout after the label
        split = next(i for i, (label, _) in enumerate(rows) if label == "Findings")
        rows[split:split] = [
            ("Evidence", f"{ev['path']}: {ev['size']:,} bytes, modified {ev['mtime']}"),
            ("SHA-256", f"{ev['sha256']}  {ev['path']}"),
        ]
    # 22 columns fit every label of a saved state; a .vmcx's settings ("VM configuration version") widen it
    width = max([LABEL_WIDTH] + [len(label) for label, _ in rows if label != "Finding"])
    for label, text in rows:
        print(f"  {text}" if label == "Finding" else f"{label:<{width}} {text}")
    return 0
