"""Fault injection: random rates from the config, and scripted one-shot faults for tests.

Scripted faults (``KvidEmulator.add_fault(endpoint, kind, times=1, match=None, **kw)``), consumed
in the order added by the next requests they apply to. Without ``match`` that is the next requests
to the endpoint; with it, only requests that carry it: a generate whose prompt contains ``match``,
a status, result or file request for the request_id ``match``. Other requests pass the fault by
without using it, so a test can aim at one job however the client orders or retries its calls.

=================  ===============================================================================
kind               effect
=================  ===============================================================================
"500"              HTTP 500 with a JSON error envelope (``body="html"`` for an HTML page)
"502", "504"       HTTP 502 / 504 with an HTML page, as a gateway sends (``body="json"``: envelope)
"503"              HTTP 503 with a JSON envelope; ``retry_after=S`` adds a Retry-After header
"429"              HTTP 429 with ``Retry-After: retry_after`` (default 1) seconds
"timeout"          generate: the job IS created, then the answer waits ``delay`` s (default 3):
                   the client times out after the job exists (the uncertain submission);
                   other endpoints: wait ``delay`` s, then answer normally
"timeout_before"   wait ``delay`` s before doing anything; generate then closes the connection
                   without creating a job or answering; other endpoints then answer normally
"reset"            close the connection without answering (TCP RST)
"non_json"         HTTP 200 with an HTML body
"malformed"        HTTP 200 with JSON that is not the envelope; on files: half the video
"missing_fields"   HTTP 200, success envelope whose ``data`` is ``{}``; on files: an empty body
"echo_key"         HTTP 500 whose message repeats the request's api-key (a careless server: the
                   client must scrub it from everything it shows); nothing is created
=================  ===============================================================================

On generate, every kind but the two timeouts takes ``after_create=True`` to create the job first
and then misbehave (default False: nothing is created). Endpoints: "generate", "status",
"result", "files", or "*" for whichever comes first.
"""

from __future__ import annotations

import functools
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from kvid_dagster.emulator.config import EmulatorConfig

ENDPOINTS: Final = ("generate", "status", "result", "files", "*")
STATUS_KINDS: Final = ("500", "502", "503", "504")
FAULT_KINDS: Final = (
    *STATUS_KINDS,
    "429",
    "timeout",
    "timeout_before",
    "reset",
    "non_json",
    "malformed",
    "missing_fields",
    "echo_key",
)
_OPTIONS: Final[dict[str, frozenset[str]]] = {
    **{k: frozenset({"retry_after", "body", "after_create"}) for k in STATUS_KINDS},
    "429": frozenset({"retry_after", "after_create"}),
    "timeout": frozenset({"delay"}),
    "timeout_before": frozenset({"delay"}),
    "reset": frozenset({"after_create"}),
    "non_json": frozenset({"after_create"}),
    "malformed": frozenset({"after_create"}),
    "missing_fields": frozenset({"after_create"}),
    "echo_key": frozenset(),
}
DEFAULT_DELAY: Final = 3.0

FAILURE_REASONS: Final = (
    "GPU worker crashed during inference",
    "Upstream model timed out",
    "Out of memory while decoding frames",
    "Content safety checker rejected the output",
)


@dataclass
class Fault:
    """One scripted fault and how many more requests it applies to."""

    endpoint: str
    kind: str
    remaining: int
    options: dict[str, Any] = field(default_factory=dict)
    match: str | None = None  # a prompt substring (generate) or a request_id (the others)

    def applies(self, endpoint: str, carried: Callable[[], str | None]) -> bool:
        """Whether a request to ``endpoint`` meets it; ``carried()``: the request's prompt
        (generate) or request_id, asked only when there is a ``match`` to compare."""
        if self.endpoint not in (endpoint, "*"):
            return False
        if self.match is None:
            return True
        value = carried()
        if value is None:
            return False
        return self.match in value if endpoint == "generate" else value == self.match

    def copy(self, remaining: int) -> Fault:
        return Fault(self.endpoint, self.kind, remaining, dict(self.options), self.match)

    @property
    def delay(self) -> float:
        return float(self.options.get("delay", DEFAULT_DELAY))

    @property
    def after_create(self) -> bool:
        return bool(self.options.get("after_create", False))

    @property
    def retry_after(self) -> int | None:
        value = self.options.get("retry_after", 1 if self.kind == "429" else None)
        return None if value is None else max(0, math.ceil(float(value)))


