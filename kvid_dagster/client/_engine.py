"""Everything the sync and async clients share: configuration, the operations and their retries.

Each operation (generate, status, result, wait, download) is a generator that *yields* the I/O
it needs (``Send`` a call, ``Fetch`` a file into a sink, ``Sleep``, ``Await`` a callback) and is
resumed with the outcome, or has the I/O's exception thrown into it. ``KvidClient`` performs the
actions with blocking calls and ``AsyncKvidClient`` with awaits; neither contains any logic of
its own, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Generic, TypeVar, get_args

import httpx

from ._download import DEFAULT_MAX_BYTES, DownloadSink, PartialDownload, target_path
from ._ramp import Ramp
from ._secrets import REDACTED, Secret, protect_logs, redact, spellings
from .errors import (
    KvidConnectionError,
    KvidDownloadTooLargeError,
    KvidError,
    KvidJobFailedError,
    KvidProtocolError,
    KvidResponseTooLargeError,
    KvidTimeoutError,
    KvidUncertainSubmissionError,
    KvidValidationError,
)
from .generation_requests import CreditPool
from .protocol import DEFAULT_DIALECT, HttpCall, WireDialect, dialect_for, where
from .results import DownloadedFile, JobResult, JobStatus
from .retry import NOT_SENT, RetryPolicy, RetryVerdict
from .video_requests import ApiDialect, JobKind, KvidRequest

logger = logging.getLogger("kvid_dagster.client")

DEFAULT_BASE_URL = "https://api.kvid.ai"
#: the variables naming the service and its key, where a program takes them from the environment
BASE_URL_ENV = "KVID_BASE_URL"
API_KEY_ENV = "KVID_API_KEY"
DEFAULT_TIMEOUT_S = 30.0
# one API call, first byte sent to last byte read: ``timeout`` bounds each socket wait only, so
# a server trickling a byte at a time would hold a generate (and its row SUBMITTING) forever
DEFAULT_CALL_DEADLINE_S = 120.0
# an API answer is a few hundred bytes of JSON: a bigger one is a broken or hostile server,
# not read into memory
MAX_ANSWER_BYTES = 4 * 1024 * 1024
# the ramp reaches it gradually (see ``_ramp.py``), so a small backlog is safe; a status tick
# over thousands of jobs needs this many to keep the round trips overlapped
DEFAULT_MAX_IN_FLIGHT = 32
DEFAULT_RETRY = RetryPolicy()
_REQUEST_TYPE_NAMES = ", ".join(cls.__name__ for cls in get_args(KvidRequest))
_DEFAULT_PORTS = {"http": 80, "https": 443}

T = TypeVar("T")
Answer = TypeVar("Answer", JobStatus, JobResult)


# ---- the I/O an operation can ask for ---------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send one API call within ``deadline_s`` (see ``_network.exchange_deadline``), reading
    its answer through an ``AnswerBody``; resumed with the ``AnswerBody.response()``."""

    request: httpx.Request
    deadline_s: float


@dataclass(frozen=True)
class Fetch:
    """Send ``request`` following redirects, streaming a 2xx body into ``sink`` (an error
    answer is read whole instead); resumed with the ``httpx.Response``."""

    request: httpx.Request
    sink: DownloadSink


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Await:
    """An awaitable returned by a user callback (only the async client can honour it)."""

    awaitable: Awaitable[Any]


Action = Send | Fetch | Sleep | Await
Op = Generator[Action, Any, T]


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or _DEFAULT_PORTS.get(url.scheme)


def _check_scheme(url: httpx.URL) -> None:
    """Refuse a request to a non-http(s) URL (a result URL or redirect to ``file://``). Where
    it may connect is checked on the address it connects to (``_network``)."""
    if url.scheme not in ("http", "https"):
        raise KvidProtocolError(
            f"refusing {url.scheme}:// ({url.host}): downloads are http(s) only"
        )


