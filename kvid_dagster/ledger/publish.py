"""Publishing the ledger as the Parquet catalogs pandas, DuckDB and Spark read.

``<catalog_dir>/videos/data.parquet`` (one row per prompt row, its latest state) and
``<catalog_dir>/submissions/data.parquet`` (every submission event) are written from one
consistent read of the ledger to hidden temp files beside them, fsynced, then renamed into
place: a reader sees the previous file or the new one, never half of one. Each file records the
ledger revision it shows. The renames happen under the ledger's ``publication`` lock and only
over older (or unreadable) files, so publishers racing on any number of hosts never put an older
state back; one that finds the ledger moved on meanwhile publishes again. A publisher killed
mid-write leaves its temp files; a later one removes them once they are old.

On object storage (``catalog_dir`` an ``s3://...`` URL, see :mod:`kvid_dagster.media.storage`) there
is no rename, but one object's PUT is atomic: the files are written to a local temp dir, and
uploaded straight to their final keys under the same lock and the same revision rule.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    Float,
    Integer,
    String,
    Table,
    Text,
    func,
    or_,
    select,
)

from kvid_dagster.ledger.row_rule import JOB_PREFIX, JOB_STATUS, OTHERWISE, ROW_RULE, RowOutcome
from kvid_dagster.ledger.store import DEFAULT_TABLE_PREFIX, Ledger
from kvid_dagster.ledger.tables import (
    JOB_OUTCOME_COLUMNS,
    QUALITY_COLUMNS,
    ROW_REQUEST_COLUMNS,
    VIDEO_FILE_COLUMNS,
    StoredText,
    UTCDateTime,
    define_tables,
)
from kvid_dagster.media.storage import (
    StoragePath,
    arrow_location,
    is_remote,
    put_file,
    storage_path,
)

REVISION_KEY = b"kvid.revision"
LEDGER_ID_KEY = b"kvid.ledger_id"
#: the highest submission id the publication read (see ``_unstamped_since``)
LAST_SUBMISSION_KEY = b"kvid.last_submission_id"
TABLES = ("videos", "submissions")
DATA_FILE = "data.parquet"
ROW_GROUP_ROWS = 16_384
_TS = pa.timestamp("us", tz="UTC")
_MAX_ROUNDS = 3
_TMP_SUFFIX = ".tmp"
_STAGE_PREFIX = "kvid-publish-"  # a remote publication's local staging dir
# a publication's temp file or staging dir untouched this long is a killed publisher's: any
# live one is written in seconds (100,000 rows: about 2 s) and gone once placed
STALE_TEMP_SECONDS = 3600.0
_FETCH_ROWS = 4_096  # rows per driver fetch: they stay in cache (8-12% faster than 16,384)
# dictionary-encode only the few-valued columns: on prompts, hashes and ids a dictionary is
# pure cost (it took 40% of a 100,000-row write, and the files came out larger)
_DICTIONARY_COLUMNS = ("status", "job_kind", "model", "event")

_LEDGER = define_tables(DEFAULT_TABLE_PREFIX)  # for its column types: any prefix has them
# Arrow type of each ledger column type (an exact type: ``BigInteger`` is an ``Integer``)
_ARROW_TYPES: dict[type[Any], pa.DataType] = {
    String: pa.string(), Text: pa.string(), StoredText: pa.string(), Integer: pa.int32(),
    BigInteger: pa.int64(), Float: pa.float64(), Boolean: pa.bool_(), UTCDateTime: _TS,
}  # fmt: skip


def _typed(table: Table, names: Sequence[str]) -> list[tuple[str, pa.DataType]]:
    return [(n, _ARROW_TYPES[type(table.c[n].type)]) for n in names]


_VIDEO_FIELDS: list[tuple[str, pa.DataType]] = [
    *_typed(_LEDGER.rows, ROW_REQUEST_COLUMNS),
    *_typed(_LEDGER.jobs, ["request_id", "status", "progress", *VIDEO_FILE_COLUMNS,
                           *QUALITY_COLUMNS, "error"]),
    ("attempts", pa.int32()),
    *_typed(_LEDGER.jobs, ["cost_credits", "estimated_credits", "submitted_at", "completed_at",
                           "updated_at"]),
]  # fmt: skip

_SUBMISSION_FIELDS: list[tuple[str, pa.DataType]] = _typed(
    _LEDGER.events,
    ["event_id", "partition_key", "request_hash", "job_kind", "model", "params_json",
     "request_id", "event", "attempt", "cost_credits", "error", "recorded_at"],
)  # fmt: skip

# pandas dtype for each Arrow type: nullable ints keep their width whatever the nulls
_PANDAS_DTYPES: dict[pa.DataType, str] = {
    pa.string(): "str",
    pa.int32(): "Int32",
    pa.int64(): "Int64",
    pa.float64(): "float64",
    pa.bool_(): "boolean",
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


@dataclass(frozen=True)
class PublishStats:
    revision: int
    videos: int
    submissions: int
    seconds: float
    rounds: int
    incremental: bool  # only what changed since the previous publication was read
    videos_table: pa.Table  # what catalog/videos now holds


def _fetch(conn: Connection, query: Any, fields: Sequence[tuple[str, pa.DataType]]) -> pa.Table:
    """``query``'s result as an Arrow table of ``fields``: each chunk of driver rows is handed
    to Arrow as it comes (tuples into a struct array, converted in C: per-value conversion in
    Python was most of the cost of reading 100,000 rows), so at most one chunk of Python
    objects is alive at a time. Timestamps come back as the driver gives them (SQLite: ISO
    text, PostgreSQL: naive datetimes; both UTC, the ledger stores nothing else) and are
    read as UTC; booleans too (SQLite: 0 and 1)."""
    sqlite = conn.dialect.name == "sqlite"
    wire = {
        _TS: pa.string() if sqlite else pa.timestamp("us"),
        pa.bool_(): pa.int8() if sqlite else pa.bool_(),
    }
    row_type = pa.struct([(n, wire.get(t, t)) for n, t in fields])
    compiled = query.compile(dialect=conn.dialect)
    params: Any = compiled.params
    if compiled.positional:
        params = [compiled.params[n] for n in compiled.positiontup or ()]
    driver = conn.connection.dbapi_connection
    assert driver is not None
    cursor = driver.cursor()
    chunks = []
    try:
        cursor.execute(str(compiled), params)
        while rows := cursor.fetchmany(_FETCH_ROWS):
            chunks.append(pa.array(rows, type=row_type))
    finally:
        cursor.close()
    table = pa.Table.from_struct_array(pa.chunked_array(chunks, type=row_type))
    for i, (name, type_) in enumerate(fields):
        if type_ == _TS:
            table = table.set_column(i, name, table[name].cast(pa.timestamp("us")).cast(_TS))
        elif type_ != table.schema.field(i).type:
            table = table.set_column(i, name, table[name].cast(type_))
    return table


# what the videos query reads of a row and of its current job (``j_<name>``), in select order:
# the struct the driver's tuples are converted into follows the same list
_ROW_FIELDS = _typed(
    _LEDGER.rows, [*ROW_REQUEST_COLUMNS, "invalid_reason", "last_error", "updated_at"]
)
_JOB_FIELDS: list[tuple[str, pa.DataType]] = [
    ("submission_id", pa.int64()),
    *_typed(_LEDGER.jobs, ["status", "error", "attempt", "updated_at", *JOB_OUTCOME_COLUMNS]),
]
_JOINED_FIELDS = [*_ROW_FIELDS, *((f"{JOB_PREFIX}{n}", t) for n, t in _JOB_FIELDS)]


def _video_table(ledger: Ledger, conn: Connection, since: int | None) -> pa.Table:
    """The videos rows (all, or those changed after revision ``since``), by partition key."""
    rows, jobs = ledger.tables.rows, ledger.tables.jobs
    selected = [
        *(rows.c[n] for n, _ in _ROW_FIELDS),
        *(jobs.c[n].label(f"{JOB_PREFIX}{n}") for n, _ in _JOB_FIELDS),
    ]
    query = select(*selected).select_from(ledger.current_jobs())
    if since is not None:
        query = query.where(or_(rows.c.revision > since, jobs.c.revision > since))
    videos = _video_rows(_fetch(conn, query, _JOINED_FIELDS))
    return videos.sort_by("partition_key")  # byte order, whatever the database's collation


def _video_rows(joined: pa.Table) -> pa.Table:
    """Joined ledger columns -> videos rows: an invalid row shows no job; its status and error
    follow ``row_rule.ROW_RULE``."""
    invalid = pc.is_valid(joined["invalid_reason"])

    def job_column(name: str) -> pa.ChunkedArray:
        column = joined[name]
        return pc.if_else(invalid, pa.scalar(None, column.type), column)

    columns: dict[str, Any] = {n: joined[n] for n in ROW_REQUEST_COLUMNS}
    columns |= {n: job_column(f"{JOB_PREFIX}{n}") for n in JOB_OUTCOME_COLUMNS}
    columns["status"] = _by_rule(
        joined, lambda o: o.status.value if o.status is not None else joined[JOB_STATUS]
    )
    columns["error"] = _by_rule(joined, lambda o: joined[o.error])
    columns["attempts"] = job_column(f"{JOB_PREFIX}attempt")
    latest = pc.max_element_wise(  # no kernel for zoned timestamps: compare the microseconds
        joined["updated_at"].cast(pa.int64()), joined[f"{JOB_PREFIX}updated_at"].cast(pa.int64()),
        skip_nulls=True,
    )  # fmt: skip
    columns["updated_at"] = latest.cast(pa.timestamp("us")).cast(_TS)
    return pa.Table.from_pydict({n: columns[n] for n in VIDEO_COLUMNS}, schema=VIDEO_SCHEMA)


def _by_rule(joined: pa.Table, shown: Callable[[RowOutcome], Any]) -> pa.ChunkedArray:
    """``ROW_RULE`` as nested Arrow ``if_else``: what ``shown`` gives for each row's outcome."""
    result = shown(OTHERWISE)
    for when, o in reversed(ROW_RULE):
        column = joined[when.column]
        result = pc.if_else(
            pc.is_null(column) if when.null else pc.is_valid(column), shown(o), result
        )
    return result


