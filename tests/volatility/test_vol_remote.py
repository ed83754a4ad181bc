"""``vol -f s3://…``: the real Linux guest read in place from an S3 bucket (moto on loopback).

The rows must be the rows of the same plugin on the local file; the request log (a proxy in front of
moto) shows each byte of the object fetched about once, and nothing but GET and HEAD.
"""

from __future__ import annotations

import sys

import pytest
from vol_guest import LinuxGuest, VolRuns
from vol_helpers import REPO, output_rows, require_volatility, run_vol

require_volatility()
sys.path.insert(0, str(REPO / "tests"))
from remote_store import S3, SECRET_KEY  # noqa: E402

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def bucket(s3: S3, linux_guest: LinuxGuest) -> dict[str, str]:
    """The plain .vmrs, and the legacy pair under mixed-case names (``.BIN`` beside ``.Vsv``)."""
    stem = linux_guest.bin.stem
    return {
        "vmrs": s3.upload("vol-evidence", "host42/Virtual Machines/guest.vmrs", linux_guest.vmrs),
        "bin": s3.upload("vol-evidence", f"host42/legacy/{stem}.BIN", linux_guest.bin),
        "vsv": s3.upload("vol-evidence", f"host42/legacy/{stem}.Vsv", linux_guest.vsv),
    }


def _remote_run(s3: S3, runs: VolRuns, url: str, plugin: str) -> tuple[str, int, int]:
    s3.proxy.take_log()
    result = run_vol(["-q", "-s", str(runs.guest.symbols), "-f", url, plugin], cache=runs.cache, env=s3.env)
    log = s3.proxy.take_log()
    assert result.returncode == 0, result.stderr[-3000:]
    assert {r.method for r in log} <= {"GET", "HEAD"}, "something was written to the store"
    assert not any(SECRET_KEY in r.headers or SECRET_KEY in r.query for r in log)
    assert SECRET_KEY not in result.stdout + result.stderr
    return result.stdout, len(log), sum(r.sent for r in log)


@pytest.mark.parametrize("kind", ["vmrs", "bin"])
def test_pslist_from_s3_equals_the_local_file(s3: S3, bucket: dict[str, str], linux_vol: VolRuns, kind: str) -> None:
    guest = linux_vol.guest
    path = guest.vmrs if kind == "vmrs" else guest.bin
    local = run_vol(["-q", "-s", str(guest.symbols), "-f", str(path), "linux.pslist"], cache=linux_vol.cache)
    assert local.returncode == 0, local.stderr[-3000:]
    stdout, requests, fetched = _remote_run(s3, linux_vol, bucket[kind], "linux.pslist")
    assert output_rows(stdout) == output_rows(local.stdout)
    stored = guest.vmrs.stat().st_size if kind == "vmrs" else guest.bin.stat().st_size + guest.vsv.stat().st_size
    # Volatility's banner scan reads the whole file once; the file layer and the saved-state layer share one
    # reader, so nothing is fetched twice
    assert fetched <= stored * 1.1, (requests, fetched, stored)
    assert requests < stored // (256 << 10), (requests, fetched, stored)


def test_vsv_partner_named_in_any_case_is_used(s3: S3, bucket: dict[str, str], linux_vol: VolRuns) -> None:
    result = run_vol(
        ["-q", "-s", str(linux_vol.guest.symbols), "--stackers", "HyperVSavedStateStacker", "-f", bucket["bin"],
         "hyperv.info"],
        cache=linux_vol.cache,
        env=s3.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {v[0]: v[1] for v in (line.split("\t") for line in output_rows(result.stdout)) if len(v) > 1}
    assert rows["File kind"] == "legacy .bin + .vsv"  # the .Vsv was found by listing the prefix
    assert rows["Virtual processors"] == "2"  # and its CPU state read
