"""The wire dialect: the ONLY module that knows paths, the ``request_id`` query parameter, the
response envelope, the status vocabulary and what each HTTP status means.

It is sans-I/O: it builds ``HttpCall`` descriptions and reads ``httpx.Response`` objects that
someone else sent and received, so the sync and async clients share every byte of it. Two
dialects: ``KvidDialect`` (the seed page's ``/ai/video/...`` with ``request_id``) and
``GenerationDialect`` (the vendor's current ``/ai/generation/...`` with ``jobId``, lowercase
statuses and coded errors); ``dialect_for`` picks one by name. Nothing else in the client knows
which it speaks.
"""

from __future__ import annotations

import json
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._fields import ApiDialect, JobKind, check_job_kind, parse_dialect
from .errors import (
    KvidAuthenticationError,
    KvidConcurrentLimitError,
    KvidError,
    KvidInsufficientCreditError,
    KvidJobFailedError,
    KvidNotFoundError,
    KvidNotReadyError,
    KvidProtocolError,
    KvidRateLimitedError,
    KvidServerError,
    KvidTimeoutError,
    KvidValidationError,
)
from .generation_requests import GENERATION_FIELDS
from .results import VIDEO_TERMINAL_STATES, JobResult, JobState, JobStatus, as_progress

__all__ = [
    "DEFAULT_DIALECT",
    "GENERATION_DIALECT",
    "KVID_DIALECT",
    "ErrorCode",
    "GenerationDialect",
    "HttpCall",
    "KvidDialect",
    "WireDialect",
    "dialect_for",
    "parse_retry_after",
    "validate_request_id",
    "where",
]

_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")


def validate_request_id(value: Any, *, field_name: str = "request_id") -> str:
    """A request_id goes into a URL: refuse anything that is not a plain token."""
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise KvidValidationError(
            field_name,
            value,
            "1–256 characters of letters, digits, '.', '_', ':', '-'",
            problem="is not a valid request id",
        )
    return value


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None for garbage."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class HttpCall:
    """One API request, described without doing it."""

    endpoint: str  # "generate" | "status" | "result": for logs and messages
    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    json: Mapping[str, Any] | None = None

    def describe(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method} {self.path}" + (f"?{query}" if query else "")


def _snippet(response: httpx.Response, limit: int = 200) -> str:
    text = response.content[: limit * 4].decode("utf-8", errors="replace").strip()
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")


def where(response: httpx.Response) -> str:
    """ "HTTP 500 for POST /path": an answer, for messages."""
    try:
        request = response.request
    except RuntimeError:  # a Response built without a request
        return f"HTTP {response.status_code}"
    # the path only: a storage URL's query may hold a signature
    return f"HTTP {response.status_code} for {request.method} {request.url.path}"


class WireDialect(ABC):
    """What a kvid API dialect must provide on the wire (paths, envelope, vocabulary; the
    ``ApiDialect`` enum only names one). Methods never do I/O."""

    name: str
    api: ApiDialect  # what requests for this dialect say they are (``request.dialect``)
    auth_header: str

    @abstractmethod
    def generate_call(self, job_kind: JobKind, body: Mapping[str, Any]) -> HttpCall: ...

    @abstractmethod
    def status_call(self, job_kind: JobKind, request_id: str) -> HttpCall: ...

    @abstractmethod
    def result_call(self, job_kind: JobKind, request_id: str) -> HttpCall: ...

    @abstractmethod
    def error_for(self, response: httpx.Response) -> KvidError | None:
        """The error a response means, or None when it is a success."""

    @abstractmethod
    def parse_generate(self, response: httpx.Response) -> str: ...

    @abstractmethod
    def parse_status(self, response: httpx.Response) -> JobStatus: ...

    @abstractmethod
    def parse_result(self, response: httpx.Response) -> JobResult: ...

    @abstractmethod
    def classify_status(self, status: str) -> JobState: ...


# ---- what both dialects share: the envelope and the meaning of an HTTP status ----------------


def _json(response: httpx.Response) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _error_by_status(
    response: httpx.Response, message: str | None, *, field_name: str | None = None
) -> KvidError:
    """The error an HTTP status means by itself (``message``: the server's, for the text)."""
    code = response.status_code
    detail = message if message is not None else _snippet(response) or "(empty body)"
    text = f"{where(response)}: {detail}"
    common: dict[str, Any] = {"status_code": code, "server_message": message}
    if code in (401, 403):
        return KvidAuthenticationError(text, **common)
    if code in (400, 422):
        return KvidValidationError(field_name, message=text, **common)
    if code == 404:
        return KvidNotFoundError(text, **common)
    if code == 409:
        return KvidNotReadyError(text, **common)
    if code == 408:
        return KvidTimeoutError(text, **common)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if code == 429:
        return KvidRateLimitedError(text, retry_after=retry_after, **common)
    if 500 <= code < 600:  # a 503 may say when to come back, too
        return KvidServerError(text, retry_after=retry_after, **common)
    return KvidProtocolError(f"unexpected {text}", **common)


