"""One-time import of a data folder written by kvid-dagster 0.1 (its Parquet-log catalog).

0.1 kept its state in ``<data_dir>/catalog/``: published snapshots (``videos/data.parquet``,
``submissions/data.parquet``, carrying ``kvid.max_seq``) plus unpublished partial updates under
``_log/``. Its request_ids are money, so the first open of such a folder folds that state and
copies it into the ledger; the old log is then renamed ``_log.imported-0.1`` and kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from sqlalchemy import Connection, insert

from kvid_dagster.ledger.status import VideoStatus
from kvid_dagster.ledger.tables import JOB_OUTCOME_COLUMNS, ROW_REQUEST_COLUMNS, LedgerTables

log = logging.getLogger("kvid_dagster.ledger")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

MARKER = "legacy_catalog_imported"
_MAX_SEQ_KEY = b"kvid.max_seq"
_SET_COLUMN = "_set"


def _records(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # a damaged file of the old engine: say so, import the rest
        log.warning("kvid 0.1 catalog: %s unreadable, skipped (%s)", path, exc)
        return []


def _parts(log_dir: Path, after: int) -> Iterator[Path]:
    numbered = []
    for part in log_dir.glob("*.parquet"):
        try:
            numbered.append((int(part.name.split("-", 1)[0]), part))
        except ValueError:
            continue
    yield from (p for seq, p in sorted(numbered) if seq > after)


def _max_seq(path: Path) -> int:
    try:
        return int((pq.read_metadata(path).metadata or {}).get(_MAX_SEQ_KEY, b"0"))
    except Exception:
        return 0


def fold_legacy(catalog_dir: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """(videos by partition key, submission events) as 0.1's ``latest()`` would show them."""
    videos_file = catalog_dir / "videos" / "data.parquet"
    subs_file = catalog_dir / "submissions" / "data.parquet"
    videos = {r["partition_key"]: r for r in _records(videos_file)} if videos_file.exists() else {}
    for part in _parts(catalog_dir / "_log" / "videos", _max_seq(videos_file)):
        for update in _records(part):
            row = videos.setdefault(update["partition_key"], {})
            for name in update.get(_SET_COLUMN) or []:
                row[name] = update.get(name)
            row["partition_key"] = update["partition_key"]
    events = _records(subs_file) if subs_file.exists() else []
    for part in _parts(catalog_dir / "_log" / "submissions", _max_seq(subs_file)):
        events.extend(_records(part))
    return videos, events


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _held_jobs(videos: Mapping[str, Mapping[str, Any]]) -> Iterator[tuple[str, int]]:
    """(partition key, attempt) of each job 0.1's rows hold, each paid request_id once.

    0.1 was idempotent per partition, not per request: two rows of one request were each
    paid, each with its own request_id, and both may be running. Each becomes a job of its
    own, so every one is polled until it ends; ``UNIQUE(request_hash, attempt)`` is kept by
    giving a later job of the request the next attempt (sent jobs in 0.1's attempt order, then
    by when they were sent; an intent never known to be sent comes last: the current job,
    shown UNCERTAIN, where a person resolves it). None is ever re-sent: a request's latest job
    refuses a new claim.
    """

    def order(key: str) -> tuple[str, bool, int, datetime, str]:
        v = videos[key]
        sent = _aware(v.get("submitted_at"))
        unsent = not v.get("request_id")
        return (str(v["request_hash"]), unsent, _attempt(v), sent or _EPOCH, key)

    held = [k for k, v in videos.items() if _holds(v) and v.get("request_hash")]
    last: dict[str, int] = {}  # request_hash -> the attempt given to its previous job
    paid: set[str] = set()
    for key in sorted(held, key=order):
        v = videos[key]
        request_id = v.get("request_id")
        if request_id in paid:
            continue  # one job however many rows show its id
        if request_id:
            paid.add(request_id)
        request_hash = str(v["request_hash"])
        attempt = max(_attempt(v), last.get(request_hash, 0) + 1)
        last[request_hash] = attempt
        yield key, attempt


def insert_legacy(
    conn: Connection,
    tables: LedgerTables,
    videos: Mapping[str, Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: datetime,
) -> list[int]:
    """Insert 0.1's folded state (:func:`fold_legacy`); returns the submission ids of its
    unfinished intents, UNCERTAIN now: the ledger settles them as recovery settles a claim."""
    settled: list[int] = []
    for key, v in sorted(videos.items()):
        conn.execute(
            insert(tables.rows).values(
                **({f: v.get(f) for f in ROW_REQUEST_COLUMNS} | {"partition_key": key}),
                invalid_reason=v.get("error") if _status(v) == VideoStatus.INVALID else None,
                last_error=None,
                updated_at=_aware(v.get("updated_at")) or now,
            )
        )
    for key, attempt in _held_jobs(videos):
        v = videos[key]
        job_status = _job_status(_status(v), v)
        inserted = conn.execute(
            insert(tables.jobs).values(
                request_hash=v["request_hash"],
                attempt=attempt,
                partition_key=key,
                prompt=v.get("prompt") or "",
                job_kind=v.get("job_kind") or "",
                model=v.get("model") or "",
                params_json=v.get("params_json") or "{}",
                status=job_status.value,
                **{
                    f: _aware(v.get(f)) if f.endswith("_at") else v.get(f)
                    for f in (*JOB_OUTCOME_COLUMNS, "error")
                },
                claimed_at=_aware(v.get("submitted_at")),
                updated_at=_aware(v.get("updated_at")) or now,
                version=0,
            )
        )
        if job_status is VideoStatus.UNCERTAIN and _status(v) == VideoStatus.SUBMITTING:
            settled.append(inserted.inserted_primary_key[0])
    for e in events:
        conn.execute(
            insert(tables.events).values(
                **{k: e.get(k) for k in _EVENT_FIELDS},
                recorded_at=_aware(e.get("recorded_at")) or now,
            )
        )
    return settled


def retire_legacy_log(catalog_dir: Path, rows: int, events: int) -> None:
    """Keep 0.1's imported log beside the catalog, under a name nothing reads."""
    (catalog_dir / "_log").rename(catalog_dir / "_log.imported-0.1")
    log.warning(
        "imported kvid 0.1's catalog from %s: %d rows, %d submission events",
        catalog_dir, rows, events,
    )  # fmt: skip


_EVENT_FIELDS = (
    "event_id", "partition_key", "request_hash", "job_kind", "model", "params_json",
    "request_id", "event", "attempt", "cost_credits", "error",
)  # fmt: skip


def _status(v: Mapping[str, Any]) -> str:
    return str(v.get("status") or VideoStatus.PENDING)


def _holds(v: Mapping[str, Any]) -> bool:
    """Whether 0.1's row holds a job (sent, or an intent that may have been)."""
    return _status(v) not in {VideoStatus.PENDING, VideoStatus.INVALID}


def _attempt(v: Mapping[str, Any]) -> int:
    return int(v.get("attempts") or 1)


def _job_status(status: str, v: Mapping[str, Any]) -> VideoStatus:
    """0.1's SUBMITTING row without a request_id was an intent its submitter never finished:
    the job may exist, so it is UNCERTAIN; any other status is kept (running ones mapped)."""
    if status == VideoStatus.SUBMITTING:
        return VideoStatus.SUBMITTED if v.get("request_id") else VideoStatus.UNCERTAIN
    try:
        return VideoStatus(status)
    except ValueError:
        return VideoStatus.from_service(status)
