"""Retry policy maths, the wire dialect's reading of responses, errors and import hygiene.

No server is needed: the dialect reads ``httpx.Response`` objects, which are plain data.
"""

from __future__ import annotations

import email.utils
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

from kvid_dagster.client import (
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
from kvid_dagster.client.protocol import parse_retry_after, validate_request_id
from kvid_dagster.client.retry import NOT_SENT, Verdict

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
    assert RetryPolicy.verdict(error, idempotent=True, sent=True) is Verdict.RETRY


@pytest.mark.parametrize("error", FINAL_ERRORS)
def test_reads_raise_final_errors(error: KvidError) -> None:
    assert RetryPolicy.verdict(error, idempotent=True, sent=True) is Verdict.RAISE


@pytest.mark.parametrize(
    ("error", "sent", "verdict"),
    [
        (KvidRateLimitedError("429"), True, Verdict.RETRY),
        (KvidConnectionError("refused"), False, Verdict.RETRY),
        (KvidTimeoutError("connect timeout"), False, Verdict.RETRY),
        (KvidTimeoutError("read timeout"), True, Verdict.UNCERTAIN),
        (KvidConnectionError("reset after send"), True, Verdict.UNCERTAIN),
        (KvidServerError("500", status_code=500), True, Verdict.UNCERTAIN),
        (KvidServerError("503", status_code=503), True, Verdict.UNCERTAIN),
        (KvidProtocolError("302?", status_code=302), True, Verdict.UNCERTAIN),
        (KvidValidationError(None, message="422", status_code=422), True, Verdict.RAISE),
        (KvidAuthenticationError("401", status_code=401), True, Verdict.RAISE),
        (KvidTimeoutError("408", status_code=408), True, Verdict.RAISE),
        (KvidProtocolError("unsupported scheme"), False, Verdict.RAISE),
    ],
)
def test_generate_is_retried_only_when_no_job_can_exist(
    error: KvidError, sent: bool, verdict: Verdict
) -> None:
    assert RetryPolicy.verdict(error, idempotent=False, sent=sent) is verdict


def test_retries_are_bounded_by_max_retries() -> None:
    policy = RetryPolicy(max_retries=2, random=lambda: 1.0)
    error = KvidServerError("503", status_code=503)
    assert policy.decide(error, 0, idempotent=True, sent=True) == (Verdict.RETRY, 0.5)
    assert policy.decide(error, 1, idempotent=True, sent=True) == (Verdict.RETRY, 1.0)
    assert policy.decide(error, 2, idempotent=True, sent=True) == (Verdict.RAISE, 0.0)
    assert RetryPolicy(max_retries=0).decide(error, 0, idempotent=True, sent=True)[0] is (
        Verdict.RAISE
    )


def test_only_pre_send_transport_errors_count_as_unsent() -> None:
    for cls in (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
        assert issubclass(cls, NOT_SENT)
    for cls in (httpx.ReadTimeout, httpx.WriteTimeout, httpx.ReadError, httpx.WriteError):
        assert not issubclass(cls, NOT_SENT)
    assert not issubclass(httpx.RemoteProtocolError, NOT_SENT)


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
        (b'{"success": true, "data": {"status": "X", "progress": "5%"}}', "data.progress"),
        (b'{"success": true, "data": {"status": "X", "progress": true}}', "data.progress"),
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
