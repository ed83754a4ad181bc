"""``vmssd read``: bytes of guest memory (physical, virtual or raw saved memory) as a hexdump or a file."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from ..cpu.chunks import MAX_VTL
from ..errors import VmssdError
from ..interface import SavedState
from ..outputs import partial_output
from .commands import add_command, add_output, add_saved_state
from .convert import check_output
from .opening import open_state

PIECE = 1 << 20
LIMIT = (1 << 64) - 1  # addresses, offsets and lengths are 64-bit quantities
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NUMBER = re.compile(r"^(0x[0-9a-f_]+|0o[0-7_]+|0b[01_]+|[0-9_]+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


def number(text: str) -> int:
    """``0x1000``, ``4096``, ``4K``, ``1MiB`` (binary suffixes): what an analyst types for an address or size."""
    m = _NUMBER.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0x1000, 4096, 4K, 1M)")
    value = int(m[1], 0) * _SUFFIX[m[2].lower()]
    if value > LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is beyond 64 bits (at most {LIMIT:#x})")
    return value


def vtl_number(text: str) -> int:
    """A VTL as Hyper-V numbers them: 0..15, refused here rather than deep in the provider."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a VTL number (0..{MAX_VTL})") from None
    if not 0 <= value <= MAX_VTL:
        raise argparse.ArgumentTypeError(f"{text!r}: a VTL is 0..{MAX_VTL}")
    return value


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "read",
        run,
        help="hexdump (or save) guest memory at a physical or virtual address",
        description=(
            "Read LENGTH bytes of guest memory at ADDRESS: a guest-physical address (default), a virtual"
            " address translated page by page with a VP's page tables (--virtual), or an offset in raw"
            " saved memory (--raw-offset, the RamBlocks concatenated; see `vmssd memmap`). Prints a"
            " hexdump (address, 16 bytes in hex, ASCII) or, with -o, writes the bytes to a file. A read"
            " that runs into a hole, a missing page or an unmapped virtual page keeps what it read and"
            " says where it stopped; it fails (exit 1) only when nothing could be read."
        ),
        examples=[
            "vmssd read vm.vmrs 0x1000 256",
            "vmssd read vm.vmrs 0xffffffff81000000 64 --virtual --vp 0",
            "vmssd read vm.vmrs 0 16M -o low16m.bin",
            "vmssd read vm.bin 0x200000 4K --raw-offset          (vm.vsv found beside vm.bin)",
        ],
    )
    add_saved_state(p)
    p.add_argument("address", type=number, help="where to start: 0x..., decimal, or with a K/M/G suffix")
    p.add_argument("length", type=number, help="how many bytes: 0x..., decimal, or with a K/M/G suffix")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--virtual", action="store_true", help="ADDRESS is virtual: translate with the VP's CR3")
    kind.add_argument("--raw-offset", action="store_true", help="ADDRESS is an offset in raw saved memory")
    p.add_argument("--vp", type=int, metavar="N", help="with --virtual: whose page tables (default 0)")
    p.add_argument(
        "--vtl",
        type=vtl_number,
        metavar="N",
        help="with --virtual: that VTL's page tables (default: VTL0 when saved, else the lowest saved)",
    )
    add_output(
        p, "write the bytes to OUT instead of a hexdump", required=False, force="with -o: overwrite OUT if it exists"
    )


class Stopped(Exception):
    """A read ended early; the message says where and why."""


def read_physical(provider: SavedState, gpa: int, length: int) -> Iterator[bytes]:
    """Bytes from ``gpa`` in pieces; raises :class:`Stopped` at the first hole or missing page."""
    done = 0
    while done < length:
        take = min(PIECE, length - done)
        try:
            data = provider.read_guest_physical_address(gpa + done, take)
        except VmssdError as exc:
            raise Stopped(str(exc)) from None
        if data:
            yield data
        done += len(data)
        if len(data) < take:
            try:  # the read that fails at the stop point says why
                provider.read_guest_physical_address(gpa + done, 1)
            except VmssdError as exc:
                raise Stopped(str(exc)) from None
            raise Stopped(f"GPA {gpa + done:#x}: the read came back short")


def read_virtual(provider: SavedState, vp: int, va: int, length: int) -> Iterator[bytes]:
    """Bytes from ``va``, translated one page (or large page) at a time with the VP's page tables."""
    done = 0
    while done < length:
        cur = (va + done) & 0xFFFF_FFFF_FFFF_FFFF
        try:
            gpa, left = provider.guest_virtual_to_physical_with_size(vp, cur)
        except VmssdError as exc:
            raise Stopped(str(exc)) from None
        take = min(left, length - done, PIECE)
        try:
            for data in read_physical(provider, gpa, take):
                done += len(data)
                yield data
        except Stopped as exc:
            raise Stopped(f"VA {cur:#x} -> {exc}") from None