def _submission_table(ledger: Ledger, conn: Connection, since: int | None) -> pa.Table:
    """The submission events (all, or those recorded after revision ``since``), in order."""
    events = ledger.tables.events
    query = select(*(events.c[n] for n in SUBMISSION_COLUMNS)).order_by(events.c.event_seq)
    if since is not None:
        query = query.where(events.c.revision > since)
    return _fetch(conn, query, _SUBMISSION_FIELDS).cast(SUBMISSION_SCHEMA)


@dataclass(frozen=True)
class _Published:
    """The catalogs as last published: what an incremental publication starts from."""

    videos: pa.Table
    submissions: pa.Table
    revision: int
    last_submission_id: int


@dataclass(frozen=True)
class _Read:
    """One consistent read of the ledger, and where it stands."""

    videos: pa.Table
    submissions: pa.Table
    revision: int
    last_submission_id: int
    incremental: bool  # merged into the previous publication (else read whole)


def _previous(paths: dict[str, StoragePath], ledger_id: str) -> _Published | None:
    """Both published files, if they are whole, of this ledger, at one revision (and one
    last submission id), and of this schema; else None (the next publication reads
    everything)."""
    try:
        tables = {}
        for name, path in paths.items():
            where, filesystem = arrow_location(path)
            tables[name] = pq.read_table(where, filesystem=filesystem)
    except (OSError, pa.ArrowInvalid):
        return None
    metas = [t.schema.metadata or {} for t in tables.values()]
    if any(m.get(LEDGER_ID_KEY) != ledger_id.encode() for m in metas):
        return None
    stands = {(m.get(REVISION_KEY), m.get(LAST_SUBMISSION_KEY)) for m in metas}
    if len(stands) != 1:
        return None
    revision, last_submission_id = stands.pop()
    if revision is None or last_submission_id is None:
        return None
    try:
        videos = tables["videos"].cast(VIDEO_SCHEMA)
        submissions = tables["submissions"].cast(SUBMISSION_SCHEMA)
    except (ValueError, pa.ArrowInvalid):
        return None
    return _Published(videos, submissions, int(revision), int(last_submission_id))


