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
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from kvid_dagster.client import (
    DEFAULT_MAX_BYTES,
    AsyncKvidClient,
    DownloadedFile,
    JobKind,
    JobResult,
    KvidDownloadBusyError,
    KvidError,
    KvidNotFoundError,
    PartialDownload,
)
from kvid_dagster.core.prompts import PROMPT_ID_PATTERN
from kvid_dagster.ledger import (
    JobChange,
    Ledger,
    Submission,
    VideoFile,
    VideoQuality,
    VideoRow,
    VideoStatus,
)
from kvid_dagster.media.preview import PreviewError, store_previews, video_previews
from kvid_dagster.media.probe import VideoProbe, probe_video
from kvid_dagster.media.quality import assess, expected_output, measure_picture
from kvid_dagster.media.storage import StorageError, StoragePath, is_remote, put_file

log = logging.getLogger("kvid_dagster.core.poll")

DEFAULT_JOB_DEADLINE_S = 15 * 60.0  # the vendor says 1-5 min; three times that before giving up
# Dagster gives a sensor tick 60 s; like dagster-fivetran's polling sensor, stop well before
SENSOR_TIMEOUT_S = 60.0
DEFAULT_TICK_BUDGET_S = 40.0
DEFAULT_LOST_AFTER_S = 120.0  # of 404s before a job is LOST
DEFAULT_FETCH_ATTEMPTS = 3
DEFAULT_POLL_CONCURRENCY = 32
# a download's hidden staging file, and the client's partial one: older than this, a leftover
_LEFTOVER_AGE_S = 3600.0
_STAGING_SUFFIX = ".unverified.mp4"
# the bytes of a download cut short by a tick's budget, kept for the next tick to continue
_PARTIAL_SUFFIX = ".partial"
# where those are kept when the videos go to remote storage (the system temp dir)
_REMOTE_PARTIALS = "kvid-partials"
# how long past the tick's budget a job's work may run before it is abandoned: its own calls
# are bounded by the budget, this only catches what cannot be (a storage upload in a thread)
_OVERRUN_GRACE_S = 5.0
# a download bound for remote storage is staged in the system temp dir, in a folder named so
_REMOTE_STAGING_PREFIX = "kvid-fetch-"


@dataclass(frozen=True)
class PollConfig:
    """One tick's rules. ``lost_after_seconds``: a job is LOST only after status has answered 404
    for this long (and ``lost_after_404s`` times in a row): a 404 right after generate, or
    during a deploy, is not proof of loss. ``fetch_attempts``: a completed job's video is
    fetched at most this many times, ``refetch_interval_seconds`` apart, before FETCH_FAILED.
    ``download_dir`` may be remote (``s3://...``, see :mod:`kvid_dagster.media.storage`).
    ``image_dir``: where a row's relative image path resolves (its prompt table's folder; None:
    the working directory): with aspect ratio ``auto`` the input image decides the expected
    size (see :mod:`kvid_dagster.media.quality`)."""

    download_dir: StoragePath
    download: bool = True
    tick_budget_seconds: float = DEFAULT_TICK_BUDGET_S
    job_deadline_seconds: float = DEFAULT_JOB_DEADLINE_S
    max_download_bytes: int = DEFAULT_MAX_BYTES
    concurrency: int = DEFAULT_POLL_CONCURRENCY
    lost_after_seconds: float = DEFAULT_LOST_AFTER_S
    lost_after_404s: int = 3
    fetch_attempts: int = DEFAULT_FETCH_ATTEMPTS
    refetch_interval_seconds: float = 20.0
    image_dir: Path | None = None


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


