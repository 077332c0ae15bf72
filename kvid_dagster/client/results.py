"""What the client returns: plain, frozen dataclasses with no I/O and no secrets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

__all__ = [
    "VIDEO_TERMINAL_STATES",
    "DownloadedFile",
    "JobResult",
    "JobState",
    "JobStatus",
    "as_progress",
]


def as_progress(value: Any) -> float | None:
    """A progress percentage as a float, or None when the server gave none usable.

    Servers send it missing, null, fractional (12.5) or as a string ("12", "12%"). It is only
    informational, so an odd value must never fail a poll of a job that is already paid for.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value.strip().removesuffix("%") if isinstance(value, str) else value)
    except (ValueError, OverflowError):  # "soon", or an integer too large for a float
        return None
    return number if math.isfinite(number) else None


class JobState(StrEnum):
    """A status string as the client understands it (the dialect maps the wire vocabulary)."""

    RUNNING = "running"  # anything not terminal: PROCESSING, IN_QUEUE, PENDING, unknown words
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"  # terminal without a video, like FAILED, but nobody's fault


#: the video dialect's (the default's) terminal words: any other is "not finished yet". Here,
#: not in ``protocol``, so a ``JobStatus`` built by hand reads them without importing it
VIDEO_TERMINAL_STATES: Mapping[str, JobState] = {
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
}


@dataclass(frozen=True)
class JobStatus:
    """One status answer. ``status`` is the server's word; ``state`` is what it means;
    ``progress`` is a percentage (a float, fractions kept) or None when the server sent none."""

    status: str
    progress: float | None = None
    logs: tuple[str, ...] = ()
    message: str | None = None
    state: JobState | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "logs", tuple(self.logs))
        object.__setattr__(self, "progress", as_progress(self.progress))
        if self.state is None:
            # built by hand (tests, callers): read ``status`` with the default dialect's words
            state = VIDEO_TERMINAL_STATES.get(self.status, JobState.RUNNING)
            object.__setattr__(self, "state", state)

    @property
    def is_terminal(self) -> bool:
        return self.state is not JobState.RUNNING

    @property
    def is_completed(self) -> bool:
        return self.state is JobState.COMPLETED

    @property
    def is_failed(self) -> bool:
        return self.state is JobState.FAILED

    @property
    def ended_without_video(self) -> bool:
        """Terminal and no video will come: FAILED or CANCELED."""
        return self.state in (JobState.FAILED, JobState.CANCELED)

    @property
    def reason(self) -> str | None:
        """Why a job failed: the server's message, else the last log line."""
        if self.message and self.message.strip():
            return self.message.strip()
        for line in reversed(self.logs):
            if line.strip():
                return line.strip()
        return None


@dataclass(frozen=True)
class JobResult:
    """Where the finished video is, and what the server says of it (None: it said nothing).

    ``size_kb`` is in kilobytes: the video dialect's own figure, the generation dialect's bytes
    / 1024. ``size_bytes``, ``width``, ``height`` and ``used_credit`` (what the job really cost)
    come from the generation dialect only.
    """

    url: str
    name: str
    size_kb: float | None = None
    width: int | None = None
    height: int | None = None
    size_bytes: int | None = None
    used_credit: float | None = None


@dataclass(frozen=True)
class DownloadedFile:
    """A video on disk, complete (it was renamed into place only after the last byte)."""

    path: Path
    size_bytes: int
    sha256: str