def read_tables(ledger: Ledger, since: _Published | None = None) -> tuple[pa.Table, pa.Table, int]:
    """(videos, submissions, revision) from one consistent read of the ledger; given the
    previous publication, only what changed after it is read, and merged into it."""
    read = _read(ledger, since)
    return read.videos, read.submissions, read.revision


def _read(ledger: Ledger, since: _Published | None) -> _Read:
    """``read_tables``: incremental when ``since`` is given and nothing was written behind the
    revisions' back (see ``_unstamped_since``), else whole."""
    jobs = ledger.tables.jobs
    with ledger.snapshot() as (conn, revision):
        last_submission_id = int(conn.scalar(select(func.max(jobs.c.submission_id))) or 0)
        if since is not None and since.revision <= revision:
            changed = _video_table(ledger, conn, since.revision)
            new_events = _submission_table(ledger, conn, since.revision)
            kept = since.videos.filter(
                pc.invert(
                    pc.is_in(since.videos["partition_key"], value_set=changed["partition_key"])
                )
            )
            videos = pa.concat_tables([kept, changed]).sort_by("partition_key")
            submissions = pa.concat_tables([since.submissions, new_events])
            if not _unstamped_since(ledger, conn, since, videos, submissions):
                return _Read(videos, submissions, revision, last_submission_id, True)
        videos, submissions = (
            _video_table(ledger, conn, None),
            _submission_table(ledger, conn, None),
        )
        return _Read(videos, submissions, revision, last_submission_id, False)


