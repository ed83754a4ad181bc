"""Evidence read in place from object storage and HTTP (docs/remote.md).

The store is on loopback only: moto's S3 server, or a range-capable static HTTP server, each behind a
proxy that logs every request (method, range, bytes) and injects 5xx answers and cut connections.
Expectations come from the same commands run on the local file.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import add_journal_entries
from remote_store import S3, SECRET_KEY, Proxy, client_env, range_server
from shared_data import REAL, REPO

from volatility3_vmssd import sources
from volatility3_vmssd.cli.main import main
from volatility3_vmssd.files import find_partner, find_vmcx
from volatility3_vmssd.storage import HyperVStorage

pytest.importorskip("fsspec", reason="fsspec is not installed (the remote extra)")
pytest.importorskip("aiohttp", reason="aiohttp is not installed (the remote extra)")

SAMPLE = REPO / "tests" / "data" / "sample.vmrs"
SECRET_QUERY = "X-Amz-Signature=deadbeefPRESIGNED0123&X-Amz-Credential=AKIAQUERYSECRET"
GUID = "5F3C2A1E-0D4B-4C6A-9E1F-2B3A4C5D6E7F"


@pytest.fixture(autouse=True)
def _fresh_sources() -> Iterator[None]:
    sources.forget()
    sources.configure(**{f: getattr(sources.RemoteOptions(), f) for f in ("retries", "backoff")})
    yield
    sources.forget()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------ locations


def test_redact_drops_userinfo_query_and_fragment() -> None:
    url = f"https://analyst:hunter2@store.example:8443/case/vm.vmrs?{SECRET_QUERY}#frag"
    shown = sources.redact(url)
    assert shown == "https://store.example:8443/case/vm.vmrs"
    assert sources.redact("/local/path?odd name") == "/local/path?odd name"  # a path is shown as it is


def test_locations_split_like_paths() -> None:
    url = "s3://bucket/host42/Virtual Machines/vm.VMRS"
    assert sources.is_remote(url) and not sources.is_remote("/tmp/vm.vmrs") and not sources.is_remote("C:\\vm.vmrs")
    assert sources.folder_of(url) == "s3://bucket/host42/Virtual Machines"
    assert sources.base_name(url) == "vm.VMRS" and sources.suffix(url) == ".VMRS"
    assert sources.join(sources.folder_of(url), "vm.vmcx") == "s3://bucket/host42/Virtual Machines/vm.vmcx"
    with pytest.raises(sources.SourceError, match="ftp:// scheme is not read"):
        sources.is_remote("ftp://host/vm.vmrs")


def test_options_are_bounded() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        sources.configure(concurrency=1000)
    with pytest.raises(ValueError, match="unknown"):
        sources.configure(password=1)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ HTTP reader


@pytest.fixture
def http_store(tmp_path: Path) -> Iterator[tuple[Path, Proxy]]:
    root = tmp_path / "store"
    root.mkdir()
    with range_server(root) as upstream:
        proxy = Proxy(upstream)
        try:
            yield root, proxy
        finally:
            proxy.close()


def test_ranged_reads_equal_the_file_and_forward_reads_coalesce(http_store: tuple[Path, Proxy]) -> None:
    root, proxy = http_store
    data = random.Random(7).randbytes(2 << 20)
    (root / "blob.bin").write_bytes(data)
    opts = sources.RemoteOptions(min_request=4096, part_size=256 << 10, readahead=1 << 20, concurrency=3)
    rng = random.Random(8)
    with sources.open_binary(f"{proxy.url}/blob.bin", opts) as fh:
        for _ in range(25):
            off, size = rng.randrange(len(data)), rng.randrange(1, 70000)
            assert fh.pread(off, size) == data[off : off + size]
        proxy.take_log()
        fh.seek(0)
        reads = 0
        while chunk := fh.read(20000):
            assert chunk == data[fh.tell() - len(chunk) : fh.tell()]
            reads += 1
        log = proxy.take_log()
    gets = [r for r in log if r.method == "GET"]
    assert reads == -(-len(data) // 20000)
    assert len(gets) * 4 < reads  # read-ahead (after 256 KiB read forward): one request serves many reads
    assert {r.method for r in log} <= {"GET", "HEAD"}


def test_cache_is_bounded(http_store: tuple[Path, Proxy]) -> None:
    root, proxy = http_store
    (root / "blob.bin").write_bytes(bytes(range(256)) * (8 << 12))  # 8 MiB
    opts = sources.RemoteOptions(min_request=1 << 20, part_size=1 << 20, readahead=0, cache=2 << 20).checked()
    with sources.open_binary(f"{proxy.url}/blob.bin", opts) as fh:
        for mib in range(8):
            fh.pread(mib << 20, 16)
        obj = fh.remote  # type: ignore[attr-defined]
        assert obj._cached <= opts.cache
        assert len(obj._spans) <= 2


def test_object_replaced_while_read_is_refused(http_store: tuple[Path, Proxy]) -> None:
    root, proxy = http_store
    target = root / "vm.vmrs"
    target.write_bytes(bytes(4 << 20))
    opts = sources.RemoteOptions(min_request=4096, readahead=0)
    with sources.open_binary(f"{proxy.url}/vm.vmrs", opts) as fh:
        assert fh.pread(0, 16) == bytes(16)
        target.write_bytes(b"\xff" * (4 << 20))  # another ETag
        with pytest.raises(sources.ObjectChangedError, match="changed while it was read"):
            fh.pread(2 << 20, 16)


def test_throttling_and_resets_are_retried(http_store: tuple[Path, Proxy]) -> None:
    root, proxy = http_store
    data = random.Random(3).randbytes(1 << 20)
    (root / "vm.vmrs").write_bytes(data)
    faults = iter([503, "reset", 500])
    proxy.fault = lambda method, path, rng: next(faults, None) if method == "GET" else None
    sources.configure(backoff=0.01)
    with sources.open_binary(f"{proxy.url}/vm.vmrs", sources.options()) as fh:
        assert fh.pread(1000, 5000) == data[1000:6000]
        retries = fh.remote.retries_done  # type: ignore[attr-defined]
    statuses = [r.status for r in proxy.take_log() if r.method == "GET"]
    assert statuses[:3] == [503, 0, 500] and statuses[3:] == [206]
    # aiohttp itself re-sends a request once when a kept-alive connection is cut: 2 or 3 retries are ours
    assert retries in (2, 3)


def test_a_read_that_keeps_failing_names_object_and_range(http_store: tuple[Path, Proxy]) -> None:
    root, proxy = http_store
    (root / "vm.vmrs").write_bytes(bytes(1 << 20))
    proxy.fault = lambda method, path, rng: 503 if method == "GET" else None
    sources.configure(retries=2, backoff=0.01)
    url = f"{proxy.url}/vm.vmrs?{SECRET_QUERY}"
    with sources.open_binary(url) as fh, pytest.raises(sources.SourceError) as err:
        fh.pread(4096, 100)
    text = str(err.value)
    assert f"{proxy.url}/vm.vmrs: bytes 4096-8191: could not be read after 3 attempts (HTTP 503" in text
    assert "deadbeef" not in text and "AKIAQUERY" not in text
    assert len([r for r in proxy.take_log() if r.method == "GET"]) == 3


def test_partners_found_by_one_listing_with_the_local_rules(http_store: tuple[Path, Proxy], tmp_path: Path) -> None:
    root, proxy = http_store
    local = tmp_path / "local"
    for folder in (root, local):
        folder.mkdir(exist_ok=True)
        for name in (f"{GUID}.BIN", f"{GUID.lower()}.vsv", f"{GUID}.Vsv", f"{GUID}.vmcx", "other.vsv"):
            (folder / name).write_bytes(b"x")
        (folder / f"{GUID}.VSV.d").mkdir()
    for ext in ([".vsv"], [".vmcx"], [".bin"]):
        start = f"{GUID}.BIN" if ext != [".bin"] else f"{GUID}.Vsv"
        want, _ = find_partner(local / start, ext)
        got, looked = find_partner(f"{proxy.url}/{start}", ext)
        assert want is not None and got == f"{proxy.url}/{Path(want).name}", ext
        assert looked == [f"{proxy.url}/{Path(start).stem}{e}" for e in ext]
    proxy.take_log()
    assert find_vmcx(f"{proxy.url}/{GUID}.BIN") == f"{proxy.url}/{GUID}.vmcx"
    assert proxy.take_log() == []  # the folder was listed once, above


# ------------------------------------------------------------------------------------------ S3 and the CLI


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A host folder: the sample .vmrs (with a .vmcx when the real one is there) and a mixed-case legacy pair."""
    root = tmp_path_factory.mktemp("host42")
    vms = root / "Virtual Machines"
    vms.mkdir()
    shutil.copyfile(SAMPLE, vms / f"{GUID}.vmrs")
    if (REAL / "test.vmcx").exists():
        shutil.copyfile(REAL / "test.vmcx", vms / f"{GUID}.vmcx")
    work = tmp_path_factory.mktemp("work")
    assert main(["convert", str(SAMPLE), "-o", str(work / "ram.elf"), "--format", "elf", "-q"]) == 0
    regs = work / "regs.json"
    with open(regs, "w", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
        assert main(["registers", "--json", str(SAMPLE)]) == 0
    pair = root / "legacy"
    pair.mkdir()
    code = main(
        [
            "create",
            "--memory",
            str(work / "ram.elf"),
            "--registers",
            str(regs),
            "--legacy",
            "-o",
            str(pair / "Sample.BIN"),
            "--vsv",
            str(pair / "sample.Vsv"),
            "-q",
        ]
    )
    assert code == 0
    return root


def _upload_tree(store: S3, root: Path, bucket: str) -> str:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        store.upload(bucket, f"host42/{path.relative_to(root).as_posix()}", path)
    return f"s3://{bucket}/host42"


@pytest.fixture(scope="module")
def bucket(s3: S3, evidence: Path) -> str:
    return _upload_tree(s3, evidence, "evidence")


def _same_output(local: str, remote: str, local_root: Path, remote_root: str) -> None:
    """Equal once the evidence folder is named alike (paths in the output become URLs remotely)."""
    assert remote.replace(remote_root, "<root>") == local.replace(str(local_root), "<root>")


COMMANDS = [["info"], ["registers", "--json"], ["memmap", "--json"], ["read"]]
READ_ARGS = ["0x1000", "0x40"]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_commands_on_s3_print_what_they_print_locally(
    s3: S3, bucket: str, evidence: Path, command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    for target in (f"Virtual Machines/{GUID}.vmrs", "legacy/Sample.BIN"):
        local = evidence / target
        tail = READ_ARGS if command == ["read"] else []
        code, want, _ = run(capsys, *command, str(local), *tail)
        assert code == 0
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        url = f"{bucket}/{target}"
        code, got, err = run(capsys, *command, url, *tail)
        assert code == 0, err
        _same_output(want, got, evidence, bucket)
        if command == ["info"] and target.endswith(".vmrs") and (REAL / "test.vmcx").exists():
            assert f"{GUID}.vmcx" in got  # the .vmcx that names the VM, found by listing
        if command == ["info"] and target.endswith(".BIN"):
            assert "sample.Vsv" in got  # the mixed-case partner, found by listing
    log = s3.proxy.take_log()
    assert log and {r.method for r in log} <= {"GET", "HEAD"}  # nothing written to the store
    assert not any(SECRET_KEY in r.headers or SECRET_KEY in r.query for r in log)


@pytest.mark.slow
def test_convert_from_s3_is_the_local_image(
    s3: S3, bucket: str, evidence: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    local = evidence / "Virtual Machines" / f"{GUID}.vmrs"
    assert main(["convert", str(local), "-o", str(tmp_path / "local.raw"), "--format", "raw", "-q"]) == 0
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3.proxy.take_log()
    code, _, err = run(
        capsys, "--remote-part-size", "1", "convert", f"{bucket}/Virtual Machines/{GUID}.vmrs", "-o",
        str(tmp_path / "s3.raw"), "--format", "raw", "-q"
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "s3.raw").read_bytes() == (tmp_path / "local.raw").read_bytes()
    log = s3.proxy.take_log()
    fetched = sum(r.sent for r in log)
    assert fetched <= local.stat().st_size * 1.25  # each byte of the object fetched about once
    assert {r.method for r in log} <= {"GET", "HEAD"}


@pytest.mark.slow
@pytest.mark.parametrize("fault", [503, 500, "reset"])
def test_failed_fetch_ends_convert_with_one_line_and_no_output(
    s3: S3,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch,
    fault: int | str,
) -> None:
    caplog.set_level("INFO", logger="volatility3_vmssd.sources")
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    key = f"/evidence/host42/Virtual%20Machines/{GUID}.vmrs"

    # the metadata (well below 256 KiB) reads; every range of RAM past 256 KiB fails, always: convert has
    # started writing when the failure comes
    def hook(method: str, path: str, rng: str | None) -> int | str | None:
        start = int(rng[6:].split("-")[0]) if rng and rng.startswith("bytes=") else 0
        return fault if method == "GET" and path == key and start >= 256 << 10 else None

    s3.proxy.fault = hook
    out = tmp_path / "out.raw"
    try:
        code, stdout, err = run(
            capsys, "--remote-retries", "2", "convert", f"{bucket}/Virtual Machines/{GUID}.vmrs", "-o", str(out),
            "--format", "raw", "-q"
        )  # fmt: skip
    finally:
        s3.proxy.fault = None
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("vmssd convert: error:")]
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    assert f"s3://evidence/host42/Virtual Machines/{GUID}.vmrs: bytes " in errors[0]
    assert "could not be read after 3 attempts" in errors[0]
    retried = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrying s3://")]
    assert len(retried) >= 2  # shown with -v (INFO); two retries of the range that then failed
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    assert stdout == ""


@pytest.mark.slow
def test_http_commands_and_secret_query_never_shown(
    evidence: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with range_server(evidence) as upstream:
        proxy = Proxy(upstream)
        try:
            for target in (f"Virtual Machines/{GUID}.vmrs", "legacy/Sample.BIN"):
                local = evidence / target
                url = f"{proxy.url}/{target}"
                for command in COMMANDS:
                    tail = READ_ARGS if command == ["read"] else []
                    code, want, _ = run(capsys, *command, str(local), *tail)
                    code, got, err = run(capsys, *command, url, *tail)
                    assert code == 0, err
                    _same_output(want, got, evidence, proxy.url)
            secret = f"http://analyst:pw-SECRET-9@127.0.0.1:{proxy.url.rsplit(':', 1)[1]}/Virtual Machines/{GUID}.vmrs"
            code, out, err = run(capsys, "info", f"{secret}?{SECRET_QUERY}")
            assert code == 0, err
            assert "pw-SECRET-9" not in out + err and "deadbeef" not in out + err
            raw = ["--format", "raw", "-q"]
            assert main(["convert", str(evidence / "legacy" / "Sample.BIN"), "-o", str(tmp_path / "a.raw"), *raw]) == 0
            code, _, err = run(capsys, "convert", f"{proxy.url}/legacy/Sample.BIN", "-o", str(tmp_path / "b.raw"), *raw)
            assert code == 0, err
            assert (tmp_path / "a.raw").read_bytes() == (tmp_path / "b.raw").read_bytes()
            log = proxy.take_log()
        finally:
            proxy.close()
    assert {r.method for r in log} <= {"GET", "HEAD"}


def test_findings_json_shows_no_secret(http_store: tuple[Path, Proxy], capsys: pytest.CaptureFixture[str]) -> None:
    root, proxy = http_store
    shutil.copyfile(SAMPLE, root / "vm.vmrs")
    code, out, err = run(capsys, "info", "--json", f"{proxy.url}/vm.vmrs?{SECRET_QUERY}")
    assert code == 0, err
    doc = json.loads(out)
    assert "deadbeef" not in out and "AKIAQUERY" not in out
    assert doc  # a real document, not an empty answer


def test_client_env_has_no_real_credentials() -> None:
    env = client_env("http://127.0.0.1:1")
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1")
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == env["AWS_CONFIG_FILE"]


def test_keys_and_apply_log_take_urls(
    http_store: tuple[Path, Proxy], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, proxy = http_store
    shutil.copyfile(SAMPLE, root / "vm.vmrs")
    url = f"{proxy.url}/vm.vmrs"
    for command in (["keys", "--json"], ["keys", "--findings"]):
        code, want, _ = run(capsys, *command, str(root / "vm.vmrs"))
        assert code == 0
        code, got, err = run(capsys, *command, url)
        assert code == 0, err
        assert got.replace(url, "<file>") == want.replace(str(root / "vm.vmrs"), "<file>")
    code, _, err = run(capsys, "apply-log", url, "-o", str(tmp_path / "copy.vmrs"))
    assert code == 0, err
    # nothing pending: the object was read (its journal header) and no copy is written, as for a local file
    assert "no pending journal entries" in err and not (tmp_path / "copy.vmrs").exists()
    # one pending entry: the object is streamed into the copy and the entry committed, as locally
    with HyperVStorage.open(root / "vm.vmrs") as s:
        offset = s.get("/savedstate/RamBlock1").data_location[0]
    add_journal_entries(root / "vm.vmrs", pending=[(offset, bytes(4096))])
    code, _, err = run(capsys, "apply-log", str(root / "vm.vmrs"), "-o", str(tmp_path / "local.vmrs"))
    assert code == 0 and "applied 1 pending journal entry" in err, err
    code, _, err = run(capsys, "apply-log", url, "-o", str(tmp_path / "remote.vmrs"))
    assert code == 0 and "applied 1 pending journal entry" in err, err
    assert (tmp_path / "remote.vmrs").read_bytes() == (tmp_path / "local.vmrs").read_bytes()
    assert {r.method for r in proxy.take_log()} <= {"GET", "HEAD"}


def test_debug_logs_show_no_secret(
    http_store: tuple[Path, Proxy], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    root, proxy = http_store
    shutil.copyfile(SAMPLE, root / "vm.vmrs")
    caplog.set_level("DEBUG")
    faults = iter([503])
    proxy.fault = lambda method, path, rng: next(faults, None) if method == "GET" else None
    code, out, err = run(capsys, "-vv", "info", f"{proxy.url}/vm.vmrs?{SECRET_QUERY}")
    assert code == 0, err
    shown = out + err + caplog.text
    assert "retrying" in caplog.text  # our own line is there, redacted
    assert "deadbeef" not in shown and "AKIAQUERY" not in shown


def test_the_dll_backend_refuses_a_url_in_one_line(http_store: tuple[Path, Proxy]) -> None:
    from volatility3_vmssd import open_saved_state
    from volatility3_vmssd.errors import BackendUnavailableError

    root, proxy = http_store
    shutil.copyfile(SAMPLE, root / "vm.vmrs")
    with pytest.raises(BackendUnavailableError, match="reads local files only"):
        open_saved_state(f"{proxy.url}/vm.vmrs?{SECRET_QUERY}", backend="dll")
    with open_saved_state(f"{proxy.url}/vm.vmrs", backend="auto") as provider:  # auto: read natively
        assert provider.kind == "vmrs" and provider.paths == [f"{proxy.url}/vm.vmrs"]


def test_an_open_asks_for_the_object_once_and_reads_the_fixed_pages_in_one_request(
    http_store: tuple[Path, Proxy],
) -> None:
    """docs/remote.md#what-an-open-costs: one metadata request for the whole open (signature check
    included); the first GET is the header copies and root object table, the next covers the replay
    log's header and every key table; no byte of a RamBlock value is fetched."""
    from volatility3_vmssd import SavedStateProvider, open_saved_state
    from volatility3_vmssd.storage.defs import OPEN_REGION, ObjectType

    root, proxy = http_store
    shutil.copyfile(SAMPLE, root / "vm.vmrs")
    with HyperVStorage.open(SAMPLE) as local:
        log_header = local.header.fields.replay_log_offset
        key_tables = [(o.offset, o.offset + o.size) for o in local.objects.of_type(ObjectType.KEY_TABLE)]
    with SavedStateProvider.load_vmrs(SAMPLE) as p:
        source = p.memory.source
        ram = [s for s in (source.block_location(n) for n in source.block_numbers()) if s is not None]
    proxy.take_log()
    with open_saved_state(f"{proxy.url}/vm.vmrs") as state:
        assert state.vp_count() >= 1
        log = proxy.take_log()
    assert sum(r.method != "GET" for r in log) == 1  # one HEAD: the object is not asked for again
    spans = []
    for r in log:
        if r.method == "GET":
            assert r.range is not None and r.range.startswith("bytes=")
            a, _, b = r.range[6:].partition("-")
            spans.append((int(a), int(b) + 1))
    assert spans[0] == (0, OPEN_REGION)
    assert all(spans[1][0] <= a and b <= spans[1][1] for a, b in [*key_tables, (log_header, log_header + 1)])
    assert not [(a, b) for a, b in spans for off, size in ram if off < b and a < off + size]
