"""Writer → reader round trips: what we write, we (and Microsoft's loader rules) read back."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
from builders import add_journal_entries, write_storage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volatility3_vmssd.storage import (
    HyperVStorage,
    HyperVStorageWriter,
    KeyType,
    ObjectType,
    commit_replay_log,
    uint,
)
from volatility3_vmssd.storage.defs import REPLAY_LOG_HEADER, ReplayLogHeaderFields, crc32_skipping
from volatility3_vmssd.storage.writer import TypedValue

names = st.text(alphabet="abcXYZ_0123456789-.", min_size=1, max_size=12)
scalars = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.integers(min_value=0, max_value=(1 << 64) - 1).map(uint),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40),
    st.binary(max_size=64),
    st.integers(min_value=2040, max_value=5000).map(lambda n: os.urandom(n)),  # around the 2048 threshold
)
trees = st.recursive(
    st.dictionaries(names, scalars, max_size=5),
    lambda children: st.dictionaries(names, st.one_of(scalars, children), min_size=1, max_size=5),
    max_leaves=40,
)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}"
        if isinstance(value, dict):
            out[path] = None
            out.update(flatten(value, path))
        else:
            out[path] = value.value if isinstance(value, TypedValue) else value
    return out


def read_back(path: Path) -> dict[str, object]:
    with HyperVStorage.open(path, strict=True) as s:
        assert not s.findings, s.findings
        return {k.path: (None if k.is_node else k.value) for k in s.walk()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=trees, alignment=st.sampled_from([0x1000, 0x2000, 0x10000]))
def test_random_trees_round_trip(tmp_path: Path, tree: dict, alignment: int) -> None:
    path = tmp_path / f"t{alignment}.vmrs"
    if path.exists():
        path.unlink()
    write_storage(path, tree, alignment=alignment)
    got = read_back(path)
    want = flatten(tree)
    assert list(got) == list(want)  # tree order = insertion order
    for k, v in want.items():
        assert got[k] == v, k


def test_file_objects_force_object_table_chaining(tmp_path: Path) -> None:
    # 300+ file objects overflow the 227-slot root table, so its last slot must chain (openvmm rule).
    path = tmp_path / "many.vmrs"
    blobs = {f"RamBlock{i}": bytes([i % 256]) * 2048 for i in range(310)}
    write_storage(path, {"savedstate": blobs})
    with HyperVStorage.open(path, strict=True) as s:
        kinds = [o.type for o in s.objects]
        assert kinds.count(ObjectType.FILE_OBJECT) == 310
        assert kinds.count(ObjectType.OBJECT_TABLE) >= 1
        assert s.get("/savedstate/RamBlock309").read() == bytes([309 % 256]) * 2048
        assert s.get("/savedstate/RamBlock0").is_file_object


def test_inline_below_threshold_file_object_at_threshold(tmp_path: Path) -> None:
    # 2048 bytes and more go to a file object, smaller values stay inline [spec §1.4]
    path = tmp_path / "thr.vmrs"
    write_storage(path, {"a": bytes(2047), "b": bytes(2048), "s": "x" * 1024})
    with HyperVStorage.open(path) as s:
        assert not s.get("/a").is_file_object
        assert s.get("/b").is_file_object
        assert s.get("/s").is_file_object and s.get("/s").value == "x" * 1024


def test_64k_alignment_places_objects_on_boundaries(tmp_path: Path) -> None:
    path = tmp_path / "a64.vmrs"
    write_storage(path, {"x": os.urandom(70000), "y": {"z": 1}}, alignment=0x10000)
    with HyperVStorage.open(path, strict=True) as s:
        assert s.header.data_alignment == 0x10000
        assert all(o.offset % 0x10000 == 0 for o in s.objects)
        assert len(s.get("/x").read()) == 70000


def test_key_tables_are_filled_exactly(tmp_path: Path) -> None:
    # Many keys spread over several tables: each table's entries must cover it to the last byte.
    path = tmp_path / "full.vmrs"
    write_storage(path, {f"node{i}": {f"value{j}": j for j in range(20)} for i in range(30)})
    with HyperVStorage.open(path, strict=True) as s:
        assert len(s.key_tables) > 1
        for table in s.key_tables:
            data = s.read_at(table.offset, table.size)
            pos = 10
            while pos + 21 <= len(data):
                size = int.from_bytes(data[pos + 2 : pos + 6], "little")
                assert size > 0
                pos += size
            assert pos == table.size
        assert sum(1 for _ in s.walk()) == 30 * 21


def test_pending_journal_supersedes_main_area_and_stale_is_ignored(tmp_path: Path) -> None:
    new, old = tmp_path / "new.vmrs", tmp_path / "old.vmrs"
    write_storage(new, {"state": {"answer": "new value!", "n": 2}})
    write_storage(old, {"state": {"answer": "old value!", "n": 1}})  # same layout, older content
    with HyperVStorage.open(new) as s:
        table = s.key_tables[0]
    old_bytes = old.read_bytes()[table.offset : table.offset + table.size]
    garbage = os.urandom(table.size)
    add_journal_entries(new, pending=[(table.offset, old_bytes)], stale=[(table.offset, garbage)])
    digest = hashlib.sha256(new.read_bytes()).hexdigest()

    with HyperVStorage.open(new, strict=True) as s:
        assert s.get("/state/answer").value == "new value!"
        assert s.get("/state/n").value == 2
        assert s.replay_log is not None and s.replay_log.pending_count == 1 and s.replay_log.stale_count == 1
        assert [f.kind for f in s.findings] == ["journal"]
    with HyperVStorage.open(new, apply_replay_log=False) as s:
        assert s.get("/state/answer").value == "old value!"
    assert hashlib.sha256(new.read_bytes()).hexdigest() == digest  # the reader never writes

    committed = tmp_path / "committed.vmrs"
    assert commit_replay_log(new, committed) == 1
    with HyperVStorage.open(committed, strict=True) as s:
        assert s.replay_log is not None and s.replay_log.pending_count == 0
        assert s.get("/state/answer").value == "new value!"
        assert not s.findings
    assert hashlib.sha256(new.read_bytes()).hexdigest() == digest
    with pytest.raises(Exception, match="refusing"):
        commit_replay_log(new, new)


def test_commit_replay_log_changes_only_count_and_crc_of_the_log_header(tmp_path: Path) -> None:
    src = tmp_path / "journal.vmrs"
    write_storage(src, {"state": {"answer": "current", "n": 2}})
    with HyperVStorage.open(src) as s:
        table = s.key_tables[0]
        log_offset = s.header.replay_log_offset
    add_journal_entries(src, pending=[(table.offset, bytes(table.size))])
    buf = bytearray(src.read_bytes())
    # Fields a fresh header leaves zero, set as Hyper-V may leave them (change tracking on, reserved byte).
    before = dataclasses.replace(
        ReplayLogHeaderFields.parse(buf, log_offset),
        reserved=0x5A,
        change_tracking_enabled=1,
        change_tracking_buffer_offset=0x123000,
        change_tracking_buffer_size=0x4000,
        change_tracking_buffer_used_size=0x180,
    )
    buf[log_offset : log_offset + REPLAY_LOG_HEADER.size] = before.pack()
    src.write_bytes(bytes(buf))
    dst = tmp_path / "committed.vmrs"
    assert commit_replay_log(src, dst) == 1
    out = dst.read_bytes()
    after = ReplayLogHeaderFields.parse(out, log_offset)
    assert after.pending_count == 0 and before.pending_count == 1
    assert after.checksum == crc32_skipping(out[log_offset : log_offset + REPLAY_LOG_HEADER.size], 4)
    same = {f.name for f in dataclasses.fields(ReplayLogHeaderFields)} - {"pending_count", "checksum"}
    assert {f: getattr(after, f) for f in same} == {f: getattr(before, f) for f in same}
    # The entries stay behind as stale leftovers, byte for byte.
    entries = slice(log_offset + REPLAY_LOG_HEADER.size, log_offset + 0x1000)
    assert out[entries] == bytes(buf[entries])
    with HyperVStorage.open(dst, strict=True) as s:
        assert s.get("/state/answer").value == "current" and not s.findings


def test_writer_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "exists.vmrs"
    path.write_bytes(b"evidence")
    with pytest.raises(FileExistsError):
        HyperVStorageWriter(path)
    assert path.read_bytes() == b"evidence"


def test_writer_removes_partial_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "partial.vmrs"
    with pytest.raises(RuntimeError), HyperVStorageWriter(path) as w:
        w.set("/a", 1)
        raise RuntimeError("boom")
    assert not path.exists()


def test_types_and_sizes(tmp_path: Path) -> None:
    path = tmp_path / "types.vmrs"
    write_storage(path, {"i": -5, "u": uint(7), "d": 0.25, "b": False, "s": "héllo", "a": b"\x01\x02"})
    with HyperVStorage.open(path) as s:
        types = {k.name: k.type for k in s.walk()}
        assert types == {
            "i": KeyType.INT,
            "u": KeyType.UINT,
            "d": KeyType.DOUBLE,
            "b": KeyType.BOOL,
            "s": KeyType.STRING,
            "a": KeyType.ARRAY,
        }
        assert s.get("/s").size == len("héllo".encode("utf-16-le"))
        assert s.get("/a").read(1, 1) == b"\x02"


def test_tables_come_first_so_a_cut_copy_keeps_its_keys(tmp_path: Path) -> None:
    # Evidence is sometimes copied while the VM is still saving: with the key tables ahead of the
    # values, a cut copy loses values (reported), not the whole tree.
    path = tmp_path / "full.vmrs"
    blobs = {f"RamBlock{i}": bytes([i]) * 5000 for i in range(20)}
    write_storage(path, {"savedstate": blobs, "configuration": {"version": 2304}})
    with HyperVStorage.open(path, strict=True) as s:
        tables = [o.offset for o in s.objects if o.type == ObjectType.KEY_TABLE]
        values = [o.offset for o in s.objects if o.type == ObjectType.FILE_OBJECT]
        cut_at = s.get("/savedstate/RamBlock10").data_location[0] + 100  # type: ignore[index]
    assert max(tables) < min(values)
    cut = tmp_path / "cut.vmrs"
    cut.write_bytes(path.read_bytes()[:cut_at])
    with HyperVStorage.open(cut) as s:
        assert s.get("/configuration/version").value == 2304
        assert s.get("/savedstate/RamBlock9").read() == bytes([9]) * 5000
        assert s.get("/savedstate/RamBlock10").read(allow_partial=True) == bytes([10]) * 100
        assert s.get("/savedstate/RamBlock11").read(allow_partial=True) == b""
        assert any(f.kind == "truncated" for f in s.findings)


def test_numbered_bulk_read_equals_key_by_key(tmp_path: Path) -> None:
    # NumberedKeys.read_values (the RAM map's bulk path) must give what Key.read and Key.path give,
    # for every value form: inline arrays, file objects, strings, scalars, leading-zero names.
    path = tmp_path / "numbered.vmrs"
    values: dict[str, object] = {
        "Rec0": os.urandom(48),
        "Rec1": os.urandom(4000),  # a file object
        "Rec2": "text value",
        "Rec3": 7,
        "Rec4": b"",
        "Rec05": os.urandom(12),  # a leading zero: a literal name, also listed under the stem
        "Other": os.urandom(48),
    }
    write_storage(path, {"savedstate": {"deep": {"er": values}}, "Rec9": os.urandom(48)})
    with HyperVStorage.open(path, strict=True) as s:
        for node in (s.find("/savedstate/deep/er"), s.root):
            assert node is not None
            keys = node.numbered_children("Rec")
            paths, got = keys.read_values()
            assert len(keys) == len(got) > 0
            assert list(keys.keys()) == sorted(keys)
            assert paths == [keys[n].path for n in keys]
            assert got == [keys[n].read() for n in keys]


def test_key_paths_stay_right_when_the_parent_path_memo_is_cleared(tmp_path: Path, monkeypatch) -> None:
    from volatility3_vmssd.storage import keytree

    monkeypatch.setattr(keytree, "_NODE_PATHS_MAX", 2)  # cleared every third parent
    tree = {f"n{i}": {f"m{j}": {"leaf": j, "x": {"y": i}} for j in range(3)} for i in range(4)}
    path = tmp_path / "paths.vmrs"
    write_storage(path, tree)
    expected = {p for p in flatten(tree)}
    with HyperVStorage.open(path, strict=True) as s:
        assert {k.path for k in s.walk()} - {""} == expected
