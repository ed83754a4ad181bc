"""The page-record stream of a RamBlock value, walked in one place (docs/format.md#ramblock-values).

:func:`tokens` is the only code that reads record headers: it yields one validated token per record
and holds every bounds check, so a fix to the format is made here once.  Its consumers interpret
the tokens: :func:`~.ramblock.plan_block` (the fast path of whole-block reads),
:func:`~.ramblock.index_block` (the careful path, which turns damage into findings) and
:mod:`.pagedecode` (which re-walks validated records from a checkpoint).

A token is ``(tag, rec, out, a, b)``: ``rec`` is the record's offset in the value and ``out`` the
offset in the block's 1 MiB of output where it starts.

* ``(n, rec, out, start, end)`` with ``n`` in 1..4096: a page record whose ``n`` bytes are
  ``value[start:end]`` (``start == rec + 4``): a raw page when ``n == 4096``, else XPRESS expanding
  to 4096 bytes;
* ``(TAG_FILL, rec, out, pattern, count)``: ``count`` identical single-fill records back to back (a
  run is taken at once only on a page boundary, where Hyper-V writes one record per empty page);
* ``(TAG_MULTI_FILL, rec, out, pattern, count)``: ``count`` pages of the pattern;
* ``(TAG_VARIABLE_RUN, rec, out, usize, csize)``: ``usize`` bytes of output from the ``csize`` bytes
  at ``rec + 12`` (raw when the sizes are equal, else XPRESS);
* ``(TAG_END, rec, out, 0, 0)``: an end marker; after one before 1 MiB of output nothing follows;
* ``(TRAILING, rec, BLOCK_SIZE, count, 0)``: ``count`` bytes after a complete 1 MiB (and its end
  marker, if any).

Damage (a record cut off by the end of the value or overrunning the 1 MiB, an unknown or zero tag, a
zero or absurd count or size, a value that ends before 1 MiB without an end marker) ends the walk
with :class:`RecordDamage`, which says where and what, in the words findings use.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

from ..errors import FormatError, TruncatedError
from .geometry import BLOCK_SIZE, PAGE_SIZE

__all__ = ["TAG_END", "TAG_FILL", "TAG_MULTI_FILL", "TAG_VARIABLE_RUN", "TRAILING", "RecordDamage", "tokens"]

TAG_END = 0xFFFFFFFF
TAG_FILL = 0xFFFFFFFE
TAG_MULTI_FILL = 0xFFFFFFFD
TAG_VARIABLE_RUN = 0xFFFFFFFC
#: The token of bytes after a complete block: above every u32 tag, so that consumers test the
#: common tags first and this one last, with the end marker.
TRAILING = 1 << 32

RECORD_TAG = struct.Struct("<I")
SINGLE_FILL_RECORD = struct.Struct("<IQ")  # tag, pattern (kept as an integer)
MULTI_FILL_RECORD = struct.Struct("<IQI")  # tag, pattern, page count (pattern first [3])
VARIABLE_RUN_RECORD = struct.Struct("<III")  # tag, uncompressed size, compressed size
_MULTI_FILL_TAIL = struct.Struct("<QI")
_VARIABLE_RUN_TAIL = struct.Struct("<II")

Token = tuple[int, int, int, int, int]


@dataclasses.dataclass(eq=False)
class RecordDamage(Exception):
    """Where a record stream stops being sound: the record's value offset ``rec``, the output ``out``
    produced before it, the finding ``kind`` and ``message``, the ``error`` strict mode raises, and
    ``counted``: the tag of a record that is counted in the block's statistics although it overruns
    the block (0 for none)."""

    rec: int
    out: int
    kind: str
    message: str
    error: type[FormatError]
    counted: int = 0


def same_records(value: bytes | bytearray | memoryview, pos: int, size: int, limit: int) -> int:
    """How many copies (1..limit) of the ``size``-byte record at ``pos`` follow back to back.

    Gallops with slice comparisons, so a run of n records costs O(log² n) Python steps, not n.
    """
    if limit <= 1:
        return max(limit, 1)
    record = bytes(value[pos : pos + size])
    if value[pos + size : pos + 2 * size] != record:
        return 1
    count, step = 2, 2
    while count < limit:
        step = min(step, limit - count)
        start = pos + count * size
        if value[start : start + step * size] == record * step:
            count += step
            step *= 2
        elif step == 1:
            break
        else:
            step //= 2
    return count


def tokens(
    value: bytes | bytearray | memoryview, pos: int = 0, out: int = 0, stop: int = BLOCK_SIZE
) -> Iterator[Token]:
    """The records of ``value`` from value offset ``pos`` (output offset ``out``) as tokens, until
    ``stop`` bytes of output; raises :class:`RecordDamage` where the stream is damaged.

    ``pos``/``out`` other than 0 restart at a record already validated (a checkpoint); a walk that
    stops before the whole block does not look at what follows.
    """
    # Hot loop (one turn per record, 131k turns for 512 MiB): locals only, the common cases first.
    size = len(value)
    head = SINGLE_FILL_RECORD.unpack_from  # tag and the next 8 bytes, the pattern of a fill record
    unpack_tag = RECORD_TAG.unpack_from
    last_page = BLOCK_SIZE - PAGE_SIZE  # a page record starting after this overruns the block
    while out < stop:
        if pos + 12 <= size:
            tag, pattern = head(value, pos)
        elif pos + 4 <= size:
            tag, pattern = unpack_tag(value, pos)[0], -1
        elif pos < size:
            raise RecordDamage(
                pos, out, "truncated", f"{size - pos} stray byte(s) where a record tag was expected", TruncatedError
            )
        else:
            raise RecordDamage(
                pos, out, "truncated", "value ends before 1 MiB of output and without an end marker", TruncatedError
            )
        if 0 < tag <= PAGE_SIZE:
            start = pos + 4
            end = start + tag
            if end > size:
                raise RecordDamage(
                    pos, out, "truncated", f"page record of {tag} bytes cut off by the end of the value", TruncatedError
                )
            if out > last_page:  # only possible off a page boundary
                raise RecordDamage(pos, out, "bad-record", "page record overruns the 1 MiB block", FormatError, tag)
            yield tag, pos, out, start, end
            pos = end
            out += PAGE_SIZE
        elif tag == TAG_FILL:
            if pattern < 0:
                raise RecordDamage(pos, out, "truncated", "single-fill record cut off", TruncatedError)
            nxt = pos + 12
            if out & 0xFFF:
                if out > last_page:
                    raise RecordDamage(
                        pos, out, "bad-record", "fill record overruns the 1 MiB block", FormatError, TAG_FILL
                    )
                run = 1
            elif value[nxt : nxt + 12] != value[pos:nxt]:
                run = 1
            else:  # Hyper-V writes one single-fill record per empty page: take the run at once
                run = same_records(value, pos, 12, min((BLOCK_SIZE - out) >> 12, (size - pos) // 12))
            yield TAG_FILL, pos, out, pattern, run
            pos += 12 * run
            out += PAGE_SIZE * run
        elif tag == TAG_MULTI_FILL:
            if pos + 16 > size:
                raise RecordDamage(pos, out, "truncated", "multi-fill record cut off", TruncatedError)
            count = _MULTI_FILL_TAIL.unpack_from(value, pos + 4)[1]
            if not 0 < count <= (BLOCK_SIZE - out) >> 12:
                raise RecordDamage(
                    pos,
                    out,
                    "bad-record",
                    f"multi-fill count {count} does not fit the {(BLOCK_SIZE - out) / PAGE_SIZE:g} pages left",
                    FormatError,
                )
            yield TAG_MULTI_FILL, pos, out, pattern, count
            pos += 16
            out += count * PAGE_SIZE
        elif tag == TAG_VARIABLE_RUN:
            if pos + 12 > size:
                raise RecordDamage(pos, out, "truncated", "variable-run header cut off", TruncatedError)
            usize, csize = _VARIABLE_RUN_TAIL.unpack_from(value, pos + 4)
            if not 0 < usize <= BLOCK_SIZE - out:
                raise RecordDamage(
                    pos,
                    out,
                    "bad-record",
                    f"variable run of {usize} bytes does not fit the {BLOCK_SIZE - out} bytes left",
                    FormatError,
                )
            if not 0 < csize <= size - pos - 12:
                raise RecordDamage(pos, out, "truncated", f"variable run data ({csize} bytes) cut off", TruncatedError)
            yield TAG_VARIABLE_RUN, pos, out, usize, csize
            pos += 12 + csize
            out += usize
        elif tag == TAG_END:
            yield TAG_END, pos, out, 0, 0
            return
        else:
            raise RecordDamage(pos, out, "bad-record", f"unknown page-record tag {tag:#010x}", FormatError)
    if stop < BLOCK_SIZE:
        return
    # Complete: the real .bin closes every block with an end marker; anything else left over is
    # harmless, because all 256 pages are known.
    if size - pos >= 4 and unpack_tag(value, pos)[0] == TAG_END:
        yield TAG_END, pos, out, 0, 0
        pos += 4
    if pos < size:
        yield TRAILING, pos, out, size - pos, 0
