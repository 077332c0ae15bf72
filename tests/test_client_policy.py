"""Retry policy maths, the wire dialect's reading of responses, errors and import hygiene.

No server is needed: the dialect reads ``httpx.Response`` objects, which are plain data.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvid_dagster.client import (
    DEFAULT_DIALECT,
    KVID_DIALECT,
    AsyncKvidClient,
    JobKind,
    JobState,
    JobStatus,
    KvidAuthenticationError,
    KvidClient,
    KvidConnectionError,
    KvidError,
    KvidNotFoundError,
    KvidNotReadyError,
    KvidProtocolError,
    KvidRateLimitedError,
    KvidServerError,
    KvidTimeoutError,
    KvidUncertainSubmissionError,
    KvidValidationError,
    RetryPolicy,
)
from kvid_dagster.client._ramp import DEFAULT_INITIAL, Exchange, Ramp
from kvid_dagster.client.protocol import parse_retry_after, validate_request_id
from kvid_dagster.client.retry import NOT_SENT, RetryVerdict

REPO = Path(__file__).resolve().parents[1]


# ---- retry policy -----------------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    top = RetryPolicy(max_retries=10, backoff_base=0.5, backoff_max=30.0, random=lambda: 1.0)
    assert [top.backoff(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert top.backoff(10_000) == 30.0  # no overflow however long it goes


def test_backoff_has_full_jitter() -> None:
    half = RetryPolicy(backoff_base=1.0, backoff_max=100.0, random=lambda: 0.5)
    assert half.backoff(3) == 4.0
    zero = RetryPolicy(random=lambda: 0.0)
    assert zero.backoff(5) == 0.0


@given(attempt=st.integers(0, 200), base=st.floats(0, 10), cap=st.floats(0, 100))
def test_real_jitter_stays_in_bounds(attempt: int, base: float, cap: float) -> None:
    delay = RetryPolicy(backoff_base=base, backoff_max=cap).backoff(attempt)
    assert 0.0 <= delay <= min(cap, base * 2.0 ** min(attempt, 64))


def test_retry_after_wins_but_is_capped() -> None:
    policy = RetryPolicy(backoff_max=10.0, random=lambda: 1.0)
    assert policy.delay(KvidRateLimitedError("x", retry_after=3.0), 0) == 3.0
    assert policy.delay(KvidRateLimitedError("x", retry_after=3600.0), 0) == 10.0
    assert policy.delay(KvidRateLimitedError("x", retry_after=None), 2) == 2.0  # backoff
    assert policy.delay(KvidServerError("503", retry_after=1.0, status_code=503), 4) == 1.0
    assert policy.delay(KvidServerError("500", status_code=500), 1) == 1.0  # backoff


READ_ERRORS: list[KvidError] = [
    KvidRateLimitedError("429"),
    KvidServerError("503", status_code=503),
    KvidConnectionError("reset"),
    KvidTimeoutError("read timeout"),
]
FINAL_ERRORS: list[KvidError] = [
    KvidAuthenticationError("401", status_code=401),
    KvidValidationError(None, message="422", status_code=422),
    KvidNotFoundError("404", status_code=404),
    KvidNotReadyError("409", status_code=409),
    KvidProtocolError("garbage", status_code=200),
]


@pytest.mark.parametrize("error", READ_ERRORS)
def test_reads_retry_transient_errors(error: KvidError) -> None:
    assert RetryPolicy.verdict(error, idempotent=True, sent=True) is RetryVerdict.RETRY


@pytest.mark.parametrize("error", FINAL_ERRORS)
def test_reads_raise_final_errors(error: KvidError) -> None:
    assert RetryPolicy.verdict(error, idempotent=True, sent=True) is RetryVerdict.RAISE


@pytest.mark.parametrize(
    ("error", "sent", "verdict"),
    [
        (KvidRateLimitedError("429"), True, RetryVerdict.RETRY),
        (KvidConnectionError("refused"), False, RetryVerdict.RETRY),
        (KvidTimeoutError("connect timeout"), False, RetryVerdict.RETRY),
        (KvidTimeoutError("read timeout"), True, RetryVerdict.UNCERTAIN),
        (KvidConnectionError("reset after send"), True, RetryVerdict.UNCERTAIN),
        (KvidServerError("500", status_code=500), True, RetryVerdict.UNCERTAIN),
        (KvidServerError("503", status_code=503), True, RetryVerdict.UNCERTAIN),
        (KvidProtocolError("302?", status_code=302), True, RetryVerdict.UNCERTAIN),
        (KvidValidationError(None, message="422", status_code=422), True, RetryVerdict.RAISE),
        (KvidAuthenticationError("401", status_code=401), True, RetryVerdict.RAISE),
        (KvidTimeoutError("408", status_code=408), True, RetryVerdict.RAISE),
        (KvidProtocolError("unsupported scheme"), False, RetryVerdict.RAISE),
    ],
)
def test_generate_is_retried_only_when_no_job_can_exist(
    error: KvidError, sent: bool, verdict: RetryVerdict
) -> None:
    assert RetryPolicy.verdict(error, idempotent=False, sent=sent) is verdict


def test_retries_are_bounded_by_max_retries() -> None:
    policy = RetryPolicy(max_retries=2, random=lambda: 1.0)
    error = KvidServerError("503", status_code=503)
    assert policy.decide(error, 0, idempotent=True, sent=True) == (RetryVerdict.RETRY, 0.5)
    assert policy.decide(error, 1, idempotent=True, sent=True) == (RetryVerdict.RETRY, 1.0)
    assert policy.decide(error, 2, idempotent=True, sent=True) == (RetryVerdict.RAISE, 0.0)
    assert RetryPolicy(max_retries=0).decide(error, 0, idempotent=True, sent=True)[0] is (
        RetryVerdict.RAISE
    )


def test_only_pre_send_transport_errors_count_as_unsent() -> None:
    for cls in (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
        assert issubclass(cls, NOT_SENT)
    for cls in (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError):
        assert not issubclass(cls, NOT_SENT)
    assert not issubclass(httpx.RemoteProtocolError, NOT_SENT)


# ---- the in-flight ramp -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


CONNECT = "connection.connect_tcp.started"
SEND = "http11.send_request_headers.started"
ANSWER = "http11.receive_response_headers.complete"


class Client:
    """The ramp as a client twin drives it (a window semaphore, a connect semaphore) against a
    model of httpx's pool: a request takes an idle kept-alive connection, else opens one."""

    def __init__(self, ramp: Ramp, clock: Clock | None = None, idle: float = 5.0) -> None:
        self.ramp = ramp
        self.clock, self.expiry = clock, idle
        self.quiet_since = -math.inf
        self.free = ramp.permits  # the window semaphore
        self.connect_free = ramp.connect_permits  # the connect semaphore
        self.idle = 0  # the pool's idle connections
        self.running: list[Exchange] = []
        self.opened = 0  # connections ever opened
        self.stuck = 0  # requests that had to wait for a connect permit on a new connection

    def take(self) -> bool:
        """Start a request if the window lets one go (False: it would wait)."""
        while self.free:
            self.free -= 1
            exchange = self.ramp.start()
            if exchange is not None:
                break
        else:
            return False
        if self.clock and not self.running and self.clock.now - self.quiet_since > self.expiry:
            self.idle = 0  # all idle longer than the keep-alive expiry: the pool closed them
        if self.idle:
            self.idle -= 1
        else:
            assert self.ramp.event(exchange, CONNECT) == 1
            if not self.connect_free:  # committed to a new connection, yet cannot open it
                self.stuck += 1
                self.connect_free += 1  # (let it through, so the model can go on)
            self.connect_free -= 1
            self.ramp.opening(exchange)
            self.opened += 1
        assert self.ramp.event(exchange, SEND) == 0
        self.running.append(exchange)
        assert self.ramp.connections == self.idle + len(self.running)  # counted right
        return True

    def fill(self) -> int:
        started = 0
        while self.take():
            started += 1
        return started

    def answer(self) -> int:
        """The oldest request gets its answer; returns the window permits released."""
        exchange = self.running.pop(0)
        if self.ramp.event(exchange, ANSWER) == -1:
            self.connect_free += 1
        return self._end(exchange, None, keep_connection=True)

    def fail(self, error: BaseException) -> int:
        """The oldest request fails; the pool drops its connection."""
        return self._end(self.running.pop(0), error, keep_connection=False)

    def _end(self, exchange: Exchange, error: BaseException | None, keep_connection: bool) -> int:
        self.connect_free += exchange.held
        released = self.ramp.done(exchange, error)
        self.free += released
        self.idle += keep_connection
        if not self.running and self.clock:
            self.quiet_since = self.clock.now
        return released

    def burst(self) -> int:
        started = self.fill()
        for _ in range(started):
            self.answer()
        return started


