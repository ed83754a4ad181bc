"""Object stores on loopback for the remote-evidence tests: moto's S3, a range-capable HTTP server, and a
counting, fault-injecting proxy in front of either.

Every request the code under test makes goes through :class:`Proxy`, which logs method, path, query,
``Range``, status and body bytes (the benchmark counts requests and bytes from this log, never by
timing) and can answer with a 5xx or cut the connection for requests a test picks.  Nothing listens on
anything but 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import html
import http.client
import os
import re
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
#: fake credentials: the secret must never appear in a request, an output or a log
ACCESS_KEY = "AKIAVMSSDTESTKEY0001"
SECRET_KEY = "vmssd-test-secret-Zq8Xw2Lp9Kd3"


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: str
    range: str | None
    status: int
    sent: int  # response body bytes
    headers: str  # all request headers, as text (for the "no secret" check)


#: A fault hook sees each request and says what to do: None (forward), an int (answer with that status) or
#: "reset" (close the connection without an answer).
FaultHook = Callable[[str, str, str | None], int | str | None]


class Proxy:
    """A reverse proxy to ``upstream`` (host, port) that logs every request and injects faults."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.log: list[Request] = []
        self.fault: FaultHook | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                rng = self.headers.get("Range")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers_text = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
                action = proxy.fault(self.command, parts.path, rng) if proxy.fault else None
                if action == "reset":
                    proxy._record(Request(self.command, parts.path, parts.query, rng, 0, 0, headers_text))
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    self.close_connection = True
                    self.connection.close()
                    return
                if isinstance(action, int):
                    payload = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    proxy._record(Request(self.command, parts.path, parts.query, rng, action, 0, headers_text))
                    self.send_response(action)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                fwd = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body or None, headers=fwd)
                resp = conn.getresponse()
                data = resp.read()
                sent = len(data) if self.command != "HEAD" else 0
                # logged before the answer goes out, so a client that has its bytes finds them in the log
                proxy._record(Request(self.command, parts.path, parts.query, rng, resp.status, sent, headers_text))
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive", "date"):
                        self.send_header(k, v)
                upstream_length = resp.getheader("Content-Length")
                head_length = upstream_length if self.command == "HEAD" and upstream_length else str(len(data))
                self.send_header("Content-Length", head_length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.server_address[1]}"

    def take_log(self) -> list[Request]:
        with self._lock:
            out, self.log = self.log, []
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RangeHandler(BaseHTTPRequestHandler):
    """A read-only static file server with single ``Range`` requests, ``ETag``/``If-Match`` and folder pages."""

    protocol_version = "HTTP/1.1"
    root: Path

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        target = (self.root / rel).resolve()
        if not str(target).startswith(str(self.root.resolve())) or not target.exists():
            self._send(404, b"not found", {}, head)
            return
        if target.is_dir():
            links = "".join(
                f'<a href="{urllib.parse.quote(p.name)}{"/" if p.is_dir() else ""}">{html.escape(p.name)}</a>\n'
                for p in sorted(target.iterdir())
            )
            self._send(200, f"<html><body>{links}</body></html>".encode(), {"Content-Type": "text/html"}, head)
            return
        st = target.stat()
        etag = '"' + hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest() + '"'
        common = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Content-Type": "application/octet-stream",
        }
        match = self.headers.get("If-Match")
        if match is not None and match != etag:
            self._send(412, b"precondition failed", {}, head)
            return
        rng = self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng or "")
        if rng and m:
            size = st.st_size
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            if start >= size or end < start:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"}, head)
                return
            with open(target, "rb") as fh:
                fh.seek(start)
                body = fh.read(end - start + 1)
            self._send(206, body, {**common, "Content-Range": f"bytes {start}-{end}/{size}"}, head)
            return
        body = b"" if head else target.read_bytes()
        if head:
            self.send_response(200)
            for k, v in common.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(st.st_size))
            self.end_headers()
            return
        self._send(200, body, common, head)


@contextmanager
def range_server(root: Path) -> Iterator[tuple[str, int]]:
    """A :class:`RangeHandler` over ``root`` on loopback: yields (host, port)."""
    handler = type("Handler", (RangeHandler,), {"root": root})
    server = ThreadingHTTPServer((LOOPBACK, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield (LOOPBACK, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


class S3:
    """moto's S3 on loopback, a proxy in front of it, and the environment a client process needs.

    moto keeps its buckets in one in-memory backend per process, shared by every server started in it:
    each test module uses buckets of its own names."""

    def __init__(self) -> None:
        pytest.importorskip("moto.server", reason="moto[server] is not installed (the test extra)")
        pytest.importorskip("s3fs", reason="s3fs is not installed (the remote extra)")
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        self.server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
        self.server.start()
        self.direct = "http://{}:{}".format(*self.server.get_host_and_port())
        self.proxy = Proxy(self.server.get_host_and_port())
        self.env = client_env(self.proxy.url)
        import boto3

        self.client = boto3.client(
            "s3",
            endpoint_url=self.direct,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def upload(self, bucket: str, key: str, path: Path) -> str:
        """Put a file (straight into moto, not through the proxy); returns its s3:// URL."""
        with suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
            self.client.create_bucket(Bucket=bucket)
        self.client.upload_file(str(path), bucket, key)
        return f"s3://{bucket}/{key}"

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()


def client_env(endpoint: str) -> dict[str, str]:
    """os.environ for a client of the store at ``endpoint``: fake credentials, no profile, no proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
        NO_PROXY="127.0.0.1",
        VMSSD_REMOTE_BACKOFF="0.05",
    )
    return env
