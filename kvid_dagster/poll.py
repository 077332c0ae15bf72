"""Polling every pending job once, concurrently, inside a time budget.

One call of :func:`poll_pending` is one sensor tick: it reads the pending rows from the catalog,
asks the service for each job's status (what does not fit in the budget waits for the next tick,
round-robin from the cursor key), fetches, downloads and probes finished videos, records every
change in the catalog in one write, and returns the events for the orchestrator to publish.
Knows neither Dagster nor HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from kvid_dagster.catalog import KvidCatalog
from kvid_dagster.client import AsyncKvidClient, JobKind, KvidError, KvidNotFoundError
from kvid_dagster.probe import probe_video
from kvid_dagster.prompts import PROMPT_ID_PATTERN

log = logging.getLogger("kvid_dagster.poll")

DEFAULT_JOB_DEADLINE_S = 15 * 60.0  # the vendor says 1-5 min; three times that before giving up
DEFAULT_INTENT_GRACE_S = 10 * 60.0  # a SUBMITTING row older than this lost its submitter
# how a job can end, as the catalog and the VideoEvents name it
TERMINAL_OUTCOMES = frozenset({"COMPLETED", "FAILED", "TIMED_OUT", "LOST", "UNCERTAIN"})


@dataclass(frozen=True)
class PollConfig:
    download_dir: Path
    download: bool = True
    budget_s: float = 40.0
    job_deadline_s: float = DEFAULT_JOB_DEADLINE_S
    intent_grace_s: float = DEFAULT_INTENT_GRACE_S
    max_download_bytes: int = 512 * 1024 * 1024
    concurrency: int = 32


@dataclass(frozen=True)
class VideoEvent:
    """Something Dagster should hear about one partition."""

    partition_key: str
    outcome: str  # COMPLETED | FAILED | TIMED_OUT | LOST | UNCERTAIN | PROGRESS
    record: Mapping[str, Any]  # the catalog row after the change
    log_lines: tuple[str, ...] = ()


@dataclass
class PollReport:
    events: list[VideoEvent] = field(default_factory=list)
    pending: int = 0  # jobs with a request_id that were not terminal at the start
    polled: int = 0
    deferred: int = 0  # left for the next tick by the time budget
    errors: list[str] = field(default_factory=list)
    last_key: str | None = None  # the cursor: the next tick starts after it
    elapsed_s: float = 0.0

    @property
    def terminal(self) -> list[VideoEvent]:
        return [e for e in self.events if e.outcome != "PROGRESS"]


def video_path(download_dir: Path, partition_key: str) -> Path:
    """Where a partition's video goes: always inside ``download_dir``, whatever the key holds."""
    if PROMPT_ID_PATTERN.fullmatch(partition_key):
        name = partition_key
    else:
        name = "key-" + hashlib.sha256(partition_key.encode()).hexdigest()[:16]
    path = (download_dir / f"{name}.mp4").resolve()
    if path.parent != download_dir.resolve():
        raise ValueError(f"video path for {partition_key!r} escapes {download_dir}")
    return path


def _as_datetime(value: Any) -> datetime | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NaT:
        return None
    stamp = pd.Timestamp(value)
    if pd.isna(stamp):
        return None
    return (stamp.tz_localize(UTC) if stamp.tzinfo is None else stamp).to_pydatetime()


def _rotate(keys: list[str], start_after: str | None) -> list[str]:
    if not start_after:
        return keys
    later = [k for k in keys if k > start_after]
    return later + [k for k in keys if k <= start_after]


async def poll_pending(
    client: AsyncKvidClient,
    catalog: KvidCatalog,
    config: PollConfig,
    *,
    start_after: str | None = None,
) -> PollReport:
    """Poll each pending job once (budget permitting) and record what changed."""
    started = time.monotonic()
    now = datetime.now(UTC)
    report = PollReport()
    rows = {str(r["partition_key"]): r for r in catalog.pending_records()}
    updates: dict[str, dict[str, Any]] = {}

    # intents whose submitter vanished between "send" and "record": a person must look
    for key, row in rows.items():
        if row.get("status") == "SUBMITTING" and not row.get("request_id"):
            since = _as_datetime(row.get("submitted_at")) or _as_datetime(row.get("updated_at"))
            if since is not None and (now - since).total_seconds() > config.intent_grace_s:
                updates[key] = {"status": "UNCERTAIN", "error": _intent_expired(row, since)}

    keys = _rotate(sorted(k for k, r in rows.items() if r.get("request_id")), start_after)
    report.pending = len(keys)
    gate = asyncio.Semaphore(max(1, config.concurrency))
    logs_by_key: dict[str, tuple[str, ...]] = {}

    def past_deadline(row: Mapping[str, Any]) -> bool:
        submitted = _as_datetime(row.get("submitted_at"))
        return submitted is not None and (now - submitted).total_seconds() > config.job_deadline_s

    async def poll_one(key: str) -> None:
        row = rows[key]
        async with gate:
            if time.monotonic() - started > config.budget_s:
                report.deferred += 1
                return
            report.polled += 1
            report.last_key = key  # the semaphore is FIFO: this follows the rotation order
            kind = JobKind(str(row["job_kind"]))
            request_id = str(row["request_id"])
            try:
                status = await client.status(kind, request_id)
            except KvidNotFoundError as exc:
                updates[key] = {
                    "status": "LOST",
                    "error": f"the service no longer knows "
                    f"{request_id} ({exc.server_message or exc})",
                }
                return
            except KvidError as exc:
                problem = f"status: {type(exc).__name__}: {exc}"
                report.errors.append(f"{key}: {problem}")
                if past_deadline(row):  # a service that never answers must not be polled forever
                    updates[key] = _timed_out(config, f"no usable status answer ({problem})")
                return
            logs_by_key[key] = tuple(status.logs[-3:])
            if status.is_completed:
                try:
                    updates[key] = await _complete(client, config, key, kind, request_id)
                except (KvidError, OSError, ValueError) as exc:
                    # not COMPLETED (terminal) without a video: FETCHING is polled again next tick
                    problem = f"fetching the video: {type(exc).__name__}: {exc}"
                    report.errors.append(f"{key}: {problem}")
                    if past_deadline(row):
                        updates[key] = _timed_out(config, f"completed, but {problem}")
                    elif row.get("status") != "FETCHING" or row.get("error") != problem:
                        updates[key] = {"status": "FETCHING", "progress": 100, "error": problem}
                return
            if status.is_failed:
                reason = status.message or (status.logs[-1] if status.logs else "") or "no reason"
                updates[key] = {
                    "status": "FAILED",
                    "error": reason,
                    "progress": status.progress,
                    "completed_at": datetime.now(UTC),
                }
                return
            if past_deadline(row):
                updates[key] = _timed_out(config, f"still {status.status}")
                return
            if status.status != row.get("status") or status.progress != row.get("progress"):
                updates[key] = {"status": status.status, "progress": status.progress}

    await asyncio.gather(*(poll_one(k) for k in keys))

    if updates:
        _record(catalog, rows, updates, report)
    for key, change in updates.items():
        record = {**rows.get(key, {}), **change, "partition_key": key}
        status = str(change["status"])
        outcome = status if status in TERMINAL_OUTCOMES else "PROGRESS"
        report.events.append(VideoEvent(key, outcome, record, logs_by_key.get(key, ())))
    report.elapsed_s = time.monotonic() - started
    return report


