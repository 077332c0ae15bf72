"""The kvid client's exceptions.

Every error carries ``status_code`` (the HTTP status, or None when there was no response) and
``server_message`` (the envelope's ``message``, or None). Texts never contain the API key: the
client scrubs anything the server echoes back before an error reaches the caller.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_MISSING: Any = object()


def short_repr(value: object, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: values in messages may be huge (prompts, base64)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 15]}…(+{len(text) - limit + 15} chars)"


class KvidError(Exception):
    """Base of every error the kvid client raises."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.server_message = server_message

    def __str__(self) -> str:
        return self.message


class KvidAuthenticationError(KvidError):
    """401/403: the api-key is missing or wrong."""


class KvidValidationError(KvidError, ValueError):
    """A request the API (422) or the client (before any HTTP call) refuses.

    Client-side errors name the field, the value and what is allowed, e.g.
    ``num_frames=120 is out of range: allowed 81–100``.
    """

    def __init__(
        self,
        field: str | None,
        value: object = _MISSING,
        allowed: str | None = None,
        *,
        problem: str = "is not allowed",
        message: str | None = None,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        if message is None:
            subject = field or "request"
            if value is not _MISSING:
                subject = f"{subject}={short_repr(value)}"
            message = f"{subject} {problem}"
            if allowed:
                message = f"{message}: allowed {allowed}"
        super().__init__(message, status_code=status_code, server_message=server_message)
        self.field = field
        self.value = None if value is _MISSING else value
        self.allowed = allowed


class KvidNotFoundError(KvidError):
    """404: the server does not know this request_id (or file)."""


class KvidNotReadyError(KvidError):
    """The result was asked for before the job completed: 409 (video dialect; also for a FAILED
    job), or 400 ``JOB_NOT_COMPLETED`` (generation dialect)."""


class KvidInsufficientCreditError(KvidError):
    """402 ``INSUFFICIENT_CREDIT``: the account cannot pay for the job, which was NOT created.

    Nothing is uncertain and waiting does not help: stop submitting until credits are bought.
    """


class KvidRateLimitedError(KvidError):
    """429: too many requests; ``retry_after`` is the server's hint in seconds, if usable."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status_code: int | None = 429,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, server_message=server_message)
        self.retry_after = retry_after


class KvidConcurrentLimitError(KvidRateLimitedError):
    """429 ``CONCURRENT_LIMIT``: too many of the account's jobs are running; this one was NOT
    created. A slot frees when a running job ends (minutes), so the client does not retry it:
    the caller holds its queue and submits again later (``retry_after`` if the server said)."""


class KvidServerError(KvidError):
    """5xx: trouble on the server side; ``retry_after`` if the server sent a usable one."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, server_message=server_message)
        self.retry_after = retry_after


class KvidProtocolError(KvidError):
    """The server answered something outside the contract (non-JSON, no envelope, …)."""


class KvidResponseTooLargeError(KvidProtocolError):
    """An API answer (generate, status, result) bigger than ``MAX_ANSWER_BYTES``: not read
    further. After a generate the job may exist (uncertain); anywhere else a protocol error."""


class KvidConnectionError(KvidError):
    """The connection failed (refused, reset, DNS, protocol breakage)."""


class KvidTimeoutError(KvidError):
    """A request timed out, or ``wait()`` passed its overall deadline."""

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        last_status: str | None = None,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, server_message=server_message)
        self.request_id = request_id
        self.last_status = last_status


class KvidDownloadTooLargeError(KvidError):
    """A download exceeded ``max_bytes`` (announced by Content-Length or while streaming)."""


class KvidDownloadBusyError(KvidError):
    """Another download into the same partial file is in progress (another poller has it)."""


class KvidJobFailedError(KvidError):
    """The job ended FAILED; ``reason`` is the server's message or last log line."""

    def __init__(
        self,
        request_id: str,
        reason: str,
        logs: Sequence[str] = (),
        *,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(
            f"kvid job {request_id} failed: {reason}",
            status_code=status_code,
            server_message=server_message,
        )
        self.request_id = request_id
        self.reason = reason
        self.logs = tuple(logs)


def abbreviate_body(body: Mapping[str, Any], limit: int = 200) -> str:
    """The body as JSON for a message, with long strings (base64 images) shortened."""

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > limit:
            return f"{value[:40]}…<{len(value)} chars>"
        return value

    return json.dumps({k: cut(v) for k, v in body.items()}, ensure_ascii=False, sort_keys=True)


class KvidUncertainSubmissionError(KvidError):
    """``generate`` failed after the body may have reached the server.

    The job may or may not exist (and may be billed). The client never re-sends such a body on its
    own: a second POST would be a second job. ``body`` is the exact JSON that was sent (the API key
    is a header, never part of it); the message shows it with long values abbreviated.
    """

    def __init__(
        self,
        cause: str,
        body: Mapping[str, Any],
        *,
        job_kind: str | None = None,
        status_code: int | None = None,
        server_message: str | None = None,
    ) -> None:
        super().__init__(
            f"submission outcome unknown ({cause}); the job may exist and be billed, so it was "
            f"not re-sent. body={abbreviate_body(body)}",
            status_code=status_code,
            server_message=server_message,
        )
        self.cause = cause
        self.body = dict(body)
        self.job_kind = job_kind