def video_path(download_dir: StoragePath, submission: Submission) -> StoragePath:
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
    if is_remote(download_dir):
        return download_dir / f"{name}.mp4"  # one key segment: the name has no "/"
    assert isinstance(download_dir, Path)
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
        error=f"{what} after the {config.job_deadline_seconds:.0f} s job deadline; polling stopped "
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
    dialect = client.dialect.api.value  # a job id means something only to its own dialect
    subs = _rotate(await asyncio.to_thread(ledger.jobs_to_poll, dialect), start_after)
    report.pending = len(subs)
    gate = asyncio.Semaphore(max(1, config.concurrency))
    changes: dict[int, JobChange] = {}
    logs: dict[int, tuple[str, ...]] = {}

    def past_deadline(sub: Submission) -> bool:
        since = sub.submitted_at or sub.claimed_at
        return since is not None and (now - since).total_seconds() > config.job_deadline_seconds

    deadline = started + config.tick_budget_seconds

    async def poll_one(sub: Submission) -> None:
        async with gate:
            left = deadline - time.monotonic()
            if left <= 0:
                report.deferred += 1
                return
            report.polled += 1
            report.last_submission_id = sub.submission_id  # the gate is FIFO: rotation order
            job = _Job(client, config, sub, past_deadline(sub), now, deadline, report, logs)
            try:
                # each call of this job is bounded by the budget (``_Job.within``); this bound
                # only catches what cannot be cut (a storage upload running in a thread)
                change = await asyncio.wait_for(job.poll(), left + _OVERRUN_GRACE_S)
            except (TimeoutError, _OutOfTime):
                report.polled -= 1
                report.deferred += 1
                return
            except Exception as exc:  # one bad job never stops the others
                problem = f"polling failed: {type(exc).__name__}: {exc}"
                log.warning("%s (%s): %s", sub.partition_key, sub.request_id, problem)
                report.errors.append(f"{sub.partition_key} ({sub.request_id}): {problem}")
                change = _noted(sub, problem)
            if change is not None:
                changes[sub.submission_id] = change

    await asyncio.to_thread(_clean_leftovers, config.download_dir)
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


def _noted(sub: Submission, problem: str) -> JobChange | None:
    """The problem recorded on the job, its status unchanged (None: already recorded)."""
    if sub.error == problem:
        return None
    return JobChange(sub.submission_id, sub.version, sub.status, error=problem)


def _percent(progress: float | int | None) -> int | None:
    """Progress as the ledger keeps it: a whole percent, or None (the service may send none,
    null, or a fraction)."""
    if progress is None:
        return None
    try:
        return max(0, min(100, round(float(progress))))
    except (TypeError, ValueError, OverflowError):
        return None


def _not_found(
    sub: Submission, config: PollConfig, now: datetime, why: str, late: bool
) -> JobChange:
    """A 404 from status: LOST once the 404s have lasted (or the job deadline passed), else
    one more in the streak."""
    since = sub.not_found_since or now
    count = sub.not_found_count + 1
    lasted = (now - since).total_seconds()
    if late or (count >= config.lost_after_404s and lasted >= config.lost_after_seconds):
        return JobChange(
            sub.submission_id,
            sub.version,
            VideoStatus.LOST,
            error=f"the service no longer knows {sub.request_id}: {count} answers of 404 over "
            f"{lasted:.0f} s ({why})",
            completed=True,
        )
    return JobChange(
        sub.submission_id,
        sub.version,
        sub.status,
        error=f"status answered 404 ({count} in a row since {since:%H:%M:%S} UTC: {why}); "
        f"LOST only after {config.lost_after_seconds:.0f} s of them",
        extra={"not_found_count": count, "not_found_since": since},
    )


T = TypeVar("T")


class _OutOfTime(Exception):
    """The tick's budget ended before this job's status answered: it waits for the next tick."""


class _DownloadCut(Exception):
    """The tick's budget ended in the middle of a video's download."""

    def __init__(self, partial: PartialDownload | None, kept_before: int) -> None:
        kept = partial.kept_bytes if partial is not None else 0
        super().__init__(f"the download was cut by the tick's budget ({kept} bytes kept)")
        # it moved on: it continued the bytes kept before (the server honours Range), or it is
        # the first attempt to keep any; a download that starts over each tick never finishes
        self.progressed = partial is not None and kept > 0 and (partial.resumed or not kept_before)
        self.kept_bytes = kept


