"""KvidCatalog: the durable record of every video job (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kvid_dagster.catalog.fold import fold_videos
from kvid_dagster.catalog.schema import (
    FORMAT_KEY,
    FORMAT_VERSION,
    MAX_SEQ_KEY,
    SUBMISSION_SCHEMA,
    TABLE_KEY,
    TERMINAL_STATUSES,
    VIDEO_COLUMNS,
    VIDEO_PART_SCHEMA,
    VIDEO_SCHEMA,
    build_submission_part,
    build_video_part,
    conform,
    utcnow,
)
from kvid_dagster.catalog.storage import (
    FileLock,
    Part,
    file_identity,
    file_lock,
    fsync_path,
    list_parts,
    parse_parquet,
    part_name,
    quarantine,
    read_bytes,
    read_counter,
    remove_stale_temps,
    temp_path,
    warn,
    write_counter,
    write_parquet,
)

TABLES = ("videos", "submissions")
_SCHEMAS = {"videos": VIDEO_SCHEMA, "submissions": SUBMISSION_SCHEMA}
_PART_SCHEMAS = {"videos": VIDEO_PART_SCHEMA, "submissions": SUBMISSION_SCHEMA}
#: Row groups of the published files: small enough for statistics to prune point lookups.
ROW_GROUP_ROWS = 16_384
#: A read retries when a compaction replaced the snapshot under it; this many times at most.
_MAX_READ_ATTEMPTS = 50


# log parts folded into one table at a time while reading (bounds memory, see _read_parts)
_COMBINE_EVERY = 256


class _Stale(Exception):
    """A compaction replaced the snapshot or deleted a part during a read: read again."""


class _Damaged(Exception):
    pass


@dataclass(frozen=True)
class CompactionStats:
    """What one ``compact()`` did."""

    rows: int  # rows of the published videos table
    submission_rows: int
    parts_folded: int
    parts_deleted: int  # folded parts plus leftovers of an interrupted compaction
    quarantined: int
    temp_files_removed: int
    max_seq: int
    seconds: float


@dataclass
class _Snapshot:
    table: pa.Table
    max_seq: int
    ident: tuple[int, int, int, int] | None  # of the *current* published file when opened
    damaged: bool  # the current file is missing/unreadable and ``table`` is a fallback


class KvidCatalog:
    """The Parquet catalog rooted at ``root`` (conventionally ``<data_dir>/catalog``).

    Safe to use from many processes and threads at once. ``durable=False`` skips fsyncs
    (tests, throwaway catalogs): a machine crash may then lose acknowledged updates, a process
    crash still cannot.
    """

    def __init__(self, root: str | os.PathLike[str], *, durable: bool = True) -> None:
        self.root = Path(root)
        self.durable = durable
        self._log_dirs = {t: self.root / "_log" / t for t in TABLES}
        self._tmp_dir = self.root / "_tmp"
        self._prev_dir = self.root / "_prev"
        self._quarantine_dir = self.root / "_quarantine"
        for d in [*self._log_dirs.values(), self._tmp_dir, self._prev_dir]:
            d.mkdir(parents=True, exist_ok=True)
        for t in TABLES:
            self.table_path(t).mkdir(exist_ok=True)
        self._lock_path = Path(os.path.realpath(self.root / ".lock"))
        self._compact_lock_path = Path(os.path.realpath(self.root / ".compact.lock"))
        self._ensure_snapshots()

    @classmethod
    def for_data_dir(cls, data_dir: str | os.PathLike[str], **kwargs: Any) -> KvidCatalog:
        """The catalog of a kvid data directory: ``<data_dir>/catalog``."""
        return cls(Path(data_dir) / "catalog", **kwargs)

    def __repr__(self) -> str:
        return f"KvidCatalog({str(self.root)!r})"

    def table_path(self, table: str) -> Path:
        """The published folder of ``table`` ("videos" or "submissions") for other readers."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r} (known: {', '.join(TABLES)})")
        return self.root / table

    # -- locking ----------------------------------------------------------------------------

    # Looked up on every use (not cached on the instance) so that a forked child gets a fresh
    # lock instead of a copy of the parent's state.
    @property
    def _main_lock(self) -> FileLock:
        return file_lock(self._lock_path)

    @property
    def _compact_lock(self) -> FileLock:
        return file_lock(self._compact_lock_path)

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the exclusive catalog lock, to make check-then-write atomic across processes.

        Writers of every process need this lock to publish (only for the instant of allocating
        a sequence number), readers never take it, so inside the block the catalog cannot change
        except by the holder, and ``get``/``find``/``update``/``record_submission`` may be
        called (the lock is reentrant for the holding thread). The submission code uses it so
        that two runs cannot both submit the same request::

            with catalog.lock():
                existing = catalog.find(request_hash=h)
                if existing.empty:  # nobody submitted (or intends to submit) this request
                    catalog.record_submission(partition_key=pk, request_hash=h, event="INTENT")
                    catalog.update(pk, request_hash=h, status="SUBMITTING")
            # ... the HTTP POST happens outside the lock ...

        Keep the block short (no network calls): every writer waits for it. ``compact()``
        must not be called inside it. ``timeout`` (seconds) raises TimeoutError.
        """
        with self._main_lock.hold(timeout):
            yield

    # -- writing ----------------------------------------------------------------------------

    def update(self, partition_key: str, **fields: Any) -> int:
        """Record a partial update of one row: only ``fields`` change, a field given as None is
        cleared (except ``updated_at``, which is set to now unless given). Returns the log
        sequence number.
        Raises ValueError naming an unknown field or a badly typed value."""
        seq = self.update_many([{"partition_key": partition_key, **fields}])
        assert seq is not None
        return seq

    def update_many(self, updates: Iterable[Mapping[str, Any]]) -> int | None:
        """Record many partial updates (mappings with ``partition_key``) as ONE log part, applied
        in list order. Returns the sequence number, None when ``updates`` is empty."""
        batch = list(updates)
        if not batch:
            return None
        return self._append("videos", build_video_part(batch, utcnow()))

    def record_submission(self, **fields: Any) -> str:
        """Append one submission event (``partition_key`` and ``event`` required); returns its
        ``event_id`` (generated unless given). ``recorded_at`` defaults to now."""
        return self.record_submissions([fields])[0]

    def record_submissions(self, events: Iterable[Mapping[str, Any]]) -> list[str]:
        """Append many submission events as one log part; returns their event ids."""
        batch = list(events)
        if not batch:
            return []
        part = build_submission_part(batch, utcnow())
        self._append("submissions", part)
        return part.column("event_id").to_pylist()

    def _append(self, table: str, part: pa.Table) -> int:
        # The expensive work (encoding, writing, fsync) happens outside the lock; inside it only
        # the counter bump and the rename, so parts appear in the log in sequence order.
        tmp = temp_path(self._tmp_dir, table)
        write_parquet(part, tmp, durable=self.durable)
        log_dir = self._log_dirs[table]
        lock = self._main_lock
        try:
            with lock.hold():
                seq = self._next_seq(lock)
                os.rename(tmp, log_dir / part_name(seq))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if self.durable:
            fsync_path(log_dir)  # the rename
            fsync_path(self._lock_path)  # the counter: it must never roll back below a part
        return seq

    def _next_seq(self, lock: FileLock) -> int:
        current = read_counter(lock.fd)
        if current is None:
            current = self._recover_counter()
            warn(f"kvid catalog: unreadable sequence counter in {lock.path}; recovered {current}")
        write_counter(lock.fd, current + 1)
        return current + 1

    def _recover_counter(self) -> int:
        """The highest sequence number in use anywhere (slow; only after damage)."""
        high = 0
        for t in TABLES:
            parts = list_parts(self._log_dirs[t])
            high = max([high, *(p.seq for p in parts)])
            for path in (self._snapshot_path(t), self._prev_path(t)):
                with contextlib.suppress(Exception):
                    meta = pq.read_metadata(path).metadata or {}
                    high = max(high, int(meta.get(MAX_SEQ_KEY, b"0")))
        return high

    # -- reading ----------------------------------------------------------------------------

    def latest(self) -> pd.DataFrame:
        """One row per partition_key with its latest state (published snapshot + log), sorted
        by partition_key, columns VIDEO_COLUMNS with the same dtypes as
        ``pandas.read_parquet`` of the published folder."""
        return _to_pandas(self.latest_table(), VIDEO_SCHEMA)

    def latest_table(self) -> pa.Table:
        """``latest()`` as an Arrow table with VIDEO_SCHEMA (for DuckDB, Polars, ...)."""
        return self._folded(None)

    def get(self, partition_key: str) -> dict[str, Any] | None:
        """The latest state of one row as plain Python values, or None if never recorded."""
        base, delta = self._state("videos")
        key = pc.field("partition_key") == partition_key
        rows = fold_videos(
            base.filter(key), None if delta is None else delta.filter(key), VIDEO_SCHEMA
        ).to_pylist()
        return rows[0] if rows else None

    def find(self, **equals: Any) -> pd.DataFrame:
        """Latest rows whose columns equal the given values (None matches null), e.g.
        ``find(request_hash=h)``."""
        where = None
        for name, value in equals.items():
            if name not in VIDEO_COLUMNS:
                raise ValueError(f"unknown video field {name!r}")
            cond = pc.field(name).is_null() if value is None else pc.field(name) == value
            where = cond if where is None else where & cond
        return _to_pandas(self._folded(where), VIDEO_SCHEMA)

    def pending(self, statuses: Iterable[str] | None = None) -> pd.DataFrame:
        """Rows still in flight: status not in TERMINAL_STATUSES (a missing status counts as
        pending), or, with ``statuses``, rows whose status is one of them."""
        return _to_pandas(self._folded(_pending_filter(statuses)), VIDEO_SCHEMA)

    def latest_records(self) -> list[dict[str, Any]]:
        """``latest()`` as plain Python dicts (None for nulls, not NaN/NA/NaT)."""
        return self.latest_table().to_pylist()

    def records_by_key(self) -> dict[str, dict[str, Any]]:
        """``latest_records()`` keyed by partition_key."""
        return {str(r["partition_key"]): r for r in self.latest_records()}

    def pending_records(self, statuses: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """``pending()`` as plain Python dicts (None for nulls): what polling code wants, since
        a missing Int32 in a DataFrame is ``pd.NA`` (whose truth value raises) and a missing
        str is NaN (which is truthy)."""
        return self._folded(_pending_filter(statuses)).to_pylist()

    def records_for(self, partition_keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The latest rows of ``partition_keys`` (those that exist), keyed by partition_key:
        what a check-then-write under ``lock()`` re-reads before writing."""
        keys = sorted(set(partition_keys))
        if not keys:
            return {}
        rows = self._folded(pc.field("partition_key").isin(keys)).to_pylist()
        return {str(r["partition_key"]): r for r in rows}

    def counts_by_status(self) -> dict[str, int]:
        """Number of rows per status (rows without a status are not counted)."""
        status = self.latest_table().column("status")
        counts = pc.value_counts(status.drop_null())
        return {v["values"]: v["counts"] for v in counts.to_pylist()}

    def submissions(
        self, *, partition_key: str | None = None, request_hash: str | None = None
    ) -> pd.DataFrame:
        """The submission history in log order, optionally for one row or one request."""
        base, delta = self._state("submissions")
        table = base if delta is None else pa.concat_tables([base, delta])
        if partition_key is not None:
            table = table.filter(pc.field("partition_key") == partition_key)
        if request_hash is not None:
            table = table.filter(pc.field("request_hash") == request_hash)
        return _to_pandas(table, SUBMISSION_SCHEMA)

    def log_parts(self) -> int:
        """Number of log part files on disk (what the next compaction would have to look at)."""
        return sum(len(list_parts(d)) for d in self._log_dirs.values())

    def _folded(self, where: pc.Expression | None) -> pa.Table:
        base, delta = self._state("videos")
        if where is not None:
            # a row may enter or leave the selection through the log: keep every logged key
            logged = (
                where
                if delta is None
                else where | pc.field("partition_key").isin(pc.unique(delta["partition_key"]))
            )
            base = base.filter(logged)
        out = fold_videos(base, delta, VIDEO_SCHEMA)
        return out if where is None else out.filter(where)

    def _state(self, table: str) -> tuple[pa.Table, pa.Table | None]:
        """A consistent (snapshot, log rows after it) pair, without taking any lock.

        Compaction publishes a snapshot before deleting the parts it folded, so if the published
        file is still the one we read once the log has been listed, no part newer than it was
        missing from the listing; otherwise read again.
        """
        for attempt in range(_MAX_READ_ATTEMPTS):
            snap = self._open_snapshot(table)
            try:
                delta = self._read_log(table, snap.max_seq)
            except _Stale:
                delta = None
            else:
                if file_identity(self._snapshot_path(table)) == snap.ident:
                    return snap.table, delta
            time.sleep(min(0.001 * 2**attempt, 0.05))
        raise RuntimeError(f"{self._snapshot_path(table)} kept changing during reads")

    def _read_log(self, table: str, after: int) -> pa.Table | None:
        log_dir = self._log_dirs[table]
        parts = list_parts(log_dir, after)
        if parts:
            # A directory scan may miss an entry renamed in during it while returning a later
            # one; every part up to the newest seen was renamed before a second scan starts.
            top = parts[-1].seq
            parts = [p for p in list_parts(log_dir, after) if p.seq <= top]
        tables, _, _ = self._read_parts(table, parts, vanished="stale")
        return pa.concat_tables(tables) if tables else None

    def _read_parts(
        self, table: str, parts: list[Part], *, vanished: str
    ) -> tuple[list[pa.Table], int, int]:
        """Read parts in order -> (tables, number quarantined, number read). Damaged parts are
        quarantined and skipped; a vanished part (deleted by a compactor) raises _Stale, or is
        skipped with ``vanished="skip"``."""
        schema = _PART_SCHEMAS[table]

        def read(part: Part) -> pa.Table | Exception | None:
            try:
                data = read_bytes(part.path)
            except FileNotFoundError:
                if vanished == "skip":
                    return None
                raise _Stale from None
            try:
                # threads only pay off for big parts (a bulk load), not for status changes
                table = parse_parquet(data, use_threads=len(data) > 256 << 10)
                return conform(table, schema)
            except Exception as exc:  # any parse failure means a damaged file
                quarantine(part.path, self._quarantine_dir, f"{type(exc).__name__}: {exc}")
                return exc

        # (a thread pool measured no faster: tiny parts are dominated by Python-side overhead)
        # Thousands of one-row tables cost ~40 KB each in Arrow overhead (5,000 parts: +183 MB);
        # combining every few hundred keeps that flat at the same speed.
        tables: list[pa.Table] = []
        batch: list[pa.Table] = []
        damaged = read_ok = 0
        for part in parts:
            result = read(part)
            if isinstance(result, pa.Table):
                batch.append(result)
                read_ok += 1
            elif isinstance(result, Exception):
                damaged += 1
            if len(batch) >= _COMBINE_EVERY:
                tables.append(pa.concat_tables(batch).combine_chunks())
                batch = []
        if batch:
            tables.append(pa.concat_tables(batch).combine_chunks() if len(batch) > 1 else batch[0])
        return tables, damaged, read_ok

    # -- snapshots --------------------------------------------------------------------------

    def _snapshot_path(self, table: str) -> Path:
        return self.root / table / "data.parquet"

    def _prev_path(self, table: str) -> Path:
        # Not next to data.parquet: pyarrow/Spark would read "videos/data.parquet.prev" as a
        # second data file (only "."/"_" prefixes are ignored), duplicating every row.
        return self._prev_dir / f"{table}.data.parquet.prev"

    def _load_snapshot(self, path: Path, table: str) -> _Snapshot:
        """Read and validate a published file (FileNotFoundError, or _Damaged)."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
        ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            raw = parse_parquet(data)
            max_seq = int((raw.schema.metadata or {})[MAX_SEQ_KEY])
            return _Snapshot(conform(raw, _SCHEMAS[table]), max_seq, ident, damaged=False)
        except Exception as exc:  # whatever is wrong, the file is unusable
            raise _Damaged(f"{type(exc).__name__}: {exc}") from exc

    def _open_snapshot(self, table: str) -> _Snapshot:
        """The published snapshot, or the previous one, or nothing, with a warning when the
        published file is damaged (the next compaction repairs it)."""
        current, prev = self._snapshot_path(table), self._prev_path(table)
        try:
            return self._load_snapshot(current, table)
        except FileNotFoundError:
            problem, ident = "missing", None
            if not prev.exists():  # a catalog created before its snapshots were initialised
                return _Snapshot(_SCHEMAS[table].empty_table(), 0, None, damaged=False)
        except _Damaged as exc:
            problem, ident = str(exc), file_identity(current)
        try:
            snap = self._load_snapshot(prev, table)
            warn(
                f"kvid catalog: published snapshot {current} is unusable ({problem}); using the "
                f"previous snapshot {prev} (max_seq {snap.max_seq}) and the log; updates folded "
                "by the last compaction may be missing"
            )
        except (FileNotFoundError, _Damaged) as exc:
            warn(
                f"kvid catalog: published snapshot {current} is unusable ({problem}) and so is "
                f"{prev} ({exc}); rebuilding from the log alone"
            )
            snap = _Snapshot(_SCHEMAS[table].empty_table(), 0, None, damaged=True)
        snap.ident, snap.damaged = ident, True
        return snap

    def _ensure_snapshots(self) -> None:
        """Publish empty tables so that ``pandas.read_parquet(folder)`` works from the start."""
        for t in TABLES:
            if self._snapshot_path(t).exists() or self._prev_path(t).exists():
                continue
            # The compaction lock: never clobber a concurrent first compaction. Inside lock()
            # waiting for it could deadlock (lock order), so then only try; readers cope.
            try:
                self._compact_lock.acquire(timeout=0 if self._main_lock.held() else None)
            except TimeoutError:
                continue
            try:
                if not self._snapshot_path(t).exists():
                    self._publish(t, _SCHEMAS[t].empty_table(), 0, previous="none")
            finally:
                self._compact_lock.release()

    def _publish(self, table: str, data: pa.Table, max_seq: int, *, previous: str) -> None:
        """Atomically replace the published file; the old one becomes the fallback
        (``previous="keep"``), is quarantined (``"quarantine"``), or is left alone (``"none"``).
        """
        meta = dict(_SCHEMAS[table].metadata)
        meta[MAX_SEQ_KEY] = str(max_seq).encode()
        meta[TABLE_KEY] = table.encode()
        meta[FORMAT_KEY] = FORMAT_VERSION
        tmp = temp_path(self._tmp_dir, f"{table}-snapshot")
        write_parquet(
            data.replace_schema_metadata(meta), tmp, durable=self.durable,
            row_group_size=ROW_GROUP_ROWS,
        )  # fmt: skip
        current = self._snapshot_path(table)
        if previous != "none" and current.exists():
            side = temp_path(self._tmp_dir, f"{table}-prev")
            try:
                os.link(current, side)  # a second name, not a copy
            except OSError:
                shutil.copyfile(current, side)
            if previous == "keep":
                os.replace(side, self._prev_path(table))
            else:
                self._quarantine_dir.mkdir(exist_ok=True)
                dest = self._quarantine_dir / f"{table}-data.parquet.{os.urandom(4).hex()}"
                os.replace(side, dest)
                warn(f"kvid catalog: damaged snapshot {current} moved to {dest} and rebuilt")
        os.replace(tmp, current)
        if self.durable:
            fsync_path(current.parent)
            fsync_path(self._prev_dir)

    # -- compaction -------------------------------------------------------------------------

    def compact(self, *, tmp_max_age: float = 600.0) -> CompactionStats:
        """Fold the log into new published snapshots, then delete the folded parts.

        Crash-safe at every step: a snapshot records the highest sequence number it includes
        (``kvid.max_seq``) and readers skip parts at or below it, so parts left behind by an
        interrupted compaction are never applied twice (and are deleted next time). Compactors
        serialise on their own lock; writers keep writing meanwhile (their parts get higher
        sequence numbers), readers keep reading. Temp files older than ``tmp_max_age`` seconds
        (left by killed writers) are deleted: it must exceed the time a live writer takes to
        write one part.
        """
        if self._main_lock.held():
            raise RuntimeError("compact() inside catalog.lock() would deadlock other compactors")
        with self._compact_lock.hold():
            return self._compact_locked(tmp_max_age)

    def maybe_compact(
        self, max_parts: int = 64, *, tmp_max_age: float = 600.0
    ) -> CompactionStats | None:
        """Compact if the log holds at least ``max_parts`` parts and no other compaction is
        running (never waits); returns None when it did nothing. Cheap enough for every tick."""
        if self._main_lock.held():
            raise RuntimeError("maybe_compact() inside catalog.lock() could deadlock")
        if self.log_parts() < max_parts:
            return None
        try:
            self._compact_lock.acquire(timeout=0)
        except TimeoutError:
            return None
        try:
            return self._compact_locked(tmp_max_age)
        finally:
            self._compact_lock.release()

    def _compact_locked(self, tmp_max_age: float) -> CompactionStats:
        started = time.perf_counter()
        removed = remove_stale_temps(
            [self._tmp_dir, *self._log_dirs.values(), *(self.table_path(t) for t in TABLES)],
            tmp_max_age,
        )
        # Only compactors publish, and we are the only one: these stay current.
        snaps = {t: self._open_snapshot(t) for t in TABLES}
        lock = self._main_lock
        with lock.hold():
            # Under the lock no rename is in flight: every seq <= the counter is on disk (or was
            # never written by a crashed writer), so the listing is complete up to `high`.
            counter = read_counter(lock.fd)
            listing = {t: list_parts(self._log_dirs[t]) for t in TABLES}
            high = max(
                [counter or 0, *(s.max_seq for s in snaps.values())]
                + [p.seq for parts in listing.values() for p in parts]
            )
            if counter != high:  # damaged, or rolled back by a machine crash
                write_counter(lock.fd, high)
        if self.durable:
            fsync_path(self._lock_path)  # a snapshot must never claim seqs the counter forgot

        rows: dict[str, int] = {}
        folded = deleted = quarantined = 0
        for t in TABLES:
            snap, parts = snaps[t], listing[t]
            todo = [p for p in parts if p.seq > snap.max_seq]
            done = [p for p in parts if p.seq <= snap.max_seq]  # an interrupted compaction's
            if todo or snap.damaged:
                tables, bad, read_ok = self._read_parts(t, todo, vanished="skip")
                quarantined += bad
                delta = pa.concat_tables(tables) if tables else None
                if t == "videos":
                    new = fold_videos(snap.table, delta, VIDEO_SCHEMA)
                else:
                    new = snap.table if delta is None else pa.concat_tables([snap.table, delta])
                # a damaged published file is kept for a post-mortem, never as the fallback
                previous = "keep" if not snap.damaged else "quarantine"
                self._publish(t, new, high, previous=previous)
                rows[t] = new.num_rows
                folded += read_ok
            else:
                rows[t] = snap.table.num_rows
            deleted += self._delete_parts(t, todo + done)
        return CompactionStats(
            rows=rows["videos"],
            submission_rows=rows["submissions"],
            parts_folded=folded,
            parts_deleted=deleted,
            quarantined=quarantined,
            temp_files_removed=removed,
            max_seq=high,
            seconds=time.perf_counter() - started,
        )

    def _delete_parts(self, table: str, parts: list[Part]) -> int:
        deleted = 0
        for p in parts:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p.path)
                deleted += 1
        if deleted and self.durable:
            fsync_path(self._log_dirs[table])
        return deleted


def _to_pandas(table: pa.Table, schema: pa.Schema) -> pd.DataFrame:
    # the pandas metadata of the schema restores nullable Int32/Int64 and the "str" dtype
    return table.replace_schema_metadata(schema.metadata).to_pandas()


def _pending_filter(statuses: Iterable[str] | None) -> pc.Expression:
    if statuses is None:
        return ~pc.field("status").isin(sorted(TERMINAL_STATUSES))  # null -> False -> kept
    return pc.field("status").isin(list(statuses))