def _unstamped_since(
    ledger: Ledger, conn: Connection, since: _Published, videos: pa.Table, submissions: pa.Table
) -> bool:
    """Whether a process that does not stamp revisions (of schema 1, from before them, still
    running beside newer ones in a rolling deploy) inserted what an incremental read cannot
    see: its rows, jobs and events are at revision 0. Rows and events are never deleted, so
    the merged tables must count exactly what the ledger holds; a job inserted after the
    publication at a revision it had published is one nobody stamped. Caught, the
    publication reads everything."""
    t = ledger.tables
    counts = conn.execute(
        select(
            select(func.count()).select_from(t.rows).scalar_subquery(),
            select(func.count()).select_from(t.events).scalar_subquery(),
        )
    ).one()
    if tuple(counts) != (videos.num_rows, submissions.num_rows):
        return True
    unstamped_job = select(t.jobs.c.submission_id).where(
        t.jobs.c.submission_id > since.last_submission_id, t.jobs.c.revision <= since.revision
    )
    return conn.scalar(unstamped_job.limit(1)) is not None


def videos_frame(ledger: Ledger) -> pd.DataFrame:
    """The videos table as ``pandas.read_parquet`` of the published folder gives it."""
    return read_tables(ledger)[0].to_pandas()


def submissions_frame(ledger: Ledger) -> pd.DataFrame:
    return read_tables(ledger)[1].to_pandas()


def _metadata(path: StoragePath) -> dict[bytes, bytes] | None:
    """A published file's key-value metadata; None when it is missing or unreadable."""
    try:
        where, filesystem = arrow_location(path)
        return pq.read_metadata(where, filesystem=filesystem).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None


def published_revision(path: StoragePath) -> int | None:
    value = (_metadata(path) or {}).get(REVISION_KEY)
    return int(value) if value is not None else None