@dataclass
class _Job:
    """One job's polling in one tick: each call it makes is bounded by the tick's ``deadline``
    (a ``time.monotonic()`` value); ``late``: the job is past its own deadline."""

    client: AsyncKvidClient
    config: PollConfig
    sub: Submission
    late: bool
    now: datetime
    deadline: float
    report: PollReport
    logs: dict[int, tuple[str, ...]]

    async def within(self, awaitable: Awaitable[T]) -> T:
        """``awaitable``, cancelled (TimeoutError) when the tick's budget ends."""
        return await asyncio.wait_for(awaitable, max(0.0, self.deadline - time.monotonic()))

    @property
    def where(self) -> str:
        return f"{self.sub.partition_key} ({self.sub.request_id})"

    async def poll(self) -> JobChange | None:
        """The change one status answer makes to the job (None: nothing changed)."""
        sub, config = self.sub, self.config
        kind = JobKind(sub.job_kind)
        if sub.status is VideoStatus.FETCHING:
            # the service said it is done: what is left is ours (the video), so neither its
            # status nor the job deadline matter any more, only ``fetch_attempts``
            return await self.completed(kind, {})
        try:
            status = await self.within(self.client.status(kind, str(sub.request_id)))
        except TimeoutError:
            if not self.late:
                raise _OutOfTime from None
            # a service that never answers must not be polled forever, even when each of its
            # hangs outlasts a tick
            return _timed_out(sub, config, "no status answer within a tick's budget")
        except KvidNotFoundError as exc:
            return _not_found(sub, config, self.now, exc.server_message or str(exc), self.late)
        except KvidError as exc:
            problem = f"status: {type(exc).__name__}: {exc}"
            self.report.errors.append(f"{self.where}: {problem}")
            # a service that never answers must not be polled forever
            if self.late:
                return _timed_out(sub, config, f"no usable status answer ({problem})")
            return None
        # an answer ends a 404 streak
        found = {"not_found_count": 0, "not_found_since": None} if sub.not_found_count else {}
        self.logs[sub.submission_id] = tuple(status.logs[-3:])
        if status.is_completed:
            return await self.completed(kind, found)
        progress = _percent(status.progress)
        if status.ended_without_video:
            reason = status.reason or ("canceled" if not status.is_failed else "no reason")
            return JobChange(
                sub.submission_id,
                sub.version,
                VideoStatus.FAILED if status.is_failed else VideoStatus.CANCELED,
                progress=progress,
                error=reason,
                completed=True,
            )
        if self.late:
            return _timed_out(sub, config, f"still {status.status}")
        running = VideoStatus.from_service(status.status)
        if running is sub.status and progress == sub.progress and not found:
            return None
        extra = {**found, "error": None} if found else {}
        return JobChange(sub.submission_id, sub.version, running, progress=progress, extra=extra)

    async def completed(self, kind: JobKind, found: dict[str, object]) -> JobChange | None:
        """The service says done: fetch, verify and keep the video, at most ``fetch_attempts``
        times ``refetch_interval_seconds`` apart; then FETCH_FAILED (the paid request_id kept).

        The job deadline does not apply: it bounds the service's work, and a paid video stays
        fetchable however long our downloads take. A download cut by the tick's budget that
        made progress (resumed, or kept its first bytes) is not a failed attempt."""
        sub, config = self.sub, self.config
        waited = (
            (self.now - sub.updated_at).total_seconds()
            if sub.updated_at
            else config.refetch_interval_seconds
        )
        if sub.fetch_failures and waited < config.refetch_interval_seconds:
            return None  # the last fetch failed a moment ago: try again on a later tick
        try:
            video, used_credit = await self.fetch(kind)
        except KvidDownloadBusyError:
            return None  # another poller (a run, a second sensor) is downloading it right now
        except _DownloadCut as cut:
            if cut.progressed:
                return JobChange(
                    sub.submission_id,
                    sub.version,
                    VideoStatus.FETCHING,
                    progress=100,
                    error=f"downloading the video: {cut.kept_bytes} bytes so far; the next "
                    "tick continues",
                    extra=found,
                )
            return self.fetch_failed(str(cut), found)
        except Exception as exc:  # whatever the result, the download or the probe raised
            return self.fetch_failed(f"{type(exc).__name__}: {exc}", found)
        # the service's own figure, where it reports one, is the job's cost (the estimate stays)
        cost = {"cost_credits": used_credit} if used_credit is not None else {}
        return JobChange(
            sub.submission_id,
            sub.version,
            VideoStatus.COMPLETED,
            progress=100,
            video=video,
            completed=True,
            extra={**found, **cost},
        )

    def fetch_failed(self, why: str, found: dict[str, object]) -> JobChange:
        sub = self.sub
        problem = f"fetching the video: {why}"
        self.report.errors.append(f"{self.where}: {problem}")
        failures = sub.fetch_failures + 1
        given_up = failures >= self.config.fetch_attempts
        if given_up:
            problem = (
                f"completed, but the video could not be fetched in {failures} attempts (last: "
                f"{problem}); the request_id {sub.request_id} is kept: `kvid-dagster refetch "
                f"{sub.partition_key}` tries again"
            )
        return JobChange(
            sub.submission_id,
            sub.version,
            VideoStatus.FETCH_FAILED if given_up else VideoStatus.FETCHING,
            progress=100,
            error=problem,
            completed=given_up,
            extra={**found, "fetch_failures": failures},
        )

    async def fetch(self, kind: JobKind) -> tuple[VideoFile, float | None]:
        """The result (and the credits the service says the job used), and its video
        downloaded to a hidden staging file, verified as a video and measured against its
        request (``_verified``), then renamed into place: what is not a video never lands as
        .mp4."""
        config, sub = self.config, self.sub
        try:
            result = await self.within(self.client.result(kind, str(sub.request_id)))
        except TimeoutError:
            raise _DownloadCut(None, 0) from None
        if not config.download:
            unfetched = VideoFile(
                url=result.url, name=result.name, size_kb=_whole_kb(result.size_kb)
            )
            return unfetched, result.used_credit
        target = video_path(config.download_dir, sub)
        if is_remote(target):
            return await self.fetch_to_storage(result, target)
        assert isinstance(config.download_dir, Path) and isinstance(target, Path)
        config.download_dir.mkdir(parents=True, exist_ok=True)
        # a name of its own: two pollers (two runs, a run and a sensor) may fetch one job at
        # once, and one renaming a shared staging file under the other failed the other's fetch
        staging = target.with_name(f".{target.stem}.{uuid.uuid4().hex[:8]}{_STAGING_SUFFIX}")
        partial = target.with_name(f".{target.name}{_PARTIAL_SUFFIX}")
        try:
            downloaded = await self.download(result, staging, partial)
            probe, quality = await asyncio.to_thread(
                _verified, downloaded.path, sub, config.image_dir
            )
            await asyncio.to_thread(os.replace, staging, target)
        except BaseException:
            with contextlib.suppress(OSError):
                staging.unlink()
            raise
        # the UI's previews are made here, in a worker thread within the tick's budget, and
        # cached beside the video: reporting the materialization then only reads them back
        with contextlib.suppress(PreviewError):
            await asyncio.to_thread(video_previews, target)
        video = _video_file(result, str(target), downloaded.sha256, probe, quality)
        return video, result.used_credit

    async def download(self, result: JobResult, dest: Path, partial: Path) -> DownloadedFile:
        """The download, continuing what an earlier tick kept in ``partial``; cut by the
        tick's budget (``_DownloadCut``), what it received stays there for the next tick."""
        kept = PartialDownload(partial)
        before = partial.stat().st_size if partial.exists() else 0
        download = self.client.download(
            result, dest, max_bytes=self.config.max_download_bytes, partial=kept
        )
        try:
            return await self.within(download)
        except TimeoutError:
            raise _DownloadCut(kept, before) from None

    async def fetch_to_storage(
        self, result: JobResult, target: StoragePath
    ) -> tuple[VideoFile, float | None]:
        """``fetch`` for remote storage: downloaded to the system temp dir (never the data
        dir), verified as a local download is, then streamed to its final key, which is what
        the ledger records. A failed upload raises :class:`StorageError`: the job's fetch
        failed, and is retried as any failed fetch is."""
        staging = tempfile.mkdtemp(prefix=_REMOTE_STAGING_PREFIX)
        partial = Path(tempfile.gettempdir(), _REMOTE_PARTIALS, target.name + _PARTIAL_SUFFIX)
        try:
            local = Path(staging) / target.name
            downloaded = await self.download(result, local, partial)
            probe, quality = await asyncio.to_thread(
                _verified, downloaded.path, self.sub, self.config.image_dir
            )
            stored = await asyncio.to_thread(put_file, local, target)
            # the previews beside it, after it (so they are never older than the video)
            with contextlib.suppress(PreviewError, StorageError):
                previews = await asyncio.to_thread(video_previews, local)
                await asyncio.to_thread(store_previews, previews, target)
        finally:  # at once, not in a thread: a cancelled tick must not leave it behind
            shutil.rmtree(staging, ignore_errors=True)
        video = _video_file(result, stored, downloaded.sha256, probe, quality)
        return video, result.used_credit