def _envelope(response: httpx.Response) -> tuple[dict[str, Any], str | None]:
    """The envelope's ``data`` and ``message`` of a 2xx answer, or a protocol error."""
    place = where(response)
    try:
        payload = json.loads(response.content)
    except ValueError:
        raise KvidProtocolError(
            f"{place}: the body is not JSON: {_snippet(response)!r}",
            status_code=response.status_code,
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("success"), bool):
        raise KvidProtocolError(
            f"{place}: no response envelope: {_snippet(response)!r}",
            status_code=response.status_code,
        )
    message = payload.get("message") if isinstance(payload.get("message"), str) else None
    if payload["success"] is not True:
        raise KvidProtocolError(
            f"{place}: success=false: {message}",
            status_code=response.status_code,
            server_message=message,
        )
    data = payload.get("data")
    if not isinstance(data, dict):
        raise KvidProtocolError(
            f"{place}: the envelope has no data object",
            status_code=response.status_code,
            server_message=message,
        )
    return data, message


def _field_error(response: httpx.Response, name: str, value: Any, want: str) -> KvidError:
    return KvidProtocolError(
        f"{where(response)}: data.{name} is {'missing' if value is None else repr(value)[:80]}"
        f" (expected {want})",
        status_code=response.status_code,
    )


def _parse_id(response: httpx.Response, data: Mapping[str, Any], *names: str) -> str:
    """The job's id from a generate answer: the first of ``names`` that is there."""
    value = next((data[name] for name in names if data.get(name) is not None), None)
    try:
        return validate_request_id(value)
    except KvidValidationError:
        raise _field_error(response, names[0], value, "an id") from None


def _file_name(name: Any, url: str) -> str | None:
    """The result's file name: the server's, else the URL's last segment (None: not a str)."""
    if name is None:
        return PurePosixPath(urlsplit(url).path).name or "video.mp4"
    return name if isinstance(name, str) else None


# ---- the video dialect (the seed page) -------------------------------------------------------


class KvidDialect(WireDialect):
    """The API of ``shared/kvid-api.md``: ``/ai/video/<kind>/{generate,status,result}``."""

    name = "kvid-video-v1"
    api = ApiDialect.VIDEO
    auth_header = "api-key"
    id_param = "request_id"
    _prefixes: Mapping[JobKind, str] = {
        JobKind.TEXT_TO_VIDEO: "/ai/video/text-to-video",
        JobKind.IMAGE_TO_VIDEO: "/ai/video/image-to-video",
    }
    _terminal: Mapping[str, JobState] = VIDEO_TERMINAL_STATES

    # ---- requests ------------------------------------------------------------------------

    def _prefix(self, job_kind: JobKind) -> str:
        # reference-to-video exists in the generation dialect only: refused before any I/O
        return self._prefixes[check_job_kind("job", job_kind, self.api)]

    def generate_call(self, job_kind: JobKind, body: Mapping[str, Any]) -> HttpCall:
        return HttpCall("generate", "POST", f"{self._prefix(job_kind)}/generate", json=body)

    def status_call(self, job_kind: JobKind, request_id: str) -> HttpCall:
        path = f"{self._prefix(job_kind)}/status"
        return HttpCall("status", "GET", path, {self.id_param: validate_request_id(request_id)})

    def result_call(self, job_kind: JobKind, request_id: str) -> HttpCall:
        path = f"{self._prefix(job_kind)}/result"
        return HttpCall("result", "GET", path, {self.id_param: validate_request_id(request_id)})

    def classify_status(self, status: str) -> JobState:
        # the page is silent about queued states: anything else is "not finished yet"
        return self._terminal.get(status, JobState.RUNNING)

    # ---- responses -----------------------------------------------------------------------

    def error_for(self, response: httpx.Response) -> KvidError | None:
        if 200 <= response.status_code < 300:
            return None
        payload = _json(response)
        message = payload.get("message") if isinstance(payload, dict) else None
        return _error_by_status(response, message if isinstance(message, str) else None)

    def parse_generate(self, response: httpx.Response) -> str:
        data, _ = _envelope(response)
        return _parse_id(response, data, self.id_param)

    def parse_status(self, response: httpx.Response) -> JobStatus:
        data, message = _envelope(response)
        status = data.get("status")
        if not isinstance(status, str) or not status:
            raise _field_error(response, "status", status, "a string")
        logs = data.get("logs")
        if logs is None:
            logs = []
        if not isinstance(logs, list) or not all(isinstance(line, str) for line in logs):
            raise _field_error(response, "logs", logs, "a list of strings")
        return JobStatus(
            status=status,
            progress=as_progress(data.get("progress")),  # missing, null, "12", 12.5: all fine
            logs=tuple(logs),
            message=message,
            state=self.classify_status(status),
        )

    def parse_result(self, response: httpx.Response) -> JobResult:
        data, _ = _envelope(response)
        url = data.get("url")
        if not isinstance(url, str) or not url.strip():
            raise _field_error(response, "url", url, "a URL")
        name = _file_name(data.get("name"), url)
        if name is None:
            raise _field_error(response, "name", data.get("name"), "a string")
        size = data.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | float)):
            raise _field_error(response, "size", size, "a number of kilobytes")
        return JobResult(url=url, name=name, size_kb=size)


