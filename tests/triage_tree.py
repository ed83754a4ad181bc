"""A Hyper-V host's folder tree in miniature, for the ``vmssd triage`` tests.

Every saved state is written by the project's writer (``vmrs/writer.py``); ``.vmcx`` files by
the storage writer with the keys a real ``.vmcx`` holds.  ``EXPECTED`` says what each file is,
because this module made it so: the tests check that discovery and classification find the same.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "volatility"))
from builders import write_storage
from vol_helpers import MIB, long_mode_vp, mixed_image, state_json, write_pair, write_vmrs

from volatility3_vmssd.cpu.guestos import encode_guest_os_id

WINDOWS_ID = encode_guest_os_id(os_id=4, vendor_id=1, major=10, build_number=20348)
LINUX_ID = encode_guest_os_id(os_id=1, open_source=True, version=0x060100)

VM_A = "1A2B3C4D-0000-4000-8000-00000000000A"  # Windows guest: current state, a checkpoint, a .vmgs
CKPT_A = "1A2B3C4D-0000-4000-8000-0000000000C1"
VM_B = "1A2B3C4D-0000-4000-8000-00000000000B"  # configuration only (a VM that is off)
VM_C = "1A2B3C4D-0000-4000-8000-00000000000C"  # runtime state of a running VM: no memory
VM_D = "1A2B3C4D-0000-4000-8000-00000000000D"  # its saved state was cut short in copying
VM_E = "1A2B3C4D-0000-4000-8000-00000000000E"  # legacy pair, extension case differs
VM_F = "1A2B3C4D-0000-4000-8000-00000000000F"  # a .vsv whose .bin was not copied
VM_G = "1A2B3C4D-0000-4000-8000-000000000010"  # the real Linux guest (when ../shared is there)

NAMES = {VM_A: "web01", CKPT_A: "web01 - (before patch)", VM_B: "dc02", VM_C: "sql03", VM_D: "app04", VM_G: "linux05"}


def vmcx(path: Path, global_id: str, name: str, logical_id: str | None = None) -> Path:
    """A VM configuration with the keys ``vmssd triage`` reads (as in a real version 9.0 ``.vmcx``)."""
    is_checkpoint = logical_id is not None and logical_id != global_id
    tree: dict[str, Any] = {
        "configuration": {
            "properties": {
                "name": name,
                "global_id": global_id,
                "type_id": "Snapshots" if is_checkpoint else "Virtual Machines",
                "version": 0x0900,
            },
            "settings": {"global": {"logical_id": logical_id or global_id}},
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_storage(path, tree)
    return path


def _state(os_id: int | None, vps: int = 1) -> dict[str, Any]:
    extra = {} if os_id is None else {"guest_os_id": hex(os_id)}
    return state_json([long_mode_vp(0x10000) for _ in range(vps)], **extra)


def build_host(root: Path, guest_vmrs: Path | None = None) -> dict[str, tuple[str, str | None]]:
    """Write the tree under ``root``; returns {path relative to root: (class, partner relative or None)}."""
    vms = root / "Hyper-V" / "Virtual Machines"
    snaps = root / "Hyper-V" / "Snapshots"
    vms.mkdir(parents=True)
    snaps.mkdir(parents=True)
    expected: dict[str, tuple[str, str | None]] = {}

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def add(p: Path, cls: str, partner: Path | None = None) -> None:
        expected[rel(p)] = (cls, None if partner is None else rel(partner))

    image = mixed_image(2 * MIB, seed=11)
    a = write_vmrs(vms / f"{VM_A}.vmrs", image, _state(WINDOWS_ID, vps=2))
    add(a, "saved-memory")
    add(vmcx(vms / f"{VM_A}.vmcx", VM_A, NAMES[VM_A]), "configuration")
    gs = vms / f"{VM_A}.vmgs"
    gs.write_bytes(os.urandom(4096))
    add(gs, "guest-state")

    ck = write_vmrs(snaps / f"{CKPT_A}.vmrs", mixed_image(2 * MIB, seed=12), _state(WINDOWS_ID))
    add(ck, "saved-memory")
    add(vmcx(snaps / f"{CKPT_A}.vmcx", CKPT_A, NAMES[CKPT_A], logical_id=VM_A), "configuration")

    add(vmcx(vms / f"{VM_B}.vmcx", VM_B, NAMES[VM_B]), "configuration")

    runtime = vms / f"{VM_C}.vmrs"
    write_storage(runtime, {"configuration": {"properties": {"version": 0x0900}, "metrics": {"x": 1}}})
    add(runtime, "no-memory")
    add(vmcx(vms / f"{VM_C}.vmcx", VM_C, NAMES[VM_C]), "configuration")

    whole = write_vmrs(root / "cut-source.vmrs", mixed_image(2 * MIB, seed=13), _state(WINDOWS_ID))
    data = whole.read_bytes()
    whole.unlink()
    cut = vms / f"{VM_D}.vmrs"
    cut.write_bytes(data[: len(data) * 2 // 3])
    add(cut, "damaged")
    add(vmcx(vms / f"{VM_D}.vmcx", VM_D, NAMES[VM_D]), "configuration")

    legacy = root / "Legacy" / "Virtual Machines" / VM_E
    legacy.mkdir(parents=True)
    b, v = write_pair(legacy / f"{VM_E}.BIN", legacy / f"{VM_E}.vsv", mixed_image(2 * MIB, seed=14), _state(LINUX_ID))
    add(b, "legacy-pair", v)

    loose = root / "loose"
    loose.mkdir()
    pb, pv = write_pair(loose / "memory.bin", loose / "tmp-partner.vsv", mixed_image(2 * MIB, seed=15), _state(None))
    pv.unlink()
    add(pb, "bin-without-vsv")
    orphan_dir = root / "Legacy" / "Virtual Machines" / VM_F
    orphan_dir.mkdir(parents=True)
    ob, ov = write_pair(orphan_dir / f"{VM_F}.bin", orphan_dir / f"{VM_F}.vsv", mixed_image(MIB, seed=16), _state(None))
    ob.unlink()
    add(ov, "vsv-without-bin")

    junk = root / "loose" / "random.vmrs"
    junk.write_bytes(random.Random(3).randbytes(8192))
    add(junk, "not-hyperv")
    (root / "loose" / "notes.txt").write_text("not a Hyper-V file, and not named like one: skipped\n")

    if guest_vmrs is not None:
        g = vms / f"{VM_G}.vmrs"
        try:
            g.symlink_to(guest_vmrs)
        except OSError:
            import shutil

            shutil.copyfile(guest_vmrs, g)
        add(g, "saved-memory")
        add(vmcx(vms / f"{VM_G}.vmcx", VM_G, NAMES[VM_G]), "configuration")
    return expected
