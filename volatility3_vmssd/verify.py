"""Compare two providers answer by answer: the engine behind ``vmssd verify``.

Any two objects with the provider method names can be compared (native vs DLL on Windows, native vs
native in the tests).  What is compared, cheapest first: VP count; per VP the architecture, paging
mode, VTLs, every register and the translation of RIP/RSP; partition VTLs and guest OS id; the
GPA chunk map and raw saved-memory size; then whole pages: the first, middle and last page of every
chunk plus ``samples`` random pages (seeded, so a run can be repeated), with their raw offsets.

Both sides failing the same way (both "unmapped", both "not found") counts as agreement.  Answers one
side cannot give at all (UnsupportedError, registers the DLL has no id for, segment fields the old ABI
does not report) are never counted as differences; registers present on one side only are reported as
informational.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .cpu.registers import REGISTER_IDS, PagingMode, SegmentRegister, TableRegister
from .errors import NotFoundError, UnmappedAddressError, UnsupportedError, VmssdError

DEFAULT_SAMPLES = 32
_SEGMENT_FIELDS = ("base", "limit", "selector", "attributes")
_TRANSLATED = ("rip", "rsp")


@dataclasses.dataclass(frozen=True)
class Difference:
    """One disagreement. ``informational`` ones (a register only one side reports) do not fail a check."""

    kind: str  # vp-count, architecture, paging-mode, vtl, registers, register, register-missing, translation,
    # guest-vtls, guest-os, chunks, raw-size, raw-offset, page, unsupported
    where: str
    a: Any
    b: Any
    message: str
    informational: bool = False

    def __str__(self) -> str:
        return f"{'note' if self.informational else 'DIFF'} [{self.kind}] {self.where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "where": self.where,
            "a": _jsonable(self.a),
            "b": _jsonable(self.b),
            "message": self.message,
            "informational": self.informational,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"length": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, (SegmentRegister, TableRegister)):
        return {k: hex(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, SegmentRegister):
        return f"(base={value.base:#x} limit={value.limit:#x} sel={value.selector:#x} attr={value.attributes:#x})"
    if isinstance(value, TableRegister):
        return f"(base={value.base:#x} limit={value.limit:#x})"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes (sha256 {hashlib.sha256(value).hexdigest()[:16]})"
    return repr(value)


Outcome = tuple[str, Any]


def _outcome(fn: Callable[..., Any], *args: Any) -> Outcome:
    """("ok", value) or (category, detail); the category is what is compared when both sides fail."""
    try:
        return "ok", fn(*args)
    except UnsupportedError as exc:
        return "unsupported", str(exc)
    except UnmappedAddressError:
        return "unmapped", None
    except NotFoundError:
        return "not-found", None
    except (VmssdError, OSError, ValueError, MemoryError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"


def _describe(outcome: Outcome) -> str:
    state, value = outcome
    if state == "ok":
        return _show(value)
    return state if value is None else f"{state} ({value})"


def sample_pages(chunks: Iterable[tuple[int, int]], samples: int, seed: int) -> list[int]:
    """Page numbers to compare: first/middle/last of every chunk plus ``samples`` seeded random pages."""
    runs = [(int(s), int(n)) for s, n in chunks if n > 0]
    picks: set[int] = set()
    for start, count in runs:
        picks.update((start, start + count // 2, start + count - 1))
    total = sum(n for _, n in runs)
    rng = random.Random(seed)
    for _ in range(min(max(samples, 0), total)):
        k = rng.randrange(total)
        for start, count in runs:
            if k < count:
                picks.add(start + k)
                break
            k -= count
    return sorted(picks)


class Comparer:
    """Runs the comparison and keeps a few counters for the report."""

    def __init__(self, a: Any, b: Any, *, labels: Sequence[str] = ("native", "dll")) -> None:
        self.a, self.b = a, b
        self.labels = tuple(labels)
        self.differences: list[Difference] = []
        self.pages_compared = 0
        self.registers_compared = 0

    def _add(self, kind: str, where: str, a: Any, b: Any, message: str | None = None, info: bool = False) -> None:
        la, lb = self.labels
        text = message or f"{la} {_show(a)} != {lb} {_show(b)}"
        self.differences.append(Difference(kind, where, a, b, text, info))

    def _both(self, kind: str, where: str, method: str, *args: Any, eq: Callable[[Any, Any], bool] | None = None):
        """Call ``method`` on both sides; record a difference unless they agree. Returns both outcomes."""
        oa = _outcome(getattr(self.a, method), *args)
        ob = _outcome(getattr(self.b, method), *args)
        (sa, va), (sb, vb) = oa, ob
        la, lb = self.labels
        if "unsupported" in (sa, sb):
            if sa != sb:
                side = la if sa == "unsupported" else lb
                self._add("unsupported", where, va, vb, f"{side} cannot answer {method}", info=True)
        elif sa == sb == "ok":
            if not (eq or _equal)(va, vb):
                self._add(kind, where, va, vb)
        elif sa != sb:
            self._add(kind, where, va, vb, f"{la} {_describe(oa)} != {lb} {_describe(ob)}")
        return oa, ob

    # ------------------------------------------------------------------ parts
    def compare_cpu(self) -> None:
        (sa, na), (sb, nb) = self._both("vp-count", "partition", "vp_count")
        count = min(na, nb) if sa == sb == "ok" else 0
        for vp in range(count):
            where = f"VP {vp}"
            self._both("architecture", where, "get_architecture", vp, eq=_int_equal)
            self._both("paging-mode", where, "get_paging_mode", vp, eq=_int_equal)
            self._both("vtl", f"{where} active VTL", "get_active_virtual_trust_level", vp)
            self._both("vtl", f"{where} enabled VTLs", "get_enabled_virtual_trust_levels", vp)
            self.compare_registers(vp)
        self._both("guest-vtls", "partition enabled VTLs", "get_guest_enabled_virtual_trust_levels")
        self._both("guest-os", "partition guest OS id", "get_guest_os_info", eq=_os_equal)

    def compare_registers(self, vp: int) -> None:
        where = f"VP {vp}"
        oa, ob = _outcome(self.a.get_registers, vp), _outcome(self.b.get_registers, vp)
        if oa[0] != "ok" or ob[0] != "ok":
            if oa[0] != ob[0]:
                la, lb = self.labels
                self._add("registers", where, oa[1], ob[1], f"{la} {_describe(oa)} != {lb} {_describe(ob)}")
            return
        ra, rb = oa[1], ob[1]
        unreported: dict[str, set[str]] = {}
        for side in (self.a, self.b):
            for name, fields in getattr(side, "unreported_fields", {}).items():
                unreported.setdefault(name, set()).update(fields)
        for name in sorted(ra.keys() & rb.keys(), key=_order):
            self.registers_compared += 1
            if not _register_equal(ra[name], rb[name], unreported.get(name, set())):
                self._add("register", f"{where} {name}", ra[name], rb[name])
        for name in sorted(ra.keys() ^ rb.keys(), key=_order):
            if name not in REGISTER_IDS:
                continue  # native-only extras (cpl, xcr0, virtual MSRs): the DLL has no id for them
            missing_side, present = (self.b, ra) if name in ra else (self.a, rb)
            expressible = getattr(missing_side, "expressible_registers", None)
            if expressible is not None and name not in expressible(vp):
                continue
            la, lb = self.labels
            lacking = lb if name in ra else la
            self._add(
                "register-missing",
                f"{where} {name}",
                ra.get(name),
                rb.get(name),
                f"only {la if name in ra else lb} reports it ({_show(present[name])}); {lacking} does not",
                info=True,
            )
        mode = _outcome(self.a.get_paging_mode, vp)
        if mode[0] == "ok" and int(mode[1]) not in (PagingMode.INVALID, PagingMode.NON_PAGED):
            for name in _TRANSLATED:
                va = ra.get(name)
                if isinstance(va, int):
                    self._both("translation", f"{where} VA {va:#x} ({name})", "guest_virtual_to_physical", vp, va)

    def compare_memory(self, samples: int, seed: int) -> None:
        (sa, ca), (sb, cb) = self._both("chunks", "GPA chunk map", "get_guest_physical_memory_chunks", eq=_chunks_equal)
        self._both("raw-size", "raw saved memory size", "get_guest_raw_saved_memory_size")
        runs: list[tuple[int, int]] = []
        page_size = 0x1000
        for state, value in ((sa, ca), (sb, cb)):
            if state == "ok":
                page_size = value[0] or page_size
                runs.extend((int(c[0]), int(c[1])) for c in value[1])
        for page in sample_pages(sorted(set(runs)), samples, seed):
            gpa = page * page_size
            self.pages_compared += 1
            self._both("page", f"GPA {gpa:#x}", "read_guest_physical_address", gpa, page_size, eq=_bytes_equal)
            self._both(
                "raw-offset", f"GPA {gpa:#x} raw offset", "guest_physical_address_to_raw_saved_memory_offset", gpa
            )
        # replace the page differences' generic message with where the bytes first differ
        for i, d in enumerate(self.differences):
            if d.kind == "page" and isinstance(d.a, bytes) and isinstance(d.b, bytes):
                self.differences[i] = dataclasses.replace(d, message=_bytes_message(d.a, d.b, self.labels))

    def run(self, *, samples: int = DEFAULT_SAMPLES, seed: int = 0) -> list[Difference]:
        self.compare_cpu()
        self.compare_memory(samples, seed)
        return self.differences


def compare_providers(
    a: Any, b: Any, *, samples: int = DEFAULT_SAMPLES, seed: int = 0, labels: Sequence[str] = ("native", "dll")
) -> list[Difference]:
    """Every difference between two providers (empty when they agree on everything sampled)."""
    return Comparer(a, b, labels=labels).run(samples=samples, seed=seed)


# ---------------------------------------------------------------------------------------------
# Equality rules
# ---------------------------------------------------------------------------------------------


def _equal(a: Any, b: Any) -> bool:
    return bool(a == b)


def _int_equal(a: Any, b: Any) -> bool:
    return int(a) == int(b)


def _os_equal(a: Any, b: Any) -> bool:
    """None (no OsId chunk) and a zero id mean the same thing: the guest never set one."""
    return (getattr(a, "value", 0) or 0) == (getattr(b, "value", 0) or 0)


def _chunks_equal(a: Any, b: Any) -> bool:
    return a[0] == b[0] and [tuple(map(int, c)) for c in a[1]] == [tuple(map(int, c)) for c in b[1]]


def _bytes_equal(a: Any, b: Any) -> bool:
    return bytes(a) == bytes(b)


def _register_equal(a: Any, b: Any, unreported: set[str]) -> bool:
    if isinstance(a, SegmentRegister) and isinstance(b, SegmentRegister):
        return all(getattr(a, f) == getattr(b, f) for f in _SEGMENT_FIELDS if f not in unreported)
    return bool(a == b)


def _order(name: str) -> tuple[int, str]:
    return REGISTER_IDS.get(name, 10_000), name


def _bytes_message(a: bytes, b: bytes, labels: Sequence[str]) -> str:
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    la, lb = labels
    return (
        f"{len(a)} vs {len(b)} bytes, first difference at +{first:#x};"
        f" sha256 {la} {hashlib.sha256(a).hexdigest()[:16]} {lb} {hashlib.sha256(b).hexdigest()[:16]}"
    )


# ---------------------------------------------------------------------------------------------
# Files: the native reader against the DLL (what the CLI runs)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VerifyReport:
    file: str
    files: list[str]
    dll: dict[str, Any] | None
    samples: int
    seed: int
    pages_compared: int
    registers_compared: int
    differences: list[Difference]
    notes: list[str]

    @property
    def identical(self) -> bool:
        return not any(not d.informational for d in self.differences)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "files": self.files,
            "dll": self.dll,
            "samples": self.samples,
            "seed": self.seed,
            "pages_compared": self.pages_compared,
            "registers_compared": self.registers_compared,
            "identical": self.identical,
            "differences": [d.to_json() for d in self.differences if not d.informational],
            "notes": [d.to_json() for d in self.differences if d.informational] + [{"message": n} for n in self.notes],
        }

    def render(self) -> str:
        lines = [
            f"File                 {self.file}",
            f"Native files         {', '.join(self.files)}",
        ]
        if self.dll:
            lines.append(
                f"DLL                  {self.dll.get('path')} ({self.dll.get('version')}, {self.dll.get('abi')} ABI)"
            )
        lines.append(f"Compared             {self.registers_compared} registers, {self.pages_compared} pages")
        real = [d for d in self.differences if not d.informational]
        notes = [d for d in self.differences if d.informational]
        lines.append(f"Result               {'identical' if self.identical else f'{len(real)} difference(s)'}")
        lines.extend(f"  {d}" for d in real)
        for n in self.notes:
            lines.append(f"  note: {n}")
        lines.extend(f"  {d}" for d in notes)
        return "\n".join(lines)


def verify_files(
    path: str | os.PathLike[str],
    *,
    vsv: str | os.PathLike[str] | None = None,
    dll_path: str | os.PathLike[str] | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    library: Any = None,
) -> VerifyReport:
    """Open ``path`` natively and with the DLL and compare.  A pending journal is committed for the DLL
    in a temporary copy (the DLL would otherwise read stale tables, or need write access to evidence)."""
    from .dll.provider import DllSavedStateProvider
    from .provider import open_saved_state

    notes: list[str] = []
    with open_saved_state(path, vsv=vsv) as native, tempfile.TemporaryDirectory(prefix="vmssd-verify-") as tmp:
        if native.kind == "bin":
            raise UnsupportedError(
                f"{native.paths[0]}: the DLL needs the .vsv of a .bin (none found beside it; pass --vsv)"
            )
        if native.findings():
            notes.append(f"the native reader recorded {len(native.findings())} finding(s); see `vmssd info`")
        if native.kind == "vmrs":
            target = native.paths[0]
            pending = (native.summary().journal or {}).get("pending", 0)
            if pending:
                target = os.path.join(tmp, "committed.vmrs")
                DllSavedStateProvider.apply_pending_replay_log(
                    native.paths[0], target, dll_path=dll_path, library=library
                )
                notes.append(f"{pending} pending journal entries: the DLL read a committed temporary copy")
            dll = DllSavedStateProvider.load_vmrs(target, dll_path=dll_path, library=library)
        else:
            dll = DllSavedStateProvider.load_bin_vsv(
                native.paths[0], native.paths[1], dll_path=dll_path, library=library
            )
        with dll:
            comparer = Comparer(native, dll, labels=("native", "dll"))
            differences = comparer.run(samples=samples, seed=seed)
            return VerifyReport(
                file=os.fspath(path),
                files=list(native.paths),
                dll=dll.dll_info,
                samples=samples,
                seed=seed,
                pages_compared=comparer.pages_compared,
                registers_compared=comparer.registers_compared,
                differences=differences,
                notes=notes,
            )
