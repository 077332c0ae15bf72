"""Publishing the ledger as the Parquet catalogs pandas, DuckDB and Spark read.

``<catalog_dir>/videos/data.parquet`` (one row per prompt row, its latest state) and
``<catalog_dir>/submissions/data.parquet`` (every submission event) are written from one
consistent read of the ledger to hidden temp files beside them, fsynced, then renamed into
place: a reader sees the previous file or the new one, never half of one. Each file records the
ledger revision it shows. The renames happen under the ledger's ``publication`` lock and only
over older (or unreadable) files, so publishers racing on any number of hosts never put an older
state back; one that finds the ledger moved on meanwhile publishes again.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kvid_dagster.ledger.store import Ledger, row_error, row_status

REVISION_KEY = b"kvid.revision"
TABLES = ("videos", "submissions")
DATA_FILE = "data.parquet"
ROW_GROUP_ROWS = 16_384
_TS = pa.timestamp("us", tz="UTC")
_MAX_ROUNDS = 3

_VIDEO_FIELDS: list[tuple[str, pa.DataType]] = [
    ("partition_key", pa.string()),
    ("prompt", pa.string()),
    ("job_kind", pa.string()),
    ("model", pa.string()),
    ("request_hash", pa.string()),
    ("params_json", pa.string()),
    ("request_id", pa.string()),
    ("status", pa.string()),
    ("progress", pa.int32()),
    ("url", pa.string()),
    ("name", pa.string()),
    ("size_kb", pa.int64()),
    ("local_path", pa.string()),
    ("sha256", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("fps", pa.float64()),
    ("num_frames", pa.int32()),
    ("duration_s", pa.float64()),
    ("error", pa.string()),
    ("attempts", pa.int32()),
    ("cost_credits", pa.float64()),
    ("submitted_at", _TS),
    ("completed_at", _TS),
    ("updated_at", _TS),
]

_SUBMISSION_FIELDS: list[tuple[str, pa.DataType]] = [
    ("event_id", pa.string()),
    ("partition_key", pa.string()),
    ("request_hash", pa.string()),
    ("job_kind", pa.string()),
    ("model", pa.string()),
    ("params_json", pa.string()),
    ("request_id", pa.string()),
    ("event", pa.string()),
    ("attempt", pa.int32()),
    ("cost_credits", pa.float64()),
    ("error", pa.string()),
    ("recorded_at", _TS),
]

# pandas dtype for each Arrow type: nullable ints keep their width whatever the nulls
_PANDAS_DTYPES: dict[pa.DataType, str] = {
    pa.string(): "str",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.float64(): "float64",
    _TS: "datetime64[us, UTC]",
}


def _schema(fields: list[tuple[str, pa.DataType]], required: Sequence[str]) -> pa.Schema:
    """The pandas metadata makes ``read_parquet`` restore nullable ``Int32``/``Int64`` columns
    (not ``float64`` when a column has nulls); DuckDB and Spark read the plain Parquet types."""
    empty = pd.DataFrame({n: pd.Series([], dtype=_PANDAS_DTYPES[t]) for n, t in fields})
    pandas_meta = pa.Schema.from_pandas(empty, preserve_index=False).metadata
    return pa.schema(
        [pa.field(n, t, nullable=n not in required) for n, t in fields], metadata=pandas_meta
    )


#: ``catalog/videos``: one row per prompt row with its latest state
VIDEO_SCHEMA: pa.Schema = _schema(_VIDEO_FIELDS, required=["partition_key", "status"])
#: ``catalog/submissions``: one row per submission event (the money and audit trail)
SUBMISSION_SCHEMA: pa.Schema = _schema(
    _SUBMISSION_FIELDS, required=["event_id", "partition_key", "event", "recorded_at"]
)
VIDEO_COLUMNS: tuple[str, ...] = tuple(VIDEO_SCHEMA.names)
SUBMISSION_COLUMNS: tuple[str, ...] = tuple(SUBMISSION_SCHEMA.names)

# videos column -> the joined ledger column it comes from (rows.* or j_* of the current job)
_FROM_JOB = {
    "request_id", "progress", "url", "name", "size_kb", "local_path", "sha256", "width",
    "height", "fps", "num_frames", "duration_s", "cost_credits", "submitted_at", "completed_at",
}  # fmt: skip


@dataclass(frozen=True)
class PublishStats:
    revision: int
    videos: int
    submissions: int
    seconds: float
    rounds: int


def _video_table(raw: Sequence[Any]) -> pa.Table:
    maps = [r._mapping for r in raw]
    columns: dict[str, list[Any]] = {}
    for name in VIDEO_COLUMNS:
        if name == "status":
            columns[name] = [row_status(m).value for m in maps]
        elif name == "error":
            columns[name] = [row_error(m) for m in maps]
        elif name == "attempts":
            columns[name] = [m["j_attempt"] for m in maps]
        elif name == "updated_at":
            columns[name] = [
                max(t for t in (m["updated_at"], m["j_updated_at"]) if t is not None) for m in maps
            ]
        elif name in _FROM_JOB:
            columns[name] = [m[f"j_{name}"] for m in maps]
        else:
            columns[name] = [m[name] for m in maps]
    # an invalid row shows no job, whatever its key's earlier request had
    invalid = [i for i, m in enumerate(maps) if m["invalid_reason"] is not None]
    for name in _FROM_JOB | {"attempts"}:
        for i in invalid:
            columns[name][i] = None
    return pa.Table.from_pydict(columns, schema=VIDEO_SCHEMA)


def _submission_table(raw: Sequence[Any]) -> pa.Table:
    maps = [r._mapping for r in raw]
    return pa.Table.from_pydict(
        {name: [m[name] for m in maps] for name in SUBMISSION_COLUMNS}, schema=SUBMISSION_SCHEMA
    )


def read_tables(ledger: Ledger) -> tuple[pa.Table, pa.Table, int]:
    """(videos, submissions, revision) from one consistent read of the ledger."""
    with ledger.snapshot() as (conn, revision):
        videos = _video_table(ledger.video_rows_raw(conn))
        submissions = _submission_table(ledger.event_rows_raw(conn))
    return videos, submissions, revision


def videos_frame(ledger: Ledger) -> pd.DataFrame:
    """The videos table as ``pandas.read_parquet`` of the published folder gives it."""
    return read_tables(ledger)[0].to_pandas()


def submissions_frame(ledger: Ledger) -> pd.DataFrame:
    return read_tables(ledger)[1].to_pandas()


def published_revision(path: Path) -> int | None:
    try:
        meta = pq.read_metadata(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(REVISION_KEY)
    return int(value) if value is not None else None


def _write_hidden(table: pa.Table, path: Path, revision: int) -> Path:
    """``table`` written and fsynced beside ``path`` under a hidden name (readers skip it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(table.schema.metadata or {}), REVISION_KEY: str(revision).encode()}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(
            table.replace_schema_metadata(meta), tmp, row_group_size=ROW_GROUP_ROWS,
            compression="zstd",
        )  # fmt: skip
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # the rename itself
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current(paths: dict[str, Path], revision: int) -> bool:
    """Both published files are readable and show ``revision`` or a later one."""
    shown = [published_revision(path) for path in paths.values()]
    return all(r is not None and r >= revision for r in shown)


def publish(ledger: Ledger, catalog_dir: str | os.PathLike[str]) -> PublishStats:
    """Write both catalogs from the ledger; see the module docstring for the guarantees."""
    started = time.monotonic()
    root = Path(catalog_dir)
    paths = {t: root / t / DATA_FILE for t in TABLES}
    videos = submissions = pa.table({})
    revision = -1
    rounds = 0
    while rounds < _MAX_ROUNDS:
        rounds += 1
        videos, submissions, revision = read_tables(ledger)
        if _current(paths, revision):
            break  # someone published this state (or a later one) already, both files whole
        written = {
            "submissions": _write_hidden(submissions, paths["submissions"], revision),
            "videos": _write_hidden(videos, paths["videos"], revision),
        }
        try:
            with ledger.exclusive("publication"):
                if not _current(paths, revision):  # never over a newer publication
                    for table, tmp in written.items():
                        os.replace(tmp, paths[table])
        finally:
            for tmp in written.values():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        for path in paths.values():
            _fsync_dir(path.parent)
        if ledger.revision() == revision:
            break
    return PublishStats(
        revision, videos.num_rows, submissions.num_rows, time.monotonic() - started, rounds
    )
