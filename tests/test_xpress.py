"""XPRESS (MS-XCA plain LZ77) codec: round trips, every length encoding, known vectors, hostile input.

The pure-Python decoder is checked three ways: against libfwnt (pyfwnt), against the documented
MS-XCA example vectors, and against ``reference_decode`` below, a deliberately naive transcription of
the MS-XCA §2.4 pseudo-code that shares no code with the optimised decoder.
"""

from __future__ import annotations

import contextlib
import random
import struct
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volatility3_vmssd.codecs import _xpress_python, xpress
from volatility3_vmssd.codecs.xpress import XpressError
from volatility3_vmssd.errors import FormatError, VmssdError

try:
    import pyfwnt
except ImportError:  # pragma: no cover - pyfwnt is a dependency on the usual platforms
    pyfwnt = None

needs_pyfwnt = pytest.mark.skipif(pyfwnt is None, reason="libfwnt-python (pyfwnt) is not installed")

PAGE = 4096
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# Independent helpers: a naive spec decoder and a token-level encoder for hand-made streams.


def reference_decode(data: bytes, out_size: int) -> tuple[bytes, set[str]] | None:
    """MS-XCA §2.4 byte by byte, with our end-of-stream rule; None where the stream is invalid.

    Also returns which length encodings the stream used, so tests can prove a form was exercised.
    """
    out = bytearray()
    forms: set[str] = set()
    pos = 0
    flags = 0
    count = 0
    half = -1

    def take(k: int) -> int | None:
        nonlocal pos
        if pos + k > len(data):
            return None
        value = int.from_bytes(data[pos : pos + k], "little")
        pos += k
        return value

    while len(out) < out_size:
        if count == 0:
            word = take(4)
            if word is None:
                return None
            flags, count = word, 32
        count -= 1
        if not flags >> count & 1:
            byte = take(1)
            if byte is None:
                return None
            out.append(byte)
            continue
        token = take(2)
        if token is None:
            return None
        length = token & 7
        offset = (token >> 3) + 1
        if length < 7:
            forms.add("3-bit")
        else:
            if half < 0:
                nibble = take(1)
                if nibble is None:
                    return None
                half = pos - 1
                length = nibble & 15
                forms.add("nibble-low")
            else:
                length = data[half] >> 4
                half = -1
                forms.add("nibble-high")
            if length == 15:
                length = take(1)
                if length is None:
                    return None
                forms.add("byte")
                if length == 255:
                    length = take(2)
                    if length is None:
                        return None
                    forms.add("u16")
                    if length == 0:
                        length = take(4)
                        if length is None:
                            return None
                        forms.add("u32")
                    if length < 15 + 7:
                        return None
                    length -= 15 + 7
                length += 15
            length += 7
        length += 3
        if offset > len(out) or len(out) + length > out_size:
            return None
        for _ in range(length):
            out.append(out[-offset])
    if pos != len(data):  # leftovers must be exactly the end marker (a set flag bit, no more input)
        if count == 0:
            word = take(4)
            if word is None:
                return None
            flags, count = word, 32
        if pos != len(data) or not flags >> (count - 1) & 1:
            return None
    return bytes(out), forms


Token = bytes | tuple[int, int] | tuple[int, int, str]