def test_the_ramp_starts_small_grows_per_answer_and_halves_on_overload() -> None:
    client = Client(Ramp(8, clock=Clock()))
    ramp = client.ramp
    assert (ramp.initial, ramp.limit, ramp.permits, ramp.in_flight) == (DEFAULT_INITIAL, 2, 2, 0)
    assert client.fill() == 2 and client.opened == 2 and ramp.unanswered == 2  # two at first
    # an answer (a 4xx too: the dialect, not the ramp, judges it) widens the window by one:
    # the returned permit and a new one are released
    assert client.answer() == 2 and ramp.limit == 3 == ramp.permits
    assert client.fill() == 2 and client.opened == 3  # one reuses the answered connection
    while ramp.limit < 8:  # up to the ceiling, and no further
        client.answer()
        client.fill()
    assert ramp.in_flight == 8 and ramp.connections == 8
    assert client.answer() == 1 and ramp.limit == 8 and client.take()
    # an overload halves the window; the permits above it are destroyed as they come back
    assert client.fail(httpx.ReadError("connection reset by peer")) == 0
    assert (ramp.limit, ramp.permits, ramp.in_flight, ramp.connections) == (4, 7, 7, 7)
    assert client.fail(httpx.ConnectError("refused")) == 0 and ramp.limit == 2
    assert client.fail(httpx.RemoteProtocolError("closed")) == 0 and ramp.limit == 1
    assert client.fail(httpx.ConnectTimeout("syn lost")) == 0 and ramp.limit == 1  # not below
    assert client.fail(httpx.ReadTimeout("slow")) == 0 and ramp.limit == 1
    # failures that say nothing about the server leave the window alone
    for neutral in (httpx.PoolTimeout("ours"), ValueError("sink"), asyncio.CancelledError()):
        client.fail(neutral)
        assert ramp.limit == 1
    assert (ramp.in_flight, ramp.permits, client.free) == (0, 1, 1)  # the last one is kept
    assert client.fill() == 1  # one at a time now
    assert client.answer() == 2 and ramp.limit == 2 == ramp.permits  # and opening again
    assert client.stuck == 0


