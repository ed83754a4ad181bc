"""Pure-Python MS-XCA "plain LZ77" (XPRESS, ``COMPRESSION_FORMAT_XPRESS`` = 3) decoder and compressor.

Written from the algorithm in [MS-XCA] §2.3 (compression) and §2.4 (decompression).  The decoder is
the fallback for a whole memory image and the reference the native decoders are checked against, so
it is both hardened (it reads hostile evidence files) and tuned for CPython.  The compressor exists to
build test files; it trades some ratio for speed (see :func:`compress`).

Stream layout, for the reader of this file: a 32-bit little-endian flag word precedes every 32 tokens,
read most significant bit first; 0 is a literal byte, 1 a two-byte match token
``(offset - 1) << 3 | length_code``.  Length code 7 means "longer": an extra 4-bit nibble (two matches
share one byte, low half first), then an extra byte if the nibble is 15, then a 16-bit total if the
byte is 255, then a 32-bit total if the 16-bit value is 0.
"""

from __future__ import annotations

import struct

from ..errors import FormatError

__all__ = ["XpressError", "compress", "decompress"]

#: Match offsets are 13 bits plus one.
MAX_OFFSET = 8192
#: The shortest match the format can express.
MIN_MATCH = 3
#: The longest match the encoder writes.  The 16-bit form could say 0xFFFF + 3, but libfwnt
#: (20260602) rejects the 32-bit form and mis-decodes 16-bit values above 0x8000 (it returns short
#: output without an error), and our output must decode everywhere, so longer runs are split.
MAX_MATCH = 0x8000 + MIN_MATCH


class XpressError(FormatError):
    """An XPRESS stream is corrupt, truncated or does not expand to the size the container declares.

    Raised with ``path=None`` (the codec only sees bytes) and ``offset`` inside the compressed input;
    callers that know the file re-raise with their path.
    """