class FaultInjector:
    """The emulator's sources of trouble. Thread-safe; one per emulator (no global state)."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._config = config
        self._omit_progress_rate = config.edges.omit_progress_rate
        self._lock = threading.Lock()
        self._rng = random.Random(config.seed)
        self._scripted: list[Fault] = []
        self._tokens = float(self._capacity)
        self._refilled = time.monotonic()

    # --- scripted one-shot faults -------------------------------------------------------------

    def add(
        self, endpoint: str, kind: str, times: int = 1, match: str | None = None, **options: Any
    ) -> Fault:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
        kind = str(kind)
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}, got {kind!r}")
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times}")
        if match is not None and not (isinstance(match, str) and match):
            raise ValueError(f"match must be a non-empty string (or None), got {match!r}")
        unknown = set(options) - _OPTIONS[kind]
        if unknown:
            raise TypeError(f"fault {kind!r} takes {sorted(_OPTIONS[kind])}, not {sorted(unknown)}")
        if options.get("after_create") and endpoint not in ("generate", "*"):
            raise ValueError("after_create only applies to the generate endpoint")
        if options.get("body", "json") not in ("json", "html"):
            raise ValueError("body must be 'json' or 'html'")
        fault = Fault(endpoint, kind, times, dict(options), match)
        with self._lock:
            self._scripted.append(fault)
        return fault

    def take(self, endpoint: str, carried: Callable[[], str | None]) -> Fault | None:
        """The first scripted fault this request meets, consumed (one use of its ``times``).

        ``carried``: what ``match`` is compared with (see ``Fault.applies``); parsed at most once.
        """
        if not self._scripted:  # the common case: no lock
            return None
        carried = functools.cache(carried)
        with self._lock:
            for i, fault in enumerate(self._scripted):
                if fault.applies(endpoint, carried):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        del self._scripted[i]
                    return fault.copy(0)
        return None

    def pending(self) -> list[Fault]:
        with self._lock:
            return [f.copy(f.remaining) for f in self._scripted]

    def clear(self) -> None:
        with self._lock:
            self._scripted.clear()

    # --- rates ---------------------------------------------------------------------------------

    @property
    def _capacity(self) -> float:
        # one second of burst, and at least one request
        return max(1.0, self._config.rate_limit or 1.0)

    def rate_limited(self) -> int | None:
        """Take a token; if none is left, the whole seconds until one is (for Retry-After)."""
        rate = self._config.rate_limit
        if rate is None:
            return None
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._refilled) * rate)
            self._refilled = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - self._tokens) / rate))

    def random_error(self) -> int | None:
        """A 5xx status for this request at ``error_rate``, else None."""
        if self._config.error_rate <= 0:
            return None
        with self._lock:
            if self._rng.random() >= self._config.error_rate:
                return None
            return self._rng.choice((500, 502, 503, 504))

    def job_failure(self) -> tuple[str, float] | None:
        """(reason, fraction of the run at which it fails) at ``failure_rate``, else None."""
        if self._config.failure_rate <= 0:
            return None
        with self._lock:
            if self._rng.random() >= self._config.failure_rate:
                return None
            return self._rng.choice(FAILURE_REASONS), self._rng.uniform(0.2, 0.8)

    def omit_progress(self) -> bool:
        """Whether this status answer leaves ``progress`` out (at ``omit_progress_rate``)."""
        rate = self._omit_progress_rate
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    def pick_seed(self) -> int:
        """A seed for a job sent with ``seed: null`` (deterministic under the config's seed)."""
        with self._lock:
            return self._rng.randrange(2**31)