# ---- the generation dialect (the vendor's current English page) ------------------------------


class ErrorCode(StrEnum):
    """The generation dialect's error codes (``shared/kvid-api.md``, its error table)."""

    MISSING_PARAMETERS = "MISSING_PARAMETERS"
    INVALID_PARAMETERS = "INVALID_PARAMETERS"
    INSUFFICIENT_CREDIT = "INSUFFICIENT_CREDIT"
    CONCURRENT_LIMIT = "CONCURRENT_LIMIT"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    JOB_NOT_COMPLETED = "JOB_NOT_COMPLETED"
    JOB_FAILED = "JOB_FAILED"


def _error_code(payload: Any, message: str | None) -> ErrorCode | None:
    """The code of an error body, wherever this server put it: ``code``, ``error.code``,
    ``error`` (a string), ``data.code``; failing those, a code spelled out in the message."""
    candidates: list[Any] = []
    if isinstance(payload, dict):
        error, data = payload.get("error"), payload.get("data")
        candidates.append(payload.get("code"))
        candidates.append(error.get("code") if isinstance(error, dict) else error)
        candidates.append(data.get("code") if isinstance(data, dict) else None)
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip().upper() in set(ErrorCode):
            return ErrorCode(candidate.strip().upper())
    if message is not None:
        for code in ErrorCode:
            if re.search(rf"\b{code.value}\b", message):
                return code
    return None


def _error_message(payload: Any) -> str | None:
    """The human text of an error body: ``message``, ``error.message``, ``data.message``,
    ``data.error_message`` or ``error`` when it is a sentence rather than a code."""
    if not isinstance(payload, dict):
        return None
    error, data = payload.get("error"), payload.get("data")
    error = error if isinstance(error, dict) else {"message": error}
    data = data if isinstance(data, dict) else {}
    for value in (payload.get("message"), error.get("message"), data.get("message")):
        if _text(value) and value.strip().upper() not in set(ErrorCode):
            return str(value)
    return _text(data.get("error_message"))


def _field_named(payload: Any, message: str | None) -> str | None:
    """The request field a 400 is about: a ``field``/``param`` key of the body, else the first
    of the generation dialect's field names the message mentions."""
    if isinstance(payload, dict):
        for place in (payload, payload.get("error"), payload.get("data")):
            if isinstance(place, dict):
                for key in ("field", "param", "parameter"):
                    if _text(place.get(key)):
                        return str(place[key])
    if message is None:
        return None
    found = [
        (match.start(), -len(name), name)
        for name in GENERATION_FIELDS
        if (match := re.search(rf"\b{re.escape(name)}\b", message))
    ]
    return min(found)[2] if found else None


def _amount(value: Any) -> float | None:
    """A figure the server reports (bytes, pixels, credits): a finite number ≥ 0, or a string of
    one; else None. It only informs, so an odd value never fails the result of a paid job."""
    number = as_progress(value)  # progress's leniency: numbers, numeric strings, nothing else
    return number if number is not None and number >= 0 else None


def _count(value: Any) -> int | None:
    number = _amount(value)
    return int(number) if number is not None and number.is_integer() else None


