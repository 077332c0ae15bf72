"""The emulator's answers as data: the API's JSON envelope (both dialects), the HTML and XML
error pages of the servers in front of it, and what the HTTP layer needs to send each one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kvid_dagster.emulator.generation import ErrorCode

_XML_ERROR: Final = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>{message}</Message></Error>"
)
_HTML_PAGE: Final = "<html><head><title>{title}</title></head><body><h1>{title}</h1></body></html>"
_REASONS: Final = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass
class Response:
    """One answer, or (``drop``) a reset instead of one."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # stream this file as the body...
    file_bytes: int = 0  # ...this many bytes of it...
    file_offset: int = 0  # ...from here
    drop: bool = False  # close the connection without answering
    close: bool = False  # answer, then close the connection


def envelope(
    status: int,
    success: bool,
    data: Any,
    message: str,
    *,
    code: ErrorCode | None = None,
    **headers: str,
) -> Response:
    """The API's JSON answer, ``{"success", "data", "message"}`` (and ``code``), with headers."""
    payload: dict[str, Any] = {"success": success, "data": data, "message": message}
    if code is not None:
        payload["code"] = code.value
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return Response(status, body, headers={k.replace("_", "-"): v for k, v in headers.items()})


def error(status: int, message: str, **headers: str) -> Response:
    """An envelope that failed: no data, the message says why."""
    return envelope(status, False, None, message, **headers)


def coded(status: int, code: ErrorCode | None, message: str) -> Response:
    """A generation-dialect error: the envelope, with the page's code beside it."""
    return envelope(status, False, None, message, code=code)


def html(status: int, title: str) -> Response:
    """An HTML page, as a proxy or gateway in front of the API answers."""
    return Response(status, _HTML_PAGE.format(title=title).encode(), "text/html; charset=utf-8")


def xml_error(status: int, code: str, message: str) -> Response:
    """An object store's error (S3 answers XML, not the API's envelope)."""
    body = _XML_ERROR.format(code=code, message=message).encode()
    return Response(status, body, "application/xml")


def status_fault(code: int, body: str, retry_after: int | None) -> Response:
    """An injected server error: the envelope (``body`` "json") or a proxy's HTML page."""
    reason = _REASONS.get(code, "Server Error")
    response = (
        html(code, f"{code} {reason}") if body == "html" else error(code, f"{reason} (injected)")
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response
