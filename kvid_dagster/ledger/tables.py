"""The ledger's tables (SQLAlchemy Core) and its schema versions.

Migrations are a small version table of our own (``<prefix>meta``), not Alembic: the ledger
lives in databases other tools own (a production Dagster instance's PostgreSQL already has
Dagster's own ``alembic_version``), a library must migrate itself on open with no scripts
folder to ship, and each step is one function run in the transaction that records it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Dialect,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)

#: The version this code writes; a database at a higher one was written by a newer kvid-dagster.
SCHEMA_VERSION = 6
# the dialect of every job sent before the ledger knew dialects (ApiDialect.VIDEO's value)
_VIDEO_DIALECT = "video"
#: The execution option a write transaction carries its revision in (see ``_stamp``).
REVISION_OPTION = "kvid_revision"
TABLE_PREFIX_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,30}")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite keeps no time zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the ledger stores UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


# PostgreSQL's text types refuse NUL, and no backend encodes a lone surrogate as UTF-8
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable_at(text: str) -> int | None:
    """The index of the first character of ``text`` a ledger database cannot store, or None."""
    found = _UNSTORABLE.search(text)
    return None if found is None else found.start()


def storable_text(text: str) -> str:
    """``text`` with U+FFFD for each character a ledger database cannot store."""
    return _UNSTORABLE.sub("\ufffd", text)


class StoredText(TypeDecorator[str]):
    """Text every backend stores. What reaches a text column from outside (a server's FAILED
    message, a refused generate's error, an invalid row's excerpt) may hold a NUL, which
    PostgreSQL refuses, failing the whole transaction and every good row in it: each
    character no backend stores is written as U+FFFD instead, the same on SQLite."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return storable_text(value) if isinstance(value, str) else value


def _stamp(context: Any) -> int:
    """The revision of the write transaction running the statement: every inserted or updated
    row of ``rows``, ``jobs`` and ``events`` carries the revision it was last written at, which
    is what lets publishing and the sensors read only what changed since a revision."""
    try:
        return int(context.execution_options[REVISION_OPTION])
    except KeyError:
        raise RuntimeError("a ledger write outside Ledger.write()") from None


def _revision_column() -> Column[Any]:
    return Column("revision", BigInteger, nullable=False, default=_stamp, onupdate=_stamp)


def _attempt_columns() -> list[Column[Any]]:
    """How the poller is faring with a job: a 404 streak (LOST only after it lasts), failed
    fetches of a completed job's video (bounded), and the forced run that claimed it."""
    return [
        Column("not_found_count", Integer, nullable=False, default=0),
        Column("not_found_since", UTCDateTime),
        Column("fetch_failures", Integer, nullable=False, default=0),
        Column("forced_by", String(255)),  # a force=True run's root run id: force is one-shot
    ]


@dataclass(frozen=True)
class LedgerTables:
    metadata: MetaData
    meta: Table  # name -> value: the schema version, the change revision, one-off markers
    rows: Table  # one per prompt row: its current request
    jobs: Table  # one per claimed attempt at a request: the money record
    events: Table  # the submissions history, published as catalog/submissions


def _request_columns() -> list[Column[Any]]:
    return [
        Column("partition_key", String(255), primary_key=True),
        Column("prompt", StoredText),
        Column("job_kind", String(64)),
        Column("model", String(255)),
        Column("request_hash", String(64)),  # null for an invalid row
        Column("params_json", StoredText),
        Column("user_columns_json", StoredText),  # the table's other columns: shown, never sent
    ]


def _video_columns() -> list[Column[Any]]:
    return [
        Column("url", StoredText),
        Column("name", StoredText),
        Column("size_kb", BigInteger),
        Column("local_path", StoredText),
        Column("sha256", String(64)),
        Column("width", Integer),
        Column("height", Integer),
        Column("fps", Float),
        Column("num_frames", Integer),
        Column("duration_s", Float),
    ]


def _quality_columns() -> list[Column[Any]]:
    """What the poller measured of a video's picture, what its request asked for, and the
    checks' verdicts (``records.VideoQuality``); all null for a job without a measured video."""
    return [
        Column("sampled_frames", Integer),
        Column("luma_mean", Float),
        Column("luma_stddev", Float),
        Column("changed_pct", Float),
        Column("expected_short_side", Integer),
        Column("expected_width", Integer),
        Column("expected_height", Integer),
        Column("expected_fps", Float),
        Column("expected_frames", Integer),
        Column("expected_duration_s", Float),
        Column("matches_request", Boolean),
        Column("not_blank", Boolean),
        Column("not_frozen", Boolean),
    ]


