"""The container reader on real files written by Hyper-V.

test.VMRS and test.vmcx come from fox-it/dissect.hypervisor @ 1ef8168 (AGPL-3.0 test data; used
here as data only, never copied into the package). See ../shared/data/real/README.md.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from volatility3_vmssd.cli.keys import key_record
from volatility3_vmssd.storage import HyperVStorage

LINE = re.compile(
    r"^(?P<path>/\S*) \| (?P<type>\w+) \| (?P<sv>.*?) \| "
    r"(?P<seq>\d+) \| (?P<table>\d+) \| (?P<off>\d+) \| (?P<flags>\d+)$"
)


def reference_keys(listing: Path) -> list[dict[str, object]]:
    """Parse test.VMRS.keys.txt (dissect.hypervisor's view of the file) into our JSON shape."""
    out = []
    for line in listing.read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        rec: dict[str, object] = {"path": m["path"], "type": m["type"]}
        sv = m["sv"]
        vm = re.match(r"size=(\d+) value=(.*)$", sv)
        if vm:
            value = ast.literal_eval(vm[2])
            rec["value"] = value
            if m["type"] == "String":
                rec["size"] = int(vm[1])
        rec["_pos"] = (int(m["seq"]), int(m["table"]), int(m["off"]), int(m["flags"]))
        out.append(rec)
    return out


def test_vmrs_keys_match_reference_listing(real_dir: Path) -> None:
    expected = reference_keys(real_dir / "test.VMRS.keys.txt")
    assert len(expected) > 20
    with HyperVStorage.open(real_dir / "test.VMRS") as storage:
        keys = list(storage.walk())
        got = [key_record(k) for k in keys]
        positions = [(k.insertion_sequence, k.table_index, k.entry_offset, k.flags) for k in keys]
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for g, e, pos in zip(got, expected, positions, strict=True):
        assert pos == e.pop("_pos"), g["path"]
        assert g == e


def test_vmrs_every_crc_verifies_and_stale_journal_is_ignored(real_dir: Path) -> None:
    # strict mode raises on any bad CRC, so opening strictly proves every checked CRC is good
    with HyperVStorage.open(real_dir / "test.VMRS", strict=True) as storage:
        assert storage.header.copy == 0 and storage.header.sequence == 7
        log = storage.replay_log
        assert log is not None and log.pending_count == 0 and log.maximum_entries == 145
        assert log.stale_count == 3 and log.applied_count == 0
        assert all(e.checksum_ok and not e.pending for e in log.entries)
        assert not [f for f in storage.findings if f.kind in ("crc", "journal")]
        assert [(t.index, t.offset) for t in storage.key_tables] == [(1, 0x3000), (2, 0x7000)]


def test_vmcx_opens_strictly_with_all_tables(real_dir: Path) -> None:
    with HyperVStorage.open(real_dir / "test.vmcx", strict=True) as storage:
        log = storage.replay_log
        assert log is not None and log.pending_count == 0 and log.applied_count == 0
        # the data README counts at least 6 leftovers, two aimed at one destination
        assert log.stale_count >= 6 and all(e.checksum_ok for e in log.entries)
        dests = [e.destination_offset for e in log.entries]
        assert len(set(dests)) < len(dests)
        assert len(storage.key_tables) == 8
        assert not storage.findings
        assert len(storage.get("/configuration").children) == 27
        paths = [k.path for k in storage.walk()]
        assert len(paths) == len(set(paths))
        assert (
            storage.get("/configuration/properties/version").value
            == storage.get("/configuration/properties/version").value
        )


def test_vmcx_matches_dissect_when_available(real_dir: Path) -> None:
    """Optional cross-check against dissect.hypervisor (not a dependency: AGPL, test-only)."""
    hyperv = pytest.importorskip("dissect.hypervisor.descriptor.hyperv", reason="dissect.hypervisor not installed")
    with open(real_dir / "test.vmcx", "rb") as fh:
        theirs = hyperv.HyperVFile(fh)
        flat: dict[str, object] = {}

        def visit(prefix: str, node: object) -> None:
            for name, entry in node.items():  # type: ignore[attr-defined]
                path = f"{prefix}/{name}"
                if hasattr(entry, "items"):
                    flat[path] = None
                    visit(path, entry)
                else:
                    flat[path] = entry

        visit("", theirs.as_dict())
    with HyperVStorage.open(real_dir / "test.vmcx") as storage:
        ours = {k.path: (None if k.is_node else k.value) for k in storage.walk()}
    assert set(ours) == set(flat)
    for path, value in flat.items():
        if isinstance(value, (int, str, bool, float)):
            assert ours[path] == value, path


def test_cli_keys_json_on_real_file(real_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "volatility3_vmssd.cli.main", "keys", "--json", str(real_dir / "test.VMRS")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    records = json.loads(out)
    assert records[2] == {"path": "/configuration/properties/version", "type": "Int", "value": 2304}
