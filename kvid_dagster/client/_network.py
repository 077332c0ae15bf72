"""The sockets under both clients' connection pools: where a connection may go, and when an API
call must be over.

- **Where**: a connection to a host that is not trusted (trusted: the API's own and
  ``allowed_download_hosts``) resolves it once, here, refuses it if any address it got is
  private, loopback or link-local, and connects to one of the addresses it checked. A check that
  resolved the host itself, with httpx resolving it again to connect, let a host answer a public
  address to the check and a private one to the connection (DNS rebinding). TLS still names the
  host: httpcore gives the original host name for SNI and the certificate check, whatever
  address it reached.
- **When**: httpx's ``timeout`` bounds each socket wait, so a server answering a byte every half
  second holds a call forever. Inside :func:`exchange_deadline` every connect, read and write
  waits at most what is left of the exchange's deadline, and fails with httpcore's own timeout
  past it, which httpx and the engine then treat as any timeout (a generate is uncertain).

httpx 0.28 has no parameter for a network backend (encode/httpx#3749 proposes one), so
:func:`guarded_transport` builds its ``HTTPTransport`` on a pool that has ours. Behind an
``HTTP(S)_PROXY`` from the environment httpx uses its own transport: the proxy connects.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import anyio
import httpcore
import httpx

from .errors import KvidProtocolError

__all__ = ["async_guarded_transport", "exchange_deadline", "guarded_transport"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Deadline:
    at: float  # time.monotonic()
    seconds: float  # as configured, for the message

    @property
    def message(self) -> str:
        return f"no complete answer within call_deadline={self.seconds:g} s"


_DEADLINE: ContextVar[_Deadline | None] = ContextVar("kvid_exchange_deadline", default=None)


@contextlib.contextmanager
def exchange_deadline(seconds: float | None) -> Iterator[None]:
    """Every socket wait of the code inside (in this thread or task) ends ``seconds`` from now
    at the latest; None: no deadline (downloads, whose length is their own)."""
    deadline = None if seconds is None else _Deadline(time.monotonic() + seconds, seconds)
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


class _Within:
    """``with _Within(timeout, error) as left``: ``timeout`` shortened to what is left of the
    exchange's deadline; a wait that ends because of the deadline raises ``error`` saying so.
    (A class, not a generator: it wraps every read and write of every call.)"""

    __slots__ = ("_deadline", "_error", "left")

    def __init__(self, timeout: float | None, error: type[httpcore.TimeoutException]) -> None:
        self._deadline = deadline = _DEADLINE.get()
        self._error = error
        self.left = timeout
        if deadline is not None:
            remaining = deadline.at - time.monotonic()
            if remaining <= 0:
                raise error(deadline.message)
            self.left = remaining if timeout is None else min(timeout, remaining)

    def __enter__(self) -> float | None:
        return self.left

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        deadline = self._deadline
        if deadline is None or kind is None or not issubclass(kind, self._error):
            return
        if time.monotonic() >= deadline.at:  # the deadline, not the per-wait timeout, ended it
            raise self._error(deadline.message) from None


def _public_addresses(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order, all of them public (one
    private address among public ones is refused too: the connection might use it)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:  # a failed lookup, as httpcore reports one
        raise httpcore.ConnectError(str(exc)) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    for text in addresses:
        address: Address = ipaddress.ip_address(text.split("%", 1)[0])
        if not address.is_global:
            raise KvidProtocolError(
                f"refusing to fetch from {host} ({address}, a non-public address): only the "
                "API's own host and allowed_download_hosts may be private"
            )
    return addresses


class _Wrapper:
    """What the sync and async streams share: the stream under them."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _Guard:
    """What the sync and async backends share: the backend under them, the trusted hosts."""

    def __init__(self, inner: Any, trusted: frozenset[str]) -> None:
        self._inner = inner
        self._trusted = trusted

    def _is_trusted(self, host: str) -> bool:
        # a trusted host (the API's own) is resolved by the connect, as httpx would
        return host.lower() in self._trusted


class _Stream(_Wrapper, httpcore.NetworkStream):
    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _Within(timeout, httpcore.ReadTimeout) as left:
            return self._stream.read(max_bytes, left)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _Within(timeout, httpcore.WriteTimeout) as left:
            self._stream.write(buffer, left)

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        with _Within(timeout, httpcore.ConnectTimeout) as left:
            self._stream = self._stream.start_tls(ssl_context, server_hostname, left)
        return self


class _Backend(_Guard, httpcore.NetworkBackend):
    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        def connect(address: str) -> httpcore.NetworkStream:
            with _Within(timeout, httpcore.ConnectTimeout) as left:
                stream = self._inner.connect_tcp(address, port, left, local_address, socket_options)
            return _Stream(stream)

        *others, last = [host] if self._is_trusted(host) else _public_addresses(host, port)
        for address in others:  # on to the next when one fails, as socket.create_connection
            with contextlib.suppress(httpcore.ConnectError):
                return connect(address)
        return connect(last)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _AsyncStream(_Wrapper, httpcore.AsyncNetworkStream):
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _Within(timeout, httpcore.ReadTimeout) as left:
            return await self._stream.read(max_bytes, left)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        with _Within(timeout, httpcore.WriteTimeout) as left:
            await self._stream.write(buffer, left)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with _Within(timeout, httpcore.ConnectTimeout) as left:
            self._stream = await self._stream.start_tls(ssl_context, server_hostname, left)
        return self


class _AsyncBackend(_Guard, httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        async def connect(address: str) -> httpcore.AsyncNetworkStream:
            with _Within(timeout, httpcore.ConnectTimeout) as left:
                stream = await self._inner.connect_tcp(
                    address, port, left, local_address, socket_options
                )
            return _AsyncStream(stream)

        if self._is_trusted(host):
            addresses = [host]
        else:  # the lookup blocks: in a thread, as asyncio's own getaddrinfo
            addresses = await anyio.to_thread.run_sync(_public_addresses, host, port)
        *others, last = addresses
        for address in others:
            with contextlib.suppress(httpcore.ConnectError):
                return await connect(address)
        return await connect(last)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def _pool_settings(limits: httpx.Limits, ssl_context: ssl.SSLContext) -> dict[str, Any]:
    """What ``httpx.HTTPTransport`` gives its pool by default, with these limits."""
    return {
        "ssl_context": ssl_context,
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }


def guarded_transport(limits: httpx.Limits, trusted: frozenset[str]) -> httpx.HTTPTransport:
    """httpx's default transport, on sockets that check where they connect and keep deadlines
    (``trusted``: lower-case host names that may be on private addresses)."""
    context = httpx.create_ssl_context()
    transport = httpx.HTTPTransport(verify=context, limits=limits)
    transport._pool = httpcore.ConnectionPool(
        **_pool_settings(limits, context), network_backend=_Backend(httpcore.SyncBackend(), trusted)
    )
    return transport


def async_guarded_transport(
    limits: httpx.Limits, trusted: frozenset[str]
) -> httpx.AsyncHTTPTransport:
    """The asyncio twin of :func:`guarded_transport`."""
    context = httpx.create_ssl_context()
    transport = httpx.AsyncHTTPTransport(verify=context, limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        **_pool_settings(limits, context),
        network_backend=_AsyncBackend(httpcore.AnyIOBackend(), trusted),
    )
    return transport