def decompress(data: bytes | bytearray | memoryview, out_size: int) -> bytes:
    """Decode a plain-LZ77 stream that must expand to exactly ``out_size`` bytes.

    Every read is bounds-checked and every match is checked against the output written so far and
    against ``out_size`` before it is copied, so hostile input costs at most
    O(len(data) + out_size) and fails with :class:`XpressError` (offset = position in ``data``).
    """
    if out_size < 0:
        raise ValueError(f"out_size must be >= 0, not {out_size}")
    src = bytes(data)
    n = len(src)
    out = bytearray()
    olen = 0
    pos = 0
    nibble = -1  # input position of a half-used shared length nibble, or -1
    flags = 0  # only the low `bits` bits are still unread; read from the top down
    bits = 0
    while olen < out_size:
        if not bits:
            if pos + 4 > n:
                raise XpressError(None, pos, f"truncated: no flag word after {olen} of {out_size} bytes")
            flags = src[pos] | src[pos + 1] << 8 | src[pos + 2] << 16 | src[pos + 3] << 24
            pos += 4
            bits = 32
        # All zero bits above the next set bit are literals: copy them as one slice.
        lits = bits - flags.bit_length()
        if lits:
            room = out_size - olen
            if lits > room:
                lits = room  # the trailing check below decides whether more literals are an error
            if pos + lits > n:
                raise XpressError(None, n, f"truncated stream: {lits} literal bytes needed at {pos:#x}")
            out += src[pos : pos + lits]
            pos += lits
            olen += lits
            bits -= lits
            if not bits or olen == out_size:
                continue
        # The next flag bit is set: a match.
        bits -= 1
        flags ^= 1 << bits
        start = pos
        if pos + 2 > n:
            raise XpressError(None, pos, "truncated stream: match token needs 2 bytes")
        token = src[pos] | src[pos + 1] << 8
        pos += 2
        length = token & 7
        if length == 7:
            if nibble < 0:
                if pos >= n:
                    raise XpressError(None, pos, "truncated stream: length nibble byte missing")
                length = src[pos] & 15
                nibble = pos
                pos += 1
            else:
                length = src[nibble] >> 4
                nibble = -1
            if length == 15:
                if pos >= n:
                    raise XpressError(None, pos, "truncated stream: extra length byte missing")
                length = src[pos]
                pos += 1
                if length == 255:
                    if pos + 2 > n:
                        raise XpressError(None, pos, "truncated stream: 16-bit match length missing")
                    length = src[pos] | src[pos + 1] << 8
                    pos += 2
                    if not length:
                        if pos + 4 > n:
                            raise XpressError(None, pos, "truncated stream: 32-bit match length missing")
                        length = src[pos] | src[pos + 1] << 8 | src[pos + 2] << 16 | src[pos + 3] << 24
                        pos += 4
                    if length < 22:
                        # The long forms store length - 3 and only exist for lengths >= 25.
                        raise XpressError(None, start, f"invalid long match length value {length} (< 22)")
                    length += 3
                else:
                    length += 25
            else:
                length += 10
        else:
            length += 3
        offset = (token >> 3) + 1
        if offset > olen:
            raise XpressError(None, start, f"match offset {offset} points before the output start ({olen})")
        if length > out_size - olen:
            raise XpressError(
                None, start, f"match of {length} bytes at output {olen} overruns the {out_size}-byte output"
            )
        if offset >= length:
            s = olen - offset
            out += out[s : s + length]
        elif offset == 1:
            out += out[-1:] * length
        else:
            # An overlapping match repeats the last `offset` bytes; build the repetition in one go.
            out += (out[-offset:] * (length // offset + 1))[:length]
        olen += length
    if pos != n:
        _check_stream_end(src, pos, flags, bits, out_size)
    return bytes(out)


def _check_stream_end(src: bytes, pos: int, flags: int, bits: int, out_size: int) -> None:
    """Accept leftover input only if it is the end marker: a set flag bit with no input after it.

    A canonical encoder pads the last flag word with ones, and when the previous word was full it
    emits a fresh all-ones word, so up to 4 bytes may follow the last token.  Anything else would
    expand beyond ``out_size`` (or is garbage), which must not be silently dropped.
    """
    n = len(src)
    if not bits:
        if n - pos < 4:
            raise XpressError(None, pos, f"{n - pos} trailing bytes after {out_size} bytes of output")
        flags = int.from_bytes(src[pos : pos + 4], "little")
        pos += 4
        bits = 32
    if pos != n or not flags >> (bits - 1) & 1:
        raise XpressError(None, pos, f"stream continues after {out_size} bytes of output")


_U16 = struct.Struct("<H").pack
_U32 = struct.Struct("<I").pack
#: How many older occurrences of the same quadword are tried before the greedy parse settles.
MAX_CHAIN = 4
#: A match this long ends the chain walk early (about 10% faster on guest RAM, same ratio).
NICE_MATCH = 32
#: Quadwords compared one by one before switching to galloping slice compares (long runs).
_WORD_STEPS = 4


def compress(data: bytes | bytearray | memoryview, *, force_u32: bool = False) -> bytes:
    """Encode ``data`` as a plain-LZ77 stream (§2.3 format): greedy parse, hash chains of quadwords.

    Guest RAM is mostly 8-byte aligned structures (pointers, page-table entries, zero padding), so
    only aligned quadwords are hashed and looked up; each hit is then extended byte-wise in both
    directions.  That keeps the Python-level work per page small (this is what makes test images of
    hundreds of MiB practical) at the price of missing matches whose offset is not a multiple of 8:
    text and code compress less than with a byte-wise match finder.  Memory use is about 50 bytes
    per input quadword, so call it per page or per RamBlock, not on a whole image.

    ``force_u32`` writes every length that needs the 16-bit form in the 32-bit form instead (and lets
    matches grow past :data:`MAX_MATCH`), which no canonical encoder does inside a page and libfwnt
    cannot read; it exists so tests can produce that form.
    """
    src = bytes(data)
    n = len(src)
    m = n >> 3
    words = struct.unpack_from(f"<{m}Q", src)
    head: dict[int, int] = {}  # quadword value -> most recent quadword index
    chain = [-1] * m  # quadword index -> previous index with the same value (-1: none known)
    out = bytearray(4)  # room for the first flag word
    flag_pos = 0
    flags = 0
    nflags = 0
    nibble = -1  # output position of a half-filled shared length nibble
    lit = 0  # start of the pending literal run
    max_match = 0xFFFFFFFF + MIN_MATCH if force_u32 else MAX_MATCH
    q = 0
    while q < m:
        w = words[q]
        c = head.setdefault(w, q)
        if c == q:
            q += 1
            continue
        head[w] = q
        chain[q] = c
        i = q << 3
        best = 0
        best_off = 0
        tries = MAX_CHAIN
        while c >= 0 and tries:
            off = i - (c << 3)
            if off > MAX_OFFSET:
                break
            d = q - c
            # Forward: whole quadwords first (no slicing), then gallop for long runs, then the
            # equal low bytes of the first differing quadword.
            k = q + 1
            steps = _WORD_STEPS
            while k < m and steps and words[k] == words[k - d]:
                k += 1
                steps -= 1
            e = k << 3
            if k < m and not steps:
                e = _gallop(src, e, off)
            elif k < m:
                x = words[k] ^ words[k - d]
                e += ((x & -x).bit_length() - 1) >> 3
            else:
                e = _tail(src, e, off)
            if e - i > best:
                best = e - i
                best_off = off
                if e == n or best >= NICE_MATCH:
                    break
            c = chain[c]
            tries -= 1
        if not best:
            q += 1
            continue
        off = best_off
        e = i + best
        # Backward into the pending literals: the equal high bytes of the previous quadwords.
        b = i
        if i - off >= 8 and i - 8 >= lit:
            x = words[q - 1] ^ words[(i - off >> 3) - 1]
            b -= (64 - x.bit_length()) >> 3
        while b > lit and b > off and src[b - 1] == src[b - 1 - off]:
            b -= 1
        if e - b > max_match:
            e = b + max_match
        if b > lit:
            run = b - lit
            if run < 32 - nflags:
                out += src[lit:b]
                flags <<= run
                nflags += run
            else:
                flag_pos, flags, nflags = _literals(out, src, lit, b, flag_pos, flags, nflags)
        v = e - b - 3
        token = (off - 1) << 3
        if v < 7:
            out += _U16(token | v)
        else:
            out += _U16(token | 7)
            v -= 7
            half = 15 if v >= 15 else v
            if nibble < 0:
                nibble = len(out)
                out.append(half)
            else:
                out[nibble] |= half << 4
                nibble = -1
            if v >= 15:
                v -= 15
                if v < 255:
                    out.append(v)
                else:
                    out.append(255)
                    v += 22  # the long forms store length - 3
                    if not force_u32:
                        out += _U16(v)
                    else:
                        out += b"\0\0"
                        out += _U32(v)
        flags = flags << 1 | 1
        nflags += 1
        if nflags == 32:
            out[flag_pos : flag_pos + 4] = _U32(flags)
            flag_pos = len(out)
            out += b"\0\0\0\0"
            flags = nflags = 0
        lit = e
        qe = (e + 7) >> 3
        if qe > m:
            qe = m
        if qe > q + 2:
            # Anchors inside the match are remembered (without chain links) for later matches.
            head.update(zip(words[q + 1 : qe], range(q + 1, qe), strict=True))
        elif qe == q + 2:
            head[words[q + 1]] = q + 1
        q = qe
    if lit < n:
        flag_pos, flags, nflags = _literals(out, src, lit, n, flag_pos, flags, nflags)
    # Pad the last flag word with ones: a decoder stops at a set bit with no input left.
    pad = 32 - nflags
    out[flag_pos : flag_pos + 4] = _U32((flags << pad | (1 << pad) - 1) & 0xFFFFFFFF)
    return bytes(out)


def _literals(
    out: bytearray, src: bytes, a: int, b: int, flag_pos: int, flags: int, nflags: int
) -> tuple[int, int, int]:
    """Append literals ``src[a:b]``; return the new (flag word position, flags, flag count).

    Flag words that hold 32 literals are zero, so the whole 32-byte chunks of a long run are joined
    in C with a zero word between them instead of being emitted one flag word at a time.
    """
    take = 32 - nflags
    if b - a < take:
        out += src[a:b]
        return flag_pos, flags << (b - a), nflags + b - a
    out += src[a : a + take]
    out[flag_pos : flag_pos + 4] = _U32(flags << take & 0xFFFFFFFF)
    a += take
    full = a + (b - a & ~31)
    if full > a:
        out += b"\0\0\0\0"
        chunks = map(slice, range(a, full, 32), range(a + 32, full + 32, 32))
        out += b"\0\0\0\0".join(map(src.__getitem__, chunks))
    flag_pos = len(out)
    out += b"\0\0\0\0"
    out += src[full:b]
    return flag_pos, 0, b - full


def _gallop(src: bytes, e: int, off: int) -> int:
    """End of the match that repeats ``src[e - off:]`` at ``e``: doubling, then halving slice compares."""
    n = len(src)
    step = 16
    while True:
        hi = e + step
        if hi >= n:
            hi = n
        if src[e:hi] != src[e - off : hi - off]:
            break
        e = hi
        if hi == n:
            return n
        step <<= 1
    while step > 8:
        step >>= 1
        mid = e + step
        if mid < n and src[e:mid] == src[e - off : mid - off]:
            e = mid
    return _tail(src, e, off)


def _tail(src: bytes, e: int, off: int) -> int:
    """Extend a match by the equal bytes of the next (at most 8) bytes."""
    a = src[e : e + 8]
    x = int.from_bytes(a, "little") ^ int.from_bytes(src[e - off : e - off + len(a)], "little")
    if not x:
        return e + len(a)
    return e + (((x & -x).bit_length() - 1) >> 3)
