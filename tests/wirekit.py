"""A raw HTTP/1.1 server on 127.0.0.1 for answers no well-behaved server gives: a status line
trickled a byte at a time, a body that never ends, gigabytes of JSON, a 5xx saying
``CONCURRENT_LIMIT``. Each request is read whole (headers and ``Content-Length`` body), then
``respond`` writes whatever it likes on the socket; the connection is closed after it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType


@dataclass(frozen=True)
class RawRequest:
    method: str
    target: str  # path and query
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Wire:
    """One connection's writing end, as ``respond`` sees it."""

    sock: socket.socket
    stopping: threading.Event
    sent: list[int] = field(default_factory=lambda: [0])

    def write(self, data: bytes) -> bool:
        """Send ``data``; False once the client has gone (or the server stops)."""
        if self.stopping.is_set():
            return False
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        self.sent[0] += len(data)
        return True

    def trickle(self, data: bytes, pause: float) -> bool:
        """Send ``data`` one byte every ``pause`` s (the server's pace, not a test's race)."""
        for index in range(len(data)):
            if not self.write(data[index : index + 1]) or self.stopping.wait(pause):
                return False
        return True


Respond = Callable[[RawRequest, Wire], None]


def json_head(status: str, length: int | None = None, extra: str = "") -> bytes:
    """A status line and headers for a JSON answer (no ``Content-Length``: read to close)."""
    sized = "" if length is None else f"Content-Length: {length}\r\n"
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{sized}{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


class RawServer:
    """``with RawServer(respond) as server``: ``server.url``; ``server.requests`` as they
    came; ``server.bytes_sent`` over every connection."""

    def __init__(self, respond: Respond) -> None:
        self._respond = respond
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._stopping = threading.Event()
        self._sent = [0]
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.requests: list[RawRequest] = []
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._sent[0]

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)  # a client that stopped reading cannot hold the server's close
        with sock:
            request = _read_request(sock)
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
            wire = Wire(sock, self._stopping)
            try:
                self._respond(request, wire)
            finally:
                with self._lock:
                    self._sent[0] += wire.sent[0]

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (closing does not)
        self._listener.close()
        self._acceptor.join()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _read_request(sock: socket.socket) -> RawRequest | None:
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            body += chunk
        return RawRequest(method, target, headers, body)
    return None
