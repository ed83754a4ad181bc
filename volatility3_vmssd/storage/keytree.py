"""The key tree of a container held compactly: the key-table bytes plus a few arrays per key.

A VM with 1 TiB of RAM has a million RamBlock keys; one Python object per key cost 900 MB and
26 s to open (docs/robustness.md).  Here every key is a small integer id into parallel ``array``
columns (table, entry position, type, flags, insertion sequence, parent), the children of a node
are one ``array`` of ids, and :class:`Key` is a two-slot view made when a caller asks for a key.
Names and values stay in the table bytes and are decoded on access.
"""

from __future__ import annotations

import operator
import re
import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Mapping
from itertools import compress, groupby, islice, repeat
from typing import Protocol

from ..errors import ChecksumError, Findings, FormatError, NotFoundError, TruncatedError
from .defs import (
    FILE_OBJECT_POINTER,
    FIXED_VALUE_SIZES,
    KEY_ENTRY_CRC_OFFSET,
    KEY_ENTRY_HEADER,
    KEY_FLAG_FILE_OBJECT,
    KEY_TABLE_HEADER,
    LENGTH_PREFIX,
    NODE_VALUE,
    SCALAR_FORMATS,
    KeyType,
)


class _Container(Protocol):
    """What the key tree needs of its container (``reader.HyperVStorage``), without importing it."""

    path: str
    findings: Findings

    def read_at(self, offset: int, size: int) -> bytes: ...

    def note_truncation(self, offset: int, message: str) -> None: ...


Value = int | float | str | bytes | bool | None

_HSIZE = KEY_ENTRY_HEADER.size
_ZERO4 = b"\0\0\0\0"
_LEFT_OUT = -1  # parent column value of a key that is not part of the tree
_SHADOWED = -3  # parent column value of an older same-named sibling (reachable through Key.shadowed)
_STRING_TYPES = (KeyType.STRING, KeyType.ARRAY)
_FIXED = {int(k): v for k, v in FIXED_VALUE_SIZES.items()}
_NODE_PATHS_MAX = 4096


def decode_utf16(data: bytes) -> str:
    """UTF-16LE without the trailing NUL(s) that Hyper-V writes."""
    if len(data) % 2:
        data = data[:-1]
    text = data.decode("utf-16-le", errors="replace")
    return text.rstrip("\0")


def _value_extent(ktype: int, kflags: int, nsize: int, body: int, end: int, data: bytes) -> int | str:
    """Length of the meaningful value bytes starting at ``body`` (what the CRC covers), or a problem."""
    room = end - body
    if kflags & KEY_FLAG_FILE_OBJECT:
        return FILE_OBJECT_POINTER.size if room >= FILE_OBJECT_POINTER.size else "file-object pointer is cut short"
    fixed = _FIXED.get(ktype)
    if fixed is not None:
        return fixed if room >= fixed else f"{fixed}-byte value cut short ({room} bytes left)"
    if ktype == KeyType.STRING or ktype == KeyType.ARRAY:
        if room < LENGTH_PREFIX.size:
            return "length prefix cut short"
        (length,) = LENGTH_PREFIX.unpack_from(data, body)
        if LENGTH_PREFIX.size + length > room:
            return f"value length {length} exceeds the entry ({room - 4} bytes left)"
        return LENGTH_PREFIX.size + length
    # Unknown type: keep its bytes; the CRC then cannot tell slack from value.
    return room


