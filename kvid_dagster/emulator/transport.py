"""HTTP plumbing: the listeners (backlog, keep-alive connections, resets under a burst), reading
request bodies (capped, chunked or not), single-range ``Range`` answers and streaming files at
the configured download rate."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import struct
import threading
from collections.abc import Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kvid_dagster.emulator.responses import Response

if TYPE_CHECKING:
    from kvid_dagster.emulator.server import KvidEmulator

logger = logging.getLogger("kvid_dagster.emulator")

_CHUNK: Final = 64 * 1024
_BYTE_RANGE: Final = re.compile(r"^bytes=(\d+)-(\d*)$")


def range_response(
    path: Path, size: int, headers: Message, validators: Mapping[str, str]
) -> Response | None:
    """A 206 (or 416) for a single-range ``Range`` whose ``If-Range`` (if any) still holds;
    None: answer with the whole file, as RFC 9110 says for anything else."""
    match = _BYTE_RANGE.match((headers.get("Range") or "").strip())
    if match is None:
        return None
    condition = (headers.get("If-Range") or "").strip()
    if condition and condition not in validators.values():
        return None  # the file changed since the client's first bytes: the whole of it
    start = int(match.group(1))
    end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
    if start >= size or end < start:
        return Response(416, b"", "video/mp4", headers={"Content-Range": f"bytes */{size}"})
    return Response(
        206,
        content_type="video/mp4",
        headers={**validators, "Content-Range": f"bytes {start}-{end}/{size}"},
        file=path,
        file_bytes=end - start + 1,
        file_offset=start,
    )


class EmulatorServer(ThreadingHTTPServer):
    """The API listener, or (``storage``) the videos' origin, which never resets bursts."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], emulator: KvidEmulator, *, storage: bool = False
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # read by server_activate's listen(), which the base __init__ calls: set it first
        self.request_queue_size = emulator.config.backlog
        self.emulator = emulator
        self.storage = storage
        self.reset_above = 0 if storage else emulator.config.edges.burst_reset_above
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.connections_accepted = 0
        self.in_flight = 0  # requests between their headers and the end of their answer
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Reset the connection unread above ``reset_above`` requests in flight, else serve it."""
        with self._connections_lock:
            refuse = 0 < self.reset_above < self.in_flight
            if not refuse:
                self._connections.add(request)
                self.connections_accepted += 1
        if refuse:  # an overloaded server: reset before reading a byte, so nothing is created
            self.emulator._count("refused")
            with contextlib.suppress(OSError):
                request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                request.close()
            return
        super().process_request(request, client_address)

    def request_started(self) -> None:
        """Count a request in flight (from its headers to the end of its answer)."""
        with self._connections_lock:
            self.in_flight += 1

    def request_ended(self) -> None:
        """Count a request as answered."""
        with self._connections_lock:
            self.in_flight -= 1

    def shutdown_request(self, request: Any) -> None:
        """Forget a closed connection, so ``close_connections`` skips it."""
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End keep-alive connections, so a stopped emulator answers nothing more."""
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a connection that broke at debug level: clients hang up on purpose in tests."""
        logger.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # else ~40 ms per keep-alive request (Nagle + delayed ACK)
    server_version = "kvid-emulator/0.1"
    sys_version = ""
    timeout = 300  # idle keep-alive connections are closed after this
    server: EmulatorServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are logged by KvidEmulator.handle, through logging

    def _read_body(self) -> bytes | None:
        """The request body, or None if over the cap (the connection is then closed)."""
        cap = self.server.emulator.config.max_body_bytes
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked(cap)
        length_header = self.headers.get("Content-Length") or "0"
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0 or length > cap:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self, cap: int) -> bytes | None:
        data = bytearray()
        while True:
            size_line = self.rfile.readline(1024).split(b";")[0].strip()
            size = int(size_line or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(data)
            if len(data) + size > cap:
                self.close_connection = True
                return None
            data += self.rfile.read(size)
            self.rfile.readline(1024)

    def _serve(self, method: str) -> None:
        self.server.request_started()
        try:
            self._answer(method)
        finally:
            self.server.request_ended()

    def _answer(self, method: str) -> None:
        try:
            body = self._read_body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        emulator = self.server.emulator
        response = emulator.handle(
            method, self.path, self.headers, body, storage=self.server.storage
        )
        try:
            if response.drop:
                self._reset()
            else:
                self._write(response, head=method == "HEAD")
        except OSError:  # the client went away (it timed out, or reset): nothing to tell it
            self.close_connection = True

    def _reset(self) -> None:
        """Close with a TCP RST, not a polite FIN: the client sees a connection error."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()

    def _write(self, response: Response, *, head: bool) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        length = response.file_bytes if response.file is not None else len(response.body)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(length))
        if response.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if head:
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        rate = self.server.emulator.config.download_bytes_per_second
        with response.file.open("rb") as fh:
            fh.seek(response.file_offset)
            left = length
            while left > 0:
                chunk = fh.read(min(_CHUNK if rate is None else max(1, int(rate / 10)), left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)
                if rate is not None:
                    self.wfile.flush()
                    self.server.emulator._sleep(len(chunk) / rate)