class GenerationDialect(WireDialect):
    """``/ai/generation/<kind>/generate-async``, and the shared ``/ai/generation/status`` and
    ``/result`` with ``?jobId=``: the job kind does not matter once the job exists."""

    name = "kvid-generation"
    api = ApiDialect.GENERATION
    auth_header = "api-key"
    id_param = "jobId"
    _root = "/ai/generation"
    _terminal: Mapping[str, JobState] = {
        "completed": JobState.COMPLETED,
        "failed": JobState.FAILED,
        "canceled": JobState.CANCELED,
        "cancelled": JobState.CANCELED,
    }

    # ---- requests ------------------------------------------------------------------------

    def generate_call(self, job_kind: JobKind, body: Mapping[str, Any]) -> HttpCall:
        kind = check_job_kind("job", job_kind, self.api)
        return HttpCall("generate", "POST", f"{self._root}/{kind}/generate-async", json=body)

    def status_call(self, job_kind: JobKind, request_id: str) -> HttpCall:
        params = {self.id_param: validate_request_id(request_id)}
        return HttpCall("status", "GET", f"{self._root}/status", params)

    def result_call(self, job_kind: JobKind, request_id: str) -> HttpCall:
        params = {self.id_param: validate_request_id(request_id)}
        return HttpCall("result", "GET", f"{self._root}/result", params)

    def classify_status(self, status: str) -> JobState:
        # queued, processing and any word this client does not know yet: still running
        return self._terminal.get(status.strip().lower(), JobState.RUNNING)

    # ---- responses -----------------------------------------------------------------------

    def _job_id(self, response: httpx.Response) -> str:
        try:
            asked = response.request.url.params.get(self.id_param)
        except RuntimeError:  # a Response built without a request
            asked = None
        return asked or "(unknown job)"

    def error_for(self, response: httpx.Response) -> KvidError | None:
        status = response.status_code
        if 200 <= status < 300:
            return None
        payload = _json(response)
        message = _error_message(payload)
        # a code is the server's word on a request it refused (4xx); a 5xx is server trouble
        # whatever its body says: after a generate, the job may exist
        code = _error_code(payload, message) if 400 <= status < 500 else None
        text = f"{where(response)}: {message or code or _snippet(response) or '(empty body)'}"
        common: dict[str, Any] = {"status_code": status, "server_message": message}
        if status == 402 or code is ErrorCode.INSUFFICIENT_CREDIT:
            return KvidInsufficientCreditError(text, **common)
        if code is ErrorCode.CONCURRENT_LIMIT:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            return KvidConcurrentLimitError(text, retry_after=retry_after, **common)
        if code is ErrorCode.JOB_NOT_COMPLETED:
            return KvidNotReadyError(text, **common)
        if code is ErrorCode.JOB_FAILED:
            return KvidJobFailedError(self._job_id(response), message or code, **common)
        if code is ErrorCode.JOB_NOT_FOUND:
            return KvidNotFoundError(text, **common)
        return _error_by_status(response, message, field_name=_field_named(payload, message))

    def parse_generate(self, response: httpx.Response) -> str:
        data, _ = _envelope(response)
        return _parse_id(response, data, "job_id", "jobId")

    def parse_status(self, response: httpx.Response) -> JobStatus:
        data, _ = _envelope(response)
        status = data.get("status")
        if not isinstance(status, str) or not status.strip():
            raise _field_error(response, "status", status, "a string")
        return JobStatus(
            status=status,
            progress=as_progress(data.get("progress")),  # none documented: None, usually
            # the job's own words only: the envelope's "Job status retrieved" is no reason
            message=_text(data.get("error_message")) or _text(data.get("message")),
            state=self.classify_status(status),
        )

    def parse_result(self, response: httpx.Response) -> JobResult:
        data, message = _envelope(response)
        url = data.get("result_url", data.get("url"))
        if not isinstance(url, str) or not url.strip():
            status = data.get("status")
            state = self.classify_status(status) if isinstance(status, str) else None
            if state is JobState.RUNNING:  # a 200 that says "not yet" in its own words
                raise KvidNotReadyError(
                    f"{where(response)}: status {status!r}, no result yet",
                    status_code=response.status_code,
                    server_message=message,
                )
            raise _field_error(response, "result_url", url, "a URL")
        name = _file_name(data.get("name"), url)
        if name is None:
            raise _field_error(response, "name", data.get("name"), "a string")
        size_bytes = _count(data.get("size"))
        if size_bytes is None:
            size_bytes = _count(data.get("file_size"))
        width, height = _count(data.get("width")), _count(data.get("height"))
        return JobResult(
            url=url,
            name=name,
            size_kb=None if size_bytes is None else size_bytes / 1024,
            width=width or None,  # a 0 is no geometry
            height=height or None,
            size_bytes=size_bytes,
            used_credit=_amount(data.get("used_credit")),
        )


KVID_DIALECT = KvidDialect()
GENERATION_DIALECT = GenerationDialect()
DEFAULT_DIALECT: WireDialect = KVID_DIALECT
_DIALECTS: Mapping[ApiDialect, WireDialect] = {
    ApiDialect.VIDEO: KVID_DIALECT,
    ApiDialect.GENERATION: GENERATION_DIALECT,
}


def dialect_for(value: ApiDialect | str) -> WireDialect:
    """The protocol object of a dialect name (``KVID_API_DIALECT``: ``video`` or ``generation``)."""
    return _DIALECTS[parse_dialect(value)]