def encode_tokens(tokens: Sequence[Token]) -> bytes:
    """Encode literals (bytes) and matches ``(offset, length[, "u32"])`` exactly as given.

    Written like the MS-XCA §2.3 pseudo-code (payload first, then its flag bit; a full flag word
    is stored and the next one reserved), independently of the package's compressor.
    """
    out = bytearray(4)
    flag_at = 0
    flags = 0
    count = 0
    half = -1

    def flag(bit: int) -> None:
        nonlocal flags, count, flag_at
        flags = flags << 1 | bit
        count += 1
        if count == 32:
            out[flag_at : flag_at + 4] = struct.pack("<I", flags)
            flag_at = len(out)
            out.extend(b"\0\0\0\0")
            flags = count = 0

    for token in tokens:
        if isinstance(token, bytes):
            for byte in token:
                out.append(byte)
                flag(0)
            continue
        offset, length = token[0], token[1]
        v = length - 3
        if v < 7:
            out += struct.pack("<H", (offset - 1) << 3 | v)
        else:
            out += struct.pack("<H", (offset - 1) << 3 | 7)
            v -= 7
            if half < 0:
                half = len(out)
                out.append(min(v, 15))
            else:
                out[half] |= min(v, 15) << 4
                half = -1
            if v >= 15:
                v -= 15
                if v < 255:
                    out.append(v)
                else:
                    out.append(255)
                    v += 15 + 7
                    if v < 0x10000 and len(token) == 2:
                        out += struct.pack("<H", v)
                    else:
                        out += b"\0\0" + struct.pack("<I", v)
        flag(1)
    pad = 32 - count
    out[flag_at : flag_at + 4] = struct.pack("<I", (flags << pad | (1 << pad) - 1) & 0xFFFFFFFF)
    return bytes(out)


# --------------------------------------------------------------------------------------------------
# Test pages.


def _rng(seed: int) -> random.Random:
    return random.Random(seed)


def random_page(seed: int = 1) -> bytes:
    return _rng(seed).randbytes(PAGE)


def text_page() -> bytes:
    words = ["the", "kernel", "maps", "guest", "physical", "memory", "pages", "into", "a", "saved", "state"]
    r = _rng(2)
    text = " ".join(r.choice(words) for _ in range(900)).encode()
    return text[:PAGE]


def long_run_page() -> bytes:
    return b"\0" * 1000 + b"\xcc" * 2000 + _rng(3).randbytes(96) + b"\x90" * (PAGE - 3096)


def memory_like_page(seed: int = 4) -> bytes:
    """Kernel-heap-like: pointers sharing high bits, small integers, zero padding, a few strings."""
    r = _rng(seed)
    out = bytearray()
    while len(out) < PAGE:
        kind = r.random()
        if kind < 0.35:
            out += struct.pack("<Q", 0xFFFF888000000000 | r.getrandbits(24) << 3)
        elif kind < 0.55:
            out += struct.pack("<Q", r.getrandbits(12))
        elif kind < 0.75:
            out += b"\0" * 8 * r.randint(1, 12)
        elif kind < 0.85:
            out += r.choice([b"kworker/0:1\0\0\0\0\0", b"systemd-journal\0", b"/dev/loop0\0\0\0\0\0\0"])
        else:
            out += r.randbytes(8)
    return bytes(out[:PAGE])


PAGES = {
    "random": random_page(),
    "zero": b"\0" * PAGE,
    "text": text_page(),
    "long-run": long_run_page(),
    "memory-like": memory_like_page(),
}


@pytest.fixture(autouse=True)
def _auto_decoder() -> Iterator[None]:
    """Every test starts and ends with automatic decoder selection."""
    xpress.force_decoder(None)
    yield
    xpress.force_decoder(None)


def every_form_input() -> bytes:
    """Planted repeats whose lengths need the 3-bit, nibble (both halves), byte and 16-bit forms."""
    r = _rng(5)
    parts = []
    for length in (8, 9, 16, 20, 17, 100, 279, 280, 1500):
        # Aligned copies at an offset that is a multiple of 8: what the quadword anchors find.
        chunk = r.randbytes(length)
        pad = -length % 8
        parts += [r.randbytes(8), chunk, r.randbytes(pad), r.randbytes(8), chunk, r.randbytes(pad)]
    return b"".join(parts)


# --------------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_round_trip_python(name: str) -> None:
    page = PAGES[name]
    packed = xpress.compress(page)
    assert xpress.decompress_python(packed, PAGE) == page
    decoded = reference_decode(packed, PAGE)
    assert decoded is not None
    assert decoded[0] == page
    if name != "random":
        # Compressible pages must really be compressed, or the test images would be all raw pages.
        assert len(packed) < PAGE * 0.8


