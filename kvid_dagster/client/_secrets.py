"""Keeping the API key out of everything the client shows: reprs, returned values and logs.

httpcore logs every request's and response's headers at DEBUG, and httpx logs every URL at INFO,
so a server that echoes the key (in a header, a redirect, a signed URL) would put it in any log
that has DEBUG on. ``protect_logs`` puts one filter on those loggers that rewrites the key, as
sent and as percent-encoded, to ``***`` in every record, whichever client's key it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from urllib.parse import quote

__all__ = ["REDACTED", "Secret", "protect_logs", "redact", "spellings"]

REDACTED = "***"
# the loggers that emit records themselves: a filter on a parent does not see its children's
_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
    "kvid_dagster.client",
)


class Secret:
    """Holds the API key so that no repr, vars() dump or log line can show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"'{REDACTED}'"

    __str__ = __repr__


def spellings(key: str) -> frozenset[str]:
    """The key as sent in a header, and as it reads inside a URL."""
    return frozenset({key, quote(key, safe="")})


def redact(text: str, secrets: Iterable[str]) -> str:
    # the longest first: a key that contains another key is replaced whole
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


class _RedactingFilter(logging.Filter):
    """Rewrites every record that shows a registered key; it never drops a record."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: frozenset[str] = frozenset()  # replaced whole: readers take no lock

    def add(self, key: str) -> None:
        with self._lock:
            self._secrets = self._secrets | spellings(key)

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self._secrets
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler will report it, scrub the parts
            message = f"{record.msg} {record.args}"
        if any(secret in message for secret in secrets):
            record.msg, record.args = redact(message, secrets), None
        if record.exc_info and not record.exc_text:  # a handler would format it later
            traceback = logging.Formatter().formatException(record.exc_info)
            if any(secret in traceback for secret in secrets):
                record.exc_text = traceback
        for name in ("exc_text", "stack_info"):
            text = getattr(record, name)
            if text and any(secret in text for secret in secrets):
                setattr(record, name, redact(text, secrets))
        return True


_FILTER = _RedactingFilter()


def protect_logs(key: str) -> None:
    """Redact ``key`` from the HTTP libraries' and the client's log records from now on."""
    _FILTER.add(key)
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)  # a no-op when already there