class KeyTree:
    """Columns of every key read from the chosen key tables, and the links between them.

    Key ids are positions in the columns, in table order then entry order; :attr:`root` is one past
    the last entry.  Each node with children gets a :class:`_ChildIndex` for lookups by name.
    """

    def __init__(self, storage: _Container) -> None:
        self.storage = storage
        self.tables: list[bytes] = []  # key-table bytes, in table-index order
        self.table_index: list[int] = []  # the TableIndex of each
        self.table_offset: list[int] = []  # absolute file offset of each
        self.first_id: list[int] = []  # id of the first key of each table
        self.pos = array("I")  # entry offset inside its table
        self.type = array("B")
        self.flags = array("B")
        self.seq = array("I")  # InsertionSequence
        self.ref = array("Q")  # ParentNodeTable << 32 | ParentNodeOffset, until linked
        self._heads = bytearray()  # every stored entry's header, until _columns
        self.parent = array("i")  # parent id, the root, or _LEFT_OUT
        self.children: dict[int, array[int]] = {}
        self.shadowed: dict[int, array[int]] = {}
        self.index: dict[int, _ChildIndex] = {}
        self.root = 0
        self.shadowed_count = 0
        self._node_paths: dict[int, str] = {}  # node id -> path, bounded by _NODE_PATHS_MAX

    def __len__(self) -> int:
        return len(self.pos)

    # ------------------------------------------------------------------ parsing
    def add_table(self, index: int, offset: int, data: bytes) -> int:
        """Parse the entries of one key table; returns how many keys it holds.

        This loop runs once per key of the file (a million for 1 TiB of RAM), so it is written for
        speed: one CRC call per entry over a copy whose CRC field is zeroed, the common value forms
        decided inline, and the entry header kept whole for :meth:`_columns`.
        """
        storage = self.storage
        findings, path = storage.findings, storage.path
        self.tables.append(data)
        self.table_index.append(index)
        self.table_offset.append(offset)
        self.first_id.append(len(self.pos))
        unpack = KEY_ENTRY_HEADER.unpack_from
        crc32 = zlib.crc32
        pos_col = self.pos.append
        heads = self._heads
        fixed = _FIXED
        fo_flag = KEY_FLAG_FILE_OBJECT
        free = int(KeyType.FREE)
        prefixed = frozenset({int(KeyType.STRING), int(KeyType.ARRAY)})  # a u32 length, then the value
        prefix = LENGTH_PREFIX.unpack_from
        n = len(data)
        zeroed = bytearray(data)
        hsize, zero4 = _HSIZE, _ZERO4
        crc_at = KEY_ENTRY_CRC_OFFSET
        pos = KEY_TABLE_HEADER.size
        count = 0
        bad: list[int] = []  # entries whose CRC fails, reported together after the loop
        while pos + hsize <= n:
            ktype, kflags, ksize, _pt, _po, kcrc, _seq, nsize = unpack(data, pos)
            if ksize == 0:
                break
            end = pos + ksize
            if ksize < hsize or end > n:
                findings.add(
                    path,
                    offset + pos,
                    "key-table",
                    f"key entry size {ksize} does not fit: expected {hsize}..{n - pos} bytes"
                    f" (rest of key table {index}); rest of the table skipped",
                    error=FormatError,
                    group="key-table",
                )
                break
            if ktype == free:
                pos = end
                continue
            body = pos + hsize + nsize
            vlen: int | str
            if nsize == 0 or body > end:
                vlen = f"name size {nsize} does not fit in an entry of {ksize} bytes"
            elif kflags & fo_flag:
                vlen = 12 if end - body >= 12 else "file-object pointer is cut short"
            elif ktype in prefixed and end - body >= 4:
                vlen = 4 + prefix(data, body)[0]
                if body + vlen > end:
                    vlen = f"value length {vlen - 4} exceeds the entry ({end - body - 4} bytes left)"
            elif (size := fixed.get(ktype)) is not None and end - body >= size:
                vlen = size
            else:
                vlen = _value_extent(ktype, kflags, nsize, body, end, data)
            if vlen.__class__ is str:
                findings.add(
                    path,
                    offset + pos,
                    "key-entry",
                    f"key entry in table {index}: {vlen}; skipped",
                    error=FormatError,
                    group="key-entry",
                )
                pos = end
                continue
            at = pos + crc_at
            zeroed[at : at + 4] = zero4
            if crc32(zeroed[pos : body + vlen]) != kcrc:  # type: ignore[operator]
                bad.append(pos)
            pos_col(pos)
            heads += zeroed[pos : pos + hsize]  # columns are cut from these at C speed (_columns)
            count += 1
            pos = end
        if bad:

            def message(j: int) -> str:
                q = bad[j]
                name = data[q + _HSIZE : q + _HSIZE + data[q + _HSIZE - 1]].rstrip(b"\0").decode("utf-8", "replace")
                return f"key entry {name!r} in table {index} fails its CRC-32"

            findings.add_all(path, "crc", [offset + q for q in bad], message, error=ChecksumError, group="key-entry")
        return count

    def _columns(self) -> None:
        """Type, flags, sequence and parent reference of every key, cut from the saved headers.

        Strided slices gather one field of every header in one C call each.
        """
        h, size = self._heads, _HSIZE
        n = len(h) // size
        self.type = array("B", h[0::size])
        self.flags = array("B", h[1::size])

        def gather(layout: tuple[int, ...], width: int) -> bytes:
            out = bytearray(width * n)
            for j, src in enumerate(layout):
                if src >= 0:
                    out[j::width] = h[src::size]
            return bytes(out)

        self.seq = array("I", gather((16, 17, 18, 19), 4))  # InsertionSequence (u32 at 16)
        # ParentNodeOffset (u32 at 8) in the low half, ParentNodeTable (u16 at 6) above it.
        self.ref = array("Q", gather((8, 9, 10, 11, 6, 7, -1, -1), 8))
        if sys.byteorder != "little":
            self.seq.byteswap()
            self.ref.byteswap()
        self._heads = bytearray()

    # ------------------------------------------------------------------ linking
    def link(self) -> None:
        """Resolve parents, order siblings, hide older same-name siblings, drop unreachable keys.

        Costs O(keys) at C speed plus O(runs of keys with one parent) in Python: the keys of a
        table mostly share a parent, and ``groupby`` hands over each run at once.
        """
        self._columns()
        n = len(self.pos)
        self.root = n
        node = int(KeyType.NODE)
        by_index = {index: t for t, index in enumerate(self.table_index)}
        bounds = [*self.first_id, n]
        pos, types = self.pos, self.type
        parent = array("i")
        groups: dict[int, array[int]] = {}
        orphans = 0
        keep = self.storage.findings.keep
        start = 0
        for r, run in groupby(self.ref):
            length = len(list(run))
            ptable, poff = r >> 32, r & 0xFFFFFFFF
            p = _LEFT_OUT
            if ptable == 0:
                p = n
            else:
                t = by_index.get(ptable)
                if t is not None:
                    lo, hi = bounds[t], bounds[t + 1]
                    j = bisect_left(pos, poff, lo, hi)
                    if j < hi and pos[j] == poff:
                        p = j if types[j] == node else -2 - j
            if p < 0:
                parent.extend(_repeat(_LEFT_OUT, length))
                for i in range(start, start + length):
                    self._orphan_finding(i, r, p, quick=orphans >= keep)
                    orphans += 1
            else:
                parent.extend(_repeat(p, length))
                group = groups.get(p)
                if group is None:
                    group = groups[p] = array("I")
                group.extend(range(start, start + length))
            start += length
        self.parent = parent
        self.ref = array("Q")  # no longer needed
        seq = self.seq
        for p, g in groups.items():
            if len(g) > 1:
                seqs = array("I", map(seq.__getitem__, g))
                if any(map(operator.gt, seqs, islice(seqs, 1, None))):
                    groups[p] = array("I", sorted(g, key=seq.__getitem__))
        self.children = groups
        self._drop_unreachable()
        self._dedupe()

    def _orphan_finding(self, i: int, r: int, p: int, quick: bool = False) -> None:
        storage = self.storage
        if quick:  # past the kept ones the aggregation only counts: no message is built
            storage.findings.add(storage.path, self.file_offset(i), "orphan", "", group="key")
            return
        what = "is missing" if p == _LEFT_OUT else f"is a {_type_label(self.type[-2 - p])}, not a Node"
        storage.findings.add(
            storage.path,
            self.file_offset(i),
            "orphan",
            f"key {self.name(i)!r}: parent (table {r >> 32}, offset {r & 0xFFFFFFFF}) {what}; key left out",
            group="key",
        )

    def _dedupe(self) -> None:
        """Index every node's children by name; same-named siblings: the newest insertion wins.

        (As dissect reads test.VMRS, which holds 9 older "devicetype" and "metric" nodes.)  The
        older ones stay reachable through ``Key.shadowed``.
        """
        hidden_total = 0
        first_hidden = -1
        parent = self.parent
        for p, g in list(self.children.items()):
            index = self.index[p] = _ChildIndex(self, g)
            older = index.shadowed
            if not older:
                continue
            drop = set(older)
            self.shadowed[p] = array("I", older)
            self.children[p] = array("I", (k for k in g if k not in drop))
            for k in older:
                parent[k] = _SHADOWED
            hidden_total += len(older)
            first_hidden = older[0] if first_hidden < 0 else min(first_hidden, older[0])
        self.shadowed_count = hidden_total
        if hidden_total:
            storage = self.storage
            storage.findings.add(
                storage.path,
                self.file_offset(first_hidden),
                "shadowed",
                f"{hidden_total} key(s) share a name with a newer sibling; the newest insertion is"
                " used and the older ones are hidden from the tree",
            )

    def _drop_unreachable(self) -> None:
        """Keys whose parent chain never reaches the root (a cycle) are left out, with one finding.

        Only nodes that have children are walked (upwards, memoised), not every key.
        """
        n = self.root
        parent = self.parent
        status: dict[int, int] = {n: 1}  # 1 reached from the root, 0 not
        for p in list(self.children):
            trail: list[int] = []
            on_trail: set[int] = set()
            k = p
            while k not in status:
                if k in on_trail or k < 0:
                    break
                trail.append(k)
                on_trail.add(k)
                k = parent[k]
            answer = status.get(k, 0)
            for t in trail:
                status[t] = answer
        bad = [p for p in self.children if status.get(p) != 1]
        lost = sum(len(self.children[p]) for p in bad)
        if lost:
            first = min(self.children[p][0] for p in bad)
            self.storage.findings.add(
                self.storage.path,
                self.file_offset(first),
                "orphan",
                f"{lost} key(s) are not reachable from the root (parent cycle); left out",
            )
        for p in bad:
            for k in self.children.pop(p):
                parent[k] = _LEFT_OUT

    # ------------------------------------------------------------------ per-key access
    def table_of(self, i: int) -> int:
        return bisect_right(self.first_id, i) - 1

    def file_offset(self, i: int) -> int:
        return self.table_offset[self.table_of(i)] + self.pos[i]

    def header(self, i: int) -> tuple[int, ...]:
        return KEY_ENTRY_HEADER.unpack_from(self.tables[self.table_of(i)], self.pos[i])

    def raw_name(self, i: int) -> bytes:
        data, pos = self.tables[self.table_of(i)], self.pos[i]
        return data[pos + _HSIZE : pos + _HSIZE + data[pos + _HSIZE - 1]].rstrip(b"\0")

    def name(self, i: int) -> str:
        return self.raw_name(i).decode("utf-8", errors="replace") if i != self.root else ""

    def value_bytes(self, i: int) -> memoryview:
        """The meaningful value bytes of key ``i`` (the CRC's extent), as validated at parse time."""
        data, pos = self.tables[self.table_of(i)], self.pos[i]
        ktype, kflags, ksize, *_rest, nsize = KEY_ENTRY_HEADER.unpack_from(data, pos)
        body = pos + _HSIZE + nsize
        vlen = _value_extent(ktype, kflags, nsize, body, pos + ksize, data)
        assert isinstance(vlen, int)  # entries with a problem were never stored
        return memoryview(data)[body : body + vlen]

    def child(self, p: int, name: str) -> int | None:
        """The child of ``p`` called ``name``: an exact match first, then ignoring case."""
        index = self.index.get(p)
        return None if index is None else index.find(name)

    def numbered(self, p: int, stem: str, *, nodes: bool) -> NumberedKeys:
        """Children of ``p`` named ``<stem><n>`` (also ``<stem>/<n>/``): values, or nodes with ``nodes``."""
        index = self.index.get(p)
        if index is None:
            return NumberedKeys(self, array("Q"), array("I"))
        return index.numbered(stem, nodes)

    def path(self, i: int) -> str:
        if i == self.root or i < 0:
            return ""
        p = self.parent[i]
        if p == self.root or p < 0:
            return "/" + self.name(i)
        # Siblings share their parent's path: a fragmented RAM map names 100,000 of them at open.
        # Iterative (a hostile file may nest keys very deep); only the parent's path is kept.
        paths = self._node_paths
        head = paths.get(p)
        if head is None:
            parts: list[str] = []
            parent, root, k = self.parent, self.root, p
            while k != root and k >= 0:
                parts.append(self.name(k))
                k = parent[k]
            head = "/" + "/".join(reversed(parts))
            if len(paths) >= _NODE_PATHS_MAX:
                paths.clear()
            paths[p] = head
        return head + "/" + self.name(i)