@needs_pyfwnt
@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_round_trip_pyfwnt(name: str) -> None:
    page = PAGES[name]
    packed = xpress.compress(page)
    assert pyfwnt.lzxpress_decompress(packed, PAGE) == page
    assert xpress.decompress(packed, PAGE) == page


def test_zero_page_compresses_to_a_few_bytes() -> None:
    # Zero pages normally become fill records, but a long run must still cost O(1) tokens.
    assert len(xpress.compress(b"\0" * PAGE)) < 32


@FAST
@given(st.binary(max_size=3000))
def test_round_trip_arbitrary_bytes(data: bytes) -> None:
    packed = xpress.compress(data)
    assert xpress.decompress_python(packed, len(data)) == data
    assert xpress.decompress(packed, len(data)) == data


@st.composite
def repetitive(draw: st.DrawFn) -> bytes:
    """Literals and (possibly overlapping) copies of earlier data: matches and runs of many lengths."""
    out = bytearray(draw(st.binary(min_size=1, max_size=64)))
    for _ in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):
            out += draw(st.binary(max_size=40))
        else:
            start = draw(st.integers(0, len(out) - 1))
            length = draw(st.integers(1, 600))
            for _ in range(length):  # byte-wise, so overlapping copies make runs
                out.append(out[start])
                start += 1
    return bytes(out)


@FAST
@given(repetitive())
def test_round_trip_repetitive_data(data: bytes) -> None:
    packed = xpress.compress(data)
    assert xpress.decompress_python(packed, len(data)) == data
    if pyfwnt is not None:
        assert pyfwnt.lzxpress_decompress(packed, len(data) + 1) == data


# --------------------------------------------------------------------------------------------------
# Length encodings.


def test_compressor_emits_every_16bit_length_form() -> None:
    data = every_form_input()
    packed = xpress.compress(data)
    decoded = reference_decode(packed, len(data))
    assert decoded is not None
    assert decoded[0] == data
    assert {"3-bit", "nibble-low", "nibble-high", "byte", "u16"} <= decoded[1]
    assert "u32" not in decoded[1]
    assert xpress.decompress_python(packed, len(data)) == data


@needs_pyfwnt
def test_pyfwnt_decodes_every_16bit_length_form() -> None:
    data = every_form_input()
    assert pyfwnt.lzxpress_decompress(xpress.compress(data), len(data)) == data


def test_matches_never_reach_beyond_the_window() -> None:
    # Offsets are 13 bits (1..8192): a repeat further back than that must be sent as literals.
    r = _rng(6)
    marker = r.randbytes(64)
    data = marker + r.randbytes(8192) + marker + r.randbytes(100) + marker
    packed = xpress.compress(data)
    assert xpress.decompress_python(packed, len(data)) == data
    if pyfwnt is not None:
        assert pyfwnt.lzxpress_decompress(packed, len(data) + 1) == data


def test_long_runs_are_split_for_libfwnt() -> None:
    # libfwnt mis-decodes 16-bit lengths above 0x8000, so the encoder caps matches (MAX_MATCH).
    data = b"\0" * 100_000
    packed = xpress.compress(data)
    assert xpress.decompress_python(packed, len(data)) == data
    if pyfwnt is not None:
        assert pyfwnt.lzxpress_decompress(packed, len(data) + 1) == data


@pytest.mark.parametrize("size", [PAGE, 100_000])
def test_32bit_length_form_decodes_in_python(size: int) -> None:
    data = long_run_page() if size == PAGE else b"\x5a" * size
    packed = _xpress_python.compress(data, force_u32=True)
    decoded = reference_decode(packed, size)
    assert decoded is not None
    assert "u32" in decoded[1]
    assert xpress.decompress_python(packed, size) == data


