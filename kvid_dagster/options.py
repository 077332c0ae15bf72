"""The settings of the status sensor, the prompt-table sensor and the schedule, one record each.

Every default is defined once (the polling ones in :mod:`kvid_dagster.core.poll`, which applies
them) and reaches ``build_kvid_definitions`` and the ``build_*`` factories as the same frozen
object, so no layer passes ``None`` on to mean "the default". Durations are ``*_seconds``,
as in Dagster's own API.
"""

from __future__ import annotations

from dataclasses import dataclass

from dagster import DefaultScheduleStatus, DefaultSensorStatus

from kvid_dagster.client import DEFAULT_MAX_BYTES
from kvid_dagster.core.poll import (
    DEFAULT_FETCH_ATTEMPTS,
    DEFAULT_JOB_DEADLINE_S,
    DEFAULT_LOST_AFTER_S,
    DEFAULT_TICK_BUDGET_S,
    SENSOR_TIMEOUT_S,
    PollConfig,
)
from kvid_dagster.media.storage import StoragePath


@dataclass(frozen=True)
class StatusSensorOptions:
    """The status sensor: how often it ticks and the reliability rules of each tick (see
    docs/RELIABILITY.md).

    - ``tick_budget_seconds``: a tick polls what fits in it, the rest waits for the next tick
      (round robin by the cursor); kept well under Dagster's 60 s sensor timeout;
    - ``download``: keep the videos in the project's storage (else only their URLs);
    - ``job_deadline_seconds`` (three times the vendor's 5 minutes): a job not finished this
      long after its submission is ``TIMED_OUT`` and no longer polled;
    - ``failed_job_max_attempts`` (1: off): a job that ends ``FAILED`` is re-submitted as a
      new, paid job until its request has had this many submissions;
    - ``max_download_bytes``: a bigger video is refused and nothing is kept;
    - ``lost_after_seconds``: a job is LOST only after status has answered 404 this long (a
      404 right after generate or during a deploy is no proof of loss);
    - ``fetch_attempts``: then a completed job whose video cannot be fetched, or is no video,
      is ``FETCH_FAILED``, its request_id kept (``kvid-dagster refetch``).

    A setting no tick could keep is refused here, when the definitions are built.
    """

    minimum_interval_seconds: int = 15
    tick_budget_seconds: float = DEFAULT_TICK_BUDGET_S
    download: bool = True
    job_deadline_seconds: float = DEFAULT_JOB_DEADLINE_S
    failed_job_max_attempts: int = 1
    max_download_bytes: int = DEFAULT_MAX_BYTES
    lost_after_seconds: float = DEFAULT_LOST_AFTER_S
    fetch_attempts: int = DEFAULT_FETCH_ATTEMPTS
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING

    def __post_init__(self) -> None:
        if self.job_deadline_seconds <= 0:
            raise ValueError(f"need job_deadline_seconds > 0, got {self.job_deadline_seconds}")
        if not 0 < self.tick_budget_seconds < SENSOR_TIMEOUT_S:
            raise ValueError(
                f"need 0 < tick_budget_seconds < {SENSOR_TIMEOUT_S:g} (Dagster's sensor timeout), "
                f"got {self.tick_budget_seconds}"
            )
        if self.lost_after_seconds < 0:
            raise ValueError(f"need lost_after_seconds >= 0, got {self.lost_after_seconds}")
        for name in (
            "minimum_interval_seconds",
            "failed_job_max_attempts",
            "fetch_attempts",
            "max_download_bytes",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def poll_config(self, download_dir: StoragePath) -> PollConfig:
        """One tick's rules for the polling engine, its videos going to ``download_dir``."""
        return PollConfig(
            download_dir=download_dir,
            download=self.download,
            tick_budget_seconds=self.tick_budget_seconds,
            job_deadline_seconds=self.job_deadline_seconds,
            max_download_bytes=self.max_download_bytes,
            lost_after_seconds=self.lost_after_seconds,
            fetch_attempts=self.fetch_attempts,
        )


@dataclass(frozen=True)
class PromptsSensorOptions:
    """The prompt-table sensor: how often it reads the table's fingerprint."""

    minimum_interval_seconds: int = 30
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING


@dataclass(frozen=True)
class ScheduleOptions:
    """The schedule that submits every partition without a job: daily at 06:00 UTC, stopped
    until switched on (it spends credits)."""

    cron_schedule: str = "0 6 * * *"
    execution_timezone: str = "UTC"
    default_status: DefaultScheduleStatus = DefaultScheduleStatus.STOPPED