def _repeat(value: int, count: int) -> array[int]:
    return array("i", [value]) * count


def _type_label(ktype: int) -> str:
    try:
        return KeyType(ktype).label
    except ValueError:
        return f"Type{ktype}"


_DIGITS = b"0123456789"


class _ChildIndex:
    """The children of one node by name, built in one pass at open.

    Names ``<stem><decimal>`` (a million ``RamBlock<n>``) go to per-stem arrays of numbers and ids
    sorted by number; other names to a small dict keyed by the ASCII-lowercased name.  A lookup is
    a bisect or a dict hit, and the ``RamBlock<n>`` listing the RAM map needs is a stem's arrays.
    """

    __slots__ = ("_numbered", "other", "shadowed", "stems", "tree")

    def __init__(self, tree: KeyTree, g: array[int]) -> None:
        self.tree = tree
        stems: dict[bytes, tuple[array[int], array[int]]] = {}
        other: dict[bytes, list[int]] = {}
        tables, first_id, pos_col = tree.tables, tree.first_id, tree.pos
        count = len(pos_col)
        lo, hi, data = 0, 0, b""
        digits, head = _DIGITS, _HSIZE
        # Hot loop (a million RamBlock<n> at open): the arrays of the last stem stay bound, so a run
        # of one stem costs no dict lookup.
        last: bytes | None = None
        add_number = add_id = None
        for k in g:
            if not lo <= k < hi:
                t = bisect_right(first_id, k) - 1
                lo = first_id[t]
                hi = first_id[t + 1] if t + 1 < len(first_id) else count
                data = tables[t]
            q = pos_col[k] + head
            name = data[q : q + data[q - 1]].rstrip(b"\0")
            stem = name.rstrip(digits)
            cut = len(stem)
            if cut == len(name) or (name[cut] == 48 and cut + 1 < len(name)):  # no number, or a leading zero
                low = name.lower()
                bucket = other.get(low)
                if bucket is None:
                    other[low] = [k]
                else:
                    bucket.append(k)
                continue
            if stem != last:
                arrays = stems.get(stem)
                if arrays is None:
                    arrays = stems[stem] = (array("Q"), array("I"))
                last, add_number, add_id = stem, arrays[0].append, arrays[1].append
            add_number(int(name[cut:]))  # type: ignore[misc]
            add_id(k)  # type: ignore[misc]
        self.stems = stems
        self.other = other
        self.shadowed: list[int] = []
        self._numbered: dict[tuple[str, bool], NumberedKeys] = {}  # the tree is immutable once linked
        for stem, (numbers, ids) in list(stems.items()):
            if any(map(operator.gt, numbers, islice(numbers, 1, None))):
                numbers, ids = stems[stem] = _by_number(numbers, ids)
            if any(map(operator.eq, numbers, islice(numbers, 1, None))):
                # One exact name more than once: the last in sibling order (the newest) wins.
                keep = [j for j in range(len(numbers)) if j + 1 == len(numbers) or numbers[j + 1] != numbers[j]]
                kept = set(keep)
                self.shadowed.extend(ids[j] for j in range(len(numbers)) if j not in kept)
                stems[stem] = (array("Q", (numbers[j] for j in keep)), array("I", (ids[j] for j in keep)))
        for bucket in other.values():
            if len(bucket) > 1:
                self._hide_older(bucket)

    def _hide_older(self, bucket: list[int]) -> None:
        """Of siblings with one exact name, all but the last (the newest insertion) are shadowed."""
        raw = self.tree.raw_name
        last: dict[bytes, int] = {}
        for k in bucket:
            last[raw(k)] = k
        if len(last) == len(bucket):
            return
        newest = set(last.values())
        self.shadowed.extend(k for k in bucket if k not in newest)
        bucket[:] = [k for k in bucket if k in newest]

    def _numbered_hit(self, stem: bytes, number: int) -> int | None:
        arrays = self.stems.get(stem)
        if arrays is None:
            return None
        numbers, ids = arrays
        j = bisect_left(numbers, number)
        return ids[j] if j < len(numbers) and numbers[j] == number else None

    def find(self, name: str) -> int | None:
        tree = self.tree
        want = name.encode("utf-8")
        stem = want.rstrip(_DIGITS)
        cut = len(stem)
        numbered = cut < len(want) and not (want[cut] == 48 and cut + 1 < len(want))
        if numbered:
            number = int(want[cut:])
            hit = self._numbered_hit(stem, number)
            if hit is not None:
                return hit
        found = self.other.get(want.lower(), [])
        for k in found:
            if tree.raw_name(k) == want:
                return k
        if numbered:  # ignoring case: the same number under a stem spelled differently
            low = stem.lower()
            for other_stem in self.stems:
                if other_stem.lower() == low:
                    hit = self._numbered_hit(other_stem, number)
                    if hit is not None:
                        return hit
        lowered = name.lower()
        for k in found:
            if tree.name(k).lower() == lowered:
                return k
        if not want.isascii():  # bytes.lower() folds ASCII only: scan the names of other scripts
            for bucket in self.other.values():
                for k in bucket:
                    if tree.name(k).lower() == lowered:
                        return k
        return None

    def numbered(self, stem: str, nodes: bool) -> NumberedKeys:
        """``<stem><n>`` children (exact stem), plus literal ``<stem>/<n>/`` and leading-zero names."""
        cached = self._numbered.get((stem, nodes))
        if cached is None:
            cached = self._numbered[(stem, nodes)] = self._build_numbered(stem, nodes)
        return cached

    def _build_numbered(self, stem: str, nodes: bool) -> NumberedKeys:
        tree = self.tree
        node = int(KeyType.NODE)
        types = tree.type
        numbers, ids = self.stems.get(stem.encode("utf-8"), (array("Q"), array("I")))
        want = operator.eq if nodes else operator.ne
        keep = array("B", map(want, map(types.__getitem__, ids), repeat(node)))
        if not all(keep):
            numbers = array("Q", compress(numbers, keep))
            ids = array("I", compress(ids, keep))
        pattern = re.compile(rf"^{re.escape(stem)}/?(\d+)/?$")
        extra_n: list[int] = []
        extra_k: list[int] = []
        for bucket in self.other.values():
            for k in bucket:
                if (types[k] == node) == nodes:
                    m = pattern.match(tree.name(k))
                    if m:
                        extra_n.append(int(m[1]))
                        extra_k.append(k)
        if extra_n:
            numbers = array("Q", [*numbers, *extra_n])
            ids = array("I", [*ids, *extra_k])
        return NumberedKeys(tree, numbers, ids)