@needs_pyfwnt
def test_32bit_length_form_falls_back_from_pyfwnt() -> None:
    # A 16-bit zero then a u32 is valid MS-XCA; libfwnt rejects it, so the fallback must catch it.
    data = long_run_page()
    packed = _xpress_python.compress(data, force_u32=True)
    try:
        accepted = pyfwnt.lzxpress_decompress(packed, PAGE + 1) == data
    except OSError:
        accepted = False
    if accepted:
        pytest.skip("this libfwnt accepts the 32-bit length form; nothing to fall back from")
    messages: list[str] = []
    assert xpress.decompress(packed, PAGE, on_fallback=messages.append) == data
    assert len(messages) == 1
    assert "pyfwnt" in messages[0]


def test_hand_made_short_lengths_and_shared_nibble() -> None:
    # Lengths 3..9 use the 3-bit form; two nibble lengths share one byte (low half first).
    tokens: list[Token] = [b"abcdefgh"]
    expected = bytearray(b"abcdefgh")
    for offset, length in [(1, 3), (2, 4), (8, 5), (3, 7), (5, 9), (4, 12), (6, 24), (1, 25), (7, 279)]:
        tokens.append((offset, length))
        for _ in range(length):
            expected.append(expected[-offset])
    packed = encode_tokens(tokens)
    assert reference_decode(packed, len(expected)) is not None
    assert xpress.decompress_python(packed, len(expected)) == expected
    assert xpress.decompress(packed, len(expected)) == expected


# --------------------------------------------------------------------------------------------------
# Known vectors ([MS-XCA] §3.1 plain LZ77 examples).

ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
ALPHABET_PACKED = bytes.fromhex("3f000000") + ALPHABET
ABC_PACKED = bytes.fromhex("ffffff1f 616263 1700 0f ff 2601")


@pytest.mark.parametrize(
    ("packed", "plain"), [(ALPHABET_PACKED, ALPHABET), (ABC_PACKED, b"abc" * 100)], ids=["alphabet", "abc"]
)
@pytest.mark.parametrize("decoder", ["auto", "python"])
def test_spec_vectors(packed: bytes, plain: bytes, decoder: str) -> None:
    if decoder == "python":
        xpress.force_decoder("python")
    assert xpress.decompress(packed, len(plain)) == plain
    assert xpress.decompress_python(packed, len(plain)) == plain


def test_compressor_matches_spec_vector_for_literals() -> None:
    assert xpress.compress(ALPHABET) == ALPHABET_PACKED


def test_empty_input() -> None:
    assert xpress.compress(b"") == b"\xff\xff\xff\xff"
    assert xpress.decompress(b"\xff\xff\xff\xff", 0) == b""
    assert xpress.decompress_python(b"", 0) == b""


def test_accepts_bytearray_and_memoryview() -> None:
    page = memory_like_page()
    packed = xpress.compress(memoryview(bytearray(page)))
    assert xpress.decompress(bytearray(packed), PAGE) == page
    assert xpress.decompress(memoryview(packed), PAGE) == page
    assert xpress.decompress_python(memoryview(packed), PAGE) == page


# --------------------------------------------------------------------------------------------------
# Hostile input: every failure is an XpressError (a FormatError), never IndexError or struct.error.

BOTH: list[Callable[[bytes, int], bytes]] = [xpress.decompress_python, xpress.decompress]


