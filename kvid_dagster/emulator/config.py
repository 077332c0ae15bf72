"""Configuration of the local kvid emulator."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from kvid_dagster.emulator.generation import (
    GENERATION_MODELS,
    GENERATION_PRICES,
    RESOLUTIONS,
    ModelFamily,
    model_family,
)

MIB = 1024 * 1024


@dataclass(frozen=True)
class RoughEdges:
    """The rough edges of real servers, resolved (``EmulatorConfig.edges``); defaults: all off."""

    burst_reset_above: int = 0
    fresh_404_s: float = 0.0
    null_progress: bool = False
    fractional_progress: bool = False
    omit_progress_rate: float = 0.0
    separate_storage: bool = False
    result_url_ttl_s: float = 0.0
    retry_after_http_date: bool = False
    echo_request_in_failures: bool = False


REALISTIC: Final = RoughEdges(
    burst_reset_above=8,
    fresh_404_s=1.0,
    null_progress=True,
    fractional_progress=True,
    omit_progress_rate=0.2,
    separate_storage=True,
    result_url_ttl_s=30.0,
    retry_after_http_date=True,
    echo_request_in_failures=True,
)
"""What ``realistic=True`` gives each rough edge the config leaves at ``None``."""


@dataclass
class EmulatorConfig:
    """How the emulator behaves. Every field has a default that gives a quick, well-behaved demo.

    The rough edges of real servers (``burst_reset_above`` to ``echo_request_in_failures``) are
    off unless set (0 or False is off); ``realistic=True`` turns on every one left at ``None``
    (values: ``REALISTIC``). An explicit value wins either way, so a test can pick one edge, or
    drop one. The server reads them resolved, from ``edges``.

    Job timing: a job takes the vendor's 1-5 minutes (by resolution and length) times
    ``time_scale``, unless ``job_duration`` fixes it. Fault rates draw from an RNG seeded with
    ``seed`` so a test that sets them is reproducible.
    """

    api_key: str | None = None
    """The accepted ``api-key``; ``None`` accepts any non-empty key."""
    workers: int = 4
    """Jobs running at once; later jobs wait ``IN_QUEUE`` with progress 0."""
    time_scale: float = 0.02
    """Multiplier on the vendor's 60-300 s job durations (0.02: 1.2-6 s)."""
    job_duration: float | None = None
    """Fixed seconds per job (benchmarks); overrides the vendor model and ``time_scale``."""
    failure_rate: float = 0.0
    """Fraction of jobs that end ``FAILED``."""
    error_rate: float = 0.0
    """Fraction of API requests answered with a 5xx."""
    rate_limit: float | None = None
    """API requests per second (token bucket, one second of burst); beyond it: 429."""
    latency: float = 0.0
    """Seconds added to every response."""
    reuse_renders: bool = False
    """Render once per output geometry and share the file (benchmarks of orchestration)."""
    seed: int = 0
    """Seed of the RNG behind the rates and of the seeds picked for ``seed: null`` jobs."""
    public_base_url: str | None = None
    """Base of the result URLs (default: the bound ``http://host:port``)."""

    # the generation dialect (/ai/generation/...) and its money; the video dialect ignores these
    strict_fields: bool = False
    """A generation body field the vendor's page does not list for its endpoint is a 400
    INVALID_PARAMETERS naming it, counted in ``stats["undocumented_field"]``; off, such fields
    are ignored, as the gateway ignores fields a model does not take."""
    generation_models: tuple[str, ...] = GENERATION_MODELS
    """The accepted ``model`` names (both documented vocabularies and the page's model path)."""
    generation_prices: Mapping[ModelFamily, Mapping[str, int]] = field(
        default_factory=lambda: GENERATION_PRICES
    )
    """Credits per 5 s clip by model family and resolution: a job's ``used_credit``."""
    credit_balance: float | None = None
    """Credits left: each generation job created debits its price; one the balance cannot pay
    is a 402 INSUFFICIENT_CREDIT and is not created (None: unlimited)."""
    concurrent_limit: int | None = None
    """Generation jobs queued or processing at once; one more is a 429 CONCURRENT_LIMIT and is
    not created (None: no limit)."""

    # limits and internals; the defaults suit tests and demos
    max_body_bytes: int = 20 * MIB
    """Largest accepted request body (413 beyond)."""
    max_image_bytes: int = 20 * MIB
    """Largest input image fetched from ``image_url`` or given as ``image_file``."""
    image_timeout: float = 10.0
    """Seconds allowed to fetch an ``image_url``."""
    render_threads: int = 2
    """Size of the render pool (encoding is CPU-bound; the machines have 2 cores)."""
    result_wait: float = 120.0
    """How long ``result`` waits for the render of a completed job before answering 503."""
    backlog: int = 5
    """Listen backlog: the standard library's (``socketserver``) 5, as small real servers have,
    so bursts meet a full accept queue in tests too; benchmarks pass a large one."""
    download_bytes_per_second: float | None = None
    """Bandwidth of every video download (None: as fast as loopback goes): a long download."""
    range_requests: bool = True
    """Video downloads honour ``Range`` (with ``If-Range`` against their ``ETag`` and
    ``Last-Modified``), as storage services do; False: every download is the whole file (200),
    as the vendor's page promises nothing more."""
    echo_api_key: bool = False
    """Put the request's api-key into an ``X-Debug-Key`` response header, status logs, FAILED
    messages and the emulator's own log, so a client's scrubbing is tested everywhere. Not part
    of ``realistic``: a real server doing this is a bug of its own."""

    # the rough edges of real servers; None: as ``realistic`` says
    realistic: bool = False
    """Turn on every rough edge below that is left at ``None``."""
    burst_reset_above: int | None = None
    """While more than this many API requests are in flight, every new connection is reset
    (TCP RST) before anything is read, so a generate refused this way creates no job (0: never)."""
    fresh_404_s: float | None = None
    """status and result answer 404 for a job younger than this many seconds, as an eventually
    consistent store does (0: never)."""
    null_progress: bool | None = None
    """status answers ``"progress": null`` while the job is ``IN_QUEUE``."""
    fractional_progress: bool | None = None
    """status answers a fractional progress (one decimal, e.g. 12.5) while ``PROCESSING``."""
    omit_progress_rate: float | None = None
    """Fraction of status answers without a ``progress`` field (seeded RNG)."""
    separate_storage: bool | None = None
    """Serve videos from a second listener (``KvidEmulator.storage_url``, ``/videos/NAME``,
    no api-key needed) instead of the API origin's ``/files/``, which then does not exist."""
    result_url_ttl_s: float | None = None
    """A result URL carries a token that expires this many seconds after the result answer that
    issued it; the file then answers 403, as an expired presigned URL does (0: never)."""
    retry_after_http_date: bool | None = None
    """``Retry-After`` on 429 and 503 as an HTTP date (RFC 7231 IMF-fixdate), not seconds."""
    echo_request_in_failures: bool | None = None
    """FAILED messages (status ``message`` and the last log line) repeat the prompt and params."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.render_threads < 1:
            raise ValueError(f"render_threads must be >= 1, got {self.render_threads}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be >= 1, got {self.backlog}")
        for name in ("failure_rate", "error_rate", "omit_progress_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.time_scale < 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale}")
        if self.job_duration is not None and self.job_duration < 0:
            raise ValueError(f"job_duration must be >= 0, got {self.job_duration}")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError(f"rate_limit must be > 0 (or None), got {self.rate_limit}")
        if self.latency < 0:
            raise ValueError(f"latency must be >= 0, got {self.latency}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty (or None to accept any key)")
        for name in ("burst_reset_above", "fresh_404_s", "result_url_ttl_s"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 (0: off), got {value}")
        if self.public_base_url is not None:
            self.public_base_url = self.public_base_url.rstrip("/")
        if self.credit_balance is not None and self.credit_balance < 0:
            raise ValueError(f"credit_balance must be >= 0 (or None), got {self.credit_balance}")
        if self.concurrent_limit is not None and self.concurrent_limit < 1:
            raise ValueError(
                f"concurrent_limit must be >= 1 (or None), got {self.concurrent_limit}"
            )
        for model in self.generation_models:
            family = model_family(model)
            if family is None:
                families = ", ".join(ModelFamily)
                raise ValueError(f"generation model {model!r} names no family ({families})")
            prices = self.generation_prices.get(family, {})
            if any(prices.get(r, 0) <= 0 for r in RESOLUTIONS):
                raise ValueError(
                    f"generation_prices needs a price > 0 for {family} at {RESOLUTIONS}"
                )

    @property
    def edges(self) -> RoughEdges:
        """The rough edges in force: each field as set, or as ``realistic`` says if ``None``."""
        base = REALISTIC if self.realistic else RoughEdges()
        values: dict[str, object] = {}
        for f in dataclasses.fields(RoughEdges):
            value = getattr(self, f.name)
            values[f.name] = getattr(base, f.name) if value is None else value
        return RoughEdges(**values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        # the key never appears in reprs or logs
        fields = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        shown = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        key = "None" if self.api_key is None else "'***'"
        return f"EmulatorConfig(api_key={key}, {shown})"
