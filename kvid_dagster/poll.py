"""Polling every pending job once, concurrently, inside a time budget.

One call of :func:`poll_pending` is one sensor tick: it settles claims whose owner is gone,
reads the submissions the service is still working on (old requests of edited rows too), asks
for each one's status (what does not fit in the budget waits for the next tick, round robin
from the cursor), fetches, downloads and probes finished videos, applies every change in one
ledger transaction, and returns the events for the orchestrator to publish. Knows neither
Dagster nor HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kvid_dagster.client import AsyncKvidClient, JobKind, KvidError, KvidNotFoundError
from kvid_dagster.ledger import JobChange, Ledger, Submission, VideoFile, VideoRow, VideoStatus
from kvid_dagster.probe import probe_video
from kvid_dagster.prompts import PROMPT_ID_PATTERN

log = logging.getLogger("kvid_dagster.poll")

DEFAULT_JOB_DEADLINE_S = 15 * 60.0  # the vendor says 1-5 min; three times that before giving up
DEFAULT_POLL_CONCURRENCY = 32


@dataclass(frozen=True)
class PollConfig:
    download_dir: Path
    download: bool = True
    budget_s: float = 40.0
    job_deadline_s: float = DEFAULT_JOB_DEADLINE_S
    max_download_bytes: int = 512 * 1024 * 1024
    concurrency: int = DEFAULT_POLL_CONCURRENCY


@dataclass(frozen=True)
class VideoEvent:
    """Something Dagster should hear about one partition: its current job moved."""

    partition_key: str
    row: VideoRow  # the row after the change
    log_lines: tuple[str, ...] = ()

    @property
    def status(self) -> VideoStatus:
        return self.row.status

    @property
    def is_final(self) -> bool:
        return self.row.status.is_terminal


@dataclass
class PollReport:
    events: list[VideoEvent] = field(default_factory=list)
    pending: int = 0  # jobs with a request_id that were not terminal at the start
    polled: int = 0
    deferred: int = 0  # left for the next tick by the time budget
    errors: list[str] = field(default_factory=list)
    settled: list[Submission] = field(default_factory=list)  # orphaned claims now UNCERTAIN
    changed: int = 0  # submissions whose record changed in this tick
    last_submission_id: int | None = None  # the cursor: the next tick starts after it
    elapsed_s: float = 0.0

    @property
    def final(self) -> list[VideoEvent]:
        return [e for e in self.events if e.is_final]


def video_path(download_dir: Path, submission: Submission) -> Path:
    """Where a submission's video goes: always inside ``download_dir``, one file per job (a
    row edited back and forth keeps each job's video), named after the row when it is safe."""
    key = submission.partition_key
    if PROMPT_ID_PATTERN.fullmatch(key) and len(key) <= 64:
        name = key
    else:
        name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    name += f"-{submission.request_hash[:10]}"
    if submission.attempt > 1:
        name += f"-{submission.attempt}"
    path = (download_dir / f"{name}.mp4").resolve()
    if path.parent != download_dir.resolve():
        raise ValueError(f"video path for {key!r} escapes {download_dir}")
    return path


def _rotate(subs: list[Submission], start_after: int | None) -> list[Submission]:
    if start_after is None:
        return subs
    later = [s for s in subs if s.submission_id > start_after]
    return later + [s for s in subs if s.submission_id <= start_after]


def _timed_out(sub: Submission, config: PollConfig, what: str) -> JobChange:
    return JobChange(
        sub.submission_id,
        sub.version,
        VideoStatus.TIMED_OUT,
        error=f"{what} after the {config.job_deadline_s:.0f} s job deadline; polling stopped "
        "(the request_id is kept: the job may still finish)",
        completed=True,
    )


