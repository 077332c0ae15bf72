"""When to retry, and how long to wait: one policy for the sync and the async client.

Reads (status, result, downloads) are idempotent and retried on transient trouble. ``generate``
is not: it costs money, so it is retried only when the job cannot have been created (a 429, or a
connection that failed before the request left). Anything after the body was sent is an
*uncertain* submission that the caller must resolve; the client never re-sends it by itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import httpx

from .errors import (
    KvidConcurrentLimitError,
    KvidConnectionError,
    KvidError,
    KvidRateLimitedError,
    KvidServerError,
    KvidTimeoutError,
    KvidValidationError,
)

__all__ = ["NOT_SENT", "TRANSIENT", "RetryPolicy", "RetryVerdict"]

# httpx exceptions raised before a single byte of the request left: a connection that was never
# made (refused, DNS, connect timeout), no free connection in the pool, or a scheme httpx lacks.
# ReadTimeout, WriteTimeout, ReadError, WriteError and RemoteProtocolError may all come after
# the server got the body, so they are not here.
NOT_SENT: tuple[type[httpx.TransportError], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
)

# errors that may well go away by themselves
TRANSIENT: tuple[type[KvidError], ...] = (
    KvidRateLimitedError,
    KvidServerError,
    KvidConnectionError,
    KvidTimeoutError,
)


class RetryVerdict(Enum):
    RETRY = "retry"
    RAISE = "raise"
    UNCERTAIN = "uncertain"  # generate only: the job may exist


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by ``max_retries`` retries per call."""

    max_retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    random: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise KvidValidationError("max_retries", self.max_retries, "an integer ≥ 0")
        if self.max_retries < 0:
            raise KvidValidationError("max_retries", self.max_retries, "an integer ≥ 0")
        for name in ("backoff_base", "backoff_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise KvidValidationError(name, value, "a finite number ≥ 0")
            if not math.isfinite(value) or value < 0:
                raise KvidValidationError(name, value, "a finite number ≥ 0")

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(backoff_max, backoff_base · 2^attempt)]."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(attempt, 64))
        return self.random() * ceiling

    def delay(self, error: KvidError, attempt: int) -> float:
        """Seconds before retry number ``attempt + 1``; a usable Retry-After wins (capped)."""
        if isinstance(error, KvidRateLimitedError | KvidServerError):
            # a 429, or a 5xx (a 503 above all), may say when to come back
            retry_after = error.retry_after
            if retry_after is not None:
                return min(retry_after, self.backoff_max)
        return self.backoff(attempt)

    @staticmethod
    def verdict(error: KvidError, *, idempotent: bool, sent: bool) -> RetryVerdict:
        """What to do about ``error``; ``sent`` is False when the request surely never left."""
        code = error.status_code
        # only a 4xx answer is the server refusing the request: nothing was created
        refused = code is not None and 400 <= code < 500
        if isinstance(error, KvidConcurrentLimitError) and refused:
            return (
                RetryVerdict.RAISE
            )  # a slot frees in minutes, not seconds: the caller holds its queue
        transient = isinstance(error, TRANSIENT)
        if idempotent:
            return RetryVerdict.RETRY if transient else RetryVerdict.RAISE
        if not sent or (refused and isinstance(error, KvidRateLimitedError)):
            # an unsent request created nothing, and a 429 is a refusal: safe to send again
            return RetryVerdict.RETRY if transient else RetryVerdict.RAISE
        if refused:
            return RetryVerdict.RAISE  # a definite refusal (auth, validation, ...): no job
        return RetryVerdict.UNCERTAIN  # a 5xx, a timeout, a broken answer: the job may exist

    def decide(
        self, error: KvidError, attempt: int, *, idempotent: bool, sent: bool
    ) -> tuple[RetryVerdict, float]:
        """The verdict for failed attempt ``attempt`` (0-based), with the wait when RETRY."""
        verdict = self.verdict(error, idempotent=idempotent, sent=sent)
        if verdict is RetryVerdict.RETRY:
            if attempt >= self.max_retries:
                return RetryVerdict.RAISE, 0.0
            return verdict, self.delay(error, attempt)
        return verdict, 0.0
