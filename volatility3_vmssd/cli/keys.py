"""``vmssd keys``: the key tree of any HyperVStorage container (.vmrs, .vmcx, modern .vsv)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

from ..storage import HyperVStorage, Key, KeyType
from .commands import add_command, add_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "keys",
        run,
        help="print the key tree of a HyperVStorage container",
        description=(
            "Print every key of a HyperVStorage container (.vmrs, .vmcx, modern .vsv) in tree order:"
            " path, type and value. Large values are summarised by size and SHA-256; file objects are"
            " only read for the hash. A pending replay log is applied in memory, never on disk."
        ),
        examples=["vmssd keys vm.vmrs", "vmssd keys --json vm.vmcx | jq '.[].path'", "vmssd keys --findings vm.vmrs"],
    )
    p.add_argument("file", help="the container to read")
    add_json(p, "a JSON list, one object per key")
    p.add_argument("--findings", action="store_true", help="list CRC/journal findings instead of the keys")
    p.add_argument("--strict", action="store_true", help="fail on the first bad CRC instead of reporting it")


def key_record(key: Key) -> dict[str, object]:
    """The JSON shape promised by the issue: path, type, value (scalars/strings), size, sha256."""
    record: dict[str, object] = {"path": key.path, "type": key.type_label}
    if key.type == KeyType.NODE:
        return record
    if key.type == KeyType.ARRAY or not isinstance(key.type, KeyType) or key.type == KeyType.UNKNOWN:
        data = key.read(allow_partial=True)
        record["size"] = key.size
        record["sha256"] = hashlib.sha256(data).hexdigest()
        return record
    record["value"] = key.value
    if key.type == KeyType.STRING:
        record["size"] = key.size
    return record


def run(args: argparse.Namespace) -> int:
    with HyperVStorage.open(args.file, strict=args.strict) as storage:
        if args.findings:
            if args.json:
                json.dump([f.to_json() for f in storage.findings], sys.stdout, indent=1)
                print()
            elif not storage.findings:
                print("no findings: every header, table, entry and journal CRC verified")
            else:
                for f in storage.findings:
                    print(f)
            return 0
        records = [key_record(k) for k in storage.walk()]
        if args.json:
            json.dump(records, sys.stdout, indent=1)
            print()
            return 0
        out = sys.stdout
        for key, rec in zip(storage.walk(), records, strict=True):
            depth = key.path.count("/") - 1
            name = "  " * depth + key.name
            if "sha256" in rec:
                detail = f"{rec['size']} bytes sha256={str(rec['sha256'])[:16]}…"
                if key.is_file_object:
                    detail += " (file object)"
            elif "value" in rec:
                detail = repr(rec["value"])
            else:
                detail = ""
            out.write(f"{name:<48} {rec['type']:<7} {detail}\n")
        if storage.findings:
            out.write(f"\n{len(storage.findings)} finding(s):\n")
            for f in storage.findings:
                out.write(f"  {f}\n")
    return 0