async def poll_pending(
    client: AsyncKvidClient,
    ledger: Ledger,
    config: PollConfig,
    *,
    start_after: int | None = None,
    is_alive: Callable[[Submission], bool | None] | None = None,
) -> PollReport:
    """Poll each pending job once (budget permitting) and record what changed."""
    started = time.monotonic()
    now = datetime.now(UTC)
    report = PollReport()
    report.settled = (await asyncio.to_thread(ledger.recover, is_alive)).settled
    subs = _rotate(await asyncio.to_thread(ledger.jobs_to_poll), start_after)
    report.pending = len(subs)
    gate = asyncio.Semaphore(max(1, config.concurrency))
    changes: dict[int, JobChange] = {}
    logs: dict[int, tuple[str, ...]] = {}

    def past_deadline(sub: Submission) -> bool:
        since = sub.submitted_at or sub.claimed_at
        return since is not None and (now - since).total_seconds() > config.job_deadline_s

    async def poll_one(sub: Submission) -> None:
        async with gate:
            if time.monotonic() - started > config.budget_s:
                report.deferred += 1
                return
            report.polled += 1
            report.last_submission_id = sub.submission_id  # the gate is FIFO: rotation order
            change = await _poll(client, config, sub, past_deadline(sub), report, logs)
            if change is not None:
                changes[sub.submission_id] = change

    await asyncio.gather(*(poll_one(s) for s in subs))
    applied = await asyncio.to_thread(ledger.apply, list(changes.values()))
    report.changed = len(applied)
    dropped = len(changes) - len(applied)
    if dropped:
        report.errors.append(f"{dropped} job(s) changed while polled; left for the next tick")
    moved = {s.submission_id for s in applied} | {s.submission_id for s in report.settled}
    by_sub = await asyncio.to_thread(ledger.rows_for_submissions, moved)
    for sub_id, rows in sorted(by_sub.items()):
        for row in rows:
            report.events.append(VideoEvent(row.partition_key, row, logs.get(sub_id, ())))
    report.events.sort(key=lambda e: e.partition_key)
    report.elapsed_s = time.monotonic() - started
    return report


async def _poll(
    client: AsyncKvidClient,
    config: PollConfig,
    sub: Submission,
    late: bool,
    report: PollReport,
    logs: dict[int, tuple[str, ...]],
) -> JobChange | None:
    """The change one status answer makes to ``sub`` (None: nothing changed)."""
    kind = JobKind(sub.job_kind)
    request_id = str(sub.request_id)
    where = f"{sub.partition_key} ({request_id})"
    try:
        status = await client.status(kind, request_id)
    except KvidNotFoundError as exc:
        return JobChange(
            sub.submission_id,
            sub.version,
            VideoStatus.LOST,
            error=f"the service no longer knows {request_id} ({exc.server_message or exc})",
            completed=True,
        )
    except KvidError as exc:
        problem = f"status: {type(exc).__name__}: {exc}"
        report.errors.append(f"{where}: {problem}")
        # a service that never answers must not be polled forever
        return _timed_out(sub, config, f"no usable status answer ({problem})") if late else None
    logs[sub.submission_id] = tuple(status.logs[-3:])
    if status.is_completed:
        try:
            video = await _fetch(client, config, sub, kind, request_id)
        except (KvidError, OSError, ValueError) as exc:
            # not COMPLETED (terminal) without a video: FETCHING is polled again next tick
            problem = f"fetching the video: {type(exc).__name__}: {exc}"
            report.errors.append(f"{where}: {problem}")
            if late:
                return _timed_out(sub, config, f"completed, but {problem}")
            if sub.status is VideoStatus.FETCHING and sub.error == problem:
                return None
            return JobChange(
                sub.submission_id, sub.version, VideoStatus.FETCHING, progress=100, error=problem
            )
        return JobChange(
            sub.submission_id,
            sub.version,
            VideoStatus.COMPLETED,
            progress=100,
            video=video,
            completed=True,
        )
    if status.is_failed:
        reason = status.message or (status.logs[-1] if status.logs else "") or "no reason"
        return JobChange(
            sub.submission_id,
            sub.version,
            VideoStatus.FAILED,
            progress=status.progress,
            error=reason,
            completed=True,
        )
    if late:
        return _timed_out(sub, config, f"still {status.status}")
    running = VideoStatus.from_service(status.status)
    if running is sub.status and status.progress == sub.progress:
        return None
    return JobChange(sub.submission_id, sub.version, running, progress=status.progress)


async def _fetch(
    client: AsyncKvidClient, config: PollConfig, sub: Submission, kind: JobKind, request_id: str
) -> VideoFile:
    result = await client.result(kind, request_id)
    if not config.download:
        return VideoFile(url=result.url, name=result.name, size_kb=result.size_kb)
    config.download_dir.mkdir(parents=True, exist_ok=True)
    downloaded = await client.download(
        result, video_path(config.download_dir, sub), max_bytes=config.max_download_bytes
    )
    probe = await asyncio.to_thread(probe_video, downloaded.path)
    return VideoFile(
        url=result.url,
        name=result.name,
        size_kb=result.size_kb,
        local_path=str(downloaded.path),
        sha256=downloaded.sha256,
        width=probe.width,
        height=probe.height,
        fps=probe.fps,
        num_frames=probe.num_frames,
        duration_s=probe.duration_s,
    )