def _intent_expired(row: Mapping[str, Any], since: datetime) -> str:
    """Why an old intent without a request_id is UNCERTAIN, and what was (maybe) sent."""
    return (
        "the submitting process stopped between sending generate and recording its request_id "
        f"(intent of {since:%Y-%m-%d %H:%M:%S} UTC, request_hash {row.get('request_hash')}); "
        "the job may exist and be billed: look for this prompt and params_json in the kvid "
        "dashboard, then record its request_id with resolve_uncertain(), or release the row "
        "for a new job"
    )


def _timed_out(config: PollConfig, what: str) -> dict[str, Any]:
    return {
        "status": "TIMED_OUT",
        "error": f"{what} after the {config.job_deadline_s:.0f} s job deadline; polling stopped "
        "(the request_id is kept: the job may still finish)",
        "completed_at": datetime.now(UTC),
    }


def _identity(row: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """What changes when someone else moved a row on while this tick was polling it."""
    if row is None:
        return (None,)
    return (row.get("status"), row.get("request_id"), _as_datetime(row.get("submitted_at")))


def _record(
    catalog: KvidCatalog,
    rows: Mapping[str, Mapping[str, Any]],
    updates: dict[str, dict[str, Any]],
    report: PollReport,
) -> None:
    """Write the tick's changes in one part, and how each job ended in the submissions history.

    Under the catalog lock, a row that changed since it was read (a submitter recorded its
    request_id, a forced re-submission started, another poller got there first) is left alone:
    a stale UNCERTAIN must never hide a request_id recorded meanwhile.
    """
    with catalog.lock():
        current = catalog.records_for(updates)
        for key in list(updates):
            if _identity(current.get(key)) != _identity(rows[key]):
                del updates[key]
                report.errors.append(f"{key}: changed while it was polled; left for the next tick")
        if not updates:
            return
        catalog.update_many([{"partition_key": k, **v} for k, v in updates.items()])
        outcomes = []
        for key, change in updates.items():
            status = str(change["status"])
            if status not in TERMINAL_OUTCOMES:
                continue
            row = rows[key]
            event: dict[str, Any] = {
                "partition_key": key,
                "event": status,
                "request_hash": row.get("request_hash"),
                "job_kind": row.get("job_kind"),
                "model": row.get("model"),
                "request_id": row.get("request_id"),
                "attempt": row.get("attempts"),
                "error": change.get("error"),
            }
            if status == "UNCERTAIN":  # never counted at SUBMITTED: this is its only cost record
                event["params_json"] = row.get("params_json")
                event["cost_credits"] = row.get("cost_credits")
            outcomes.append(event)
        catalog.record_submissions(outcomes)


async def _complete(
    client: AsyncKvidClient, config: PollConfig, key: str, kind: JobKind, request_id: str
) -> dict[str, Any]:
    result = await client.result(kind, request_id)
    change: dict[str, Any] = {
        "status": "COMPLETED",
        "progress": 100,
        "url": result.url,
        "name": result.name,
        "size_kb": result.size_kb,
        "completed_at": datetime.now(UTC),
        "error": None,
    }
    if config.download:
        config.download_dir.mkdir(parents=True, exist_ok=True)
        downloaded = await client.download(
            result, video_path(config.download_dir, key), max_bytes=config.max_download_bytes
        )
        probe = await asyncio.to_thread(probe_video, downloaded.path)
        change.update(
            local_path=str(downloaded.path),
            sha256=downloaded.sha256,
            width=probe.width,
            height=probe.height,
            fps=probe.fps,
            num_frames=probe.num_frames,
            duration_s=probe.duration_s,
        )
    return change
