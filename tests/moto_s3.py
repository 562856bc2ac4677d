"""A real S3-protocol server on loopback (moto's server mode) and a fault-injecting HTTP proxy for it.

Imported by the s3 test modules (tests/ is on sys.path under pytest's default import mode).
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

from ops_services import free_port

DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextmanager
def moto_server() -> Iterator[str]:
    """Start `python -m moto.server` on a free loopback port; yield its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """Dummy credentials and the endpoint in os.environ (what s3fs/botocore read), restored afterwards."""
    values = DUMMY_CREDENTIALS | {"AWS_ENDPOINT_URL": endpoint}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    _forget_s3_clients()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_s3_clients()


def _forget_s3_clients() -> None:
    """Drop cached s3fs instances so the next one reads the (new) endpoint from the environment."""
    import s3fs

    from pipeline.data import remote

    s3fs.S3FileSystem.clear_instance_cache()
    remote.reader_filesystem.cache_clear()


class FaultyProxy:
    """HTTP proxy to ``upstream`` that breaks every ``every``-th GET/HEAD, cycling through
    a 500 error, a reset connection and a body cut off half-way; at most ``max_faults``."""

    KINDS = ("500", "reset", "truncate")

    def __init__(self, upstream: str, every: int = 3, max_faults: int = 1000, *, ranged_gets_only: bool = False) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.every, self.max_faults = every, max_faults
        # only GETs of byte ranges (the body reads): each fault is then exactly one failed read
        # attempt, where a HEAD or listing may be one of several requests inside a single attempt
        self.ranged_gets_only = ranged_gets_only
        self.requests = self.faults = 0  # requests: those a fault may hit
        self.received = 0  # every request, of any method
        self.by_kind = {kind: 0 for kind in self.KINDS}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FaultyProxy":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _next_fault(self, method: str, ranged: bool = False) -> str | None:
        with self._lock:
            if method not in ("GET", "HEAD") or (self.ranged_gets_only and not (method == "GET" and ranged)):
                return None
            self.requests += 1
            if self.requests % self.every or self.faults >= self.max_faults:
                return None
            kind = self.KINDS[self.faults % len(self.KINDS)]
            if kind == "truncate" and method == "HEAD":
                kind = "500"
            self.faults += 1
            self.by_kind[kind] += 1
            return kind

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reset(self) -> None:
                # SO_LINGER 0: close with a TCP RST, as a dropped connection looks to the client.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.received += 1
                fault = proxy._next_fault(self.command, ranged="Range" in self.headers)
                if fault == "reset":
                    self._reset()
                    return
                if fault == "500":
                    error = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response has no body, whatever its Content-Length
                        self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length", "date", "server"):
                        self.send_header(key, value)
                declared = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", declared or "0")
                self.end_headers()
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self._reset()
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        return Handler
