"""Expanding the pages of a RamBlock from its :class:`~.ramblock.BlockIndex`: the careful path.

:func:`~.ramblock.index_block` has validated the records and noted what is damaged;
:func:`decode_pages` turns the index into pages (a range of them, each variable run walked once).
Every XPRESS record goes through :func:`~..codecs.xpress.decompress`, which alone decides between
the native and the pure-Python decoder; a page that does not decode raises :class:`FormatError`, or
with ``errors`` is collected and reads as zeros.  Well-formed blocks read whole take
:func:`~.ramblock.plan_block` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..codecs import xpress as _xpress
from ..errors import FormatError
from .geometry import PAGE_SIZE, PAGES_PER_BLOCK
from .ramblock import (
    _ALL_FILL_KINDS,
    _PATTERN,
    _ZERO_PAGE,
    KIND_FILL,
    KIND_PIECES,
    KIND_RAW,
    KIND_XPRESS,
    BlockIndex,
    Piece,
    fill_page,
)
from .records import TAG_FILL, TAG_MULTI_FILL, TAG_VARIABLE_RUN, RecordDamage, tokens

__all__ = ["decode_pages", "detach_error", "uniform_pattern"]


def _fill_bytes(pattern: int, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of an endless repetition of the 8-byte pattern (for unaligned pieces)."""
    raw = _PATTERN.pack(pattern)
    phase = start & 7
    rotated = raw[phase:] + raw[:phase]
    n = stop - start
    return (rotated * ((n + 7) >> 3))[:n]


def _pieces(value: bytes | bytearray | memoryview, pos: int, out: int, stop: int) -> Iterator[Piece]:
    """Re-walk records from a checkpoint until output offset ``stop``, as pieces.

    Only called for pages below ``BlockIndex.covered``, whose records :func:`index_block` has
    already validated; damage (an index used on another value) just ends the walk.
    """
    try:
        for tag, rec, at, arg, count in tokens(value, pos, out, stop):
            if 0 < tag <= PAGE_SIZE:
                yield at, PAGE_SIZE, KIND_RAW if tag == PAGE_SIZE else KIND_XPRESS, arg, tag, rec
            elif tag in (TAG_FILL, TAG_MULTI_FILL):
                yield at, count * PAGE_SIZE, KIND_FILL, arg, 8, rec
            elif tag == TAG_VARIABLE_RUN:
                yield at, arg, KIND_RAW if arg == count else KIND_XPRESS, rec + 12, count, rec
            else:
                return
    except RecordDamage:
        return


def detach_error(exc: FormatError) -> FormatError:
    """``exc`` and its causes without tracebacks, before it is kept in an ``errors`` list.

    Bounded on purpose: a kept traceback ties the decoder's frames (holding the list itself and 1 MiB
    buffers) into a reference cycle that only the cyclic GC frees, so decoding damaged blocks one
    after another held hundreds of MiB (225 MB RSS after 12,000 fuzz inputs; 100 MB without).
    """
    link: BaseException | None = exc
    while link is not None:
        link.__traceback__ = None
        link = link.__cause__
    return exc


def _bad_page(index: BlockIndex, page: int, detail: str, offset: int | None = None) -> FormatError:
    if offset is None:
        offset = index.record_offset(page)
    return FormatError(index.path, offset, f"RamBlock page {page}: {detail}")


def _expand_xpress(
    data: bytes | memoryview,
    size: int,
    index: BlockIndex,
    page: int,
    at: int | None,
    on_fallback: Callable[..., object] | None,
) -> bytes:
    try:
        out = _xpress.decompress(data, size, on_fallback=on_fallback)
    except FormatError as exc:
        raise _bad_page(index, page, f"XPRESS data does not decode ({exc.expected})", at) from exc
    if len(out) != size:
        raise _bad_page(index, page, f"XPRESS data expands to {len(out)} bytes, expected {size}", at)
    return out


def _xpress_page(
    view: memoryview,
    offset: int,
    length: int,
    index: BlockIndex,
    page: int,
    on_fallback: Callable[..., object] | None,
) -> bytes:
    """The XPRESS page record of ``page`` expanded, or the :class:`FormatError` that names it."""
    return _expand_xpress(
        view[offset : offset + length], PAGE_SIZE, index, page, index.record_offset(page), on_fallback
    )


def _piece_offset(index: BlockIndex, piece: Piece) -> int | None:
    return None if index.file_offset is None else index.file_offset + piece[5]