def _by_number(numbers: array[int], ids: array[int]) -> tuple[array[int], array[int]]:
    """Both arrays in ascending ``numbers`` order; a stable sort, so siblings keep their order.

    A writer that numbers its keys backwards gives a strictly descending run, reversed at C speed.
    """
    if all(map(operator.gt, numbers, islice(numbers, 1, None))):
        return array("Q", reversed(numbers)), array("I", reversed(ids))
    order = sorted(range(len(numbers)), key=numbers.__getitem__)
    return array("Q", map(numbers.__getitem__, order)), array("I", map(ids.__getitem__, order))


class NumberedKeys(Mapping[int, "Key"]):
    """``n -> Key`` for numbered siblings (``RamBlock<n>``), held as two sorted arrays."""

    def __init__(self, tree: KeyTree, numbers: array[int], ids: array[int]) -> None:
        self._tree = tree
        if any(map(operator.gt, numbers, islice(numbers, 1, None))):
            numbers, ids = _by_number(numbers, ids)
        # One key per number: the first in child order, as a dict built with setdefault would keep.
        if any(map(operator.eq, numbers, islice(numbers, 1, None))):
            keep = [j for j in range(len(numbers)) if j == 0 or numbers[j] != numbers[j - 1]]
            numbers = array("Q", (numbers[j] for j in keep))
            ids = array("I", (ids[j] for j in keep))
        self._numbers = numbers
        self._ids = ids

    def __len__(self) -> int:
        return len(self._numbers)

    def __iter__(self) -> Iterator[int]:
        return iter(self._numbers)

    def keys(self) -> array[int]:  # type: ignore[override]
        """The numbers, ascending, as one array (a KeysView would iterate in Python)."""
        return self._numbers

    def __contains__(self, n: object) -> bool:
        return self._find(n) >= 0

    def _find(self, n: object) -> int:
        if not isinstance(n, int) or n < 0:
            return -1
        j = bisect_left(self._numbers, n)
        return j if j < len(self._numbers) and self._numbers[j] == n else -1

    def __getitem__(self, n: int) -> Key:
        j = self._find(n)
        if j < 0:
            raise KeyError(n)
        return Key(self._tree, self._ids[j])

    def read_values(self) -> tuple[list[str], list[bytes]]:
        """Every key's path and value (:meth:`Key.read`), by ascending ``n``, in one loop.

        Inline values come straight from the key tables (their extent was validated when the
        table was parsed); file objects are read one by one.  The RAM map of a fragmented VM is
        100,000 small values read at open, where going through a :class:`Key` per value cost
        twice the rest of the work.
        """
        tree = self._tree
        ids = self._ids
        if not ids:
            return [], []
        flags, types, parent, root = tree.flags, tree.type, tree.parent, tree.root
        tables, first_id, pos_col = tree.tables, tree.first_id, tree.pos
        fo_flag, prefix = KEY_FLAG_FILE_OBJECT, LENGTH_PREFIX.unpack_from
        strings = {int(t) for t in _STRING_TYPES}
        paths: list[str] = []
        values: list[bytes] = []
        lo = hi = 0
        data = b""
        last_parent, folder = -1, ""
        for k in ids:
            if not lo <= k < hi:
                t = bisect_right(first_id, k) - 1
                lo, hi = first_id[t], first_id[t + 1] if t + 1 < len(first_id) else len(pos_col)
                data = tables[t]
            q = pos_col[k]
            nsize = data[q + _HSIZE - 1]
            body = q + _HSIZE + nsize
            name = data[q + _HSIZE : body].rstrip(b"\0").decode("utf-8", errors="replace")
            p = parent[k]
            if p != last_parent:
                last_parent, folder = p, tree.path(p) if p != root and p >= 0 else ""
            paths.append(f"{folder}/{name}")
            if flags[k] & fo_flag:
                values.append(Key(tree, k).read())
            elif types[k] in strings:
                values.append(data[body + 4 : body + 4 + prefix(data, body)[0]])
            else:
                values.append(bytes(tree.value_bytes(k)))
        return paths, values

    @staticmethod
    def union(maps: Iterable[Mapping[int, Key]]) -> Mapping[int, Key]:
        """The union of ``maps``; where numbers repeat, the earlier map wins."""
        nonempty = [m for m in maps if len(m)]
        if len(nonempty) == 1:
            return nonempty[0]
        out: dict[int, Key] = {}
        for m in nonempty:
            for n in m:
                out.setdefault(n, m[n])
        return out