def test_at_most_two_connections_await_their_first_answer() -> None:
    # all a full accept queue can hold against one client, however answers bunch up
    client = Client(Ramp(32, clock=Clock()))
    ramp = client.ramp
    assert [client.burst() for _ in range(5)] == [2, 4, 6, 8, 10]  # two new ones each time
    peak = 0
    client.fill()
    for _ in range(300):  # a pipeline kept full, answered oldest first
        client.answer()
        client.fill()
        peak = max(peak, ramp.unanswered)
    assert peak == DEFAULT_INITIAL
    assert ramp.in_flight == ramp.limit == 32 == client.opened  # it does get to the ceiling
    assert client.stuck == 0  # and never let in a request that had to wait to connect
    for _ in range(32):
        client.answer()
    assert client.fill() == 32 and client.opened == 32  # all kept alive: reused


def test_after_a_quiet_spell_the_ramp_starts_over() -> None:
    clock = Clock()
    client = Client(Ramp(16, idle=5.0, clock=clock), clock)
    while client.burst() < 16:
        pass
    clock.now += 4.0  # within the pool's keep-alive expiry: all sixteen are still open
    assert client.burst() == 16 and client.opened == 16
    clock.now += 5.5  # expired: the pool has closed them all
    assert client.fill() == 2 and client.ramp.unanswered == 2  # two new connections at first
    assert client.stuck == 0
    never = Client(Ramp(4, idle=None, clock=clock))  # no expiry: nothing is forgotten
    while never.burst() < 4:
        pass
    clock.now += 3600.0
    assert never.burst() == 4 and never.opened == 4