def _video_file(
    result: JobResult, stored: str, sha256: str, probe: VideoProbe, quality: VideoQuality
) -> VideoFile:
    return VideoFile(
        url=result.url,
        name=result.name,
        size_kb=_whole_kb(result.size_kb),
        local_path=stored,
        sha256=sha256,
        width=probe.width,
        height=probe.height,
        fps=probe.fps,
        num_frames=probe.num_frames,
        duration_s=probe.duration_s,
        quality=quality,
    )


def _whole_kb(size_kb: float | None) -> int | None:
    """The catalog keeps whole kilobytes (the generation dialect reports bytes)."""
    return None if size_kb is None else round(size_kb)


def _verified(
    path: Path, sub: Submission, image_dir: Path | None
) -> tuple[VideoProbe, VideoQuality]:
    """The file's probe, if it is a video whose frames decode; else ValueError (a failed
    fetch). And its measured quality against ``sub``'s request: a video that is not what was
    asked, or blank, or frozen, is delivered all the same
    (see :mod:`kvid_dagster.media.quality`)."""
    try:
        probe = probe_video(path)
    except Exception as exc:  # PyAV raises its own zoo (and IndexError: no video stream)
        raise ValueError(f"the download is not a video ({type(exc).__name__}: {exc})") from exc
    if probe.width <= 0 or probe.height <= 0 or probe.num_frames <= 0:
        raise ValueError(f"the download has no picture ({probe.width}x{probe.height}, "
                         f"{probe.num_frames} frames)")  # fmt: skip
    try:
        figures = measure_picture(path, probe.num_frames)
    except Exception as exc:  # a stream whose header probes but whose frames do not decode
        raise ValueError(
            f"the download's frames do not decode ({type(exc).__name__}: {exc})"
        ) from exc
    return probe, assess(probe, figures, expected_output(sub, image_dir))


def _clean_leftovers(download_dir: StoragePath) -> None:
    """Remove staging and partial files a killed poller left (never a fresh one: another
    poller may be writing it)."""
    old = time.time() - _LEFTOVER_AGE_S
    if is_remote(download_dir):
        for path in Path(tempfile.gettempdir()).glob(f"{_REMOTE_STAGING_PREFIX}*"):
            with contextlib.suppress(OSError):
                if path.is_dir() and path.stat().st_mtime < old:
                    shutil.rmtree(path)
        folder, pattern = Path(tempfile.gettempdir(), _REMOTE_PARTIALS), "*"
    else:
        assert isinstance(download_dir, Path)
        folder, pattern = download_dir, ".*"  # hidden files beside the videos
    if not folder.is_dir():
        return
    # a partial download is touched by every tick that continues it: an old one was abandoned
    suffixes = (_STAGING_SUFFIX, ".part", _PARTIAL_SUFFIX, f"{_PARTIAL_SUFFIX}.json")
    for path in folder.glob(pattern):
        if not path.name.endswith(suffixes):
            continue
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_mtime < old:
                path.unlink()
