"""The wire dialect: the ONLY module that knows paths, the ``request_id`` query parameter, the
response envelope, the status vocabulary and what each HTTP status means.

It is sans-I/O: it builds ``HttpCall`` descriptions and reads ``httpx.Response`` objects that
someone else sent and received, so the sync and async clients share every byte of it. The
vendor's newer API (``/ai/generation/...``, ``jobId``, lowercase statuses, 402) would be a second
``Dialect`` subclass; nothing else in the client would change.
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
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import httpx

from .errors import (
    KvidAuthenticationError,
    KvidError,
    KvidNotFoundError,
    KvidNotReadyError,
    KvidProtocolError,
    KvidRateLimitedError,
    KvidServerError,
    KvidTimeoutError,
    KvidValidationError,
)
from .requests import JobKind
from .results import JobResult, JobState, JobStatus, as_progress

__all__ = [
    "DEFAULT_DIALECT",
    "KVID_DIALECT",
    "Dialect",
    "HttpCall",
    "KvidDialect",
    "parse_retry_after",
    "validate_request_id",
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


def _where(response: httpx.Response) -> str:
    try:
        request = response.request
    except RuntimeError:  # a Response built without a request
        return f"HTTP {response.status_code}"
    # the path only: a storage URL's query may hold a signature
    return f"HTTP {response.status_code} for {request.method} {request.url.path}"


class Dialect(ABC):
    """What a kvid API dialect must provide. Methods never do I/O."""

    name: str
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


class KvidDialect(Dialect):
    """The API of ``shared/kvid-api.md``: ``/ai/video/<kind>/{generate,status,result}``."""

    name = "kvid-video-v1"
    auth_header = "api-key"
    id_param = "request_id"
    _prefixes: Mapping[JobKind, str] = {
        JobKind.TEXT_TO_VIDEO: "/ai/video/text-to-video",
        JobKind.IMAGE_TO_VIDEO: "/ai/video/image-to-video",
    }
    _terminal: Mapping[str, JobState] = {"COMPLETED": JobState.COMPLETED, "FAILED": JobState.FAILED}

    # ---- requests ------------------------------------------------------------------------

    def generate_call(self, job_kind: JobKind, body: Mapping[str, Any]) -> HttpCall:
        return HttpCall("generate", "POST", f"{self._prefixes[job_kind]}/generate", json=body)

    def status_call(self, job_kind: JobKind, request_id: str) -> HttpCall:
        path = f"{self._prefixes[job_kind]}/status"
        return HttpCall("status", "GET", path, {self.id_param: validate_request_id(request_id)})

    def result_call(self, job_kind: JobKind, request_id: str) -> HttpCall:
        path = f"{self._prefixes[job_kind]}/result"
        return HttpCall("result", "GET", path, {self.id_param: validate_request_id(request_id)})

    def classify_status(self, status: str) -> JobState:
        # the page is silent about queued states: anything else is "not finished yet"
        return self._terminal.get(status, JobState.RUNNING)

    # ---- responses -----------------------------------------------------------------------

    def _server_message(self, response: httpx.Response) -> str | None:
        try:
            payload = json.loads(response.content)
        except ValueError:
            return None
        message = payload.get("message") if isinstance(payload, dict) else None
        return message if isinstance(message, str) else None

    def error_for(self, response: httpx.Response) -> KvidError | None:
        code = response.status_code
        if 200 <= code < 300:
            return None
        message = self._server_message(response)
        detail = message if message is not None else _snippet(response) or "(empty body)"
        text = f"{_where(response)}: {detail}"
        common: dict[str, Any] = {"status_code": code, "server_message": message}
        if code in (401, 403):
            return KvidAuthenticationError(text, **common)
        if code in (400, 422):
            return KvidValidationError(None, message=text, **common)
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

    def _data(self, response: httpx.Response) -> tuple[dict[str, Any], str | None]:
        """The envelope's ``data`` and ``message`` of a 2xx answer, or a protocol error."""
        where = _where(response)
        try:
            payload = json.loads(response.content)
        except ValueError:
            raise KvidProtocolError(
                f"{where}: the body is not JSON: {_snippet(response)!r}",
                status_code=response.status_code,
            ) from None
        if not isinstance(payload, dict) or not isinstance(payload.get("success"), bool):
            raise KvidProtocolError(
                f"{where}: no response envelope: {_snippet(response)!r}",
                status_code=response.status_code,
            )
        message = payload.get("message") if isinstance(payload.get("message"), str) else None
        if payload["success"] is not True:
            raise KvidProtocolError(
                f"{where}: success=false: {message}",
                status_code=response.status_code,
                server_message=message,
            )
        data = payload.get("data")
        if not isinstance(data, dict):
            raise KvidProtocolError(
                f"{where}: the envelope has no data object",
                status_code=response.status_code,
                server_message=message,
            )
        return data, message

    @staticmethod
    def _field_error(response: httpx.Response, name: str, value: Any, want: str) -> KvidError:
        return KvidProtocolError(
            f"{_where(response)}: data.{name} is {'missing' if value is None else repr(value)[:80]}"
            f" (expected {want})",
            status_code=response.status_code,
        )

    def parse_generate(self, response: httpx.Response) -> str:
        data, _ = self._data(response)
        request_id = data.get(self.id_param)
        try:
            return validate_request_id(request_id)
        except KvidValidationError:
            raise self._field_error(response, self.id_param, request_id, "an id") from None

    def parse_status(self, response: httpx.Response) -> JobStatus:
        data, message = self._data(response)
        status = data.get("status")
        if not isinstance(status, str) or not status:
            raise self._field_error(response, "status", status, "a string")
        logs = data.get("logs")
        if logs is None:
            logs = []
        if not isinstance(logs, list) or not all(isinstance(line, str) for line in logs):
            raise self._field_error(response, "logs", logs, "a list of strings")
        return JobStatus(
            status=status,
            progress=as_progress(data.get("progress")),  # missing, null, "12", 12.5: all fine
            logs=tuple(logs),
            message=message,
            state=self.classify_status(status),
        )

    def parse_result(self, response: httpx.Response) -> JobResult:
        data, _ = self._data(response)
        url = data.get("url")
        if not isinstance(url, str) or not url.strip():
            raise self._field_error(response, "url", url, "a URL")
        name = data.get("name")
        if name is None:
            name = PurePosixPath(urlsplit(url).path).name or "video.mp4"
        if not isinstance(name, str):
            raise self._field_error(response, "name", name, "a string")
        size = data.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int | float)):
            raise self._field_error(response, "size", size, "a number of kilobytes")
        return JobResult(url=url, name=name, size_kb=size)


KVID_DIALECT = KvidDialect()
DEFAULT_DIALECT: Dialect = KVID_DIALECT