#: a job's video file (``records.VideoFile``) and its measured picture (``records.VideoQuality``)
VIDEO_FILE_COLUMNS: tuple[str, ...] = tuple(c.name for c in _video_columns())
QUALITY_COLUMNS: tuple[str, ...] = tuple(c.name for c in _quality_columns())
#: a row's request as the ``rows`` table holds it (and the catalog shows it)
ROW_REQUEST_COLUMNS: tuple[str, ...] = tuple(c.name for c in _request_columns())
#: what a job learned of its request from the service: the catalog shows the current job's
#: beside its row (null for an invalid row), and 0.1's are imported as they were
JOB_OUTCOME_COLUMNS = (
    "request_id", "progress", *VIDEO_FILE_COLUMNS, *QUALITY_COLUMNS, "cost_credits",
    "estimated_credits", "submitted_at", "completed_at",
)  # fmt: skip

_SPEND_INDEX_SUFFIXES = ("_claimed_at_cost", "_run_cost")


def _spend_indexes(prefix: str) -> list[Index]:
    return [
        Index(f"ix_{prefix}jobs_claimed_at_cost", "claimed_at", "cost_credits"),
        Index(f"ix_{prefix}jobs_run_cost", "owner_run_id", "cost_credits"),
    ]


def define_tables(prefix: str) -> LedgerTables:
    if not TABLE_PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(f"table prefix {prefix!r}: lowercase letters, digits and _, at most 31")
    md = MetaData()
    meta = Table(
        f"{prefix}meta",
        md,
        Column("name", String(64), primary_key=True),
        Column("int_value", BigInteger),
        Column("text_value", StoredText),
    )
    rows = Table(
        f"{prefix}rows",
        md,
        *_request_columns(),
        Column("invalid_reason", StoredText),  # set: the row is INVALID
        Column("last_error", StoredText),  # why its last submission did not go through
        Column("updated_at", UTCDateTime, nullable=False),
        _revision_column(),
        Index(f"ix_{prefix}rows_request_hash", "request_hash"),
        Index(f"ix_{prefix}rows_revision", "revision"),
    )
    jobs = Table(
        f"{prefix}jobs",
        md,
        Column("submission_id", Integer, primary_key=True, autoincrement=True),
        Column("request_hash", String(64), nullable=False),
        Column("attempt", Integer, nullable=False),
        Column("partition_key", String(255), nullable=False),
        Column("prompt", StoredText, nullable=False),
        Column("job_kind", String(64), nullable=False),
        Column("model", String(255), nullable=False),
        Column("params_json", StoredText, nullable=False),
        Column("status", String(16), nullable=False),
        Column("request_id", Text),  # the service's: as long as the client accepts (see v5)
        Column("progress", Integer),
        *_video_columns(),
        *_quality_columns(),
        Column("error", StoredText),
        # what the job cost: the service's figure when it reports one, else the estimate
        Column("cost_credits", Float),
        Column("estimated_credits", Float),
        Column("dialect", String(16), nullable=False, server_default=_VIDEO_DIALECT),
        Column("owner_host", String(255)),
        Column("owner_pid", Integer),
        Column("owner_started", String(128)),
        Column("owner_run_id", String(64)),
        Column("claimed_at", UTCDateTime),
        Column("heartbeat_at", UTCDateTime),
        Column("submitted_at", UTCDateTime),
        Column("completed_at", UTCDateTime),
        Column("updated_at", UTCDateTime, nullable=False),
        Column("version", Integer, nullable=False, default=0),
        *_attempt_columns(),
        _revision_column(),
        # the database itself refuses a second claim of the same attempt at the same request
        UniqueConstraint("request_hash", "attempt", name=f"uq_{prefix}jobs_request_attempt"),
        Index(f"ix_{prefix}jobs_status", "status"),
        Index(f"ix_{prefix}jobs_request_id", "request_id"),
        Index(f"ix_{prefix}jobs_revision", "revision"),
        # a budgeted claim sums the spend of its day and of its run in its own transaction:
        # covering indexes keep that from scanning every job the ledger ever had
        *_spend_indexes(prefix),
    )
    events = Table(
        f"{prefix}events",
        md,
        Column("event_seq", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(32), nullable=False, unique=True),
        Column("submission_id", Integer),
        Column("partition_key", String(255), nullable=False),
        Column("request_hash", String(64)),
        Column("job_kind", String(64)),
        Column("model", String(255)),
        Column("params_json", StoredText),
        Column("request_id", Text),
        Column("event", String(32), nullable=False),
        Column("attempt", Integer),
        Column("cost_credits", Float),
        Column("error", StoredText),
        Column("recorded_at", UTCDateTime, nullable=False),
        _revision_column(),
        Index(f"ix_{prefix}events_revision", "revision"),
    )
    return LedgerTables(md, meta, rows, jobs, events)


