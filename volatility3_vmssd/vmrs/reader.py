"""A saved state held in a HyperVStorage container: a ``.vmrs``, or the ``.vsv`` of a legacy pair.

Finds the RamMemoryBlock records (the RAM map), the RamBlock values (the memory) and the
partition_state blob (the CPU state) among the container's keys, and builds the reader objects for
them; the legacy ``.bin`` (``legacy_bin.py``) is the other memory source.  Key paths and their
variants are explained in ``docs/format.md`` ("Where a saved state keeps its parts").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence

from ..cpu.chunkparser import parse_partition_state
from ..cpu.cpustate import PartitionState
from ..errors import Findings, NotFoundError, UnsupportedError, VmssdError
from ..memory.geometry import PAGES_PER_BLOCK
from ..memory.rammap import RamMap, RamMemoryBlockRecord
from ..storage import HyperVStorage, Key, NumberedKeys

__all__ = [
    "PARTITION_STATE_PATHS",
    "ContainerFacts",
    "VmrsBlockSource",
    "container_facts",
    "memory_absence",
    "partition_state",
    "ram_block_keys",
    "ram_map",
    "version_text",
]

PARTITION_STATE_PATHS = (
    "/savedstate/savedVM/partition_state",
    "/savedVM/partition_state",
    "/savedstate/partition_state",
)
#: VM configuration versions up to 5.0 wrote the legacy .bin + .vsv pair (``docs/format.md``).
LAST_LEGACY_VM_VERSION = 0x0500


class VmrsBlockSource:
    """RamBlock values held as keys of a container (inline or file objects); read on demand."""

    def __init__(self, storage: HyperVStorage, keys: Mapping[int, Key]) -> None:
        self.path = storage.path
        self._keys = keys
        self._storage = storage

    def read_span(self, offset: int, size: int) -> bytes:
        """File bytes as the committed journal leaves them: a run of raw RamBlocks in one read."""
        return self._storage.read_at(offset, size)

    def block_numbers(self) -> Collection[int]:
        return self._keys.keys()

    def block_location(self, n: int) -> tuple[int, int] | None:
        key = self._keys.get(n)
        return key.data_location if key is not None else None

    def read_block_value(self, n: int) -> bytes:
        key = self._keys.get(n)
        if key is None:
            raise NotFoundError(f"{self.path}: RamBlock {n} is not present")
        return key.read(allow_partial=True)


def _numbered(storage: HyperVStorage, stem: str) -> Mapping[int, Key]:
    """Keys ``<stem><n>`` under /savedstate, a node ``<stem>`` with children ``n``, or literal names.

    Microsoft's legacy path format is ``RamMemoryBlock/%d/``; whether that is a node with numbered
    children or a literal name with slashes is not known, so both are accepted.  The result is the
    storage's compact mapping: a million RamBlocks are two arrays, not a dict of a million keys.
    """
    maps: list[Mapping[int, Key]] = []
    for p in ("/savedstate", "/"):
        node = storage.root if p == "/" else storage.find(p)
        if node is not None:
            maps.append(node.numbered_children(stem))
    for p in (f"/{stem}", f"/savedstate/{stem}", f"/savedVM/{stem}"):
        node = storage.find(p)
        if node is None:
            continue
        maps.append(node.numbered_children(""))
        nodes = node.numbered_children("", nodes=True)  # RamBlock/<n>/ written as a node with one value
        maps.append({n: nodes[n].children[0] for n in nodes if nodes[n].child_count})
    return NumberedKeys.union(maps)


def ram_block_keys(storage: HyperVStorage) -> Mapping[int, Key]:
    """RamBlock number -> key, for every RamBlock the container holds."""
    return _numbered(storage, "RamBlock")


def ram_map(storage: HyperVStorage, findings: Findings, block_numbers: Iterable[int]) -> RamMap:
    """The GPA map from the RamMemoryBlock records; an identity map (with a finding) when there are none."""
    keys = _numbered(storage, "RamMemoryBlock")
    identity_pages = (max(block_numbers, default=-1) + 1) * PAGES_PER_BLOCK
    if not keys:
        if identity_pages:
            findings.add(
                storage.path,
                None,
                "no-ram-map",
                "no RamMemoryBlock records: assuming one chunk from GPA 0 over the RamBlocks",
            )
            return RamMap.identity(identity_pages, findings=findings, path=storage.path)
        findings.add(
            storage.path,
            None,
            "no-memory",
            "no saved memory (no RamMemoryBlock or RamBlock keys): a runtime-state or configuration file,"
            " not a saved state",
        )
        return RamMap([], findings=findings, path=storage.path)
    # A fragmented VM has 100,000 records: one bulk read, and a Key only where a record is bad.
    if isinstance(keys, NumberedKeys):
        numbers: Sequence[int] = keys.keys()
        names, values = keys.read_values()
    else:
        numbers = sorted(keys)
        names, values = [keys[n].path for n in numbers], [keys[n].read() for n in numbers]
    if numbers[-1] != len(numbers) - 1:  # distinct and sorted: 0..n-1 exactly when the last is n-1
        findings.add(
            storage.path,
            None,
            "ram-map",
            f"RamMemoryBlock numbers are not 0..{len(keys) - 1}: {list(numbers[:16])}; all of them are used",
        )
    records: list[RamMemoryBlockRecord] = []
    sound = RamMemoryBlockRecord.parse_sound
    for n, name, value in zip(numbers, names, values, strict=True):
        record = sound(value, name)
        if record is None:  # parse() says why, with the offset of the key
            offset = keys[n].file_offset
            try:
                record = RamMemoryBlockRecord.parse(value, path=storage.path, offset=offset, key=name)
            except UnsupportedError as exc:
                findings.add(
                    storage.path, offset, "ram-map", f"{exc}; falling back to one identity chunk over the RamBlocks"
                )
                return RamMap.identity(identity_pages, findings=findings, path=storage.path)
        records.append(record)
    return RamMap(records, findings=findings, path=storage.path)


def partition_state(storage: HyperVStorage, findings: Findings) -> PartitionState | None:
    """The parsed CPU state, or None with a finding saying why there is none."""
    for path in PARTITION_STATE_PATHS:
        key = storage.find(path)
        if key is not None and not key.is_node:
            blob = key.read(allow_partial=True)
            loc = key.data_location
            base = loc[0] if loc else key.file_offset
            try:
                return parse_partition_state(blob, path=storage.path, base_offset=base, findings=findings)
            except VmssdError as exc:
                # A copy cut right after its key tables has no partition_state bytes left: its
                # memory is still readable, so say why CPU state is missing instead of failing.
                if findings.strict:
                    raise
                findings.add(storage.path, base, "no-cpu-state", f"partition_state is unreadable: {exc}")
                return None
    if storage.find("/savedstate") is not None or storage.find("/savedVM") is not None:
        findings.add(storage.path, None, "no-cpu-state", "no partition_state key: CPU state is unavailable")
    return None


@dataclasses.dataclass(frozen=True)
class ContainerFacts:
    """What a container says about itself, for the summary and for explaining a file without memory."""

    vm_version: int | None
    saved_state_type: str | None
    has_ram_map: bool
    has_ram_blocks: bool
    legacy_paths: bool  # partition_state under /savedVM (the layout of VM versions <= 5.0)


def version_text(version: int) -> str:
    """``major.minor`` of a version stored as ``major << 8 | minor`` (VM and container versions)."""
    return f"{version >> 8}.{version & 0xFF}"


def _int_value(storage: HyperVStorage, *paths: str) -> int | None:
    for p in paths:
        key = storage.find(p)
        if key is not None and isinstance(key.value, int) and not isinstance(key.value, bool):
            return int(key.value)
    return None


def container_facts(storage: HyperVStorage) -> ContainerFacts:
    sstype = storage.find("/savedstate/type")
    return ContainerFacts(
        vm_version=_int_value(storage, "/savedstate/VmVersion", "/configuration/properties/version"),
        saved_state_type=sstype.value if sstype is not None and isinstance(sstype.value, str) else None,
        has_ram_map=bool(_numbered(storage, "RamMemoryBlock")),
        has_ram_blocks=bool(ram_block_keys(storage)),
        legacy_paths=storage.find("/savedVM/partition_state") is not None,
    )


def memory_absence(facts: ContainerFacts, *, named_vsv: bool) -> str:
    """Why a container has no saved RAM, and what to do, from what the file says about itself.

    A legacy ``.vsv`` keeps the RAM map while its ``.bin`` holds the RamBlocks; a ``.vmrs`` with a
    RAM map and no RamBlocks is damaged (cut, or its RamBlock keys lost); a container with neither is
    the runtime state of a running VM, a production checkpoint or a configuration file.
    """
    version = f"VM version {facts.vm_version >> 8}.{facts.vm_version & 0xFF}" if facts.vm_version is not None else None
    legacy = (
        named_vsv or facts.legacy_paths or (facts.vm_version is not None and facts.vm_version <= LAST_LEGACY_VM_VERSION)
    )
    if facts.has_ram_map and legacy:
        why = ", ".join(filter(None, [version, "partition_state under /savedVM" if facts.legacy_paths else None]))
        return (
            "this is the .vsv of a legacy saved state (" + (why or "named .vsv") + "): it holds the RAM map and CPU"
            " state, and the memory is in the .bin of the same name; open the .bin (its .vsv is found beside it)"
        )
    if facts.has_ram_map:
        return (
            "the RAM map (RamMemoryBlock records) is present but no RamBlock holds memory"
            + (f" ({version})" if version else "")
            + ": the file is damaged or cut short; collect the .vmrs again from the host"
        )
    return (
        "the file holds no saved guest memory: a .vmcx (VM configuration), the runtime state of a running VM,"
        " or a production checkpoint; to analyse memory, save the VM (Save-VM) or take a standard checkpoint,"
        " and collect the .vmrs it writes"
    )
