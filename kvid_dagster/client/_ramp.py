"""How many requests may be in flight, and how many new connections: like TCP slow start.

Why: a server may listen with a small backlog (socketserver's 5, the kvid emulator's default).
Too many *new* connections at once overflow its accept queue; on Linux with syncookies the
connect() still succeeds, the request is written, and about a second later it is reset. For a
``generate`` that is an uncertain submission although no job was created. Kept-alive
connections are not at risk, only new ones. So:

- the window of requests in flight starts at ``initial`` (2), widens by one per HTTP answer
  (any status, even a 4xx: the connection was accepted) up to ``ceiling`` (``max_in_flight``),
  and halves on a transport error that suggests overload (``OVERLOAD``), never below 1;
- a request that opens a connection (httpx's ``trace`` extension tells exactly) waits for one
  of ``initial`` connect permits, given back when its answer's headers arrive or it fails. So
  at most 2 connections per client await their first answer, all a full accept queue can hold
  against it however slowly the server accepts (two or three clients fit a backlog of 5);
- the window also never admits more than can go at once (the pool's connections, counted from
  the same events, plus the free connect permits), lest requests be committed to new
  connections while kept-alive ones come free. The count is only an estimate (the pool closes
  idle ones silently) and never weakens the guarantee above. Without trace events
  (``httpx.MockTransport``) there is nothing to count or gate: the window alone applies.

``Ramp`` only decides; each client twin waits on two plain semaphores (threading or asyncio):
``permits`` window permits, which ``start``/``done`` create and destroy as the window moves,
and ``connect_permits``, taken and given back as ``event`` says.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import httpx

__all__ = ["DEFAULT_INITIAL", "OVERLOAD", "Exchange", "Ramp"]

DEFAULT_INITIAL = 2

# transport errors that may mean "too much at once": the connection was reset, refused or
# dropped (a full accept queue, a struggling server), or the server did not keep up in time.
# PoolTimeout (our own pool), UnsupportedProtocol and the like say nothing about the server.
OVERLOAD: tuple[type[httpx.TransportError], ...] = (
    httpx.NetworkError,  # ConnectError, ReadError, WriteError, CloseError
    httpx.RemoteProtocolError,  # disconnected without an answer
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
)

# httpcore trace events (the ``trace`` request extension): a new connection is being opened, a
# request is being written on a connection, and an answer's headers arrived
_CONNECTING = ("connection.connect_tcp.started", "connection.connect_unix_socket.started")
_SENDING = "send_request_headers.started"
_ANSWERED = "receive_response_headers.complete"


class Exchange:
    """One request under way, as the ramp sees it through the trace events."""

    __slots__ = ("held", "on_connection")

    def __init__(self) -> None:
        self.held = 0  # connect permits: connections it opened, not yet answered on
        self.on_connection = False  # it was written on a connection (new or kept alive)


class Ramp:
    """The window of requests in flight (``limit``) and the connect permits; thread-safe, does
    no I/O.

    A request calls ``start()`` once it has taken a window permit. None means the permit was
    surplus (the window shrank): it is gone, and the request waits for another one. Otherwise
    it goes ahead with the ``Exchange`` returned, reports its trace events to ``event`` (and
    ``opening`` once it holds a connect permit), and when it ends calls ``done(exchange,
    error)`` (``error`` None: an HTTP answer came back), gives back the connect permits the
    exchange still holds, and releases as many window permits as ``done`` returns.
    """

    def __init__(
        self,
        ceiling: int,
        *,
        initial: int = DEFAULT_INITIAL,
        idle: float | None = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ceiling < 1 or initial < 1:
            raise ValueError(f"ceiling and initial must be >= 1, got {ceiling} and {initial}")
        self.ceiling = ceiling
        self.initial = min(initial, ceiling)
        self._idle = math.inf if idle is None else idle  # the pool's keep-alive expiry
        self._clock = clock
        self._limit = self._permits = self.initial
        self._in_flight = 0
        self._connections = 0  # the pool's connections, as far as the events tell
        self._unanswered = 0  # connect permits held
        self._quiet_since = -math.inf  # when the last request in flight ended
        self._traced = True  # False once an answer came without trace events (a mock transport)
        self._lock = threading.Lock()

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def connections(self) -> int:
        """The pool's connections as counted (it closes idle ones silently: an estimate)."""
        return self._connections

    @property
    def unanswered(self) -> int:
        """Connections opened and not yet answered on (connect permits held)."""
        return self._unanswered

    @property
    def permits(self) -> int:
        """Window permits in existence (in the semaphore or held); it starts with these."""
        return self._permits

    @property
    def connect_permits(self) -> int:
        """How many new connections may await their first answer at once."""
        return self.initial

    def start(self) -> Exchange | None:
        """A window permit was taken: the exchange to go ahead with, or None if the permit was
        surplus (and is now destroyed)."""
        with self._lock:
            if self._in_flight == 0 and self._clock() - self._quiet_since > self._idle:
                self._connections = 0  # the pool has closed them all by now
            self._limit = min(self._limit, self._room())
            if self._in_flight >= self._limit:
                self._permits -= 1
                return None
            self._in_flight += 1
            return Exchange()

    def event(self, exchange: Exchange, name: str) -> int:
        """An httpx trace event of ``exchange``: 1 to wait for a connect permit (then call
        ``opening``), -1 to give one back (answered), 0 for nothing."""
        with self._lock:
            if name.endswith(_SENDING):
                exchange.on_connection = True
            elif name in _CONNECTING:
                return 1
            elif exchange.held and name.endswith(_ANSWERED):
                exchange.held -= 1
                self._unanswered -= 1
                return -1
            return 0

    def opening(self, exchange: Exchange) -> None:
        """``exchange`` got its connect permit and opens a connection now."""
        with self._lock:
            exchange.held += 1
            self._unanswered += 1
            self._connections = min(self.ceiling, self._connections + 1)

    def done(self, exchange: Exchange, error: BaseException | None = None) -> int:
        """``exchange`` ended (``error`` None: an HTTP answer came back); returns the number of
        window permits to release (0, 1 or 2). Its caller gives back ``exchange.held``."""
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._quiet_since = self._clock()
            self._unanswered -= exchange.held
            if error is None:
                if not exchange.on_connection:
                    self._traced = False  # no connections to count or gate: the window alone
                self._limit = min(self.ceiling, self._limit + 1, max(self._limit, self._room()))
            else:
                if exchange.held or exchange.on_connection:  # the pool drops its connection
                    self._connections = max(0, self._connections - 1)
                if isinstance(error, OVERLOAD):
                    self._limit = max(1, self._limit // 2)
                # other failures (ours, a cancellation) say nothing about the server
            if self._permits > self._limit:
                self._permits -= 1
                return 0
            give = 1 + self._limit - self._permits
            self._permits = self._limit
            return give

    def _room(self) -> int:
        """Requests that can go at once: one per connection, plus the free connect permits."""
        if not self._traced:
            return self.ceiling
        return max(1, self._connections + self.initial - self._unanswered)
