"""Configuration of the local kvid emulator."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass
class EmulatorConfig:
    """How the emulator behaves. Every field has a default that gives a quick, well-behaved demo.

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

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.render_threads < 1:
            raise ValueError(f"render_threads must be >= 1, got {self.render_threads}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be >= 1, got {self.backlog}")
        for name in ("failure_rate", "error_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
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
        if self.public_base_url is not None:
            self.public_base_url = self.public_base_url.rstrip("/")

    def __repr__(self) -> str:
        # the key never appears in reprs or logs
        fields = {k: v for k, v in self.__dict__.items() if k != "api_key"}
        shown = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        key = "None" if self.api_key is None else "'***'"
        return f"EmulatorConfig(api_key={key}, {shown})"