def read_raw(provider: SavedState, offset: int, length: int) -> Iterator[bytes]:
    """Bytes of raw saved memory; on missing data, page by page up to the first missing page."""
    size = provider.get_guest_raw_saved_memory_size()
    done = 0
    while done < length:
        pos = offset + done
        take = min(PIECE, length - done)
        try:
            data = provider.read_guest_raw_saved_memory(pos, take)
        except VmssdError:
            data = b""
            while len(data) < take:
                step = min(take - len(data), 0x1000 - ((pos + len(data)) & 0xFFF))
                try:
                    data += provider.read_guest_raw_saved_memory(pos + len(data), step)
                except VmssdError as exc:
                    if data:
                        yield data
                    raise Stopped(str(exc)) from None
        if data:
            yield data
        done += len(data)
        if len(data) < take:
            raise Stopped(f"raw offset {offset + done:#x} is past the end of raw saved memory ({size:#x} bytes)")


class Hexdump:
    """``hexdump -C`` style lines (address, 16 bytes as two groups of hex, ASCII), fed in pieces."""

    def __init__(self, out: TextIO, address: int, width: int) -> None:
        self.out = out
        self.address = address
        self.width = width
        self._rest = b""

    def feed(self, data: bytes) -> None:
        data = self._rest + data
        full = len(data) - len(data) % 16
        for i in range(0, full, 16):
            self._line(data[i : i + 16])
        self._rest = data[full:]

    def close(self) -> None:
        if self._rest:
            self._line(self._rest)
            self._rest = b""

    def _line(self, chunk: bytes) -> None:
        left = " ".join(f"{b:02x}" for b in chunk[:8])
        right = " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        self.out.write(f"{self.address:0{self.width}x}  {left:<23}  {right:<23}  |{text}|\n")
        self.address += len(chunk)


def run(args: argparse.Namespace) -> int:
    for option in ("vp", "vtl"):
        if getattr(args, option) is not None and not args.virtual:
            print(f"vmssd read: error: --{option} only applies with --virtual", file=sys.stderr)
            return 2
    if args.output:
        check_output(args.output, [args.file] + ([args.vsv] if args.vsv else []), force=args.force)
    with open_state(args, needs_memory=True) as provider:
        if args.virtual:
            vp = args.vp or 0
            if args.vtl is not None:  # refused, naming the saved VTLs, when that VTL's registers were not saved
                provider.force_active_virtual_trust_level(vp, args.vtl)
            what = f"VA {args.address:#x} (VP {vp}" + (f" VTL {args.vtl})" if args.vtl is not None else ")")
            pieces = read_virtual(provider, vp, args.address, args.length)
        elif args.raw_offset:
            what = f"raw offset {args.address:#x}"
            pieces = read_raw(provider, args.address, args.length)
        else:
            what = f"GPA {args.address:#x}"
            pieces = read_physical(provider, args.address, args.length)
        if args.output:
            check_output(args.output, provider.paths, force=args.force)
            with partial_output(args.output, force=args.force) as fh:
                got, stop = _drain(pieces, fh.write)
                if not got and args.length:
                    raise VmssdError(f"nothing read at {what}: {stop}")
        else:
            width = 16 if args.virtual else max(8, len(f"{args.address + max(args.length, 1) - 1:x}"))
            dump = Hexdump(sys.stdout, args.address, width)
            got, stop = _drain(pieces, dump.feed)
            dump.close()
            if not got and args.length:
                raise VmssdError(f"nothing read at {what}: {stop}")
    if stop is not None:
        sys.stdout.flush()
        print(f"vmssd read: stopped after {got:#x} of {args.length:#x} bytes: {stop}", file=sys.stderr)
    if args.output:
        print(f"wrote {got:#x} bytes ({got:,}) from {what} to {args.output}", file=sys.stderr)
    return 0


def _drain(pieces: Iterator[bytes], sink: Callable[[bytes], object]) -> tuple[int, str | None]:
    """Feed every piece to ``sink``; returns (bytes read, why it stopped or None)."""
    got = 0
    try:
        for data in pieces:
            sink(data)
            got += len(data)
    except Stopped as exc:
        return got, str(exc)
    return got, None
