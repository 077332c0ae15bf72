"""``AsyncKvidClient``: the asyncio twin of ``KvidClient``. It performs, with awaits, the I/O
that the shared operations in ``_engine`` ask for; it makes no decision of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ._download import DEFAULT_MAX_BYTES, PartialDownload
from ._engine import Action, AnswerBody, Await, ClientBase, Fetch, Op, OpRunner, Send, Sleep
from ._network import async_guarded_transport, exchange_deadline
from ._ramp import Exchange
from .results import DownloadedFile, JobResult, JobStatus
from .video_requests import JobKind, KvidRequest

__all__ = ["AsyncKvidClient"]

T = TypeVar("T")


class AsyncKvidClient(ClientBase):
    """Asyncio kvid client on ``httpx.AsyncClient``; use it from one event loop.

    Same constructor as ``KvidClient``, except that ``transport`` is an
    ``httpx.AsyncBaseTransport`` and ``sleep`` an async ``Callable[[float], Awaitable[None]]``
    (default ``asyncio.sleep``). ``max_in_flight`` is the same gradually reached ceiling
    (2 at first, one more per HTTP answer, halved on a reset, at most 2 on connections not yet
    answered on: see ``_ramp.py``), waited for on an ``asyncio.Semaphore``.
    """

    _default_sleep = staticmethod(asyncio.sleep)

    def _open_http(self, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        self._slots = asyncio.Semaphore(self._ramp.permits)
        self._connects = asyncio.Semaphore(self._ramp.connect_permits)

        async def strip_foreign_key(request: httpx.Request) -> None:
            self._strip_foreign_key(request)

        return httpx.AsyncClient(
            timeout=self._timeout,
            limits=self._limits,
            transport=(
                transport
                if transport is not None
                else async_guarded_transport(self._limits, self._trusted_hosts)
            ),
            follow_redirects=False,
            event_hooks={"request": [strip_foreign_key]},
        )

    async def _take_slot(self) -> Exchange:
        while True:
            await self._slots.acquire()
            exchange = self._ramp.start()
            if exchange is not None:  # no await since acquire: no permit lost
                return exchange

    @contextlib.asynccontextmanager
    async def _slot(self, request: httpx.Request) -> AsyncIterator[None]:
        """Hold a window permit for one HTTP exchange, and a connect permit while a connection
        it opens awaits its first answer (see ``_ramp.py``)."""
        exchange = await self._take_slot()

        async def trace(event: str, info: Any) -> None:
            step = self._ramp.event(exchange, event)
            if step > 0:
                await self._connects.acquire()
                self._ramp.opening(exchange)
            elif step < 0:
                self._connects.release()

        request.extensions["trace"] = trace
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            for _ in range(exchange.held):
                self._connects.release()
            for _ in range(self._ramp.done(exchange, error)):
                self._slots.release()

    async def _perform(
        self, action: Action, before_send: Callable[[], Awaitable[None]] | None = None
    ) -> Any:
        if isinstance(action, Send):
            async with self._slot(action.request):
                if before_send is not None:
                    await before_send()
                with exchange_deadline(action.deadline_s):
                    response = await self._http.send(action.request, stream=True)
                    try:
                        answer = AnswerBody(response)
                        async for chunk in response.aiter_bytes():
                            answer.add(chunk)
                    finally:
                        await response.aclose()
            return answer.response()
        if isinstance(action, Fetch):
            async with self._slot(action.request):
                response = await self._http.send(action.request, stream=True, follow_redirects=True)
                try:
                    if action.sink.accept(response):
                        async for chunk in response.aiter_bytes():
                            action.sink.write(chunk)
                        return response
                    answer = AnswerBody(response)  # an error page is an answer: capped
                    async for chunk in response.aiter_bytes():
                        answer.add(chunk)
                finally:
                    await response.aclose()
            return answer.response()
        if isinstance(action, Sleep):
            return await self._sleep(action.seconds)
        assert isinstance(action, Await)
        return await action.awaitable

    async def _run(self, op: Op[T], before_send: Callable[[], Awaitable[None]] | None = None) -> T:
        with OpRunner(op, self._scrub) as runner:
            for action in runner:
                hook = before_send if isinstance(action, Send) else None
                if hook is not None:
                    before_send = None  # once: retries of a request that was not sent reuse it
                try:
                    outcome = await self._perform(action, hook)
                except Exception as exc:  # handed to the operation, which decides
                    runner.fail(exc)
                else:
                    runner.resolve(outcome)
            return runner.result

    # ---- the API (documented on KvidClient) -----------------------------------------------

    async def generate(
        self, request: KvidRequest, *, before_send: Callable[[], Awaitable[None]] | None = None
    ) -> str:
        """Async ``KvidClient.generate``: never re-sends an ambiguous submission.

        ``before_send`` is awaited once, when the client's own limits let the request go, right
        before it is written: where a caller records that it is about to pay (a claim waiting
        in the client's queue would hold a row for nothing). If it raises, nothing is sent and
        its exception propagates.
        """
        return await self._run(self._generate_op(request), before_send)

    async def status(self, job_kind: JobKind | str, request_id: str) -> JobStatus:
        """Async ``KvidClient.status``."""
        return await self._run(self._status_op(job_kind, request_id))

    async def result(self, job_kind: JobKind | str, request_id: str) -> JobResult:
        """Async ``KvidClient.result``."""
        return await self._run(self._result_op(job_kind, request_id))

    async def wait(
        self,
        job_kind: JobKind | str,
        request_id: str,
        *,
        poll_interval: float = 5.0,
        deadline: float = 600.0,
        on_progress: Callable[[JobStatus], Any] | None = None,
    ) -> JobStatus:
        """Async ``KvidClient.wait``; ``on_progress`` may be a plain or an async function."""
        return await self._run(
            self._wait_op(job_kind, request_id, poll_interval, deadline, on_progress)
        )

    async def download(
        self,
        result_or_url: JobResult | str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        partial: PartialDownload | None = None,
    ) -> DownloadedFile:
        """Async ``KvidClient.download`` (tmp file + rename, size cap, key only to our origin;
        ``partial`` keeps and resumes what a cancelled or failed download received)."""
        return await self._run(self._download_op(result_or_url, dest, max_bytes, partial))

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncKvidClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