def _raises(decode: Callable[[bytes, int], bytes], data: bytes, size: int) -> XpressError:
    with pytest.raises(XpressError) as info:
        decode(data, size)
    assert isinstance(info.value, FormatError)
    assert info.value.path is None
    return info.value


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_truncated_streams(decode: Callable[[bytes, int], bytes]) -> None:
    page = memory_like_page()
    packed = xpress.compress(page)
    for cut in [0, 1, 3, 4, 5, len(packed) // 3, len(packed) // 2, len(packed) - 5]:
        _raises(decode, packed[:cut], PAGE)


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_offset_before_start(decode: Callable[[bytes, int], bytes]) -> None:
    err = _raises(decode, encode_tokens([b"ab", (3, 3)]), 5)
    if decode is xpress.decompress_python:
        assert err.offset == 6  # the token right after the flag word and two literals
        assert "before the output start" in err.expected


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_match_overruns_output(decode: Callable[[bytes, int], bytes]) -> None:
    _raises(decode, encode_tokens([b"abc", (3, 10)]), 8)


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_output_size_must_match_exactly(decode: Callable[[bytes, int], bytes]) -> None:
    page = memory_like_page()
    packed = xpress.compress(page)
    _raises(decode, packed, PAGE + 1)  # stream ends early: never padded
    _raises(decode, packed, PAGE - 1)  # stream goes on: never cut
    _raises(decode, ABC_PACKED, 299)  # a single long match that does not fit


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_long_length_value_below_minimum(decode: Callable[[bytes, int], bytes]) -> None:
    # nibble 15, byte 255, then a 16-bit value of 5: the long forms store length - 3 >= 22.
    stream = bytes.fromhex("ffffff1f 616263 1700 0f ff 0500")
    _raises(decode, stream, 300)


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_huge_32bit_length_is_rejected_without_work(decode: Callable[[bytes, int], bytes]) -> None:
    stream = bytes.fromhex("ffffff1f 616263 1700 0f ff 0000 ffffffff")
    _raises(decode, stream, PAGE)


@pytest.mark.parametrize("decode", BOTH, ids=["python", "auto"])
def test_truncated_inside_long_length(decode: Callable[[bytes, int], bytes]) -> None:
    # flag word, "abc", token, nibble, extra byte, 16-bit zero, u32: cut inside each of them.
    stream = encode_tokens([b"abc", (3, 297, "u32")])
    assert len(stream) == 17
    assert xpress.decompress_python(stream, 300) == b"abc" * 100
    for cut in range(7, len(stream)):
        _raises(decode, stream[:cut], 300)


def test_trailing_garbage_is_rejected_by_python() -> None:
    packed = xpress.compress(memory_like_page())
    for tail in (b"\0", b"\0\0\0\0", b"\0\0\0\0\0", b"\xff" * 7):
        _raises(xpress.decompress_python, packed + tail, PAGE)


def test_canonical_end_marker_word_is_accepted() -> None:
    # 32 literals fill the first flag word; a canonical encoder then writes an all-ones word.
    data = bytes(range(32))
    packed = xpress.compress(data)
    assert packed == b"\0\0\0\0" + data + b"\xff\xff\xff\xff"
    assert xpress.decompress_python(packed, 32) == data
    assert xpress.decompress_python(packed[:-4], 32) == data  # and a stream without it


def test_negative_size_is_a_caller_error() -> None:
    with pytest.raises(ValueError):
        xpress.decompress(b"", -1)
    with pytest.raises(ValueError):
        xpress.decompress_python(b"", -1)


@FAST
@given(st.binary(max_size=400), st.integers(0, 2000))
def test_garbage_agrees_with_reference(data: bytes, size: int) -> None:
    expected = reference_decode(data, size)
    try:
        got = xpress.decompress_python(data, size)
    except XpressError:
        assert expected is None
    else:
        assert expected is not None
        assert got == expected[0]
    try:
        auto = xpress.decompress(data, size)
    except XpressError:
        pass
    else:
        assert len(auto) == size  # native decoders may be laxer about trailing bytes, never about size


@FAST
@given(st.data())
def test_mutated_streams_agree_with_reference(data: st.DataObject) -> None:
    page = data.draw(st.sampled_from(sorted(PAGES)))
    packed = bytearray(xpress.compress(PAGES[page]))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(packed) - 1))
        packed[at] = data.draw(st.integers(0, 255))
    size = data.draw(st.sampled_from([PAGE, PAGE - 1, PAGE + 1, 100]))
    expected = reference_decode(bytes(packed), size)
    try:
        got = xpress.decompress_python(packed, size)
    except XpressError:
        assert expected is None
    else:
        assert expected is not None
        assert got == expected[0]
    with contextlib.suppress(XpressError):
        assert len(xpress.decompress(packed, size)) == size