def test_failed_requests_take_their_connections_with_them() -> None:
    client = Client(Ramp(8, clock=Clock()))
    while client.burst() < 8:
        pass
    assert client.ramp.connections == 8
    client.fill()
    for _ in range(3):
        client.fail(httpx.ReadError("reset"))
    assert client.ramp.connections == 5 and client.ramp.limit == 1
    # a request cancelled while it waited for a connect permit had no connection yet
    waiting = Ramp(4)
    exchange = waiting.start()
    assert exchange is not None and waiting.event(exchange, CONNECT) == 1
    waiting.done(exchange, asyncio.CancelledError())
    assert (waiting.connections, waiting.unanswered, waiting.limit) == (0, 0, 2)


def test_the_ramp_reads_the_trace_events_it_needs() -> None:
    ramp = Ramp(4)
    exchange = ramp.start()
    assert exchange is not None
    assert ramp.event(exchange, "connection.connect_tcp.started") == 1
    assert ramp.event(exchange, "connection.connect_unix_socket.started") == 1
    assert ramp.event(exchange, "http11.receive_response_headers.complete") == 0  # none held
    ramp.opening(exchange)
    assert (exchange.held, ramp.unanswered, ramp.connections) == (1, 1, 1)
    for quiet in ("connection.connect_tcp.complete", "http11.send_request_body.started"):
        assert ramp.event(exchange, quiet) == 0
    assert ramp.event(exchange, "http11.send_request_headers.started") == 0
    assert exchange.on_connection
    assert ramp.event(exchange, "http11.receive_response_headers.complete") == -1
    assert (exchange.held, ramp.unanswered) == (0, 0)
    assert ramp.done(exchange) == 2


def test_without_trace_events_the_window_alone_applies() -> None:
    ramp = Ramp(8)  # a transport with no connections to tell of (httpx.MockTransport)
    free, running = ramp.permits, []
    for _ in range(12):
        while free:
            free -= 1
            exchange = ramp.start()
            if exchange is not None:
                running.append(exchange)
        free += ramp.done(running.pop(0))
    assert ramp.limit == 8 and ramp.connections == 0


def test_the_ramp_never_exceeds_a_ceiling_below_its_initial_value() -> None:
    ramp = Ramp(1)
    assert ramp.limit == ramp.permits == ramp.connect_permits == 1
    exchange = ramp.start()
    assert exchange is not None and ramp.done(exchange) == 1 and ramp.limit == 1
    with pytest.raises(ValueError):
        Ramp(0)