def _write_hidden(table: pa.Table, path: Path, stands: dict[bytes, bytes]) -> Path:
    """``table`` written and fsynced beside ``path`` under a hidden name (readers skip it),
    its metadata saying where the ledger ``stands``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(table.schema.metadata or {}), **stands}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        pq.write_table(
            table.replace_schema_metadata(meta), tmp, row_group_size=ROW_GROUP_ROWS,
            compression="zstd",
            use_dictionary=[c for c in _DICTIONARY_COLUMNS if c in table.column_names],
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


def _write_all(
    tables: dict[str, pa.Table], paths: dict[str, Path], stands: dict[bytes, bytes]
) -> dict[str, Path]:
    """Every table written hidden beside its path, at once (Arrow writes without the GIL: the
    two files take the time of the larger); if any fails, none is left behind."""
    with ThreadPoolExecutor(len(tables)) as pool:
        futures = {
            name: pool.submit(_write_hidden, table, paths[name], stands)
            for name, table in tables.items()
        }
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        for future in futures.values():
            if future.exception() is None:
                future.result().unlink(missing_ok=True)
        raise failed[0]
    return {name: future.result() for name, future in futures.items()}


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # the rename itself
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current(paths: dict[str, StoragePath], revision: int, ledger_id: str) -> bool:
    """Both published files are readable, of this ledger, and show ``revision`` or a later one
    (another ledger's files are replaced whatever revision they show)."""
    for path in paths.values():
        meta = _metadata(path)
        if meta is None:
            return False
        shown = meta.get(REVISION_KEY)
        if meta.get(LEDGER_ID_KEY) != ledger_id.encode() or shown is None:
            return False
        if int(shown) < revision:
            return False
    return True


def _remove_stale_temps(remote: bool, paths: dict[str, StoragePath]) -> None:
    """Remove what publishers killed mid-write left: hidden temp files beside the published
    ones, or (remote: the temp files are local, the object store gets only whole files) the
    staging dirs in the system temp dir. Only what is old enough not to be a live one."""
    if remote:
        found = Path(tempfile.gettempdir()).glob(f"{_STAGE_PREFIX}*")
    else:
        found = (
            leftover
            for path in paths.values()
            for leftover in Path(path.parent).glob(f".{path.name}.*{_TMP_SUFFIX}")
        )
    cutoff = time.time() - STALE_TEMP_SECONDS
    for leftover in found:
        with contextlib.suppress(OSError):  # another publisher removed it first
            if leftover.lstat().st_mtime >= cutoff:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def _place(tmp: Path, path: StoragePath) -> None:
    """A finished temp file to its published name: renamed locally, uploaded to a store."""
    if is_remote(path):
        put_file(tmp, path)
    else:
        os.replace(tmp, path)


def publish(ledger: Ledger, catalog_dir: str | os.PathLike[str]) -> PublishStats:
    """Write both catalogs from the ledger (``catalog_dir`` a folder or a storage URL); see
    the module docstring for the guarantees."""
    started = time.monotonic()
    remote = is_remote(catalog_dir)
    root = storage_path(catalog_dir) if remote else Path(catalog_dir)
    paths = {t: root / t / DATA_FILE for t in TABLES}
    ledger_id = ledger.ledger_id()
    videos = submissions = pa.table({})
    revision = -1
    rounds = 0
    incremental = False
    _remove_stale_temps(remote, paths)
    while rounds < _MAX_ROUNDS:
        rounds += 1
        previous = _previous(paths, ledger_id)
        read = _read(ledger, previous)
        videos, submissions, revision = read.videos, read.submissions, read.revision
        incremental = read.incremental
        if previous is not None and previous.revision >= revision:
            break  # this state (or a later one) is published already, both files whole
        # beside the published files, or (remote) in a local temp dir, uploaded from there
        stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX)) if remote else None
        local = {t: stage / t / DATA_FILE if stage else paths[t] for t in TABLES}
        written: dict[str, Path] = {}
        try:
            tables = {"videos": videos, "submissions": submissions}
            stands = {
                REVISION_KEY: str(revision).encode(),
                LEDGER_ID_KEY: ledger_id.encode(),
                LAST_SUBMISSION_KEY: str(read.last_submission_id).encode(),
            }
            written = _write_all(tables, local, stands)
            with ledger.exclusive("publication"):
                if not _current(paths, revision, ledger_id):  # never over a newer publication
                    for table, tmp in written.items():
                        _place(tmp, paths[table])
        finally:
            for tmp in written.values():
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        if not remote:  # an object store has no directory entries to make durable
            for path in paths.values():
                _fsync_dir(Path(path.parent))
        if ledger.revision() == revision:
            break
    return PublishStats(
        revision, videos.num_rows, submissions.num_rows, time.monotonic() - started, rounds,
        incremental, videos,
    )  # fmt: skip