def test_xpress_error_is_in_the_package_hierarchy() -> None:
    assert issubclass(XpressError, FormatError)
    assert issubclass(XpressError, VmssdError)
    assert xpress.XpressError is _xpress_python.XpressError


# --------------------------------------------------------------------------------------------------
# Decoder selection and fallback.


def test_active_decoder_values() -> None:
    assert xpress.active_decoder() in {"pyfwnt", "ntdll", "python"}
    if pyfwnt is not None:
        assert xpress.active_decoder() == "pyfwnt"


def test_force_python_makes_decompress_use_python(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = _xpress_python.decompress

    def spy(data: bytes | bytearray | memoryview, out_size: int) -> bytes:
        calls.append(out_size)
        return real(data, out_size)

    monkeypatch.setattr(_xpress_python, "decompress", spy)
    xpress.force_decoder("python")
    assert xpress.active_decoder() == "python"
    page = memory_like_page()
    messages: list[str] = []
    assert xpress.decompress(xpress.compress(page), PAGE, on_fallback=messages.append) == page
    assert calls == [PAGE]
    assert messages == []  # the forced decoder is not a fallback
    xpress.force_decoder(None)
    if pyfwnt is not None:
        calls.clear()
        assert xpress.decompress(xpress.compress(page), PAGE) == page
        assert calls == []  # pyfwnt did the work


def test_no_native_decoder_means_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xpress, "_native", lambda name: None)
    assert xpress.active_decoder() == "python"
    with pytest.raises(ValueError):
        xpress.force_decoder("pyfwnt")
    assert xpress.decompress(ABC_PACKED, 300) == b"abc" * 100


def test_force_decoder_rejects_unavailable_or_unknown() -> None:
    with pytest.raises(ValueError):
        xpress.force_decoder("lznt1")
    if pyfwnt is None:
        with pytest.raises(ValueError):
            xpress.force_decoder("pyfwnt")
    else:
        xpress.force_decoder("pyfwnt")
        assert xpress.active_decoder() == "pyfwnt"


@pytest.mark.skipif(sys.platform == "win32", reason="ntdll exists on Windows")
def test_ntdll_unavailable_off_windows() -> None:
    with pytest.raises(ValueError):
        xpress.force_decoder("ntdll")