class RampMachine(RuleBasedStateMachine):
    """The ramp, its semaphores and a model pool under any order of events."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.client = Client(Ramp(7, idle=5.0, clock=self.clock), self.clock)

    @rule()
    def start(self) -> None:
        self.client.take()

    @rule()
    def answer(self) -> None:
        if self.client.running:
            before = self.client.ramp.limit
            self.client.answer()
            assert before <= self.client.ramp.limit <= min(7, before + 1)

    @rule(error=st.sampled_from([httpx.ReadError("reset"), ValueError("ours")]))
    def fail(self, error: BaseException) -> None:
        if self.client.running:
            before = self.client.ramp.limit
            self.client.fail(error)
            overload = isinstance(error, httpx.ReadError)
            assert self.client.ramp.limit == (max(1, before // 2) if overload else before)

    @rule(seconds=st.sampled_from([0.1, 3.0, 6.0]))
    def wait(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def consistent(self) -> None:
        client, ramp = self.client, self.client.ramp
        assert 1 <= ramp.limit <= 7 and ramp.permits <= 7
        assert ramp.in_flight == len(client.running) and client.free >= 0
        assert ramp.permits == client.free + ramp.in_flight
        assert 0 <= ramp.unanswered == sum(e.held for e in client.running) <= DEFAULT_INITIAL
        assert client.connect_free == ramp.connect_permits - ramp.unanswered
        assert ramp.connections >= len(client.running)
        assert client.stuck == 0
        if not client.running:
            assert client.free >= 1  # never stuck: something can always start


TestRampMachine = RampMachine.TestCase


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_retries": -1},
        {"max_retries": True},
        {"backoff_base": -0.1},
        {"backoff_max": float("inf")},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(KvidValidationError):
        RetryPolicy(**kwargs)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("-2", 0.0),
        ("soon", None),
        ("", None),
        ("nan", None),
        ("inf", None),
        (None, None),
        ("Wed, 21 Oct 2015 07:28:00", None),  # a date without a zone means nothing
    ],
)
def test_retry_after_parsing_tolerates_garbage(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_retry_after_http_date() -> None:
    now = time.time()
    header = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(header, now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0


# ---- the dialect ------------------------------------------------------------------------------


def _response(
    status: int, *, json: Any = None, content: bytes | None = None, **kw: Any
) -> httpx.Response:
    request = httpx.Request("GET", "http://kvid.test/ai/video/text-to-video/status?request_id=r1")
    if content is not None:
        return httpx.Response(status, content=content, request=request, **kw)
    return httpx.Response(status, json=json, request=request, **kw)


def test_calls_follow_the_contract_paths() -> None:
    generate = KVID_DIALECT.generate_call(JobKind.IMAGE_TO_VIDEO, {"prompt": "x"})
    assert (generate.method, generate.path) == ("POST", "/ai/video/image-to-video/generate")
    assert generate.json == {"prompt": "x"}
    status = KVID_DIALECT.status_call(JobKind.TEXT_TO_VIDEO, "req_1")
    assert (status.method, status.path, dict(status.params)) == (
        "GET",
        "/ai/video/text-to-video/status",
        {"request_id": "req_1"},
    )
    result = KVID_DIALECT.result_call(JobKind.IMAGE_TO_VIDEO, "req_2")
    assert result.describe() == "GET /ai/video/image-to-video/result?request_id=req_2"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (401, KvidAuthenticationError),
        (403, KvidAuthenticationError),
        (422, KvidValidationError),
        (404, KvidNotFoundError),
        (409, KvidNotReadyError),
        (429, KvidRateLimitedError),
        (500, KvidServerError),
        (502, KvidServerError),
        (503, KvidServerError),
        (504, KvidServerError),
        (418, KvidProtocolError),
    ],
)
def test_http_errors_map_to_the_hierarchy(status: int, cls: type[KvidError]) -> None:
    body = {"success": False, "data": None, "message": "num_frames: out of range"}
    error = KVID_DIALECT.error_for(_response(status, json=body))
    assert type(error) is cls
    assert error.status_code == status
    assert error.server_message == "num_frames: out of range"
    assert "num_frames: out of range" in str(error) and str(status) in str(error)


def test_success_is_not_an_error() -> None:
    assert KVID_DIALECT.error_for(_response(200, json={"success": True, "data": {}})) is None


def test_429_reads_retry_after_and_tolerates_garbage() -> None:
    limited = KVID_DIALECT.error_for(_response(429, json={}, headers={"Retry-After": "7"}))
    assert isinstance(limited, KvidRateLimitedError) and limited.retry_after == 7.0
    garbage = KVID_DIALECT.error_for(
        _response(429, content=b"slow down", headers={"Retry-After": "x"})
    )
    assert isinstance(garbage, KvidRateLimitedError) and garbage.retry_after is None


def test_503_may_carry_retry_after() -> None:
    error = KVID_DIALECT.error_for(_response(503, json={}, headers={"Retry-After": "2"}))
    assert isinstance(error, KvidServerError) and error.retry_after == 2.0


def test_non_json_5xx_is_a_server_error_with_a_snippet() -> None:
    error = KVID_DIALECT.error_for(_response(502, content=b"<html><h1>Bad Gateway</h1></html>"))
    assert isinstance(error, KvidServerError) and error.server_message is None
    assert "Bad Gateway" in str(error)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "not JSON"),
        (b'["a list"]', "no response envelope"),
        (b'{"data": {"status": "COMPLETED"}}', "no response envelope"),
        (b'{"success": false, "data": null, "message": "nope"}', "success=false: nope"),
        (b'{"success": true, "data": null}', "no data object"),
        (b'{"success": true, "data": {"progress": 5}}', "data.status is missing"),
        (b'{"success": true, "data": {"status": 3}}', "data.status is 3"),
        (b'{"success": true, "data": {"status": "X", "logs": "a line"}}', "data.logs"),
        (b'{"success": true, "data": {"status": "X", "logs": [1]}}', "data.logs"),
    ],
)
def test_status_answers_outside_the_contract_are_protocol_errors(
    payload: bytes, fragment: str
) -> None:
    with pytest.raises(KvidProtocolError) as caught:
        KVID_DIALECT.parse_status(_response(200, content=payload))
    assert fragment in str(caught.value)


_NO_PROGRESS = object()


@pytest.mark.parametrize(
    ("sent", "read"),
    [
        (_NO_PROGRESS, None),
        (None, None),
        (45, 45.0),
        (12.5, 12.5),
        ("12", 12.0),
        (" 7.5% ", 7.5),
        ("soon", None),
        ("nan", None),
        (10**400, None),
        (True, None),
        ({"pct": 3}, None),
    ],
)
def test_progress_may_be_missing_null_fractional_or_a_string(sent: Any, read: float | None) -> None:
    """Progress only informs: an odd value must not fail the poll of a job already paid for."""
    data: dict[str, Any] = {"status": "PROCESSING"}
    if sent is not _NO_PROGRESS:
        data["progress"] = sent
    status = KVID_DIALECT.parse_status(_response(200, json={"success": True, "data": data}))
    assert status.progress == read and (read is None or type(status.progress) is float)
    assert JobStatus("PROCESSING", progress=sent if sent is not _NO_PROGRESS else None) == status


@pytest.mark.parametrize("word", ["PROCESSING", "IN_QUEUE", "PENDING", "queued", "SOMETHING_NEW"])
def test_unknown_statuses_mean_still_running(word: str) -> None:
    status = KVID_DIALECT.parse_status(
        _response(200, json={"success": True, "data": {"status": word, "progress": 10}})
    )
    assert status.state is JobState.RUNNING and not status.is_terminal
    assert status.status == word and status.progress == 10 and status.logs == ()


def test_terminal_statuses() -> None:
    payload = {
        "success": True,
        "data": {"status": "FAILED", "progress": 100, "logs": ["started", "GPU on fire"]},
        "message": "",
    }
    failed = KVID_DIALECT.parse_status(_response(200, json=payload))
    assert failed.is_terminal and failed.is_failed and not failed.is_completed
    assert failed.reason == "GPU on fire"  # no message: the last log line
    assert JobStatus("FAILED", message="quota exceeded", logs=("x",)).reason == "quota exceeded"
    assert JobStatus("COMPLETED").is_completed and JobStatus("COMPLETED").is_terminal
    assert JobStatus("IN_QUEUE").state is JobState.RUNNING


@pytest.mark.parametrize("word", ["COMPLETED", "FAILED", "IN_QUEUE", "completed", "canceled"])
def test_a_status_built_by_hand_reads_the_default_dialects_words(word: str) -> None:
    """``results`` holds the default dialect's words (it does not import ``protocol``): a
    ``JobStatus`` built by hand reads them as ``DEFAULT_DIALECT`` does."""
    assert JobStatus(word).state is DEFAULT_DIALECT.classify_status(word)


def test_generate_and_result_parsing() -> None:
    generated = {"success": True, "data": {"request_id": "req_12345abcdef"}, "message": "ok"}
    assert KVID_DIALECT.parse_generate(_response(200, json=generated)) == "req_12345abcdef"
    bad_id = {"success": True, "data": {"request_id": "../../etc"}}
    with pytest.raises(KvidProtocolError, match="request_id"):
        KVID_DIALECT.parse_generate(_response(200, json=bad_id))
    result = KVID_DIALECT.parse_result(
        _response(
            200,
            json={
                "success": True,
                "data": {"url": "https://s/v.mp4", "name": "a.mp4", "size": 15420},
            },
        )
    )
    assert (result.url, result.name, result.size_kb) == ("https://s/v.mp4", "a.mp4", 15420)
    unnamed = KVID_DIALECT.parse_result(
        _response(200, json={"success": True, "data": {"url": "https://s/x/r1.mp4"}})
    )
    assert unnamed.name == "r1.mp4" and unnamed.size_kb is None
    for data in ({"name": "a.mp4"}, {"url": "https://s/v.mp4", "size": "big"}):
        with pytest.raises(KvidProtocolError):
            KVID_DIALECT.parse_result(_response(200, json={"success": True, "data": data}))


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "x y", "x?y=1", "r" * 257, None, 5, "é"])
def test_request_ids_are_validated(bad: Any) -> None:
    with pytest.raises(KvidValidationError) as caught:
        validate_request_id(bad)
    assert caught.value.field == "request_id"


def test_plausible_request_ids_pass() -> None:
    for good in ("req_12345abcdef", "a", "job-1.2:3", "0" * 256):
        assert validate_request_id(good) == good


# ---- errors and secrets -----------------------------------------------------------------------


def test_uncertain_submission_abbreviates_but_keeps_the_body() -> None:
    body = {"prompt": "p", "image_file": "A" * 100_000}
    error = KvidUncertainSubmissionError("ReadTimeout", body, job_kind="image-to-video")
    assert len(str(error)) < 1000 and "<100000 chars>" in str(error)
    assert error.body == body and error.body is not body
    assert error.job_kind == "image-to-video" and "ReadTimeout" in str(error)


def test_client_reprs_and_state_hide_the_key() -> None:
    key = "sk-very-secret-123"
    client = KvidClient(key, "http://127.0.0.1:9")
    aclient = AsyncKvidClient(key, "http://127.0.0.1:9")
    try:
        for obj in (client, aclient):
            assert key not in repr(obj) and "***" in repr(obj)
            assert key not in repr(vars(obj)) and key not in str(vars(obj))
    finally:
        client.close()


@pytest.mark.parametrize("key", ["", "   ", "with space", "line\nbreak", None])
def test_bad_keys_are_refused_without_echoing_them(key: Any) -> None:
    with pytest.raises(KvidValidationError) as caught:
        KvidClient(key)
    assert caught.value.field == "api_key"
    if key and key.strip():
        assert key not in str(caught.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "ftp://kvid.test"},
        {"base_url": "kvid.test"},
        {"timeout": 0},
        {"max_in_flight": 0},
        {"max_in_flight": 2.5},
        {"max_retries": -1},
    ],
)
def test_bad_client_options_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(KvidValidationError):
        KvidClient("key", **kwargs)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_importing_the_client_does_not_import_dagster() -> None:
    done = _python(
        "import sys\n"
        "import kvid_dagster.client\n"
        "from kvid_dagster.client import *\n"
        "assert 'dagster' not in sys.modules, 'dagster imported'\n"
        "import kvid_dagster.client as c\n"
        "missing = [n for n in c.__all__ if n not in globals()]\n"
        "assert not missing, missing\n"
        "print(len(c.__all__))\n"
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 30
