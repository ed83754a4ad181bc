"""RamBlock page-record codec (spec §3.2): every record kind, early ends, hostile streams."""

from __future__ import annotations

import contextlib
import random
import struct

import pytest
from blockforms import encode_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volatility3_vmssd.codecs import xpress
from volatility3_vmssd.errors import Findings, FormatError, TruncatedError, VmssdError
from volatility3_vmssd.memory import pagedecode
from volatility3_vmssd.memory import ramblock as rb
from volatility3_vmssd.memory.geometry import BLOCK_SIZE, PAGE_SIZE
from volatility3_vmssd.memory.guestmemory import GuestMemory, InMemoryBlockSource
from volatility3_vmssd.memory.pagedecode import decode_pages
from volatility3_vmssd.memory.ramblock import encode_block, fill_page, index_block, plan_block
from volatility3_vmssd.memory.rammap import RamMap, build_layout
from volatility3_vmssd.memory.records import RecordDamage, tokens

FILE_OFFSET = 0x5000


def zero_page() -> bytes:
    return bytes(PAGE_SIZE)


def pattern_page(pattern: bytes) -> bytes:
    return pattern * (PAGE_SIZE // 8)


def random_page(rng: random.Random) -> bytes:
    return rng.randbytes(PAGE_SIZE)


def text_page(rng: random.Random) -> bytes:
    words = [b"kernel", b"page", b"task_struct", b"\x00\x00\x00\x00", b"0xffff8880", b"\xff\xff"]
    out = bytearray()
    while len(out) < PAGE_SIZE:
        out += rng.choice(words) + bytes([rng.randrange(256)])
    return bytes(out[:PAGE_SIZE])


def mixed_block(seed: int = 1) -> bytes:
    """Zero runs, pattern runs (single and multi), compressible and incompressible pages."""
    rng = random.Random(seed)
    pages: list[bytes] = []
    while len(pages) < 256:
        choice = rng.randrange(6)
        if choice == 0:
            pages += [zero_page()] * rng.randrange(1, 20)
        elif choice == 1:
            pages += [pattern_page(rng.randbytes(8))] * rng.randrange(1, 4)
        elif choice in (2, 3):
            pages.append(text_page(rng))
        elif choice == 4:
            pages.append(random_page(rng))
        else:
            pages.append(pattern_page(b"\xff" * 8))
    return b"".join(pages[:256])


def opened(value: bytes, findings: Findings | None = None) -> rb.BlockIndex:
    return index_block(
        value, path="t.bin", file_offset=FILE_OFFSET, findings=findings if findings is not None else Findings()
    )


def decoded(value: bytes | memoryview, index: rb.BlockIndex, **kwargs: object) -> bytes:
    """The whole block by the careful path (missing and, with ``errors``, undecodable pages as zeros)."""
    return b"".join(decode_pages(value, index, **kwargs))  # type: ignore[arg-type]


def decoded_page(value: bytes, index: rb.BlockIndex, page: int) -> bytes:
    """One page decoded alone (raises on undecodable data)."""
    return decode_pages(value, index, page, page + 1)[0]


class Stream:
    """Builds a record stream by hand together with the bytes it must decode to."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.expected = bytearray()
        self.tokens: list[tuple[int, int, int, int, int]] = []  # what records.tokens must yield, one per record

    def _token(self, tag: int, a: int, b: int) -> None:
        self.tokens.append((tag, self.record_offset(), len(self.expected), a, b))

    def record_offset(self) -> int:
        return sum(map(len, self.parts))

    def fill(self, pattern: bytes) -> Stream:
        self._token(rb.TAG_FILL, int.from_bytes(pattern, "little"), 1)
        self.parts.append(struct.pack("<I", rb.TAG_FILL) + pattern)
        self.expected += pattern_page(pattern)
        return self

    def multi(self, pattern: bytes, count: int) -> Stream:
        self._token(rb.TAG_MULTI_FILL, int.from_bytes(pattern, "little"), count)
        self.parts.append(struct.pack("<I", rb.TAG_MULTI_FILL) + pattern + struct.pack("<I", count))
        self.expected += pattern_page(pattern) * count
        return self

    def raw_page(self, page: bytes) -> Stream:
        self._token(PAGE_SIZE, self.record_offset() + 4, self.record_offset() + 4 + PAGE_SIZE)
        self.parts.append(struct.pack("<I", PAGE_SIZE) + page)
        self.expected += page
        return self

    def xpress_page(self, page: bytes) -> Stream:
        packed = xpress.compress(page)
        assert len(packed) < PAGE_SIZE
        self._token(len(packed), self.record_offset() + 4, self.record_offset() + 4 + len(packed))
        self.parts.append(struct.pack("<I", len(packed)) + packed)
        self.expected += page
        return self

    def var_raw(self, data: bytes) -> Stream:
        self._token(rb.TAG_VARIABLE_RUN, len(data), len(data))
        self.parts.append(struct.pack("<III", rb.TAG_VARIABLE_RUN, len(data), len(data)) + data)
        self.expected += data
        return self

    def var_xpress(self, data: bytes) -> Stream:
        packed = xpress.compress(data)
        assert len(packed) < len(data)
        self._token(rb.TAG_VARIABLE_RUN, len(data), len(packed))
        self.parts.append(struct.pack("<III", rb.TAG_VARIABLE_RUN, len(data), len(packed)) + packed)
        self.expected += data
        return self

    def end(self) -> Stream:
        self._token(rb.TAG_END, 0, 0)
        self.parts.append(struct.pack("<I", rb.TAG_END))
        return self

    def value(self) -> bytes:
        return b"".join(self.parts)


def planned(value: bytes) -> bytes | None:
    """What the fast path (plan_block, then one batch of XPRESS parts) makes of a value; None if it declines
    or some XPRESS part does not decode (the careful path must say which)."""
    plan = plan_block(value)
    if plan is None:
        return None
    if plan.uniform is not None:
        assert not plan.streams
        return rb.uniform_block(plan.uniform)
    decoded = xpress.decompress_many(plan.streams, plan.sizes)
    if not all(isinstance(d, bytes) for d in decoded):
        return None
    done = plan.finish(decoded)  # type: ignore[arg-type]
    if plan.paged:
        assert len(done) == 256 and all(len(page) == PAGE_SIZE for page in done)
    else:
        assert len(done) == 1 and len(done[0]) == BLOCK_SIZE
    return b"".join(done)


def assert_decodes(value: bytes, expected: bytes) -> rb.BlockIndex:
    """Every decode path agrees with ``expected``: whole block (fresh and reused buffer), bytes, each page."""
    findings = Findings(strict=True)
    index = opened(value, findings)
    assert not findings
    assert index.complete and index.missing_pages == []
    pages = decode_pages(value, index)
    assert len(pages) == 256 and all(len(page) == PAGE_SIZE for page in pages)
    assert b"".join(pages) == expected
    assert decoded(memoryview(value), opened(memoryview(value))) == expected
    for page in range(256):
        assert decoded_page(value, index, page) == expected[page * PAGE_SIZE : (page + 1) * PAGE_SIZE], page
    for first, stop in ((0, 0), (3, 9), (100, 256), (255, 256)):
        assert decoded(value, index, first=first, stop=stop) == expected[first * PAGE_SIZE : stop * PAGE_SIZE]
    fast = planned(value)
    assert fast is None or fast == expected
    return index


# -- round trips through the writer ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_encode_block_round_trips_mixed_content(seed: int) -> None:
    data = mixed_block(seed)
    value = encode_block(data)
    assert len(value) < BLOCK_SIZE
    index = assert_decodes(value, data)
    stats = index.stats
    assert stats.end_markers == 1
    assert stats.fill_records + stats.multi_fill_pages + stats.xpress_pages + stats.raw_pages == 256
    assert stats.xpress_pages and stats.raw_pages and stats.multi_fill_records  # every kind exercised


def test_encode_block_uses_one_multi_fill_for_a_zero_block() -> None:
    value = encode_block(bytes(BLOCK_SIZE))
    # tag + pattern + count, then the end marker: a block this small is stored inline in a .vmrs.
    assert value == struct.pack("<IQI", rb.TAG_MULTI_FILL, 0, 256) + struct.pack("<I", rb.TAG_END)
    index = assert_decodes(value, bytes(BLOCK_SIZE))
    assert pagedecode.uniform_pattern(index) == 0


def test_encode_block_single_fill_and_no_end_marker() -> None:
    data = pattern_page(b"ABCDEFGH") + mixed_block(5)[PAGE_SIZE:]
    value = encode_form(data, end_marker=False)
    assert value[:12] == struct.pack("<IQ", rb.TAG_FILL, int.from_bytes(b"ABCDEFGH", "little"))
    index = assert_decodes(value, data)
    assert index.stats.end_markers == 0  # complete after 256 pages: no marker needed


def test_incompressible_block_is_stored_raw() -> None:
    # Size == 1 MiB *means* raw, so a record stream must never be exactly (or more than) 1 MiB.
    data = random.Random(7).randbytes(BLOCK_SIZE)
    value = encode_block(data)
    assert value == data
    index = assert_decodes(value, data)
    assert index.raw and index.stats.raw_blocks == 1


def test_encode_without_compression_writes_raw_page_records() -> None:
    data = bytearray(BLOCK_SIZE)
    data[PAGE_SIZE : 2 * PAGE_SIZE] = text_page(random.Random(3))
    value = encode_block(bytes(data), compress=False)
    index = assert_decodes(value, bytes(data))
    assert index.stats.raw_pages == 1 and index.stats.xpress_pages == 0


def test_encode_with_variable_runs_round_trips() -> None:
    data = mixed_block(4)
    value = encode_form(data, variable_runs=True)
    index = assert_decodes(value, data)
    assert index.stats.variable_runs > 0
    assert rb.KIND_PIECES in index.kinds


def test_encode_block_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        encode_block(bytes(PAGE_SIZE))


def test_fill_page_cache_stays_bounded() -> None:
    for n in range(rb._FILL_CACHE_MAX * 2):
        assert fill_page(n) == struct.pack("<Q", n) * 512
    assert len(rb._FILL_PAGES) <= rb._FILL_CACHE_MAX
    assert fill_page(0) is fill_page(0)


# -- hand-built streams: each record kind ---------------------------------------------------------------


def test_multi_fill_pattern_comes_before_the_count() -> None:
    # Pascal, VMkatz-new and PR #1969 agree on pattern-then-count; old VMkatz had it reversed.
    s = Stream().multi(b"\x01\x02\x03\x04\x05\x06\x07\x08", 200).fill(b"\x00" * 8).multi(b"\xff" * 8, 55).end()
    index = assert_decodes(s.value(), bytes(s.expected))
    assert index.stats.multi_fill_records == 2 and index.stats.multi_fill_pages == 255


def test_runs_of_identical_single_fills_as_hyper_v_writes_them() -> None:
    # The real .bin uses one single-fill record per empty page; the indexer takes runs at once,
    # so check runs broken at every kind of boundary.
    s = Stream()
    for _ in range(100):
        s.fill(bytes(8))
    s.fill(b"AAAAAAAA")
    for _ in range(3):
        s.fill(bytes(8))
    s.raw_page(random_page(random.Random(18)))
    for _ in range(151):
        s.fill(b"\xff" * 8)
    index = assert_decodes(s.end().value(), bytes(s.expected))
    assert index.stats.fill_records == 255


def test_single_fills_beyond_256_pages_are_trailing_data() -> None:
    s = Stream()
    for _ in range(256):
        s.fill(bytes(8))
    value = s.value() + struct.pack("<IQ", rb.TAG_FILL, 0)
    findings = Findings()
    index = opened(value, findings)
    assert index.complete and index.stats.fill_records == 256
    assert [f.kind for f in findings] == ["trailing-data"]


def test_uniform_blocks_are_shared() -> None:
    value = Stream().multi(b"\x07" * 8, 256).end().value()
    index = opened(value)
    assert pagedecode.uniform_pattern(index) == 0x0707070707070707
    assert planned(value) is rb.uniform_block(0x0707070707070707)
    # The careful path (a memoryview is never planned) shares the same block.
    memory = GuestMemory(RamMap(build_layout([(0, BLOCK_SIZE)])), InMemoryBlockSource({0: memoryview(value)}))
    assert memory.read_gpa(0, BLOCK_SIZE) is rb.uniform_block(0x0707070707070707)
    assert memory.blocks_careful == 1


def test_raw_and_xpress_page_records() -> None:
    rng = random.Random(11)
    s = Stream().raw_page(random_page(rng)).xpress_page(text_page(rng)).multi(bytes(8), 254).end()
    index = assert_decodes(s.value(), bytes(s.expected))
    assert (index.stats.raw_pages, index.stats.xpress_pages) == (1, 1)


def test_variable_runs_raw_and_compressed_across_page_boundaries() -> None:
    rng = random.Random(12)
    s = Stream()
    s.var_raw(rng.randbytes(100))  # leaves the output 100 bytes into page 0
    s.var_xpress(text_page(rng)[:3000])  # compressed run straddling pages 0 and 1
    s.raw_page(random_page(rng))  # a page record at an unaligned position
    s.xpress_page(text_page(rng))
    s.fill(b"12345678")  # unaligned fill: the pattern's phase starts at the record
    s.multi(b"abcdefgh", 3)
    s.var_xpress(bytes(PAGE_SIZE * 2 - 100 - 3000 + PAGE_SIZE))  # back onto a page boundary
    aligned_at = len(s.expected)
    assert aligned_at % PAGE_SIZE == 0
    s.multi(bytes(8), 256 - aligned_at // PAGE_SIZE).end()
    index = assert_decodes(s.value(), bytes(s.expected))
    assert index.stats.variable_runs == 3
    assert index.kinds[aligned_at // PAGE_SIZE] == rb.KIND_FILL  # aligned records go back to the page table


def test_many_tiny_variable_runs_keep_the_index_small() -> None:
    # 65,536 one-byte runs: the index stays 256 checkpoints, not one entry per record.
    rng = random.Random(17)
    data = rng.randbytes(16 * PAGE_SIZE)
    record = struct.pack("<III", rb.TAG_VARIABLE_RUN, 1, 1)
    value = b"".join(record + data[i : i + 1] for i in range(len(data)))
    value += struct.pack("<IQI", rb.TAG_MULTI_FILL, 0, 240) + struct.pack("<I", rb.TAG_END)
    index = opened(value)
    assert index.stats.variable_runs == 16 * PAGE_SIZE
    assert index.piece_out is not None and len(index.piece_out) == 256
    assert decoded_page(value, index, 15) == data[15 * PAGE_SIZE :]
    assert decoded(value, index) == data + bytes(240 * PAGE_SIZE)


def test_tokens_are_the_records_in_order_and_restart_at_any_of_them() -> None:
    rng = random.Random(30)
    s = Stream().fill(b"12345678").raw_page(random_page(rng)).xpress_page(text_page(rng)).var_raw(rng.randbytes(100))
    s.fill(b"ABCDEFGH").var_xpress(text_page(rng)[:3000]).xpress_page(text_page(rng))  # off page boundaries
    s.var_raw(rng.randbytes(PAGE_SIZE - (len(s.expected) & 0xFFF)))  # back on a boundary
    s.multi(bytes(8), 256 - len(s.expected) // PAGE_SIZE).end()
    value = s.value()
    assert list(tokens(value)) == s.tokens
    for i, (_, rec, out, _, _) in enumerate(s.tokens):  # a checkpoint is any record already walked
        assert list(tokens(value, rec, out)) == s.tokens[i:]
    stop = 5 * PAGE_SIZE
    assert list(tokens(value, stop=stop)) == [t for t in s.tokens if t[2] < stop]
    assert_decodes(value, bytes(s.expected))


def test_identical_single_fills_on_a_page_boundary_are_one_token() -> None:
    s = Stream().fill(b"12345678")
    for _ in range(200):
        s.fill(bytes(8))
    s.multi(b"\xee" * 8, 55).end()
    assert [(t[0], t[4]) for t in tokens(s.value())] == [
        (rb.TAG_FILL, 1),
        (rb.TAG_FILL, 200),
        (rb.TAG_MULTI_FILL, 55),
        (rb.TAG_END, 0),
    ]


def test_the_encoder_and_the_test_forms_agree_on_the_default_form() -> None:
    data = mixed_block(6)
    assert encode_form(data) == encode_block(data)
    assert encode_form(data, compress=False) == encode_block(data, compress=False)


def test_variable_run_smaller_than_a_page() -> None:
    rng = random.Random(13)
    s = Stream()
    for _ in range(PAGE_SIZE // 512):
        s.var_raw(rng.randbytes(512))
    s.multi(bytes(8), 255).end()
    assert_decodes(s.value(), bytes(s.expected))


# -- early end, truncation, hostile input -----------------------------------------------------------------


def test_early_end_marker_leaves_the_rest_missing() -> None:
    s = Stream().multi(b"\x11" * 8, 10)
    end_at = s.record_offset()
    value = s.end().value()
    findings = Findings()
    index = opened(value, findings)
    assert [f.kind for f in findings] == ["truncated"]
    assert findings[0].offset == FILE_OFFSET + end_at
    assert index.missing_pages == list(range(10, 256))
    assert index.stats.missing_pages == 246
    out = decoded(value, index)
    assert out[: 10 * PAGE_SIZE] == s.expected and not any(out[10 * PAGE_SIZE :])
    assert index.kinds[10] == rb.KIND_MISSING
    with pytest.raises(TruncatedError):
        opened(value, Findings(strict=True))


def test_stream_exhausted_without_end_marker() -> None:
    value = Stream().multi(bytes(8), 4).value()
    findings = Findings()
    index = opened(value, findings)
    assert [f.kind for f in findings] == ["truncated"]
    assert index.missing_pages == list(range(4, 256))


def test_partial_page_at_the_end_is_missing() -> None:
    rng = random.Random(14)
    value = Stream().multi(bytes(8), 2).var_raw(rng.randbytes(5000)).value()
    findings = Findings()
    index = opened(value, findings)
    assert index.missing_pages == list(range(3, 256))  # page 3 only partly produced
    assert decoded_page(value, index, 2) == bytes(value[-5000:][:PAGE_SIZE])
    block = decoded(value, index)
    assert not any(block[3 * PAGE_SIZE :])


def test_complete_block_with_trailing_bytes_is_noted_not_fatal() -> None:
    value = encode_block(bytes(BLOCK_SIZE)) + b"junk"
    findings = Findings(strict=True)
    index = opened(value, findings)
    assert index.complete
    assert [f.kind for f in findings] == ["trailing-data"]


def _hostile(prefix: Stream, bad: bytes) -> tuple[bytes, int]:
    at = prefix.record_offset()
    return prefix.value() + bad, at


HOSTILE = {
    "absurd multi-fill count": (struct.pack("<IQI", rb.TAG_MULTI_FILL, 0, 0xFFFFFFFF), "bad-record"),
    "multi-fill count past the block": (struct.pack("<IQI", rb.TAG_MULTI_FILL, 0, 256), "bad-record"),
    "zero multi-fill count": (struct.pack("<IQI", rb.TAG_MULTI_FILL, 0, 0), "bad-record"),
    "page record past the value": (struct.pack("<I", 3000) + b"x" * 10, "truncated"),
    "tag zero": (struct.pack("<I", 0) + bytes(64), "bad-record"),
    "oversized page record": (struct.pack("<I", 4097) + bytes(5000), "bad-record"),
    "variable run past the block": (struct.pack("<III", rb.TAG_VARIABLE_RUN, BLOCK_SIZE, 8) + bytes(8), "bad-record"),
    "empty variable run": (struct.pack("<III", rb.TAG_VARIABLE_RUN, 0, 8) + bytes(8), "bad-record"),
    "variable run data past the value": (struct.pack("<III", rb.TAG_VARIABLE_RUN, 100, 0xFFFFFF00), "truncated"),
    "fill record cut": (struct.pack("<I", rb.TAG_FILL) + b"abc", "truncated"),
    "multi-fill record cut": (struct.pack("<IQ", rb.TAG_MULTI_FILL, 0), "truncated"),
    "stray bytes": (b"\x01\x02", "truncated"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_record_becomes_a_finding_or_format_error(name: str) -> None:
    bad, kind = HOSTILE[name]
    value, at = _hostile(Stream().multi(bytes(8), 1), bad)
    findings = Findings()
    index = opened(value, findings)
    assert [f.kind for f in findings] == [kind], findings
    assert findings[0].offset == FILE_OFFSET + at
    assert findings[0].path == "t.bin"
    assert index.missing_pages == list(range(1, 256))
    assert decoded(value, index)[:PAGE_SIZE] == bytes(PAGE_SIZE)
    with pytest.raises(FormatError):
        opened(value, Findings(strict=True))


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_damage_ends_the_walk_at_the_bad_record_for_both_paths(name: str) -> None:
    bad, kind = HOSTILE[name]
    value, at = _hostile(Stream().multi(bytes(8), 1), bad)
    walked = []
    with pytest.raises(RecordDamage) as err:
        walked.extend(tokens(value))
    assert len(walked) == 1  # the sound record before it
    assert (err.value.rec, err.value.out, err.value.kind) == (at, PAGE_SIZE, kind)
    assert plan_block(value) is None


def test_unaligned_record_overrunning_the_block() -> None:
    rng = random.Random(15)
    s = Stream().var_raw(rng.randbytes(100)).multi(bytes(8), 255)
    value, at = _hostile(s, struct.pack("<IQ", rb.TAG_FILL, 0))  # would end 100 bytes past 1 MiB
    findings = Findings()
    index = opened(value, findings)
    assert [f.kind for f in findings] == ["bad-record"] and findings[0].offset == FILE_OFFSET + at
    assert index.missing_pages == [255]


def test_inline_value_findings_name_the_value_offset() -> None:
    findings = Findings()
    index_block(b"\x01\x02", path="t.vmrs", file_offset=None, findings=findings)
    assert findings[0].offset is None and "value offset 0x0" in findings[0].message


def test_corrupt_xpress_page_raises_or_is_collected() -> None:
    rng = random.Random(16)
    s = Stream().xpress_page(text_page(rng)).multi(bytes(8), 255).end()
    value = bytearray(s.value())
    value[4:40] = b"\xff" * 36  # garbage where the first XPRESS page starts
    value = bytes(value)
    index = opened(value)
    try:
        expected_page = decoded_page(value, index, 0)
    except FormatError as exc:
        assert exc.path == "t.bin" and exc.offset == FILE_OFFSET  # the record's own offset
        errors: list[tuple[int, FormatError]] = []
        block = decoded(value, index, errors=errors)
        assert [page for page, _ in errors] == [0]
        assert block[:PAGE_SIZE] == bytes(PAGE_SIZE)
        with pytest.raises(FormatError):
            decoded(value, index)
    else:  # the garbage happened to decode: then all paths must agree on it
        assert decoded(value, index)[:PAGE_SIZE] == expected_page


def test_page_number_out_of_range() -> None:
    value = encode_block(bytes(BLOCK_SIZE))
    with pytest.raises(ValueError):
        decode_pages(value, opened(value), 256, 257)


# -- the fast path of whole-block reads ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_plan_block_takes_what_hyper_v_writes(seed: int) -> None:
    data = mixed_block(seed)
    value = encode_block(data)
    assert planned(value) == data
    hand = Stream().fill(bytes(8)).fill(bytes(8)).fill(b"\x01" * 8).raw_page(random_page(random.Random(seed)))
    hand.xpress_page(text_page(random.Random(seed))).multi(b"abcdefgh", 2)
    hand.multi(bytes(8), 256 - len(hand.expected) // PAGE_SIZE).end()
    assert planned(hand.value()) == hand.expected


def test_plan_block_takes_one_single_fill_per_page() -> None:
    """The layout of the real .bin: 256 single-fill records, taken as one run."""
    stream = Stream()
    for _ in range(200):
        stream.fill(bytes(8))
    for page in range(56):
        stream.fill(struct.pack("<Q", page % 3))
    value = stream.end().value()
    plan = plan_block(value)
    assert plan is not None and plan.uniform is None and not plan.streams
    assert planned(value) == stream.expected
    assert plan.parts[0] is fill_page(0)  # shared, not 200 copies


@pytest.mark.parametrize("pattern", [bytes(8), b"\xff" * 8, b"ABCDEFGH"])
def test_plan_block_sees_uniform_blocks(pattern: bytes) -> None:
    value = encode_block(pattern_page(pattern) * 256)
    plan = plan_block(value)
    assert plan is not None and plan.uniform == struct.unpack("<Q", pattern)[0]
    assert planned(value) == pattern_page(pattern) * 256
    if pattern == bytes(8):
        assert rb.uniform_block(0) is rb.ZERO_BLOCK


def _declined() -> dict[str, bytes]:
    rng = random.Random(5)
    complete = Stream().xpress_page(text_page(rng)).multi(bytes(8), 255).end().value()
    return {
        "raw 1 MiB value": random_page(rng) * 256,
        "no end marker before 1 MiB": Stream().multi(bytes(8), 10).value(),
        "end marker then bytes": Stream().multi(bytes(8), 10).end().value() + b"\0",
        "variable run cut off": Stream().multi(bytes(8), 2).var_raw(bytes(5000)).value()[:-10],
        "zero-sized variable run": Stream().multi(bytes(8), 2).value() + struct.pack("<III", rb.TAG_VARIABLE_RUN, 0, 4),
        "variable run overrun": Stream().multi(bytes(8), 255).value()
        + struct.pack("<III", rb.TAG_VARIABLE_RUN, 5000, 5000)
        + bytes(5000),
        "page record overrunning 1 MiB": Stream()
        .var_raw(bytes(100))
        .multi(bytes(8), 255)
        .raw_page(bytes(PAGE_SIZE))
        .end()
        .value(),
        "trailing bytes": complete + b"\0",
        "cut in a record": complete[:20],
        "unknown tag": Stream().multi(bytes(8), 5).value() + struct.pack("<I", 0x12345678) + bytes(64),
        "zero tag": struct.pack("<I", 0) + bytes(64),
        "multi-fill overrun": Stream().multi(bytes(8), 200).multi(bytes(8), 57).end().value(),
        "multi-fill of zero pages": Stream().multi(bytes(8), 0).multi(bytes(8), 256).end().value(),
        "xpress data past the end": struct.pack("<I", 4000) + bytes(100),
        "empty": b"",
    }


@pytest.mark.parametrize("name", sorted(_declined()))
def test_plan_block_declines_damaged_streams(name: str) -> None:
    """Damaged streams go to index_block, which reports them."""
    value = _declined()[name]
    assert plan_block(value) is None
    if len(value) == BLOCK_SIZE:
        return  # raw: nothing to walk (the reader serves it as it is)
    findings = Findings()
    opened(value, findings)
    assert findings, "the careful path has nothing to say about a stream the fast path declined"
    assert plan_block(memoryview(encode_block(mixed_block(1)))) is None  # not bytes: careful path


# -- fuzz: mutated and truncated valid streams --------------------------------------------------------------


def _seed_streams() -> list[bytes]:
    rng = random.Random(21)
    hand = Stream().var_raw(rng.randbytes(100)).var_xpress(text_page(rng)[:3000]).raw_page(random_page(rng))
    hand.xpress_page(text_page(rng)).fill(b"12345678").multi(b"abcdefgh", 3)
    hand.var_xpress(bytes(PAGE_SIZE * 2 - 3100 + PAGE_SIZE)).multi(bytes(8), 256 - len(hand.expected) // PAGE_SIZE - 3)
    hand.end()
    few_pages = bytearray(BLOCK_SIZE)
    for page in (0, 7, 100, 255):
        few_pages[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = text_page(rng)
    return [
        encode_block(bytes(few_pages)),
        encode_form(bytes(few_pages), variable_runs=True),
        encode_block(mixed_block(9)),
        hand.value(),
    ]


SEEDS = _seed_streams()
INTERESTING = [0, 1, 8, 4095, 4096, 4097, 0xFFFF, 0x100000, 0x7FFFFFFF, 0xFFFFFFFC, 0xFFFFFFFD, 0xFFFFFFFE, 0xFFFFFFFF]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    edits=st.lists(
        st.tuples(
            st.integers(0, 1 << 20),
            st.one_of(st.sampled_from(INTERESTING), st.integers(0, 0xFFFFFFFF)),
            st.booleans(),
        ),
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, 1 << 20)),
    strict=st.booleans(),
)
def test_fuzzed_streams_raise_only_vmssd_errors(
    seed: int, edits: list[tuple[int, int, bool]], cut: int | None, strict: bool
) -> None:
    value = bytearray(SEEDS[seed])
    for pos, number, whole_word in edits:
        pos %= len(value)
        if whole_word:
            value[pos : pos + 4] = struct.pack("<I", number)[: len(value) - pos]
        else:
            value[pos] = number & 0xFF
    if cut is not None:
        del value[cut % (len(value) + 1) :]
    data = bytes(value)
    plan = plan_block(data)
    if plan is not None:
        # The fast path only takes streams the careful one finds nothing wrong with (an early end marker
        # is wrong only if the map needs the pages after it), and agrees with it (or, when a page does
        # not decode, gives up so that the careful path can report it).
        findings = Findings()
        careful = index_block(data, path="fuzz", file_offset=0, findings=findings, needed=plan.covered >> 12)
        assert not findings and careful.covered == plan.covered
        fast = planned(data)
        bad: list[tuple[int, FormatError]] = []
        block = decoded(data, careful, errors=bad)
        assert fast is None or (not bad and fast == block)  # None also when only the fallback decoder copes
    try:
        index = index_block(data, path="fuzz", file_offset=0, findings=Findings(strict=strict))
    except VmssdError:
        return
    errors: list[tuple[int, FormatError]] = []
    block = decoded(data, index, errors=errors)
    assert len(block) == BLOCK_SIZE
    for page in range(0, 256, 17):
        with contextlib.suppress(VmssdError):
            assert decoded_page(data, index, page) == block[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
    with contextlib.suppress(VmssdError):
        decoded(data, index)