def _piece_bytes(
    view: memoryview,
    index: BlockIndex,
    piece: Piece,
    start: int,
    stop: int,
    on_fallback: Callable[..., object] | None,
) -> bytes | memoryview:
    """Output bytes ``start:stop`` (relative to the piece) of one piece."""
    out_start, length, kind, arg, stored, _ = piece
    if kind == KIND_FILL:
        # The pattern's phase is relative to the record's first output byte, wherever that lands.
        if start == 0 and stop == PAGE_SIZE:
            return fill_page(arg)
        return _fill_bytes(arg, start, stop)
    if kind == KIND_RAW:
        return view[arg + start : arg + stop]
    data = _expand_xpress(
        view[arg : arg + stored], length, index, out_start >> 12, _piece_offset(index, piece), on_fallback
    )
    return data[start:stop] if (start, stop) != (0, length) else data


def _decode_pieces(
    view: memoryview,
    index: BlockIndex,
    pages: list[bytes],
    first: int,
    stop: int,
    on_fallback: Callable[..., object] | None,
    errors: list[tuple[int, FormatError]] | None,
) -> None:
    """Put every run of KIND_PIECES pages (of ``first``..``stop - 1``) into ``pages`` (which starts at
    page ``first``), walking each run's records once."""
    kinds, piece_out = index.kinds, index.piece_out
    assert piece_out is not None
    last_page = min(index.covered >> 12, stop)  # pages from covered on are missing
    page = first
    while page < last_page:
        if kinds[page] != KIND_PIECES:
            page += 1
            continue
        stop_page = page
        while stop_page < last_page and kinds[stop_page] == KIND_PIECES:
            stop_page += 1
        lo, hi = page << 12, stop_page << 12
        out = bytearray(hi - lo)
        for piece in _pieces(view, index.args[page], piece_out[page], hi):
            start, end = max(lo, piece[0]) - piece[0], min(hi, piece[0] + piece[1]) - piece[0]
            if end <= start:
                continue
            at = piece[0] + start
            try:
                out[at - lo : at - lo + end - start] = _piece_bytes(view, index, piece, start, end, on_fallback)
            except FormatError as exc:
                if errors is None:
                    raise
                detach_error(exc)
                for bad in range(at >> 12, ((at + end - start - 1) >> 12) + 1):
                    errors.append((bad, exc))
                    out[(bad << 12) - lo : ((bad + 1) << 12) - lo] = _ZERO_PAGE
        for p in range(page, stop_page):
            pages[p - first] = bytes(out[(p << 12) - lo : ((p + 1) << 12) - lo])
        page = stop_page


def decode_pages(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    first: int = 0,
    stop: int = PAGES_PER_BLOCK,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> list[bytes]:
    """Pages ``first``..``stop - 1`` (all 256 by default) as one ``bytes`` object each.

    Fill pages are the shared cached pattern page and missing pages (``index.missing_pages``) a
    shared zero page, so a mostly-empty block costs a 2 KiB list instead of a fresh 1 MiB buffer
    that the kernel must fault in.  A page whose XPRESS data does not decode raises
    :class:`FormatError`, unless ``errors`` is given: then it reads as zeros and ``(page, error)``
    is appended, so one bad page does not cost the others.  Pages inside one variable run share
    its data (up to 1 MiB): each run of such pages is walked and expanded once, not once per page.
    """
    if not 0 <= first <= stop <= PAGES_PER_BLOCK:
        raise ValueError(f"page range {first}..{stop} outside 0..{PAGES_PER_BLOCK}")
    view = memoryview(value)
    kinds, args, lengths = index.kinds, index.args, index.lengths
    pages: list[bytes] = []
    append = pages.append
    for page in range(first, stop):
        kind = kinds[page]
        if kind == KIND_FILL:
            append(fill_page(args[page]))
        elif kind == KIND_XPRESS:
            try:
                append(_xpress_page(view, args[page], lengths[page], index, page, on_fallback))
            except FormatError as err:
                if errors is None:
                    raise
                errors.append((page, detach_error(err)))
                append(_ZERO_PAGE)
        elif kind == KIND_RAW:
            offset = args[page]
            append(bytes(view[offset : offset + PAGE_SIZE]))
        else:  # missing; pieces are decoded below, one walk per run
            append(_ZERO_PAGE)
    if index.piece_out is not None:
        _decode_pieces(view, index, pages, first, stop, on_fallback, errors)
    return pages


def uniform_pattern(index: BlockIndex) -> int | None:
    """The fill pattern if every page of the block is the same fill, else None (cheap: C-level scans)."""
    if index.raw or index.kinds != _ALL_FILL_KINDS:
        return None
    args = index.args
    pattern = args[0]
    return pattern if args.count(pattern) == PAGES_PER_BLOCK else None
