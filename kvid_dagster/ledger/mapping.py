"""Database rows to records (and a poller's change to job columns): the one place that knows
how ``Submission``, ``VideoRow`` and ``ClaimOwner`` are laid out in the ledger's tables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from kvid_dagster.ledger.records import (
    QUALITY_FIELDS,
    VIDEO_FILE_FIELDS,
    ClaimOwner,
    JobChange,
    Submission,
    VideoFile,
    VideoQuality,
    VideoRow,
)
from kvid_dagster.ledger.row_rule import row_error, row_status
from kvid_dagster.ledger.status import VideoStatus


def job_change_values(change: JobChange, now: datetime) -> dict[str, Any]:
    """The job columns a poller's change sets."""
    values: dict[str, Any] = {"status": change.status.value, "updated_at": now, **change.extra}
    if change.progress is not None:
        values["progress"] = change.progress
    if change.error is not None or change.status is VideoStatus.COMPLETED:
        values["error"] = change.error
    if change.video is not None:
        values.update({f: getattr(change.video, f) for f in VIDEO_FILE_FIELDS})
        quality = change.video.quality
        values.update({f: getattr(quality, f) if quality else None for f in QUALITY_FIELDS})
    if change.completed:
        values["completed_at"] = now
    return values


def _claim_owner(m: Mapping[str, Any], prefix: str = "") -> ClaimOwner | None:
    host = m.get(f"{prefix}owner_host")
    if host is None:
        return None
    return ClaimOwner(
        host, int(m[f"{prefix}owner_pid"] or 0), m[f"{prefix}owner_started"] or "",
        m[f"{prefix}owner_run_id"],
    )  # fmt: skip


def submission_from(m: Mapping[str, Any], prefix: str = "") -> Submission:
    def get(name: str) -> Any:
        return m.get(f"{prefix}{name}")

    return Submission(
        submission_id=int(get("submission_id")),
        request_hash=get("request_hash"),
        attempt=int(get("attempt")),
        partition_key=get("partition_key"),
        prompt=get("prompt"),
        job_kind=get("job_kind"),
        model=get("model"),
        params_json=get("params_json"),
        status=VideoStatus(get("status")),
        request_id=get("request_id"),
        progress=get("progress"),
        video=VideoFile(**{f: get(f) for f in VIDEO_FILE_FIELDS}, quality=_quality(get)),
        error=get("error"),
        cost_credits=get("cost_credits"),
        owner=_claim_owner(m, prefix),
        claimed_at=get("claimed_at"),
        heartbeat_at=get("heartbeat_at"),
        submitted_at=get("submitted_at"),
        completed_at=get("completed_at"),
        updated_at=get("updated_at"),
        version=int(get("version") or 0),
        not_found_count=int(get("not_found_count") or 0),
        not_found_since=get("not_found_since"),
        fetch_failures=int(get("fetch_failures") or 0),
        forced_by=get("forced_by"),
        dialect=get("dialect") or "video",
        estimated_credits=get("estimated_credits"),
    )


def _quality(get: Callable[[str], Any]) -> VideoQuality | None:
    """A job's measured video, or None (never measured: every quality column is null)."""
    if get("sampled_frames") is None:
        return None
    return VideoQuality(**{f: get(f) for f in QUALITY_FIELDS})


def video_row_from(m: Mapping[str, Any]) -> VideoRow:
    sub = submission_from(m, "j_") if m["j_submission_id"] is not None else None
    if m["invalid_reason"] is not None:
        sub = None
    return VideoRow(
        partition_key=m["partition_key"],
        prompt=m["prompt"],
        job_kind=m["job_kind"],
        model=m["model"],
        request_hash=m["request_hash"],
        params_json=m["params_json"],
        user_columns_json=m["user_columns_json"],
        status=row_status(m),
        error=row_error(m),
        submission=sub,
        updated_at=max(
            (t for t in (m["updated_at"], sub.updated_at if sub else None) if t is not None),
            default=None,
        ),
    )
