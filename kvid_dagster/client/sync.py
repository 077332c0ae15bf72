"""``KvidClient``: the blocking client. It only performs the I/O that the shared operations in
``_engine`` ask for; every decision (retries, parsing, errors) is made there."""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ._download import DEFAULT_MAX_BYTES, PartialDownload
from ._engine import Action, AnswerBody, Await, ClientBase, Fetch, Op, OpRunner, Send, Sleep
from ._network import exchange_deadline, guarded_transport
from ._ramp import Exchange
from .results import DownloadedFile, JobResult, JobStatus
from .video_requests import JobKind, KvidRequest

__all__ = ["KvidClient"]

T = TypeVar("T")


class KvidClient(ClientBase):
    """Blocking kvid client on ``httpx.Client``; safe to share between threads.

    ``KvidClient(api_key, base_url="https://api.kvid.ai", *, timeout=30.0, call_deadline=120.0,
    max_retries=5, backoff_base=0.5, backoff_max=30.0, max_in_flight=32, transport=None,
    sleep=None, clock=time.monotonic, dialect=None, allowed_download_hosts=(),
    credit_pool=None)``

    - ``api_key`` goes in the ``api-key`` header, to ``base_url``'s origin only; it never shows
      in a repr, an error, a returned status or result, or an ``httpx``/``httpcore`` log record.
    - ``base_url`` may carry a path prefix (a gateway's ``https://gw.example.com/kvid``): the
      API paths are appended to it.
    - ``timeout``: seconds for each connect/read/write/pool wait of one HTTP request.
    - ``call_deadline``: seconds one API call (generate, status, result; each retry anew) may
      take from its first byte sent to its answer's last byte read, however the server
      trickles it; past it a generate is uncertain (``KvidUncertainSubmissionError``), a status
      or result a timeout, retried. Answers bigger than ``MAX_ANSWER_BYTES`` (4 MiB) are not
      read: after a generate uncertain, else a ``KvidResponseTooLargeError``.
    - ``allowed_download_hosts``: hosts a video may be fetched from on a private or loopback
      address, besides the API's own; any other is refused on the address actually connected
      to (``KvidProtocolError``).
    - ``max_retries``/``backoff_base``/``backoff_max``: the ``RetryPolicy`` (full jitter).
    - ``max_in_flight``: the most requests at once across all threads (the connection pool
      has the same size). It is a ceiling reached gradually, like TCP slow start: 2 in flight
      at first, one more per HTTP answer, halved on a reset or refused connection, and never
      more than 2 on connections the server has not answered on yet, so that a burst cannot
      overflow a small listen backlog (see ``_ramp.py``). Kept-alive connections are reused,
      so a busy client stays at the ceiling.
    - ``transport``: an ``httpx.BaseTransport`` (tests); ``sleep``: ``Callable[[float], None]``
      (default ``time.sleep``; inject it to test retries without waiting); ``clock``: monotonic
      seconds for ``wait``'s deadline; ``dialect``: the wire dialect (default ``KVID_DIALECT``).
    """

    _default_sleep = staticmethod(time.sleep)

    def _open_http(self, transport: httpx.BaseTransport | None) -> httpx.Client:
        self._slots = threading.Semaphore(self._ramp.permits)
        self._connects = threading.Semaphore(self._ramp.connect_permits)
        return httpx.Client(
            timeout=self._timeout,
            limits=self._limits,
            transport=(
                transport
                if transport is not None
                else guarded_transport(self._limits, self._trusted_hosts)
            ),
            follow_redirects=False,
            event_hooks={"request": [self._strip_foreign_key]},
        )

    def _take_slot(self) -> Exchange:
        while True:
            self._slots.acquire()
            exchange = self._ramp.start()
            if exchange is not None:
                return exchange

    @contextlib.contextmanager
    def _slot(self, request: httpx.Request) -> Iterator[None]:
        """Hold a window permit for one HTTP exchange, and a connect permit while a connection
        it opens awaits its first answer (see ``_ramp.py``)."""
        exchange = self._take_slot()

        def trace(event: str, info: Any) -> None:
            step = self._ramp.event(exchange, event)
            if step > 0:
                self._connects.acquire()
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

    def _perform(self, action: Action) -> Any:
        if isinstance(action, Send):
            with self._slot(action.request), exchange_deadline(action.deadline_s):
                response = self._http.send(action.request, stream=True)
                with contextlib.closing(response):
                    answer = AnswerBody(response)
                    for chunk in response.iter_bytes():
                        answer.add(chunk)
            return answer.response()
        if isinstance(action, Fetch):
            with self._slot(action.request):
                response = self._http.send(action.request, stream=True, follow_redirects=True)
                with contextlib.closing(response):
                    if action.sink.accept(response):
                        for chunk in response.iter_bytes():
                            action.sink.write(chunk)
                        return response
                    answer = AnswerBody(response)  # an error page is an answer: capped
                    for chunk in response.iter_bytes():
                        answer.add(chunk)
            return answer.response()
        if isinstance(action, Sleep):
            return self._sleep(action.seconds)
        assert isinstance(action, Await)
        if inspect.iscoroutine(action.awaitable):
            action.awaitable.close()  # no "never awaited" warning on top of the error
        raise TypeError(
            "on_progress returned an awaitable: use AsyncKvidClient for async callbacks"
        )

    def _run(self, op: Op[T]) -> T:
        with OpRunner(op, self._scrub) as runner:
            for action in runner:
                try:
                    runner.resolve(self._perform(action))
                except Exception as exc:  # the operation decides what an I/O failure means
                    runner.fail(exc)
            return runner.result

    # ---- the API -----------------------------------------------------------------------------

    def generate(self, request: KvidRequest) -> str:
        """Submit a job and return its request_id.

        Retried only when no job can have been created (429, connection never made); otherwise
        an ambiguous failure raises ``KvidUncertainSubmissionError`` and nothing is re-sent.
        """
        return self._run(self._generate_op(request))

    def status(self, job_kind: JobKind | str, request_id: str) -> JobStatus:
        """The job's current status (any word but COMPLETED/FAILED means still running)."""
        return self._run(self._status_op(job_kind, request_id))

    def result(self, job_kind: JobKind | str, request_id: str) -> JobResult:
        """Where the finished video is (409 ``KvidNotReadyError`` before COMPLETED)."""
        return self._run(self._result_op(job_kind, request_id))

    def wait(
        self,
        job_kind: JobKind | str,
        request_id: str,
        *,
        poll_interval: float = 5.0,
        deadline: float = 600.0,
        on_progress: Callable[[JobStatus], Any] | None = None,
    ) -> JobStatus:
        """Poll until the job is terminal; ``on_progress`` sees every status.

        Raises ``KvidJobFailedError`` for FAILED, ``KvidTimeoutError`` after ``deadline`` s.
        """
        return self._run(self._wait_op(job_kind, request_id, poll_interval, deadline, on_progress))

    def download(
        self,
        result_or_url: JobResult | str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        partial: PartialDownload | None = None,
    ) -> DownloadedFile:
        """Stream the video to ``dest`` (a file, or a folder to put ``result.name`` in).

        Written to a temporary file beside it and renamed into place when complete; more than
        ``max_bytes`` (announced or received), an empty body or one far from the result's
        ``size_kb`` aborts and deletes it. The api-key goes only to the API's own origin.

        ``partial``: write to ``partial.path`` instead, and keep what was received when the
        download stops short (an error, a timeout, a cancelled caller); a later call with the
        same path continues from there where the server honours HTTP Range (guarded by
        ``If-Range``, else by the file's length), and starts over where it does not
        (``partial.resumed`` tells which). While a download holds the path, another gets
        ``KvidDownloadBusyError``.
        """
        return self._run(self._download_op(result_or_url, dest, max_bytes, partial))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KvidClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