class Key:
    """A key of the container: a Node with children, or a typed value.  A view onto :class:`KeyTree`.

    Scalars and inline values are decoded on access; a file-object value is read only when
    :attr:`value` or :meth:`read` is called, so opening a multi-GiB ``.vmrs`` reads no RAM.
    """

    __slots__ = ("_id", "_tree")

    def __init__(self, tree: KeyTree, key_id: int) -> None:
        self._tree = tree
        self._id = key_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other._tree is self._tree and other._id == self._id

    def __hash__(self) -> int:
        return hash((id(self._tree), self._id))

    def __repr__(self) -> str:
        return f"<Key {self.path or '/'} {self.type_label}>"

    @property
    def is_root(self) -> bool:
        return self._id == self._tree.root

    @property
    def name(self) -> str:
        return self._tree.name(self._id)

    @property
    def path(self) -> str:
        return self._tree.path(self._id)

    @property
    def type(self) -> KeyType | int:
        if self.is_root:
            return KeyType.NODE
        t = self._tree.type[self._id]
        try:
            return KeyType(t)
        except ValueError:
            return t

    @property
    def type_label(self) -> str:
        return _type_label(self.type)

    @property
    def flags(self) -> int:
        return 0 if self.is_root else self._tree.flags[self._id]

    @property
    def table_index(self) -> int:
        return 0 if self.is_root else self._tree.table_index[self._tree.table_of(self._id)]

    @property
    def entry_offset(self) -> int:
        """Offset of the entry inside its key table."""
        return 0 if self.is_root else self._tree.pos[self._id]

    @property
    def file_offset(self) -> int:
        """Absolute file offset of the key entry."""
        return 0 if self.is_root else self._tree.file_offset(self._id)

    @property
    def insertion_sequence(self) -> int:
        return 0 if self.is_root else self._tree.seq[self._id]

    @property
    def parent(self) -> Key | None:
        if self.is_root:
            return None
        p = self._tree.parent[self._id]
        return None if p < 0 else Key(self._tree, p)

    @property
    def children(self) -> list[Key]:
        tree = self._tree
        return [Key(tree, k) for k in tree.children.get(self._id, ())]

    @property
    def child_count(self) -> int:
        return len(self._tree.children.get(self._id, ()))

    @property
    def shadowed(self) -> list[Key]:
        """Older siblings hidden because a newer one has the same name."""
        tree = self._tree
        return [Key(tree, k) for k in tree.shadowed.get(self._id, ())]

    @property
    def is_node(self) -> bool:
        return self.type == KeyType.NODE

    @property
    def _fo(self) -> tuple[int, int] | None:
        if self.is_root or not self.flags & KEY_FLAG_FILE_OBJECT:
            return None
        return FILE_OBJECT_POINTER.unpack_from(self._tree.value_bytes(self._id))

    @property
    def is_file_object(self) -> bool:
        return not self.is_root and bool(self.flags & KEY_FLAG_FILE_OBJECT)

    @property
    def data_location(self) -> tuple[int, int] | None:
        """(absolute file offset, size) of a file-object value, or None when the value is inline."""
        fo = self._fo
        return (fo[1], fo[0]) if fo is not None else None

    def _inline(self) -> memoryview:
        return memoryview(b"") if self.is_root else self._tree.value_bytes(self._id)

    @property
    def size(self) -> int:
        """Bytes of a String or Array value (without the length prefix); 8/4/12 for scalars/nodes."""
        fo = self._fo
        if fo is not None:
            return fo[0]
        n = len(self._inline())
        return n - LENGTH_PREFIX.size if self.type in _STRING_TYPES else n

    def read(self, offset: int = 0, size: int | None = None, *, allow_partial: bool = False) -> bytes:
        """Bytes of a String/Array value, or a slice of them; file objects are read on demand.

        With ``allow_partial`` a value cut short by the end of the file returns what is there
        (and the storage records a finding) instead of raising :class:`TruncatedError`.
        """
        # The columns are read once here (not through size/_fo/type, which each repeat them): the
        # RAM map of a fragmented VM reads 100,000 small values at open.
        tree, i = self._tree, self._id
        if i == tree.root:
            inline, fo = memoryview(b""), None
        else:
            inline = tree.value_bytes(i)
            fo = FILE_OBJECT_POINTER.unpack_from(inline) if tree.flags[i] & KEY_FLAG_FILE_OBJECT else None
        if fo is None:
            start = LENGTH_PREFIX.size if i != tree.root and tree.type[i] in _STRING_TYPES else 0
            total = len(inline) - start
        else:
            total = fo[0]
        if offset < 0 or offset > total:
            raise NotFoundError(f"{self.path}: offset {offset} outside a value of {total} bytes")
        end = total if size is None else min(total, offset + max(0, size))
        if fo is None:
            return bytes(inline[start + offset : start + end])
        storage = self._tree.storage
        want = end - offset
        data = storage.read_at(fo[1] + offset, want)
        if len(data) < want:
            message = (
                f"value of {self.path} ({total} bytes at {fo[1]:#x}) is cut short by the end of"
                f" the file: {len(data)} of {want} bytes requested from offset {offset} are present"
            )
            if not allow_partial:
                raise TruncatedError(storage.path, fo[1] + offset + len(data), message)
            storage.note_truncation(fo[1] + offset + len(data), message)
        return data

    @property
    def value(self) -> Value:
        """The typed value: int (Int/UInt), float, str (without the trailing NUL), bytes, bool.

        Nodes have no value (None); unknown key types give their raw bytes.
        """
        t = self.type
        if t == KeyType.NODE:
            return None
        fmt = SCALAR_FORMATS.get(t)  # type: ignore[call-overload]
        if fmt is not None:
            # A scalar stored as a file object is odd but harmless: decode its leading bytes.
            raw = self._inline() if self._fo is None else self.read()
            if len(raw) < fmt.size:
                return None
            v = fmt.unpack_from(raw)[0]
            return bool(v) if t == KeyType.BOOL else v
        data = self.read()
        return decode_utf16(data) if t == KeyType.STRING else data

    @property
    def node_info(self) -> tuple[int, int] | None:
        """(ChangeTrackingSequence, NextInsertionSequence) of a Node."""
        if self.type != KeyType.NODE or self.is_root:
            return None
        raw = self._inline()
        return NODE_VALUE.unpack_from(raw) if len(raw) >= NODE_VALUE.size else None

    def child(self, name: str) -> Key:
        k = self._tree.child(self._id, name)
        if k is None:
            raise NotFoundError(f"{self.path or '/'} has no child named {name!r}")
        return Key(self._tree, k)

    def get(self, name: str) -> Key | None:
        k = self._tree.child(self._id, name)
        return None if k is None else Key(self._tree, k)

    def numbered_children(self, stem: str, *, nodes: bool = False) -> NumberedKeys:
        """Children named ``<stem><n>`` as a compact ``n -> Key`` mapping (values, or nodes with ``nodes``).

        What the RAM map and block index need from a million RamBlock keys, without a million objects.
        """
        return self._tree.numbered(self._id, stem, nodes=nodes)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.children)

    def walk(self) -> Iterator[Key]:
        """This key's descendants in tree order (siblings by insertion sequence)."""
        tree = self._tree
        children = tree.children
        stack = list(reversed(children.get(self._id, ())))
        while stack:
            k = stack.pop()
            yield Key(tree, k)
            g = children.get(k)
            if g:
                stack.extend(reversed(g))