@pytest.mark.parametrize("mode", ["raises", "short", "long"])
def test_native_failure_falls_back_and_reports(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    def broken(data: bytes, out_size: int) -> bytes:
        if mode == "raises":
            raise OSError("unable to decompress data")
        return b"\0" * (out_size - 1 if mode == "short" else out_size + 1)

    monkeypatch.setattr(xpress, "_native", lambda name: broken)
    assert xpress.active_decoder() == "pyfwnt"
    page = memory_like_page()
    messages: list[str] = []
    assert xpress.decompress(xpress.compress(page), PAGE, on_fallback=messages.append) == page
    assert len(messages) == 1
    assert "pure-Python" in messages[0]
    # When the fallback fails too, the caller gets the Python decoder's verdict, and no finding.
    messages.clear()
    with pytest.raises(XpressError):
        xpress.decompress(b"\0\0\0\0", PAGE, on_fallback=messages.append)
    assert messages == []


# --------------------------------------------------------------------------------------------------
# decompress_many: the batch decoder of whole-block reads.


def _batch_pages(count: int) -> list[bytes]:
    return [memory_like_page(seed) for seed in range(count)]


@needs_pyfwnt
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decompress_many_matches_decompress(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    shared: list[int] = []
    real = xpress._decode_shared

    def spy(batch: Callable[..., list[bytes]], streams: Sequence[bytes], out_size: int, shares: int) -> list[bytes]:
        shared.append(shares)
        return real(batch, streams, out_size, shares)

    monkeypatch.setattr(xpress, "_decode_shared", spy)
    monkeypatch.setattr(xpress, "MIN_STREAMS_PER_THREAD", 4)
    pages = _batch_pages(150)  # several chunks of 32, the last one short
    streams = [xpress.compress(page) for page in pages]
    assert xpress.decompress_many(streams, PAGE, threads=threads) == pages
    assert shared == ([] if threads == 1 else [threads])
    assert xpress.decompress_many([], PAGE, threads=threads) == []


@needs_pyfwnt
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bad", ["corrupt", "short", "long"])
def test_decompress_many_gives_each_bad_stream_its_verdict(
    monkeypatch: pytest.MonkeyPatch, threads: int, bad: str
) -> None:
    """One stream that is not exactly its size gets decompress()'s verdict in place; the others decode."""
    monkeypatch.setattr(xpress, "MIN_STREAMS_PER_THREAD", 4)
    pages = _batch_pages(80)
    streams = [xpress.compress(page) for page in pages]
    page = memory_like_page(99)
    streams[57] = {
        "corrupt": b"\xff\xff\xff\xff" + bytes(8),
        "short": xpress.compress(page[:-1]),
        "long": xpress.compress(page + b"x"),
    }[bad]
    out = xpress.decompress_many(streams, PAGE, threads=threads)
    assert isinstance(out[57], XpressError)
    assert out[:57] + out[58:] == pages[:57] + pages[58:]


@needs_pyfwnt
def test_decompress_many_takes_one_size_per_stream() -> None:
    """Variable runs expand to their own sizes; a size that does not match is that stream's error."""
    data = [memory_like_page(seed)[: 100 * (seed + 1)] for seed in range(60)]
    streams = [xpress.compress(d) for d in data]
    sizes = [len(d) for d in data]
    assert xpress.decompress_many(streams, sizes, threads=2) == data
    sizes[3] += 1
    out = xpress.decompress_many(streams, sizes)
    assert isinstance(out[3], XpressError) and out[4] == data[4]
    with pytest.raises(ValueError):
        xpress.decompress_many(streams, sizes[:-1])


def test_decompress_many_falls_back_per_stream_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A native decoder that returns the wrong size for one stream: the pure-Python decoder decides that
    stream, and the caller is told which one (it records the finding)."""
    pages = _batch_pages(5)
    streams = [xpress.compress(page) for page in pages]

    def batch(streams: Sequence[bytes], sizes: object) -> list[bytes]:
        return [bytes(PAGE - 1) if i == 2 else pages[i] for i in range(len(streams))]

    monkeypatch.setattr(xpress, "active_decoder", lambda: "pyfwnt")
    monkeypatch.setattr(xpress, "_native_batch", lambda name: batch)
    monkeypatch.setattr(xpress, "_native", lambda name: lambda data, size: b"")
    notes: list[tuple[int, str]] = []
    assert xpress.decompress_many(streams, PAGE, on_fallback=lambda i, note: notes.append((i, note))) == pages
    assert [i for i, _ in notes] == [2] and "pure-Python" in notes[0][1]


def test_decompress_many_survives_worker_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper thread that fails costs its streams a second decode, not the read."""

    def batch(streams: Sequence[bytes], out_size: object) -> list[bytes]:
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("helper failed")
        return [bytes(8)] * len(streams)

    monkeypatch.setattr(xpress, "active_decoder", lambda: "pyfwnt")
    monkeypatch.setattr(xpress, "_native_batch", lambda name: batch)
    monkeypatch.setattr(xpress, "_native", lambda name: lambda data, size: bytes(size))
    monkeypatch.setattr(xpress, "MIN_STREAMS_PER_THREAD", 1)
    streams = [b"x"] * 200
    assert xpress.decompress_many(streams, 8, threads=1) == [bytes(8)] * 200
    assert xpress.decompress_many(streams, 8, threads=2) == [bytes(8)] * 200


def test_decompress_many_with_the_python_decoder() -> None:
    xpress.force_decoder("python")
    page = text_page()
    out = xpress.decompress_many([xpress.compress(page), b"\0\0\0\0"], PAGE)
    assert out[0] == page and isinstance(out[1], XpressError)


def test_decode_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMSSD_DECODE_THREADS", "3")
    assert xpress.decode_threads() == 3
    monkeypatch.setenv("VMSSD_DECODE_THREADS", "1")
    assert xpress.decode_threads() == 1
    for junk in ("0", "many", ""):
        monkeypatch.setenv("VMSSD_DECODE_THREADS", junk)
        assert 1 <= xpress.decode_threads() <= 4


# --------------------------------------------------------------------------------------------------
# Real data: the XPRESS pages of a real Hyper-V .bin (spec §5.1), compressed by Windows itself.

from shared_data import REAL  # noqa: E402

REAL_BIN = REAL / "test_file.bin"


def _real_bin_blocks() -> dict[str, list[tuple[str, bytes]]]:
    """Just enough of the legacy .bin (spec §5.1) and its page records (§3.2) for this test."""
    data = REAL_BIN.read_bytes()
    capacity, index_at, names_at = struct.unpack_from("<12xIQQ", data)
    blocks: dict[str, list[tuple[str, bytes]]] = {}
    for slot in range(capacity):
        name_at, name_len, _, _, _, used, value_at = struct.unpack_from("<IHBBIIQ", data, index_at + 24 * slot)
        if not used:
            continue
        name = data[names_at + name_at : names_at + name_at + name_len - 1].decode()
        value = data[value_at : value_at + used]
        pages: list[tuple[str, bytes]] = []
        pos = 0
        while pos < len(value):
            (tag,) = struct.unpack_from("<I", value, pos)
            pos += 4
            if tag == 0xFFFFFFFF:
                break
            if tag == 0xFFFFFFFE:
                pages.append(("fill", value[pos : pos + 8] * 512))
                pos += 8
            elif tag == 0xFFFFFFFD:
                (count,) = struct.unpack_from("<I", value, pos + 8)
                pages += [("fill", value[pos : pos + 8] * 512)] * count
                pos += 12
            else:
                pages.append(("raw" if tag == PAGE else "xpress", value[pos : pos + tag]))
                pos += tag
        blocks[name] = pages
    return blocks


@pytest.mark.shared
@pytest.mark.skipif(not REAL_BIN.exists(), reason="../shared/data/real/test_file.bin is not present")
def test_real_windows_pages() -> None:
    blocks = _real_bin_blocks()
    packed = [data for pages in blocks.values() for kind, data in pages if kind == "xpress"]
    assert len(packed) == 185
    for data in packed:
        plain = xpress.decompress_python(data, PAGE)
        if pyfwnt is not None:
            assert pyfwnt.lzxpress_decompress(data, PAGE) == plain
    # Ground truth from the Microsoft DLL (rafawo/vmsavedstatetodump-rs tests): 12 bytes at GPA
    # 0xC0FFE, which straddle pages 0xC0 and 0xC1 of RamBlock 0, both XPRESS-compressed.
    block0 = blocks["RamBlock/0/"]
    assert [block0[0xC0][0], block0[0xC1][0]] == ["xpress", "xpress"]
    memory = b"".join(xpress.decompress_python(block0[p][1], PAGE) for p in (0xC0, 0xC1))
    assert struct.unpack_from("<3I", memory, 0xFFE) == (75826887, 1235222542, 3439375364)


def test_environment_pins_the_decoder_in_child_processes() -> None:
    import os
    import subprocess
    import sys

    code = "from volatility3_vmssd.codecs import xpress; print(xpress.active_decoder())"
    env = {**os.environ, "VMSSD_XPRESS_DECODER": "python"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "python"
    env["VMSSD_XPRESS_DECODER"] = "no-such-decoder"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "ignored" in out.stderr and out.stdout.strip() != "no-such-decoder"
