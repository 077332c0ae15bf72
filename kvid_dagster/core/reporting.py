"""What Dagster must hear about rows whose job ended, decided without Dagster.

The status sensor reports each outcome once as it happens, and again when Dagster never got it
(a tick that died after the ledger write). Which rows, as which event, with which ``video_ok``
verdict and which quality checks' outcomes (``quality``): typed records here; ``_dagster_common``
and the sensor turn them into Dagster events.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from kvid_dagster.core.poll import VideoEvent
from kvid_dagster.ledger import VideoRow, VideoStatus
from kvid_dagster.media.quality import CheckOutcome, QualityCheck, outcomes

VIDEO_CHECK_NAME = "video_ok"
#: every check on ``kvid_videos``, each with at most one runless result per partition
CHECK_NAMES: tuple[str, ...] = (VIDEO_CHECK_NAME, *(c.value for c in QualityCheck))
# how far back a tick looks for failures Dagster never heard of (a tick killed mid-report)
REREPORT_WINDOW_S = 24 * 3600.0


class ReportKind(StrEnum):
    """How ``kvid_videos`` hears of a partition's ended job."""

    MATERIALIZATION = "materialization"  # the video exists, downloaded and verified
    OBSERVATION = "observation"  # ended without a video: its status and request_id are shown


class RowVerdict(StrEnum):
    """The ``video_ok`` check's verdict on a partition."""

    PASSED = "passed"  # completed, downloaded and verified
    NO_VIDEO = "no_video"  # the job ended (or is pending) without a video
    NO_ROW = "no_row"  # the ledger has no row for the partition

    @property
    def passed(self) -> bool:
        return self is RowVerdict.PASSED


def verdict_for(row: VideoRow | None) -> RowVerdict:
    if row is None:
        return RowVerdict.NO_ROW
    return RowVerdict.PASSED if row.status is VideoStatus.COMPLETED else RowVerdict.NO_VIDEO


@dataclass(frozen=True)
class VideoReport:
    """One partition's ended job, to be reported: the event, the ``video_ok`` verdict and the
    quality checks' outcomes, each unless the partition already has that check's result
    (Dagster 1.13 stores one runless result per check and partition, and fails the whole tick
    on a second one). Only a measured video has quality outcomes: a partition without one
    gets none, so that its later video's are not the second result."""

    partition_key: str
    row: VideoRow
    kind: ReportKind
    verdict: RowVerdict | None
    quality: tuple[CheckOutcome, ...] = ()


def video_reports(
    events: Iterable[VideoEvent], *, checked: Mapping[str, Collection[str]]
) -> list[VideoReport]:
    """The reports of the events whose job ended; ``checked``: by check name (``CHECK_NAMES``),
    the partitions that have its result."""
    done = {name: set(checked.get(name, ())) for name in CHECK_NAMES}

    def unchecked(name: str, key: str) -> bool:
        """``key`` has no ``name`` result yet; from now on, it has."""
        new = key not in done[name]
        done[name].add(key)
        return new

    reports = []
    for event in events:
        if not event.is_final:
            continue
        key = event.partition_key
        kind = (
            ReportKind.MATERIALIZATION
            if event.status is VideoStatus.COMPLETED
            else ReportKind.OBSERVATION
        )
        verdict = verdict_for(event.row) if unchecked(VIDEO_CHECK_NAME, key) else None
        found = outcomes(event.row.video) if kind is ReportKind.MATERIALIZATION else []
        quality = tuple(o for o in found if unchecked(o.check.value, key))
        reports.append(VideoReport(key, event.row, kind, verdict, quality))
    return reports


def unmeasured_reason(row: VideoRow | None) -> str:
    """Why a partition's video has no quality outcomes (``quality.outcomes`` gave none)."""
    if row is None:
        return "no ledger row"
    if row.status is not VideoStatus.COMPLETED:
        why = f": {row.error}" if row.error else ""
        return f"no video to check: the job is {row.status}{why}"
    if row.video.local_path is None:
        return "not measured: the video was not downloaded (the status sensor's download is off)"
    return "not measured: the video was fetched before kvid-dagster measured videos"


@dataclass(frozen=True)
class ShownOutcome:
    """What the latest observation of a partition shows (None: not in its metadata)."""

    status: str | None
    request_id: str | None

    def is_stale_for(self, row: VideoRow) -> bool:
        """It shows another status or request than the row's."""
        actual = (row.status.value, row.request_id or "")
        shown = (self.status, self.request_id)
        return any(s is not None and s != a for s, a in zip(shown, actual, strict=True))


@dataclass(frozen=True)
class Recheck:
    """Changed rows whose outcome Dagster may have missed."""

    completed: list[VideoRow]  # need a materialization of their partition
    ended: list[VideoRow]  # ended without a video lately: need an observation showing it


def rows_to_recheck(rows: Iterable[VideoRow], *, skip: Collection[str], now: datetime) -> Recheck:
    """``rows`` but ``skip`` (reported this tick); failures older than the window are let be."""
    since = now - timedelta(seconds=REREPORT_WINDOW_S)
    candidates = [r for r in rows if r.partition_key not in skip]
    return Recheck(
        completed=[r for r in candidates if r.status is VideoStatus.COMPLETED],
        ended=[
            r
            for r in candidates
            if r.status.is_terminal
            and r.status not in {VideoStatus.COMPLETED, VideoStatus.INVALID}
            and (r.updated_at is None or r.updated_at >= since)
        ],
    )


def unreported(
    recheck: Recheck, materialized: Collection[str], observed: Mapping[str, ShownOutcome]
) -> list[VideoEvent]:
    """The rows of ``recheck`` Dagster does not show: a completed row whose partition is not
    materialized, an ended one with no observation or one showing another outcome."""
    events = [VideoEvent(r.partition_key, r) for r in recheck.completed]
    events = [e for e in events if e.partition_key not in materialized]
    for row in recheck.ended:
        shown = observed.get(row.partition_key)
        if shown is None or shown.is_stale_for(row):
            events.append(VideoEvent(row.partition_key, row))
    return events
