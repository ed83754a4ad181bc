"""Expanding the pages of a RamBlock from its :class:`~.ramblock.BlockIndex`: the careful path.

:func:`~.ramblock.index_block` has validated the records and noted what is damaged; these turn the
index into pages: :func:`decode_page` (one page), :func:`decode_pages` (a range, each variable run
walked once), :func:`decode_block` (into a bytearray), :func:`decode_block_bytes` and
:func:`decode_block_pages` (the forms the block cache keeps).  Every XPRESS record goes through
:func:`~..codecs.xpress.decompress`, which alone decides between the native and the pure-Python
decoder; a page that does not decode raises :class:`FormatError`, or with ``errors`` is collected
and reads as zeros.  Well-formed blocks read whole take :func:`~.ramblock.plan_block` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from ..codecs import xpress as _xpress
from ..errors import FormatError
from .geometry import BLOCK_SIZE, PAGE_SIZE, PAGES_PER_BLOCK
from .ramblock import (
    _ALL_FILL_KINDS,
    _MULTI_FILL_TAIL,
    _PATTERN,
    _VARIABLE_RUN_TAIL,
    _ZERO_PAGE,
    KIND_FILL,
    KIND_MISSING,
    KIND_PIECES,
    KIND_RAW,
    KIND_XPRESS,
    RECORD_TAG,
    TAG_FILL,
    TAG_MULTI_FILL,
    TAG_VARIABLE_RUN,
    BlockIndex,
    MissingPageError,
    Piece,
    fill_page,
    uniform_block,
)

__all__ = [
    "decode_block",
    "decode_block_bytes",
    "decode_block_pages",
    "decode_page",
    "decode_pages",
    "detach_error",
    "uniform_pattern",
]


def _fill_bytes(pattern: int, start: int, stop: int) -> bytes:
    """Bytes ``start:stop`` of an endless repetition of the 8-byte pattern (for unaligned pieces)."""
    raw = _PATTERN.pack(pattern)
    phase = start & 7
    rotated = raw[phase:] + raw[:phase]
    n = stop - start
    return (rotated * ((n + 7) >> 3))[:n]


def _walk(value: bytes | bytearray | memoryview, pos: int, out: int, stop: int) -> Iterator[Piece]:
    """Re-walk records from a checkpoint until output offset ``stop``.

    Only called for pages below ``BlockIndex.covered``, whose records :func:`index_block` has
    already validated, so no bounds are rechecked beyond a guard against a mis-used index.
    """
    unpack_tag = RECORD_TAG.unpack_from
    while out < stop and pos + 4 <= len(value):
        tag = unpack_tag(value, pos)[0]
        if tag == TAG_FILL:
            yield out, PAGE_SIZE, KIND_FILL, _PATTERN.unpack_from(value, pos + 4)[0], 8, pos
            pos += 12
            out += PAGE_SIZE
        elif 0 < tag <= PAGE_SIZE:
            yield out, PAGE_SIZE, KIND_RAW if tag == PAGE_SIZE else KIND_XPRESS, pos + 4, tag, pos
            pos += 4 + tag
            out += PAGE_SIZE
        elif tag == TAG_MULTI_FILL:
            pattern, count = _MULTI_FILL_TAIL.unpack_from(value, pos + 4)
            yield out, count * PAGE_SIZE, KIND_FILL, pattern, 8, pos
            pos += 16
            out += count * PAGE_SIZE
        elif tag == TAG_VARIABLE_RUN:
            usize, csize = _VARIABLE_RUN_TAIL.unpack_from(value, pos + 4)
            yield out, usize, KIND_RAW if usize == csize else KIND_XPRESS, pos + 12, csize, pos
            pos += 12 + csize
            out += usize
        else:
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


def decode_page(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    page_no: int,
    *,
    on_fallback: Callable[..., object] | None = None,
) -> bytes:
    """Decode one 4 KiB page; raises :class:`MissingPageError` or :class:`FormatError` (bad XPRESS)."""
    if not 0 <= page_no < PAGES_PER_BLOCK:
        raise ValueError(f"page number {page_no} outside 0..255")
    kind = index.kinds[page_no]
    if kind == KIND_FILL:
        return fill_page(index.args[page_no])
    if kind == KIND_RAW:
        offset = index.args[page_no]
        return bytes(value[offset : offset + PAGE_SIZE])
    if kind == KIND_XPRESS:
        offset = index.args[page_no]
        return _xpress_page(memoryview(value), offset, index.lengths[page_no], index, page_no, on_fallback)
    if kind == KIND_PIECES and index.piece_out is not None and page_no < index.covered >> 12:
        view = memoryview(value)
        lo, hi = page_no << 12, (page_no + 1) << 12
        parts: list[bytes | memoryview] = []
        for piece in _walk(view, index.args[page_no], index.piece_out[page_no], hi):
            start, stop = max(lo, piece[0]) - piece[0], min(hi, piece[0] + piece[1]) - piece[0]
            if stop > start:
                parts.append(_piece_bytes(view, index, piece, start, stop, on_fallback))
        return b"".join(parts)
    where = f" (absolute offset {index.file_offset:#x})" if index.file_offset is not None else ""
    raise MissingPageError(
        f"{index.path}: page {page_no} of the RamBlock value{where} is not produced by its record stream",
        page_no,
    )


def _decode_pieces(
    view: memoryview,
    index: BlockIndex,
    out: bytearray,
    on_fallback: Callable[..., object] | None,
    errors: list[tuple[int, FormatError]] | None,
    first_page: int = 0,
    end_page: int = PAGES_PER_BLOCK,
) -> None:
    """Write every run of KIND_PIECES pages (of ``first_page``..``end_page - 1``) into ``out``, walking
    each run's records once; ``out`` starts at page ``first_page``."""
    kinds, piece_out = index.kinds, index.piece_out
    assert piece_out is not None
    base = first_page << 12
    last_page = min(index.covered >> 12, end_page)  # pages from covered on are missing
    page = first_page
    while page < last_page:
        if kinds[page] != KIND_PIECES:
            page += 1
            continue
        stop_page = page
        while stop_page < last_page and kinds[stop_page] == KIND_PIECES:
            stop_page += 1
        lo, hi = page << 12, stop_page << 12
        for piece in _walk(view, index.args[page], piece_out[page], hi):
            start, stop = max(lo, piece[0]) - piece[0], min(hi, piece[0] + piece[1]) - piece[0]
            if stop <= start:
                continue
            at = piece[0] + start
            try:
                out[at - base : at - base + stop - start] = _piece_bytes(view, index, piece, start, stop, on_fallback)
            except FormatError as exc:
                if errors is None:
                    raise
                detach_error(exc)
                for bad in range(at >> 12, ((at + stop - start - 1) >> 12) + 1):
                    errors.append((bad, exc))
                    out[(bad << 12) - base : ((bad + 1) << 12) - base] = _ZERO_PAGE
        page = stop_page


