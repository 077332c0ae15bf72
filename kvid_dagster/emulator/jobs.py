"""The emulated job queue: worker capacity and states derived from the clock.

No thread runs per job. Each job is booked at creation onto the worker slot that frees first:
``start`` = when that slot frees (or now), ``end`` = ``start`` + duration (or the failure time).
A status request then only compares the clock with those two numbers, so it costs O(1) however
many jobs are pending (the sensor benchmark polls 5,000 of them).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from kvid_dagster.emulator.validation import EmulatedDialect


class EmulatedJobState(StrEnum):
    """A job's state; the values are the video dialect's words (the generation dialect has its
    own, lowercase). CANCELED happens only to generation jobs (``KvidEmulator.cancel_job``)."""

    IN_QUEUE = "IN_QUEUE"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


TERMINAL: Final = frozenset(
    {EmulatedJobState.COMPLETED, EmulatedJobState.FAILED, EmulatedJobState.CANCELED}
)

# the vendor's "1-5 minutes by resolution and length": seconds for a 5 s (120 frame) clip
_BASE_SECONDS: Final = {480: 60.0, 580: 75.0, 720: 96.0, 1080: 150.0}
_FRAMES_PER_LOG_LINE: Final = 20  # the vendor's example logs "Processing frame 1-20"
_FRAMES_SHARE: Final = 0.9  # frames are "processed" in the first 90%; then "Encoding video"

_MESSAGES: Final = {
    EmulatedJobState.IN_QUEUE: "Video generation request is queued",
    EmulatedJobState.PROCESSING: "Video generation in progress",
    EmulatedJobState.COMPLETED: "Video generation completed",
}


def vendor_duration(short_side: int, frames: int) -> float:
    """Seconds the real service takes: 60 s for 480p/5 s up to 300 s for 1080p/10 s."""
    base = _BASE_SECONDS.get(short_side, 60.0 * short_side / 480)
    return min(300.0, max(60.0, base * max(1.0, frames / 120)))


@dataclass(eq=False)
class Job:
    """One emulated job. Times are ``time.monotonic()`` seconds; ``end``: completion or failure."""

    request_id: str  # the video dialect's request_id, or the generation dialect's job_id
    dialect: EmulatedDialect
    kind: str
    model: str  # video: "v1" | "v2"; generation: the model name as sent (or its default)
    body: dict[str, Any]  # as sent, image_file contents elided
    params: dict[str, Any]  # video: validated, defaults filled; generation: documented fields
    frames: int
    duration: float
    created: float
    created_wall: float
    start: float
    end: float
    slot: int
    fail_reason: str | None = None
    canceled: bool = False
    price: int | None = None  # generation: the credits debited (used_credit)
    video: Future[Path] | None = None  # the render; set right after creation
    extra: dict[str, Any] = field(default_factory=dict)

    def wall(self, t: float) -> float:
        """Epoch seconds for a monotonic instant (log timestamps)."""
        return self.created_wall + (t - self.created)


@dataclass(frozen=True)
class EmulatedJobStatus:
    """What the clock says of a job now: the state and progress its status answer is built from
    (named apart from the client's ``JobStatus``, which reads such answers)."""

    state: EmulatedJobState
    progress: int
    exact_progress: float  # progress before rounding down to a whole percent
    logs: list[str]
    message: str


def stamp(epoch: float) -> str:
    """A log line's timestamp: UTC, so logs read the same on every machine."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


class JobQueue:
    """Jobs by request id, booked onto ``workers`` slots. Thread-safe."""

    def __init__(self, workers: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._workers = workers
        self._free_at = [0.0] * workers
        self._last: list[Job | None] = [None] * workers

    def create(
        self,
        request_id: str,
        *,
        dialect: EmulatedDialect,
        kind: str,
        model: str,
        body: dict[str, Any],
        params: dict[str, Any],
        frames: int,
        duration: float,
        fail_reason: str | None = None,
        fail_fraction: float = 0.5,
    ) -> Job:
        """Book a job on the earliest free slot; a job bound to fail ends at ``fail_fraction``."""
        with self._lock:
            now = self._clock()
            slot = min(range(self._workers), key=self._free_at.__getitem__)
            start = max(now, self._free_at[slot])
            end = start + duration * (fail_fraction if fail_reason else 1.0)
            job = Job(
                request_id=request_id,
                dialect=dialect,
                kind=kind,
                model=model,
                body=body,
                params=params,
                frames=frames,
                duration=duration,
                created=now,
                created_wall=time.time(),
                start=start,
                end=end,
                slot=slot,
                fail_reason=fail_reason,
            )
            job.extra["booked_from"] = self._free_at[slot]
            self._free_at[slot] = end
            self._last[slot] = job
            self._jobs[request_id] = job
            return job

    def get(self, request_id: str) -> Job | None:
        return self._jobs.get(request_id)

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def __len__(self) -> int:
        return len(self._jobs)

    def clear(self) -> None:
        """Forget every job and free every slot (a service restart)."""
        with self._lock:
            self._jobs.clear()
            self._free_at = [0.0] * self._workers
            self._last = [None] * self._workers

    def fail(self, job: Job, reason: str, *, at: float | None = None, force: bool = False) -> None:
        """End ``job`` FAILED at ``at`` (default now), unless it already completed.

        A job that already COMPLETED by the clock stays so unless ``force`` (its render failed:
        the video it promised does not exist). A failed job frees its slot when it fails.
        """
        with self._lock:
            now = self._clock() if at is None else at
            if job.fail_reason is not None or job.canceled:
                return
            if now >= job.end and not force:
                raise ValueError(f"job {job.request_id} already completed")
            job.fail_reason = reason
            if now < job.end:
                self._end_now(job, now)

    def cancel(self, job: Job) -> None:
        """End ``job`` CANCELED now, freeing its slot. The caller checks that it is still
        running as its status says (the clock may have ended a job whose render still runs)."""
        with self._lock:
            now = self._clock()
            job.canceled = True
            if now < job.end:
                self._end_now(job, now)

    def _end_now(self, job: Job, now: float) -> None:
        """Move a job's end to ``now`` (a queued job ends from the queue); lock held."""
        if now < job.start:
            job.start = now
        job.end = max(now, job.start)
        if self._last[job.slot] is job:
            self._free_at[job.slot] = max(job.end, job.extra["booked_from"])

    def status(self, job: Job, now: float | None = None) -> EmulatedJobStatus:
        """The job's state, progress and logs at ``now``, from its two booked instants."""
        now = self._clock() if now is None else now
        if now < job.start:
            return EmulatedJobStatus(
                EmulatedJobState.IN_QUEUE, 0, 0.0, [], _MESSAGES[EmulatedJobState.IN_QUEUE]
            )
        upto = min(now, job.end)
        exact = self._progress(job, upto)
        progress = int(exact)
        logs = self._logs(job, upto)
        if now < job.end:
            message = _MESSAGES[EmulatedJobState.PROCESSING]
            return EmulatedJobStatus(EmulatedJobState.PROCESSING, progress, exact, logs, message)
        if job.canceled:
            logs.append(f"{stamp(job.wall(job.end))} - Video generation canceled")
            return EmulatedJobStatus(
                EmulatedJobState.CANCELED, progress, exact, logs, "Video generation canceled"
            )
        if job.fail_reason is not None:
            logs.append(f"{stamp(job.wall(job.end))} - Video generation failed: {job.fail_reason}")
            message = f"Video generation failed: {job.fail_reason}"
            return EmulatedJobStatus(EmulatedJobState.FAILED, progress, exact, logs, message)
        logs.append(f"{stamp(job.wall(job.end))} - Video generation completed")
        return EmulatedJobStatus(
            EmulatedJobState.COMPLETED, 100, 100.0, logs, _MESSAGES[EmulatedJobState.COMPLETED]
        )

    @staticmethod
    def _progress(job: Job, upto: float) -> float:
        if job.duration <= 0:
            return 99.0
        return max(0.0, min(99.0, 99 * (upto - job.start) / job.duration))

    @staticmethod
    def _logs(job: Job, upto: float) -> list[str]:
        """Log lines up to ``upto``: started, one per 20 frames, then encoding (at most ~15)."""
        lines = [f"{stamp(job.wall(job.start))} - Video generation started"]
        chunks = math.ceil(job.frames / _FRAMES_PER_LOG_LINE)
        for k in range(chunks):
            at = job.start + job.duration * _FRAMES_SHARE * k / chunks
            if at > upto:
                break
            first = k * _FRAMES_PER_LOG_LINE + 1
            last = min(job.frames, (k + 1) * _FRAMES_PER_LOG_LINE)
            lines.append(f"{stamp(job.wall(at))} - Processing frame {first}-{last}")
        encoding_at = job.start + job.duration * _FRAMES_SHARE
        if encoding_at <= upto and (job.fail_reason is None or encoding_at < job.end):
            lines.append(f"{stamp(job.wall(encoding_at))} - Encoding video")
        return lines
