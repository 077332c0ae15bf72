"""``Ledger``: every paid request, in a transactional database (SQLite file or PostgreSQL).

The money rules live here, enforced by the database rather than by whoever calls:

- **one claim per attempt at a request**: ``(request_hash, attempt)`` is unique, so two runs,
  a run and a sensor, or two hosts cannot both claim (and so both send) the same request;
- **a claim is committed immediately before its generate leaves** and records its owner
  (host, pid, process start, Dagster run id): :meth:`Ledger.recover` settles the claims of
  owners that are gone, at once, without a grace period;
- **a request is paid once across the whole history**, whatever partition asks for it: a row
  that returns to an earlier request reuses that request's job and video;
- **a paid request_id is never only in memory**: recording it is retried, then journalled.

Everything else (which rows, when, over what HTTP) is the callers' business.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Connection,
    Integer,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from kvid_dagster.ledger.claims import (
    DEFAULT_CLAIM_LEASE_SECONDS,
    DEFAULT_RULE,
    ClaimRule,
    Refusal,
    SpendWindow,
    day_start,
    refusal_for,
)
from kvid_dagster.ledger.engine import (
    advisory_lock_key,
    create_ledger_engine,
    normalize_database_url,
    redact_url,
    utcnow,
)
from kvid_dagster.ledger.journal import Journal, JournalEntry
from kvid_dagster.ledger.mapping import job_change_values, submission_from, video_row_from
from kvid_dagster.ledger.records import (
    ClaimOwner,
    InvalidEntry,
    JobChange,
    RequestRow,
    Submission,
    VideoRow,
)
from kvid_dagster.ledger.row_rule import JOB_PREFIX, status_case
from kvid_dagster.ledger.status import SubmissionEvent, VideoStatus
from kvid_dagster.ledger.tables import (
    MIGRATIONS,
    REVISION_OPTION,
    SCHEMA_VERSION,
    LedgerTables,
    create_schema,
    define_tables,
    unstorable_at,
)

log = logging.getLogger("kvid_dagster.ledger")

DEFAULT_TABLE_PREFIX = "kvid_"
DATABASE_FILE = "kvid.db"
JOURNAL_FILE = "kvid-journal.jsonl"
# recording a paid request_id: this many attempts, with these waits, before the journal
_RECORD_ATTEMPTS = 5
_RECORD_BACKOFF_SECONDS = (0.05, 0.2, 0.5, 1.0)
_REVISION = "revision"
_LEDGER_ID = "ledger_id"
_IN_CHUNK = 5_000  # values in one IN (...): under every backend's parameter limit
_VERSION = "schema_version"
_CREDIT_SLACK = 1e-9  # float sums of whole-credit prices must not refuse an exact fit


class LedgerSchemaChanged(RuntimeError):
    """The database was migrated by a newer kvid-dagster while this process had it open."""


@dataclass(frozen=True)
class RecoveryReport:
    replayed: list[Submission]  # request_ids recorded from the journal
    settled: list[Submission]  # claims of owners that are gone, now UNCERTAIN


class Ledger:
    """The job ledger on ``url`` (``sqlite:///path/kvid.db`` or ``postgresql+psycopg://...``).

    Tables are named ``<table_prefix>rows``, ``jobs``, ``events`` and ``meta``, so the ledger
    can share a database (a production Dagster instance's, say). The schema is created or
    migrated on open. Safe for many threads, processes and hosts at once.
    """

    def __init__(
        self,
        url: str,
        *,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        journal_path: Path | None = None,
        claim_lease_seconds: float = DEFAULT_CLAIM_LEASE_SECONDS,
    ) -> None:
        self.url = normalize_database_url(url)
        self.tables: LedgerTables = define_tables(table_prefix)
        self.engine = create_ledger_engine(self.url)
        self.journal = Journal(journal_path) if journal_path is not None else None
        self.claim_lease_seconds = claim_lease_seconds
        self._ledger_id: str | None = None
        self._migrate()

    @classmethod
    def for_data_dir(
        cls,
        data_dir: str | os.PathLike[str],
        database_url: str | None = None,
        **kwargs: Any,
    ) -> Ledger:
        """The ledger of a data folder: ``database_url``, else ``<data_dir>/kvid.db``; its
        journal is ``<data_dir>/kvid-journal.jsonl`` either way."""
        folder = Path(data_dir).resolve()
        url = database_url or f"sqlite:///{folder / DATABASE_FILE}"
        ledger = cls(url, journal_path=folder / JOURNAL_FILE, **kwargs)
        ledger.import_legacy_catalog(folder / "catalog")  # once: 0.1's request_ids are money
        return ledger

    def import_legacy_catalog(self, catalog_dir: Path) -> int:
        """Import kvid-dagster 0.1's catalog in ``catalog_dir`` once (see
        :mod:`kvid_dagster.ledger.legacy`); returns the number of rows imported."""
        from kvid_dagster.ledger.legacy import (  # pyarrow: only for a folder 0.1 wrote
            MARKER,
            fold_legacy,
            insert_legacy,
            retire_legacy_log,
        )

        if not (catalog_dir / "_log").is_dir() or self.marker(MARKER) is not None:
            return 0
        videos, events = fold_legacy(catalog_dir)
        now = utcnow()
        with self.write() as conn:
            settled = insert_legacy(conn, self.tables, videos, events, now)
            for job in self._fetch(conn, settled):  # after 0.1's history: its INTENT came first
                self._event(conn, job, SubmissionEvent.UNCERTAIN, cost=job.cost_credits or 0.0)
            self.set_marker(MARKER, now.isoformat(), conn)
        retire_legacy_log(catalog_dir, len(videos), len(events))
        return len(videos)

    def __repr__(self) -> str:
        return f"Ledger({redact_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction at the next revision; what it writes carries that revision.

        The revision is taken first, so write transactions run one at a time and their
        revisions follow their commits: a reader that sees revision R has every write up to R
        and none after it (what incremental publishing and the sensors' re-checks rely on).
        Then the schema version is read, under that lock: a newer kvid-dagster that migrated
        the database since this process opened it (a rolling deploy) takes the same lock
        first, and what this process would write, without the newer columns, is refused
        (:class:`LedgerSchemaChanged`) rather than written unseen by the newer readers.
        """
        meta = self.tables.meta
        with self.engine.connect().execution_options(kvid_write=True) as conn, conn.begin():
            revision = conn.execute(
                update(meta)
                .where(meta.c.name == _REVISION)
                .values(int_value=meta.c.int_value + 1)
                .returning(meta.c.int_value)
            ).scalar_one()
            version = conn.scalar(select(meta.c.int_value).where(meta.c.name == _VERSION))
            if version != SCHEMA_VERSION:
                raise LedgerSchemaChanged(
                    f"the kvid ledger in {redact_url(self.url)} is now at schema version "
                    f"{version}: another kvid-dagster migrated it since this process opened it "
                    f"at version {SCHEMA_VERSION}; nothing was written: restart this process "
                    "with the kvid-dagster that migrated it"
                )
            conn.execution_options(**{REVISION_OPTION: int(revision)})
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold a lock named ``name`` across every process and host using this ledger, for a
        short block (it waits for, and then holds off, the ledger's writers on SQLite)."""
        with self.engine.connect().execution_options(kvid_write=True) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                key = f"{self.tables.meta.name}:{name}"
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_lock_key(key)}
                )
            # SQLite: BEGIN IMMEDIATE already holds the database's write lock
            yield

    def _migrate(self) -> None:
        meta = self.tables.meta
        with self.engine.connect().execution_options(kvid_write=True) as conn, conn.begin():
            if conn.dialect.name == "postgresql":  # serialise first opens of one database
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_lock_key(meta.name)}
                )
            if not conn.dialect.has_table(conn, meta.name):
                meta.create(conn)
            version = conn.scalar(select(meta.c.int_value).where(meta.c.name == _VERSION)) or 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"the kvid ledger in {redact_url(self.url)} is at schema version {version}, "
                    f"written by a newer kvid-dagster (this one knows {SCHEMA_VERSION})"
                )
            if 0 < version < SCHEMA_VERSION:
                # the writers' lock first: a write in flight finishes under the old schema,
                # and every later one reads the new version (see ``write``)
                conn.execute(
                    update(meta)
                    .where(meta.c.name == _REVISION)
                    .values(int_value=meta.c.int_value + 1)
                )
            if version == 0:
                create_schema(conn, self.tables)
                conn.execute(
                    insert(meta),
                    [{"name": _VERSION, "int_value": 0}, {"name": _REVISION, "int_value": 0}],
                )
            else:
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[step](conn, self.tables)
            if conn.scalar(select(meta.c.text_value).where(meta.c.name == _LEDGER_ID)) is None:
                conn.execute(insert(meta).values(name=_LEDGER_ID, text_value=uuid.uuid4().hex))
            if version < SCHEMA_VERSION:
                conn.execute(
                    update(meta).where(meta.c.name == _VERSION).values(int_value=SCHEMA_VERSION)
                )

    def ledger_id(self) -> str:
        """This database's identity: a catalog published from another ledger is not ours.
        Written once when the database is created, so it is read once per ``Ledger``."""
        if self._ledger_id is None:
            meta = self.tables.meta
            with self._read() as conn:
                found = conn.scalar(select(meta.c.text_value).where(meta.c.name == _LEDGER_ID))
            self._ledger_id = str(found)
        return self._ledger_id

    def revision(self) -> int:
        """A number that grows with every committed change (what a publication is of)."""
        meta = self.tables.meta
        with self._read() as conn:
            return int(conn.scalar(select(meta.c.int_value).where(meta.c.name == _REVISION)) or 0)

    def marker(self, name: str) -> str | None:
        meta = self.tables.meta
        with self._read() as conn:
            return conn.scalar(select(meta.c.text_value).where(meta.c.name == f"marker:{name}"))

    def set_marker(self, name: str, value: str, conn: Connection | None = None) -> None:
        meta = self.tables.meta
        with contextlib.ExitStack() as stack:
            conn = conn or stack.enter_context(self.write())
            conn.execute(delete(meta).where(meta.c.name == f"marker:{name}"))
            conn.execute(insert(meta).values(name=f"marker:{name}", text_value=value))

    # -- rows ----------------------------------------------------------------------------------

    def register(self, valid: Sequence[RequestRow], invalid: Sequence[InvalidEntry] = ()) -> int:
        """Make the rows table say what the prompt table says; return how many rows changed.

        A row whose request changed keeps its old submissions (still polled, kept in the
        history); its status is now that of its new request. A key that is both valid and
        invalid belongs to the valid row. Free text is stored as :class:`StoredText` says; a
        key or another short value the database cannot hold is a ValueError before anything
        is written, on every backend (the prompt table's validator never hands out one).
        """
        now = utcnow()
        wanted: dict[str, dict[str, Any]] = {}
        for bad in invalid:
            wanted[bad.partition_key] = {
                "partition_key": bad.partition_key,
                "prompt": bad.prompt,
                "job_kind": None,
                "model": None,
                "request_hash": None,
                "params_json": None,
                "user_columns_json": None,
                "invalid_reason": bad.reason,
            }
        for row in valid:
            wanted[row.partition_key] = {
                "partition_key": row.partition_key,
                "prompt": row.prompt,
                "job_kind": row.job_kind,
                "model": row.model,
                "request_hash": row.request_hash,
                "params_json": row.params_json,
                "user_columns_json": row.user_columns_json,
                "invalid_reason": None,
            }
        if not wanted:
            return 0
        self._check_storable(wanted.values())
        for attempt in range(3):
            try:
                return self._register(wanted, now)
            except IntegrityError:
                # another process inserted the same new key first (READ COMMITTED on
                # PostgreSQL): read again, and this time it is an update or nothing
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _check_storable(self, wanted: Iterable[Mapping[str, Any]]) -> None:
        """Refuse a value of a sized column (a key, a model) that the database cannot hold:
        PostgreSQL would refuse the whole batch, SQLite would store it whatever its size."""
        rows = self.tables.rows
        for values in wanted:
            for name, value in values.items():
                limit = getattr(rows.c[name].type, "length", None)  # None: TEXT, unsized
                if value is None or limit is None:
                    continue
                if len(value) > limit or unstorable_at(value) is not None:
                    raise ValueError(
                        f"row {values['partition_key']!r:.80}: {name} {value!r:.80} cannot be "
                        f"stored: at most {limit} characters, without NUL"
                    )

    def _register(self, wanted: Mapping[str, dict[str, Any]], now: datetime) -> int:
        # a table read again unchanged (every run, every refresh) writes nothing: a write
        # transaction takes the next revision, and a new revision is a new publication
        with self._read() as conn:
            if not any(self._registration(conn, wanted, now)):
                return 0
        with self.write() as conn:  # read again under the write lock: another may have moved
            new, changed = self._registration(conn, wanted, now)
            if new:
                conn.execute(insert(self.tables.rows), new)
            for values in changed:
                conn.execute(
                    update(self.tables.rows).where(
                        self.tables.rows.c.partition_key == values["partition_key"]
                    ),
                    values,
                )
        return len(new) + len(changed)

    def _registration(
        self, conn: Connection, wanted: Mapping[str, dict[str, Any]], now: datetime
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The rows of ``wanted`` to insert, and those to update (empty: nothing to write)."""
        rows = self.tables.rows
        compared = (
            "prompt", "job_kind", "model", "request_hash", "params_json", "user_columns_json",
            "invalid_reason",
        )  # fmt: skip
        existing = {
            r.partition_key: r
            for r in conn.execute(select(rows.c.partition_key, *(rows.c[c] for c in compared)))
        }
        new = [
            {**w, "last_error": None, "updated_at": now}
            for k, w in wanted.items()
            if k not in existing
        ]
        changed = [
            {**w, "last_error": None, "updated_at": now}
            for k, w in wanted.items()
            if k in existing and any(getattr(existing[k], c) != w[c] for c in compared)
        ]
        return new, changed

    def current_jobs(self) -> Any:
        """``rows`` outer-joined with each row's current job: the latest attempt at its request
        (the FROM clause of every row read, publishing's included). "No later attempt" as an
        anti-join: PostgreSQL hashes it, SQLite seeks the (request_hash, attempt) key, both
        faster than joining a GROUP BY of the maximum attempts (at 100,000 rows, PostgreSQL
        0.11 against 0.31 s, SQLite 0.22 against 0.31 s)."""
        rows, jobs = self.tables.rows, self.tables.jobs
        later = jobs.alias("later")
        no_later_attempt = ~exists().where(
            later.c.request_hash == jobs.c.request_hash, later.c.attempt > jobs.c.attempt
        )
        return rows.outerjoin(
            jobs, and_(jobs.c.request_hash == rows.c.request_hash, no_later_attempt)
        )

    def _row_query(self) -> Any:
        rows, jobs = self.tables.rows, self.tables.jobs
        return select(rows, *(c.label(f"j_{c.name}") for c in jobs.c)).select_from(
            self.current_jobs()
        )

    def rows_changed_since(self, revision: int) -> tuple[list[VideoRow], int]:
        """The rows whose state changed after ``revision`` (their own row or current job was
        written, or their job went away), and the revision they are read at."""
        rows, jobs = self.tables.rows, self.tables.jobs
        query = (
            self._row_query()
            .where(or_(rows.c.revision > revision, jobs.c.revision > revision))
            .order_by(rows.c.partition_key)
        )
        with self.snapshot() as (conn, now):
            return [video_row_from(r._mapping) for r in conn.execute(query)], now

    def rows(self, keys: Iterable[str] | None = None) -> list[VideoRow]:
        """Rows (all, or those of ``keys``) with their current submission, by partition key."""
        key = self.tables.rows.c.partition_key
        query = self._row_query().order_by(key)
        with self._read() as conn:
            if keys is None:
                return [video_row_from(r._mapping) for r in conn.execute(query)]
            wanted = sorted(set(keys))
            found = []
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = query.where(key.in_(wanted[start : start + _IN_CHUNK]))
                found += [video_row_from(r._mapping) for r in conn.execute(chunk)]
            return found

    def row(self, partition_key: str) -> VideoRow | None:
        found = self.rows([partition_key])
        return found[0] if found else None

    def rows_by_key(self, keys: Iterable[str] | None = None) -> dict[str, VideoRow]:
        return {r.partition_key: r for r in self.rows(keys)}

    def rows_for_submissions(self, submission_ids: Iterable[int]) -> dict[int, list[VideoRow]]:
        """The rows whose current submission is each of ``submission_ids``."""
        ids = set(submission_ids)
        if not ids:
            return {}
        jobs, rows = self.tables.jobs, self.tables.rows
        found: dict[int, list[VideoRow]] = {i: [] for i in ids}
        wanted = sorted(ids)
        with self._read() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                hashes = (
                    select(jobs.c.request_hash)
                    .where(jobs.c.submission_id.in_(wanted[start : start + _IN_CHUNK]))
                    .scalar_subquery()
                )
                query = self._row_query().where(rows.c.request_hash.in_(hashes))
                for r in conn.execute(query.order_by(rows.c.partition_key)):
                    row = video_row_from(r._mapping)
                    if row.submission is not None and row.submission.submission_id in ids:
                        found[row.submission.submission_id].append(row)
        return found

    def rows_with_job_status(self, status: VideoStatus) -> list[VideoRow]:
        """The valid rows whose current job is in ``status``, by partition key."""
        rows, jobs = self.tables.rows, self.tables.jobs
        query = (
            self._row_query()
            .where(jobs.c.status == status.value, rows.c.invalid_reason.is_(None))
            .order_by(rows.c.partition_key)
        )
        with self._read() as conn:
            return [video_row_from(r._mapping) for r in conn.execute(query)]

    def counts_by_status(self) -> dict[VideoStatus, int]:
        """How many rows are in each status (counted by the database)."""
        rows, jobs = self.tables.rows, self.tables.jobs
        status = status_case(
            lambda n: jobs.c[n.removeprefix(JOB_PREFIX)] if n.startswith(JOB_PREFIX) else rows.c[n]
        ).label("status")
        query = select(status, func.count()).select_from(self.current_jobs()).group_by(status)
        with self._read() as conn:
            return {VideoStatus(s): int(n) for s, n in conn.execute(query)}

    # -- submissions ---------------------------------------------------------------------------

    def _latest(self, conn: Connection, request_hash: str) -> Submission | None:
        jobs = self.tables.jobs
        found = conn.execute(
            select(jobs)
            .where(jobs.c.request_hash == request_hash)
            .order_by(jobs.c.attempt.desc())
            .limit(1)
        ).first()
        return submission_from(found._mapping) if found is not None else None

    def latest_submission(self, request_hash: str) -> Submission | None:
        with self._read() as conn:
            return self._latest(conn, request_hash)

    def latest_submissions(self, request_hashes: Iterable[str]) -> dict[str, Submission]:
        """The latest submission of each request that has one, by request_hash."""
        jobs = self.tables.jobs
        wanted = sorted(set(request_hashes))
        found: dict[str, Submission] = {}
        with self._read() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                for r in conn.execute(
                    select(jobs).where(jobs.c.request_hash.in_(chunk)).order_by(jobs.c.attempt)
                ):
                    sub = submission_from(r._mapping)
                    found[sub.request_hash] = sub  # ascending attempts: the last one wins
        return found

    def submission(self, submission_id: int) -> Submission | None:
        jobs = self.tables.jobs
        with self._read() as conn:
            found = conn.execute(select(jobs).where(jobs.c.submission_id == submission_id)).first()
        return submission_from(found._mapping) if found is not None else None

    def submissions(self, statuses: Iterable[VideoStatus] | None = None) -> list[Submission]:
        """Every submission (or those in ``statuses``), oldest first."""
        jobs = self.tables.jobs
        query = select(jobs).order_by(jobs.c.submission_id)
        if statuses is not None:
            query = query.where(jobs.c.status.in_([s.value for s in statuses]))
        with self._read() as conn:
            return [submission_from(r._mapping) for r in conn.execute(query)]

    def jobs_to_poll(self, dialect: str | None = None) -> list[Submission]:
        """Submissions the service knows by request_id and has not finished, old and current
        requests alike (an edited row's earlier job still gets its video); given ``dialect``,
        only the jobs sent in it (an id means nothing to the other dialect's endpoints)."""
        polled = [s for s in VideoStatus if s.needs_polling]
        return [
            s
            for s in self.submissions(polled)
            if s.request_id and (dialect is None or s.dialect == dialect)
        ]

    def claim(
        self,
        row: RequestRow,
        owner: ClaimOwner,
        *,
        cost_credits: float,
        rule: ClaimRule = DEFAULT_RULE,
    ) -> Submission | Refusal:
        """Claim the next attempt at ``row``'s request, committed before returning.

        Call it immediately before sending the generate, and send only with the submission it
        returns: the database refuses any second claim of the same attempt.
        """
        jobs = self.tables.jobs
        now = utcnow()
        try:
            with self.write() as conn:
                latest = self._latest(conn, row.request_hash)
                reason = refusal_for(latest, rule)
                if reason is not None:
                    return Refusal(reason, latest)
                for cap in rule.caps:
                    spent = self._spent(conn, cap.window, owner.run_id, now)
                    if spent + cost_credits > cap.credits + _CREDIT_SLACK:
                        return Refusal(
                            f"over the per-{cap.window} budget of {cap.credits:g} credits "
                            f"({spent:g} spent, this request {cost_credits:g})",
                            latest,
                            over_budget=cap,
                        )
                attempt = latest.attempt + 1 if latest is not None else 1
                values = {
                    "request_hash": row.request_hash,
                    "attempt": attempt,
                    "partition_key": row.partition_key,
                    "prompt": row.prompt,
                    "job_kind": row.job_kind,
                    "model": row.model,
                    "params_json": row.params_json,
                    "status": VideoStatus.SUBMITTING.value,
                    "progress": 0,
                    "cost_credits": cost_credits,
                    "estimated_credits": cost_credits,
                    "dialect": row.dialect,
                    "owner_host": owner.host,
                    "owner_pid": owner.pid,
                    "owner_started": owner.started,
                    "owner_run_id": owner.run_id,
                    "claimed_at": now,
                    "heartbeat_at": now,
                    "updated_at": now,
                    "version": 0,
                    "forced_by": rule.force_token if rule.force else None,
                }
                submission_id = conn.execute(insert(jobs).values(values)).inserted_primary_key[0]
                self._event(
                    conn,
                    submission_from({**values, "submission_id": submission_id}),
                    SubmissionEvent.INTENT,
                )
                self._clear_row_error(conn, row.partition_key)
        except IntegrityError:
            with self._read() as conn:
                latest = self._latest(conn, row.request_hash)
            return Refusal(
                "another submitter claimed this exact request at the same moment", latest
            )
        claimed = self.submission(int(submission_id))
        assert claimed is not None
        return claimed

    def spent_credits(self, window: SpendWindow, *, run_id: str | None = None) -> float:
        """The credits of the claims ``window`` counts now (of run ``run_id`` for RUN): each
        job's cost, the service's figure where it reported one, else the estimate. A released
        claim sent nothing and counts nothing; an UNCERTAIN one may be billed and counts."""
        with self._read() as conn:
            return self._spent(conn, window, run_id, utcnow())

    def _spent(
        self, conn: Connection, window: SpendWindow, run_id: str | None, now: datetime
    ) -> float:
        jobs = self.tables.jobs
        if window is SpendWindow.DAY:
            where = jobs.c.claimed_at >= day_start(now)
        elif run_id is None:
            raise ValueError("a per-run credit budget needs the claim owner's run id")
        else:
            where = jobs.c.owner_run_id == run_id
        total = conn.scalar(select(func.coalesce(func.sum(jobs.c.cost_credits), 0.0)).where(where))
        return float(total or 0.0)

    def record_submitted(self, submission: Submission, request_id: str) -> None:
        """Record the request_id a generate returned: retried, then journalled; raises only if
        both fail, with the request_id in the message (and logged at ERROR)."""
        problem: Exception | None = None
        for attempt in range(_RECORD_ATTEMPTS):
            try:
                self._record_submitted(
                    submission.submission_id, submission.request_hash, request_id
                )
                return
            except LedgerSchemaChanged as exc:  # no retry will write it: journal it at once
                problem = exc
                break
            except (OperationalError, DBAPIError, OSError) as exc:
                problem = exc
                if attempt < len(_RECORD_BACKOFF_SECONDS):
                    time.sleep(_RECORD_BACKOFF_SECONDS[attempt])
        what = (
            f"{submission.partition_key}: PAID job request_id {request_id} (request_hash "
            f"{submission.request_hash}, attempt {submission.attempt}) could not be recorded in "
            f"the ledger ({type(problem).__name__}: {problem})"
        )
        if self.journal is None:
            log.error("%s, and there is no journal", what)
            raise RuntimeError(f"{what}, and there is no journal") from problem
        try:
            self.journal.append(
                JournalEntry(
                    submission.submission_id,
                    submission.request_hash,
                    submission.attempt,
                    submission.partition_key,
                    request_id,
                )
            )
        except OSError as exc:
            log.error("%s, nor journalled (%s)", what, exc)
            raise RuntimeError(f"{what}, nor journalled: {exc}") from problem
        log.error(
            "%s; it is journalled in %s and recorded on the next start", what, self.journal.path
        )

    def _record_submitted(
        self, submission_id: int, request_hash: str, request_id: str
    ) -> Submission | None:
        jobs = self.tables.jobs
        now = utcnow()
        with self.write() as conn:
            current = conn.execute(
                select(jobs).where(jobs.c.submission_id == submission_id)
            ).first()
            if current is None:
                raise LookupError(f"no submission {submission_id} in the ledger")
            sub = submission_from(current._mapping)
            if sub.request_hash != request_hash:  # a journal of another ledger, say
                raise LookupError(
                    f"submission {submission_id} is of request_hash {sub.request_hash}, "
                    f"not {request_hash}"
                )
            if sub.request_id == request_id:
                return None  # already recorded (a journal replayed twice)
            if sub.status not in {VideoStatus.SUBMITTING, VideoStatus.UNCERTAIN}:
                raise LookupError(
                    f"submission {submission_id} is {sub.status} with request_id "
                    f"{sub.request_id}; not overwriting it with {request_id}"
                )
            conn.execute(
                update(jobs)
                .where(jobs.c.submission_id == submission_id)
                .values(
                    status=VideoStatus.SUBMITTED.value,
                    request_id=request_id,
                    error=None,
                    submitted_at=now,
                    updated_at=now,
                    version=jobs.c.version + 1,
                )
            )
            recorded = replace(sub, status=VideoStatus.SUBMITTED, request_id=request_id)
            # a claim settled UNCERTAIN meanwhile counted its cost already: this adds nothing
            self._event(conn, recorded, SubmissionEvent.SUBMITTED, cost=_cost_moved(sub, recorded))
            return recorded

    def release(self, submission: Submission, error: str, *, invalid: bool = False) -> None:
        """The generate was refused or never sent: nothing was billed, the claim goes away and
        the row is PENDING again (``invalid``: the service said the request is invalid)."""
        jobs, rows = self.tables.jobs, self.tables.rows
        with self.write() as conn:
            conn.execute(
                delete(jobs).where(
                    jobs.c.submission_id == submission.submission_id,
                    jobs.c.status == VideoStatus.SUBMITTING.value,
                )
            )
            # only a claim in flight is deleted, and it counted nothing: nothing to take back
            self._event(conn, submission, SubmissionEvent.FAILED_TO_SUBMIT, cost=0.0, error=error)
            self._touch_request(conn, submission.request_hash)
            values: dict[str, Any] = {"last_error": error, "updated_at": utcnow()}
            if invalid:
                values["invalid_reason"] = error
            conn.execute(
                update(rows)
                .where(
                    rows.c.partition_key == submission.partition_key,
                    rows.c.request_hash == submission.request_hash,
                )
                .values(values)
            )

    def mark_uncertain(self, submission: Submission, error: str) -> None:
        """The generate may have created a job whose request_id we never got."""
        self._settle_uncertain(submission, error)

    def _settle_uncertain(self, submission: Submission, error: str) -> bool:
        jobs = self.tables.jobs
        with self.write() as conn:
            done = conn.execute(
                update(jobs)
                .where(
                    jobs.c.submission_id == submission.submission_id,
                    jobs.c.status == VideoStatus.SUBMITTING.value,
                )
                .values(
                    status=VideoStatus.UNCERTAIN.value,
                    error=error,
                    updated_at=utcnow(),
                    version=jobs.c.version + 1,
                )
            ).rowcount
            if done:
                settled = replace(submission, status=VideoStatus.UNCERTAIN)
                self._event(
                    conn,
                    settled,
                    SubmissionEvent.UNCERTAIN,
                    cost=_counted(settled),  # from a claim in flight, which counted nothing
                    error=error,
                )
        return bool(done)

    def heartbeat(self, submission_ids: Iterable[int]) -> None:
        """Claims in flight are still owned (what another host's recovery looks at)."""
        ids = list(submission_ids)
        if not ids:
            return
        jobs = self.tables.jobs
        with self.engine.connect().execution_options(kvid_write=True) as conn, conn.begin():
            conn.execute(
                update(jobs)
                .where(jobs.c.submission_id.in_(ids), jobs.c.status == VideoStatus.SUBMITTING.value)
                .values(heartbeat_at=utcnow(), revision=jobs.c.revision)  # nothing published
            )

    def owner_alive(self, submission: Submission) -> bool:
        """Whether a claim's owner may still send or record it: an owner whose pid this process
        can look up (same host, boot and PID namespace) by its process; any other by its
        heartbeat lease (another host, or another container on this kernel)."""
        owner = submission.owner
        if owner is None:
            return False
        if owner.is_local():
            return owner.is_alive_locally()
        beat = submission.heartbeat_at or submission.claimed_at
        lease = timedelta(seconds=self.claim_lease_seconds)
        return beat is not None and utcnow() - beat < lease

    def recover(
        self, is_alive: Callable[[Submission], bool | None] | None = None
    ) -> RecoveryReport:
        """Replay the journal, then settle every claim whose owner is gone: its generate may
        have left, so it is UNCERTAIN at once (never sent again by itself).

        ``is_alive`` may say more than the ledger can (e.g. the Dagster run has ended); None
        from it means "ask the default" (:meth:`owner_alive`).
        """
        replayed = self.replay_journal()
        settled = []
        for sub in self.submissions([VideoStatus.SUBMITTING]):
            verdict = is_alive(sub) if is_alive is not None else None
            alive = self.owner_alive(sub) if verdict is None else verdict
            if alive:
                continue
            owner = sub.owner
            who = (
                f"run {owner.run_id or '-'} on {owner.host} (pid {owner.pid})"
                if owner
                else "an unknown submitter"
            )
            message = (
                f"the submitter, {who}, stopped while this request's generate was in flight "
                f"(claimed {sub.claimed_at:%Y-%m-%d %H:%M:%S} UTC, request_hash "
                f"{sub.request_hash}); the job may exist and be billed: look for this prompt and "
                "params_json in the kvid dashboard, then `kvid-dagster resolve KEY --request-id "
                "ID`, or `kvid-dagster resolve KEY` if there is none"
            )
            if self._settle_uncertain(sub, message):
                settled.append(replace(sub, status=VideoStatus.UNCERTAIN, error=message))
        return RecoveryReport(replayed, settled)

    def replay_journal(self) -> list[Submission]:
        """Record the journalled request_ids. One that cannot be recorded (the database
        refuses it, its submission is gone or holds another id) never stops the others: it
        is logged at ERROR with its row and id, and kept in the journal for the next replay
        (a paid id is never dropped)."""
        if self.journal is None or not self.journal.pending():
            return []
        replayed, kept = [], []
        with self.journal.taken() as entries:
            for entry in entries:
                try:
                    recorded = self._record_submitted(
                        entry.submission_id, entry.request_hash, entry.request_id
                    )
                except Exception as exc:  # whatever it is, the next entry is another job
                    log.error(
                        "%s: PAID job request_id %s (submission %s, request_hash %s, attempt "
                        "%s) could not be recorded from the journal (%s: %s); it is kept in %s "
                        "and tried again on every start",
                        entry.partition_key, entry.request_id, entry.submission_id,
                        entry.request_hash, entry.attempt, type(exc).__name__, exc,
                        self.journal.path,
                    )  # fmt: skip
                    kept.append(entry)
                    continue
                if recorded is not None:
                    log.warning(
                        "%s: recorded the journalled request_id %s",
                        entry.partition_key,
                        entry.request_id,
                    )
                    replayed.append(recorded)
            self.journal.append_all(kept)  # before the taken files are deleted
        return replayed

    def resolve_uncertain(
        self, partition_key: str, *, request_id: str | None = None, note: str = ""
    ) -> VideoRow:
        """A person's answer to an UNCERTAIN row, after looking at the kvid dashboard: the
        request_id of the job they found (polled as usual from now on), or none (the claim is
        released and the next run submits the row). Raises ValueError otherwise."""
        if request_id is not None and (not isinstance(request_id, str) or not request_id.strip()):
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        jobs = self.tables.jobs
        row = self.row(partition_key)
        sub = row.submission if row is not None else None
        if row is None or sub is None or row.status is not VideoStatus.UNCERTAIN:
            status = row.status if row is not None else None
            raise ValueError(f"{partition_key!r} is not UNCERTAIN (status {status})")
        with self.write() as conn:
            where = and_(
                jobs.c.submission_id == sub.submission_id,
                jobs.c.status == VideoStatus.UNCERTAIN.value,
                jobs.c.version == sub.version,
            )
            if request_id is not None:
                changed = conn.execute(
                    update(jobs)
                    .where(where)
                    .values(
                        status=VideoStatus.SUBMITTED.value,
                        request_id=request_id.strip(),
                        error=None,
                        submitted_at=utcnow(),
                        updated_at=utcnow(),
                        version=jobs.c.version + 1,
                    )
                ).rowcount
            else:
                changed = conn.execute(delete(jobs).where(where)).rowcount
                self._touch_request(conn, sub.request_hash)
            if not changed:
                raise ValueError(f"{partition_key!r} changed while it was being resolved")
            resolved_job = (
                replace(sub, status=VideoStatus.SUBMITTED, request_id=request_id.strip())
                if request_id is not None
                else None  # released: the job is gone, and what it counted with it
            )
            self._event(
                conn,
                replace(sub, request_id=request_id.strip() if request_id else None),
                SubmissionEvent.RESOLVED,
                cost=_cost_moved(sub, resolved_job),
                error=note or ("job found" if request_id else "no job found: released"),
            )
        resolved = self.row(partition_key)
        assert resolved is not None
        return resolved

    def refetch(self, partition_key: str) -> VideoRow:
        """A person's "try again" for a FETCH_FAILED row: its job is FETCHING again, with a
        fresh count of fetch attempts (the paid request_id is the same). Raises ValueError."""
        jobs = self.tables.jobs
        row = self.row(partition_key)
        sub = row.submission if row is not None else None
        if row is None or sub is None or row.status is not VideoStatus.FETCH_FAILED:
            status = row.status if row is not None else None
            raise ValueError(f"{partition_key!r} is not FETCH_FAILED (status {status})")
        with self.write() as conn:
            changed = conn.execute(
                update(jobs)
                .where(jobs.c.submission_id == sub.submission_id, jobs.c.version == sub.version)
                .values(
                    status=VideoStatus.FETCHING.value,
                    fetch_failures=0,
                    completed_at=None,
                    updated_at=utcnow(),
                    version=jobs.c.version + 1,
                )
            ).rowcount
            if not changed:
                raise ValueError(f"{partition_key!r} changed while it was being refetched")
            self._event(conn, sub, SubmissionEvent.REFETCH, error=sub.error)
        refetched = self.row(partition_key)
        assert refetched is not None
        return refetched

    def apply(self, changes: Sequence[JobChange]) -> list[Submission]:
        """Apply the poller's changes in one transaction; a change to a submission someone
        else moved meanwhile (another poller, a resolver) is dropped. Returns those applied."""
        if not changes:
            return []
        jobs = self.tables.jobs
        now = utcnow()
        order = {c.submission_id: i for i, c in enumerate(changes)}
        with self.write() as conn:
            # write transactions run one at a time: the versions read here are the ones the
            # updates meet, so a change is applied exactly when it passes this check
            before = self._before(conn, list(order))
            counted: dict[int, float] = {}
            shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            applied: list[int] = []
            for change in changes:
                version, counted_before = before.pop(change.submission_id, (None, 0.0))
                if version != change.expected_version:
                    continue  # moved meanwhile (or a second change of one submission)
                counted[change.submission_id] = counted_before
                values = self._storable(job_change_values(change, now), change.submission_id)
                shapes.setdefault(tuple(sorted(values)), []).append(
                    {"b_id": change.submission_id, **{f"b_{k}": v for k, v in values.items()}}
                )
                applied.append(change.submission_id)
            for names, params in shapes.items():  # one executemany per set of columns
                statement = (
                    update(jobs)
                    .where(jobs.c.submission_id == bindparam("b_id"))
                    .values(
                        {**{n: bindparam(f"b_{n}") for n in names}, "version": jobs.c.version + 1}
                    )
                )
                conn.execute(statement, sorted(params, key=lambda p: p["b_id"]))
            found = self._fetch(conn, applied)
            events = []
            for sub in found:
                # the service's own figure for the cost (``used_credit``) replaces the one counted
                moved = _counted(sub) - counted[sub.submission_id]
                if sub.status.is_terminal:
                    kind = SubmissionEvent.ended(sub.status)
                    events.append(self._event_values(sub, kind, cost=moved, error=sub.error))
                elif moved:
                    events.append(self._event_values(sub, SubmissionEvent.COST, cost=moved))
            self._events(conn, events)
        by_id = {s.submission_id: s for s in found}
        return [by_id[i] for i in sorted(applied, key=order.__getitem__)]

    def _before(self, conn: Connection, ids: Sequence[int]) -> dict[int, tuple[int, float]]:
        """Each submission's version and what the history counts of its cost."""
        jobs = self.tables.jobs
        wanted = sorted(ids)
        found: dict[int, tuple[int, float]] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            query = select(
                jobs.c.submission_id, jobs.c.version, jobs.c.status, jobs.c.cost_credits
            ).where(jobs.c.submission_id.in_(wanted[start : start + _IN_CHUNK]))
            found.update(
                {
                    int(i): (int(v), _counted_cost(VideoStatus(s), c))
                    for i, v, s, c in conn.execute(query)
                }
            )
        return found

    def _storable(self, values: dict[str, Any], submission_id: int) -> dict[str, Any]:
        """``values`` with each integer its column cannot hold as None ("not known"), logged: a
        server's nonsense size or a file's claimed frame count must not fail the transaction,
        and every other job's change with it (PostgreSQL refuses it, SQLite's driver too)."""
        jobs = self.tables.jobs
        for name, value in values.items():
            kind = jobs.c[name].type
            if isinstance(value, int) and isinstance(kind, Integer):
                bound = 2**63 if isinstance(kind, BigInteger) else 2**31
                if not -bound <= value < bound:
                    log.warning(
                        "submission %s: %s %d does not fit the ledger; stored as not known",
                        submission_id, name, value,
                    )  # fmt: skip
                    values[name] = None
        return values

    def _fetch(self, conn: Connection, ids: Sequence[int]) -> list[Submission]:
        jobs = self.tables.jobs
        wanted = sorted(ids)
        found = []
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            query = select(jobs).where(jobs.c.submission_id.in_(chunk))
            found += [submission_from(r._mapping) for r in conn.execute(query)]
        return found

    # -- the history ---------------------------------------------------------------------------

    def _event(
        self,
        conn: Connection,
        sub: Submission,
        kind: SubmissionEvent,
        *,
        cost: float = 0.0,
        error: str | None = None,
    ) -> None:
        self._events(conn, [self._event_values(sub, kind, cost=cost, error=error)])

    def _events(self, conn: Connection, values: list[dict[str, Any]]) -> None:
        if values:
            conn.execute(insert(self.tables.events), values)

    @staticmethod
    def _event_values(
        sub: Submission,
        kind: SubmissionEvent,
        *,
        cost: float = 0.0,
        error: str | None = None,
    ) -> dict[str, Any]:
        """An event of ``sub``; ``cost``: what it adds to the history's sum of cost_credits
        (see :class:`SubmissionEvent`), shown on the events that state one even when 0."""
        return {
            "event_id": uuid.uuid4().hex,
            "submission_id": sub.submission_id,
            "partition_key": sub.partition_key,
            "request_hash": sub.request_hash,
            "job_kind": sub.job_kind,
            "model": sub.model,
            "params_json": sub.params_json,
            "request_id": sub.request_id,
            "event": kind.value,
            "attempt": sub.attempt,
            "cost_credits": cost if cost or kind.states_cost else None,
            "error": error,
            "recorded_at": utcnow(),
        }

    def _touch_request(self, conn: Connection, request_hash: str) -> None:
        """A job of this request went away: the rows showing it show another state now."""
        rows = self.tables.rows
        revision = conn.get_execution_options()[REVISION_OPTION]
        conn.execute(
            update(rows).where(rows.c.request_hash == request_hash).values(revision=revision)
        )

    def _clear_row_error(self, conn: Connection, partition_key: str) -> None:
        rows = self.tables.rows
        conn.execute(
            update(rows)
            .where(rows.c.partition_key == partition_key, rows.c.last_error.is_not(None))
            .values(last_error=None)
        )

    def events(self) -> list[Mapping[str, Any]]:
        """The submissions history, oldest first (what ``catalog/submissions`` publishes)."""
        events = self.tables.events
        with self._read() as conn:
            return [
                dict(r._mapping) for r in conn.execute(select(events).order_by(events.c.event_seq))
            ]

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[tuple[Connection, int]]:
        """One consistent read (the rows, the history and the revision they are at).

        On SQLite a read transaction sees one snapshot once it has read; on PostgreSQL this
        uses REPEATABLE READ for the same guarantee.
        """
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                meta = self.tables.meta
                revision = int(
                    conn.scalar(select(meta.c.int_value).where(meta.c.name == _REVISION)) or 0
                )
                yield conn, revision


def _counted_cost(status: VideoStatus, cost: float | None) -> float:
    """What a job adds to the history's sum of cost_credits: nothing while its claim is in
    flight (it may yet be released unsent), its cost once settled, whatever comes after."""
    return 0.0 if status is VideoStatus.SUBMITTING else (cost or 0.0)


def _counted(sub: Submission | None) -> float:
    return 0.0 if sub is None else _counted_cost(sub.status, sub.cost_credits)


def _cost_moved(before: Submission | None, after: Submission | None) -> float:
    """What an event taking a job from ``before`` to ``after`` (None: no job) adds to the
    history's sum: the sum over the events is then the sum over the jobs, each counted once."""
    return _counted(after) - _counted(before)