class AnswerBody:
    """One API answer, collected as it streams (decoded, so a compressed bomb counts by what
    it decompresses to); refused once it passes ``MAX_ANSWER_BYTES``."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._chunks: list[bytes] = []
        self._size = 0
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > MAX_ANSWER_BYTES:
            raise self._too_large(f"announces {announced} bytes, more than")

    def _too_large(self, detail: str) -> KvidResponseTooLargeError:
        return KvidResponseTooLargeError(
            f"{where(self._response)}: the answer {detail} MAX_ANSWER_BYTES={MAX_ANSWER_BYTES} "
            "(what an API answer may take): not read further"
        )

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > MAX_ANSWER_BYTES:
            raise self._too_large("runs past")
        self._chunks.append(chunk)

    def response(self) -> httpx.Response:
        """The answer as a read response (its body already decoded)."""
        headers = [
            (name, value)
            for name, value in self._response.headers.multi_items()
            if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(
            self._response.status_code,
            headers=headers,
            content=b"".join(self._chunks),
            request=self._response.request,
        )


def _dialect(value: WireDialect | ApiDialect | str | None) -> WireDialect:
    if value is None:
        return DEFAULT_DIALECT
    return value if isinstance(value, WireDialect) else dialect_for(value)


def _credit_pool(
    value: CreditPool | tuple[str, str] | None, dialect: WireDialect
) -> CreditPool | None:
    if value is None:
        return None
    if dialect.api is not ApiDialect.GENERATION:
        raise KvidValidationError(
            "credit_pool",
            problem=f"is a setting of the generation dialect; this client speaks {dialect.api}",
        )
    if isinstance(value, CreditPool):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return CreditPool.of(*value)
    # never echo it: the value part is a secret
    raise KvidValidationError(
        "credit_pool", problem="has the wrong type", allowed="a CreditPool or (field, value)"
    )


def _positive(name: str, value: Any, *, integer: bool = False) -> None:
    kind = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise KvidValidationError(name, value, "a positive number", problem="has the wrong type")
    if value <= 0:
        raise KvidValidationError(name, value, "a positive number", problem="is out of range")


class OpRunner(Generic[T]):
    """Steps an operation: iterate it for the actions to perform, and report each outcome with
    ``resolve``/``fail``. As a context manager it closes an abandoned operation, which runs
    the operation's own cleanup (a download's tmp file)."""

    def __init__(self, op: Op[T], scrub: Callable[[KvidError], None]) -> None:
        self._op = op
        self._scrub = scrub
        self._value: Any = None
        self._error: BaseException | None = None
        self.result: T

    def __iter__(self) -> Iterator[Action]:
        return self

    def __next__(self) -> Action:
        value, error = self._value, self._error
        self._value = self._error = None
        try:
            if error is None:
                return self._op.send(value)
            return self._op.throw(error)
        except StopIteration as stop:
            self.result = stop.value
            raise StopIteration from None
        except KvidError as exc:
            self._scrub(exc)
            raise

    def resolve(self, value: Any) -> None:
        self._value = value

    def fail(self, error: BaseException) -> None:
        self._error = error

    def __enter__(self) -> OpRunner[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._op.close()


class ClientBase:
    """Shared state and operations of ``KvidClient`` and ``AsyncKvidClient``."""

    _default_sleep: Callable[[float], Any]

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        call_deadline: float = DEFAULT_CALL_DEADLINE_S,
        max_retries: int = DEFAULT_RETRY.max_retries,
        backoff_base: float = DEFAULT_RETRY.backoff_base,
        backoff_max: float = DEFAULT_RETRY.backoff_max,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        dialect: WireDialect | ApiDialect | str | None = None,
        allowed_download_hosts: Sequence[str] = (),
        credit_pool: CreditPool | tuple[str, str] | None = None,
    ) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise KvidValidationError("api_key", problem="is empty", allowed="a non-empty string")
        if any(c.isspace() or ord(c) < 32 or ord(c) > 126 for c in api_key):
            # never echo the value: it is a secret even when malformed
            raise KvidValidationError(
                "api_key", problem="contains characters a header cannot carry", allowed="ASCII"
            )
        try:
            url = httpx.URL(base_url)
        except (httpx.InvalidURL, TypeError):
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise KvidValidationError("base_url", base_url, "an http(s) URL")
        _positive("timeout", timeout)
        _positive("call_deadline", call_deadline)
        _positive("max_in_flight", max_in_flight, integer=True)
        self._api_key = Secret(api_key)
        self._base_url = url
        self._timeout = httpx.Timeout(timeout)
        self._call_deadline = call_deadline
        self._max_in_flight = max_in_flight
        self._retry = RetryPolicy(max_retries, backoff_base, backoff_max)
        self._sleep = sleep if sleep is not None else type(self)._default_sleep
        self._clock = clock
        self._dialect = _dialect(dialect)
        self._credit_pool = _credit_pool(credit_pool, self._dialect)
        # private and loopback addresses are fetched only from the API's own host and these
        self._trusted_hosts = frozenset(h.lower() for h in (url.host, *allowed_download_hosts) if h)
        # one connection per request in flight: the ramp's semaphores, not the pool, do the
        # queueing, and open new connections gradually (see _ramp.py)
        self._limits = httpx.Limits(
            max_connections=max_in_flight, max_keepalive_connections=max_in_flight
        )
        self._ramp = Ramp(max_in_flight, idle=self._limits.keepalive_expiry)
        self._http = self._open_http(transport)
        protect_logs(api_key)  # once the client exists: a refused one sends nothing
        if self._credit_pool is not None:
            protect_logs(self._credit_pool.value.reveal())

    def _open_http(self, transport: Any) -> Any:
        """The httpx client; without a ``transport``, on ``_network``'s guarded sockets."""
        raise NotImplementedError

    # ---- public, I/O-free --------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return str(self._base_url)

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    @property
    def dialect(self) -> WireDialect:
        return self._dialect

    def __repr__(self) -> str:
        pool = "" if self._credit_pool is None else f", credit_pool='{self._credit_pool.field}=***'"
        return (
            f"{type(self).__name__}(base_url={self.base_url!r}, api_key='***', "
            f"max_in_flight={self._max_in_flight}, dialect={self._dialect.name!r}{pool})"
        )

    # ---- secrets -----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        text = redact(text, spellings(self._api_key.reveal()))
        if self._credit_pool is None:
            return text
        # a pool id may be as short as "7": only whole tokens, or "HTTP 429" would lose a digit
        for secret in spellings(self._credit_pool.value.reveal()):
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", REDACTED, text)
        return text

    def _redact_value(self, value: Any) -> Any:
        """A text, or a tuple of texts, without the key; anything else, and any text without
        the key, is returned as it is (a ``StrEnum`` stays a member)."""
        if isinstance(value, str):
            redacted = self._redact(value)
            return value if redacted == value else redacted
        if isinstance(value, tuple):
            return tuple(self._redact_value(item) for item in value)
        return value

    def _scrub(self, error: KvidError) -> None:
        """Remove the API key from an error, should the server have echoed it back."""
        for name, value in vars(error).items():
            setattr(error, name, self._redact_value(value))
        error.args = self._redact_value(error.args)

    def _scrubbed(self, answer: Answer) -> Answer:
        """A status or result with the key removed from every text the server sent: they go on
        to callbacks, the ledger, catalogs and Dagster metadata."""
        changes = {f.name: self._redact_value(getattr(answer, f.name)) for f in fields(answer)}
        return replace(answer, **changes)

    def _is_own_origin(self, url: httpx.URL) -> bool:
        return _origin(url) == _origin(self._base_url)

    def _strip_foreign_key(self, request: httpx.Request) -> None:
        """Request hook, on every request and redirect hop: the api-key never goes to another
        origin, and nothing is fetched but http(s)."""
        _check_scheme(request.url)
        header = self._dialect.auth_header
        if header in request.headers and not self._is_own_origin(request.url):
            del request.headers[header]

    def _auth_headers(self, url: httpx.URL) -> dict[str, str]:
        if self._is_own_origin(url):
            return {self._dialect.auth_header: self._api_key.reveal()}
        return {}

    # ---- building blocks ---------------------------------------------------------------------

    def _build(self, call: HttpCall) -> httpx.Request:
        # appended, not joined: joining an absolute path would drop a gateway's prefix
        url = self._base_url.copy_with(path=self._base_url.path.rstrip("/") + call.path)
        request: httpx.Request = self._http.build_request(
            call.method,
            url,
            params=dict(call.params),
            json=call.json,
            headers=self._auth_headers(url),
            timeout=self._timeout,
        )
        return request

    def _send(self, call: HttpCall) -> Send:
        return Send(self._build(call), self._call_deadline)

    def _transport_error(self, exc: httpx.RequestError, what: str) -> KvidError:
        text = f"{what}: {type(exc).__name__}: {self._redact(str(exc)) or 'no detail'}"
        if isinstance(exc, httpx.TimeoutException):
            return KvidTimeoutError(text)
        if isinstance(exc, httpx.NetworkError | httpx.ProtocolError | httpx.ProxyError):
            return KvidConnectionError(text)
        return KvidProtocolError(text)  # decoding errors, redirect loops, unsupported schemes

    def _exchange(
        self,
        make_action: Callable[[], Send | Fetch],
        what: str,
        *,
        idempotent: bool,
        deadline: float | None = None,
        body: Mapping[str, Any] | None = None,
        job_kind: JobKind | None = None,
    ) -> Op[httpx.Response]:
        """One call with the retry policy; returns the 2xx response or raises the error."""
        attempt = 0
        while True:
            started = self._clock()
            logger.debug("%s (attempt %d)", what, attempt + 1)
            try:
                response: httpx.Response = yield make_action()
            except httpx.RequestError as exc:
                error = self._transport_error(exc, what)
                sent = not isinstance(exc, NOT_SENT)
            except KvidResponseTooLargeError as exc:
                error, sent = exc, True
            else:
                logger.debug(
                    "%s -> HTTP %d in %.0f ms",
                    what,
                    response.status_code,
                    1000 * (self._clock() - started),
                )
                refusal = self._dialect.error_for(response)
                if refusal is None:
                    return response
                error, sent = refusal, True
            self._scrub(error)
            verdict, delay = self._retry.decide(error, attempt, idempotent=idempotent, sent=sent)
            if verdict is RetryVerdict.UNCERTAIN:
                assert body is not None
                raise KvidUncertainSubmissionError(
                    str(error),
                    body,
                    job_kind=job_kind,
                    status_code=error.status_code,
                    server_message=error.server_message,
                )
            out_of_time = deadline is not None and self._clock() + delay >= deadline
            if verdict is RetryVerdict.RAISE or out_of_time:
                raise error
            attempt += 1
            logger.info(
                "%s failed (%s); retry %d of %d in %.2f s",
                what,
                error,
                attempt,
                self._retry.max_retries,
                delay,
            )
            yield Sleep(delay)

    @staticmethod
    def _job_kind(value: Any) -> JobKind:
        try:
            return JobKind(value)
        except ValueError:
            allowed = ", ".join(kind.value for kind in JobKind)
            raise KvidValidationError("job_kind", value, allowed, problem="is unknown") from None

    # ---- the operations ----------------------------------------------------------------------

    def _generate_op(self, request: KvidRequest) -> Op[str]:
        if not isinstance(request, KvidRequest):
            raise KvidValidationError(
                "request", request, _REQUEST_TYPE_NAMES, problem="has the wrong type"
            )
        if request.dialect is not self._dialect.api:
            raise KvidValidationError(
                "dialect",
                request.dialect.value,
                self._dialect.api.value,
                problem=f"of this {type(request).__name__} is not the client's: it would be "
                f"sent to the {self._dialect.api} dialect's endpoints",
            )
        body = request.to_body()  # what errors show: the credit pool is added to the copy sent
        sent = body if self._credit_pool is None else {**body, **self._credit_pool.body_fields()}
        call = self._dialect.generate_call(request.job_kind, sent)
        what = call.describe()
        response = yield from self._exchange(
            lambda: self._send(call),
            what,
            idempotent=False,
            body=body,
            job_kind=request.job_kind,
        )
        try:
            request_id = self._dialect.parse_generate(response)
        except KvidProtocolError as error:
            # a 2xx means the server took the body: the job probably exists, id unknown
            raise KvidUncertainSubmissionError(
                str(error), body, job_kind=request.job_kind, status_code=response.status_code
            ) from None
        logger.debug("%s -> request_id %s", what, request_id)
        return request_id

    def _status_op(
        self, job_kind: Any, request_id: Any, deadline: float | None = None
    ) -> Op[JobStatus]:
        call = self._dialect.status_call(self._job_kind(job_kind), request_id)
        response = yield from self._exchange(
            lambda: self._send(call), call.describe(), idempotent=True, deadline=deadline
        )
        return self._scrubbed(self._dialect.parse_status(response))

    def _result_op(self, job_kind: Any, request_id: Any) -> Op[JobResult]:
        call = self._dialect.result_call(self._job_kind(job_kind), request_id)
        response = yield from self._exchange(
            lambda: self._send(call), call.describe(), idempotent=True
        )
        result = self._scrubbed(self._dialect.parse_result(response))
        try:
            url = self._download_url(result.url, "url")
        except KvidValidationError:
            raise KvidProtocolError(
                f"{call.describe()}: the result URL {result.url[:200]!r} is not an http(s) URL",
                status_code=response.status_code,
            ) from None
        return replace(result, url=str(url))

    def _wait_op(
        self,
        job_kind: Any,
        request_id: Any,
        poll_interval: float,
        deadline: float,
        on_progress: Callable[[JobStatus], Any] | None,
    ) -> Op[JobStatus]:
        _positive("poll_interval", poll_interval)
        _positive("deadline", deadline)
        give_up_at = self._clock() + deadline
        while True:
            status = yield from self._status_op(job_kind, request_id, give_up_at)
            if on_progress is not None:
                outcome = on_progress(status)
                if inspect.isawaitable(outcome):
                    yield Await(outcome)
            if status.is_completed:
                return status
            if status.ended_without_video:
                raise KvidJobFailedError(
                    request_id,
                    status.reason or f"status {status.status}",
                    status.logs,
                    server_message=status.message,
                )
            remaining = give_up_at - self._clock()
            if remaining <= 0:
                raise KvidTimeoutError(
                    f"kvid job {request_id} not finished after {deadline:g} s "
                    f"(last status {status.status}, progress {status.progress})",
                    request_id=request_id,
                    last_status=status.status,
                )
            yield Sleep(min(poll_interval, remaining))

    def _download_url(self, url: Any, field_name: str) -> httpx.URL:
        """An absolute http(s) URL; a relative one is taken relative to the API's base URL."""
        try:
            parsed = httpx.URL(url) if isinstance(url, str) else None
        except httpx.InvalidURL:
            parsed = None
        if parsed is not None and parsed.is_relative_url and str(parsed).startswith("/"):
            parsed = self._base_url.join(parsed)
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
            raise KvidValidationError(field_name, url, "an http(s) URL", problem="is not usable")
        return parsed

    def _download_op(
        self,
        result_or_url: JobResult | str,
        dest: Any,
        max_bytes: int,
        partial: PartialDownload | None = None,
    ) -> Op[DownloadedFile]:
        _positive("max_bytes", max_bytes, integer=True)
        expected_kb: float | None = None
        if isinstance(result_or_url, JobResult):
            url, name = self._download_url(result_or_url.url, "url"), result_or_url.name
            expected_kb = result_or_url.size_kb
        else:
            url = self._download_url(result_or_url, "result_or_url")
            name = url.path.rsplit("/", 1)[-1]
        sink = DownloadSink(target_path(dest, name), max_bytes, partial)
        what = f"GET {url.copy_with(query=None)}"  # a signed URL's query is a credential too

        def fetch() -> Fetch:
            headers = {**self._auth_headers(url), **sink.resume_headers()}
            request = self._http.build_request("GET", url, headers=headers, timeout=self._timeout)
            return Fetch(request, sink)

        try:
            yield from self._exchange(fetch, what, idempotent=True)
            sink.check_size(expected_kb)
            downloaded = sink.commit()
        except (KvidDownloadTooLargeError, KvidProtocolError):
            sink.forget()  # refused, not cut short: nothing in it is worth continuing
            raise
        finally:
            sink.discard()
        logger.debug("%s -> %s (%d bytes)", what, downloaded.path, downloaded.size_bytes)
        return downloaded


__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_CALL_DEADLINE_S",
    "DEFAULT_MAX_BYTES",
    "MAX_ANSWER_BYTES",
    "Action",
    "AnswerBody",
    "ClientBase",
    "OpRunner",
]