def decode_pages(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    first: int,
    stop: int,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> bytes:
    """Pages ``first``..``stop - 1`` as one ``bytes``; missing pages are zeros; errors as in :func:`decode_block`.

    Bounded on purpose: pages inside one variable run share its data (up to 1 MiB), and
    :func:`decode_page` re-expands the whole run for each of them, so reading a block page by page
    cost 256 expansions (minutes in pure Python).  Here each run of such pages is walked once.
    """
    if not 0 <= first <= stop <= PAGES_PER_BLOCK:
        raise ValueError(f"page range {first}..{stop} outside 0..{PAGES_PER_BLOCK}")
    out = bytearray((stop - first) << 12)
    kinds = index.kinds
    for page in range(first, stop):
        kind = kinds[page]
        if kind in (KIND_MISSING, KIND_PIECES):
            continue  # missing pages stay zero; pieces are decoded below, one walk per run
        lo = (page - first) << 12
        try:
            out[lo : lo + PAGE_SIZE] = decode_page(value, index, page, on_fallback=on_fallback)
        except FormatError as exc:
            if errors is None:
                raise
            errors.append((page, detach_error(exc)))
    if index.piece_out is not None:
        _decode_pieces(memoryview(value), index, out, on_fallback, errors, first, stop)
    return bytes(out)


def decode_block(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    out: bytearray | None = None,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> bytearray:
    """Decode all 256 pages in one pass into ``out`` (a new 1 MiB bytearray by default).

    Missing pages (``index.missing_pages``) are zero-filled.  A page whose XPRESS data does not
    decode raises :class:`FormatError`, unless ``errors`` is given: then it is zero-filled and
    ``(page, error)`` is appended, so one bad page does not cost the other 255.
    """
    fresh = out is None
    if out is None:
        out = bytearray(BLOCK_SIZE)
    elif len(out) != BLOCK_SIZE:
        raise ValueError(f"output buffer must be {BLOCK_SIZE} bytes, not {len(out)}")
    view = memoryview(value)
    if index.raw:
        out[:] = view
        return out
    kinds, args, lengths = index.kinds, index.args, index.lengths
    for page in range(PAGES_PER_BLOCK):
        kind = kinds[page]
        lo = page << 12
        if kind == KIND_FILL:
            pattern = args[page]
            if pattern or not fresh:  # a new bytearray is already zero
                out[lo : lo + PAGE_SIZE] = fill_page(pattern)
        elif kind == KIND_XPRESS:
            offset = args[page]
            try:
                out[lo : lo + PAGE_SIZE] = _xpress_page(view, offset, lengths[page], index, page, on_fallback)
            except FormatError as err:
                if errors is None:
                    raise
                errors.append((page, detach_error(err)))
                if not fresh:
                    out[lo : lo + PAGE_SIZE] = _ZERO_PAGE
        elif kind == KIND_RAW:
            offset = args[page]
            out[lo : lo + PAGE_SIZE] = view[offset : offset + PAGE_SIZE]
        elif kind == KIND_MISSING and not fresh:
            out[lo : lo + PAGE_SIZE] = _ZERO_PAGE
    if index.piece_out is not None:
        _decode_pieces(view, index, out, on_fallback, errors)
    return out


def uniform_pattern(index: BlockIndex) -> int | None:
    """The fill pattern if every page of the block is the same fill, else None (cheap: C-level scans)."""
    if index.raw or index.kinds != _ALL_FILL_KINDS:
        return None
    args = index.args
    pattern = args[0]
    return pattern if args.count(pattern) == PAGES_PER_BLOCK else None


def decode_block_pages(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> list[bytes]:
    """Decode all 256 pages as separate ``bytes`` objects (the form :class:`GuestMemory` caches).

    Fill pages are the shared cached pattern page and missing pages a shared zero page, so a
    mostly-empty block costs a 2 KiB list instead of a fresh 1 MiB buffer that the kernel must
    fault in; reads then copy each byte once, straight into their result.  Error handling is as
    in :func:`decode_block`.
    """
    if index.raw or index.piece_out is not None:  # rare in compressed form: take the general path
        block = bytes(decode_block(value, index, on_fallback=on_fallback, errors=errors))
        return [block[lo : lo + PAGE_SIZE] for lo in range(0, BLOCK_SIZE, PAGE_SIZE)]
    view = memoryview(value)
    kinds, args, lengths = index.kinds, index.args, index.lengths
    pages: list[bytes] = []
    append = pages.append
    for page in range(PAGES_PER_BLOCK):
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
        else:
            append(_ZERO_PAGE)
    return pages


def decode_block_bytes(
    value: bytes | bytearray | memoryview,
    index: BlockIndex,
    *,
    on_fallback: Callable[..., object] | None = None,
    errors: list[tuple[int, FormatError]] | None = None,
) -> bytes:
    """Like :func:`decode_block` but immutable ``bytes``, built with one copy.

    A block that is one fill pattern throughout is the shared :func:`uniform_block`.
    """
    if index.raw:
        return value if isinstance(value, bytes) else bytes(value)
    pattern = uniform_pattern(index)
    if pattern is not None:
        return uniform_block(pattern)
    if index.piece_out is not None:
        return bytes(decode_block(value, index, on_fallback=on_fallback, errors=errors))
    return b"".join(decode_block_pages(value, index, on_fallback=on_fallback, errors=errors))