def create_schema(conn: Connection, tables: LedgerTables) -> None:
    """A new database gets the current schema in one step (no migration replays)."""
    tables.metadata.create_all(conn)


def _add_revisions(conn: Connection, tables: LedgerTables) -> None:
    """v2: the revision each row was last written at (0: before v2, so published as of old),
    the user's own columns of each row, and the poller's counts of each job."""
    conn.execute(text(f"ALTER TABLE {tables.rows.name} ADD COLUMN user_columns_json TEXT"))
    jobs = tables.jobs.name
    for column in (
        "not_found_count INTEGER NOT NULL DEFAULT 0",
        f"not_found_since {UTCDateTime().compile(dialect=conn.dialect)}",
        "fetch_failures INTEGER NOT NULL DEFAULT 0",
        "forced_by VARCHAR(255)",
    ):
        conn.execute(text(f"ALTER TABLE {jobs} ADD COLUMN {column}"))
    for table in (tables.rows, tables.jobs, tables.events):
        conn.execute(
            text(f"ALTER TABLE {table.name} ADD COLUMN revision BIGINT NOT NULL DEFAULT 0")
        )
        for index in table.indexes:
            if index.name and index.name.endswith("_revision"):
                index.create(conn)


def _add_dialects(conn: Connection, tables: LedgerTables) -> None:
    """v3: the API dialect of each job (every job before v3 was sent in the video dialect)
    and the estimate beside the cost the service reports."""
    jobs = tables.jobs.name
    conn.execute(
        text(f"ALTER TABLE {jobs} ADD COLUMN dialect VARCHAR(16) NOT NULL "
             f"DEFAULT '{_VIDEO_DIALECT}'")
    )  # fmt: skip
    conn.execute(text(f"ALTER TABLE {jobs} ADD COLUMN estimated_credits FLOAT"))
    conn.execute(text(f"UPDATE {jobs} SET estimated_credits = cost_credits"))


def _add_spend_indexes(conn: Connection, tables: LedgerTables) -> None:
    """v4: the indexes a budgeted claim's spend sums use."""
    for index in tables.jobs.indexes:
        if index.name and index.name.endswith(_SPEND_INDEX_SUFFIXES):
            index.create(conn)


def _widen_request_ids(conn: Connection, tables: LedgerTables) -> None:
    """v5: request ids of any length (the client accepts 256 characters, VARCHAR(255) held one
    fewer, and a paid id PostgreSQL refused was journalled and refused again on every replay).
    SQLite never enforced the length: nothing to change there."""
    if conn.dialect.name == "sqlite":
        return
    for table in (tables.jobs, tables.events):  # VARCHAR to TEXT: no rewrite, indexes kept
        conn.execute(text(f"ALTER TABLE {table.name} ALTER COLUMN request_id TYPE TEXT"))


def _add_quality(conn: Connection, tables: LedgerTables) -> None:
    """v6: each video's measured picture, what its request asked for and the checks'
    verdicts (null for the videos fetched before: they were never measured)."""
    for column in _quality_columns():
        kind = column.type.compile(dialect=conn.dialect)
        conn.execute(text(f"ALTER TABLE {tables.jobs.name} ADD COLUMN {column.name} {kind}"))


#: version -> the step that brings a database from version - 1 to it (version 1: created)
MIGRATIONS: dict[int, Callable[[Connection, LedgerTables], None]] = {
    2: _add_revisions,
    3: _add_dialects,
    4: _add_spend_indexes,
    5: _widen_request_ids,
    6: _add_quality,
}
assert max(MIGRATIONS) == SCHEMA_VERSION
