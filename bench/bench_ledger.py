"""The job ledger at 100,000 rows (quick: 5,000) on one backend, a fresh database.

    python -m bench.bench_ledger --out F.json [--backend sqlite|postgresql] [--quick] [--rows N]

Set-up, not timed: N rows, one submission each (``--pending`` of them still polled, the rest
ended, most COMPLETED with a video) and their history (INTENT, SUBMITTED and the end event),
inserted straight into ``ledger.tables.*`` with SQLAlchemy executemany. Measured, each against a
baseline measured in the same run on the same database:

- ``Ledger.apply`` of ``--changes`` JobChange in one transaction (what one status tick writes),
  against one plain executemany UPDATE of the same values;
- ``apply`` of one change (one durable commit), its median and p95; a claim and the recording
  of its request_id (what each submitted row costs the ledger);
- ``ledger.jobs_to_poll()``, against a plain SELECT of the same rows (the SQL floor);
- ``ledger.rows()`` (all rows: a status sensor's first tick) and ``rows_changed_since`` after
  ``--changes`` changes (what each later tick re-checks for outcomes Dagster never got);
- ``publish(ledger, dir)`` (the Parquet catalogs): the first publication (everything), split
  into ``read_tables`` (one consistent read into Arrow tables) and the rest (the fsynced
  writes), against a plain ``pyarrow.parquet.write_table`` of the same tables; then the
  publication after ``--changes`` changes (a tick's), which merges only the changed rows into
  the previous files; peak RSS while publishing; ``pandas.read_parquet`` of the result.

The SQLite database is a file in the scratch folder, the PostgreSQL one is created for the run
and dropped after it (``KVID_TEST_DATABASE_URL``, as the tests); an unreachable PostgreSQL makes
the phase report itself skipped.
"""

from __future__ import annotations

import operator
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from bench.common import (
    DatabaseUnavailable,
    ledger_database,
    phase_args,
    proc_status_mb,
    redacted,
    reset_peak_rss,
    scratch,
    write_result,
    write_skipped,
)
from kvid_dagster.ledger.tables import REVISION_OPTION

CHUNK = 10_000  # rows per executemany in the set-up
POLLED = ("SUBMITTED", "IN_QUEUE", "PROCESSING")
ENDED = ("FAILED", "TIMED_OUT", "LOST", "UNCERTAIN")


@dataclass(frozen=True)
class _Request:
    """A valid prompt row, as far as the ledger is concerned (``RequestRow``)."""

    partition_key: str
    prompt: str
    request_hash: str
    job_kind: str = "text-to-video"
    model: str = "v1"
    params_json: str = '{"resolution": "480p"}'
    dialect: str = "video"
    user_columns_json: str | None = None


def _median(times: list[float]) -> float:
    return statistics.median(times)


def _timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _insert_many(conn: Any, table: Any, records: list[dict[str, Any]]) -> None:
    """One driver-level executemany of ``INSERT INTO table`` (set-up only), the values already
    as the driver takes them (see :func:`bulk_load`): SQLAlchemy's own executemany processes
    every bound value in Python, which made loading 100,000 rows take longer than everything
    measured."""
    from sqlalchemy import insert

    if not records:
        return
    # what SQLAlchemy would fill in: the columns' scalar defaults, and the revision that
    # Ledger.write() stamps (a driver-level insert does neither)
    filled = {
        c.key: c.default.arg for c in table.c if c.default is not None and c.default.is_scalar
    }
    if "revision" in table.c:
        filled["revision"] = conn.get_execution_options()[REVISION_OPTION]
    records = [{**filled, **r} for r in records]
    columns = list(records[0])
    compiled = insert(table).compile(dialect=conn.dialect, column_keys=columns)
    params: list[Any] = records  # pyformat (psycopg) takes the dicts
    if compiled.positiontup is not None:  # qmark (SQLite) takes tuples
        pick = operator.itemgetter(*compiled.positiontup)
        params = [pick(r) for r in records]
    conn.exec_driver_sql(str(compiled), params)


def bulk_load(ledger: Any, n: int, pending: int, rng: random.Random) -> dict[str, Any]:
    """N rows with one submission each and their history, straight into the tables."""
    from sqlalchemy import func, select

    t = ledger.tables
    # what UTCDateTime stores: naive UTC; SQLite as SQLAlchemy's text format
    if ledger.engine.dialect.name == "sqlite":

        def stamp(d: datetime) -> Any:
            return d.isoformat(" ", "microseconds")
    else:

        def stamp(d: datetime) -> Any:
            return d

    now = datetime.now(UTC).replace(tzinfo=None)
    pending_at = set(rng.sample(range(n), pending))
    counts: dict[str, int] = {}
    events = 0
    t0 = time.perf_counter()
    with ledger.write() as conn:
        for start in range(0, n, CHUNK):
            idx = range(start, min(n, start + CHUNK))
            rows, jobs = [], []
            for i in idx:
                key = f"row-{i:08d}"
                request_hash = f"{rng.getrandbits(256):064x}"
                prompt = f"a cinematic shot of scene {i}, golden hour, slow dolly-in, 35mm film"
                params = f'{{"resolution": "480p", "seed": {i}}}'
                claimed = now - timedelta(seconds=rng.randrange(60, 86_400))
                if i in pending_at:
                    status = rng.choice(POLLED)
                elif rng.random() < 0.9:
                    status = "COMPLETED"
                else:
                    status = rng.choice(ENDED)
                counts[status] = counts.get(status, 0) + 1
                done = status == "COMPLETED"
                rows.append(
                    {
                        "partition_key": key,
                        "prompt": prompt,
                        "job_kind": "text-to-video",
                        "model": "v1",
                        "request_hash": request_hash,
                        "params_json": params,
                        "invalid_reason": None,
                        "last_error": None,
                        "updated_at": stamp(claimed),
                    }
                )
                jobs.append(
                    {
                        "request_hash": request_hash,
                        "attempt": 1,
                        "partition_key": key,
                        "prompt": prompt,
                        "job_kind": "text-to-video",
                        "model": "v1",
                        "params_json": params,
                        "status": status,
                        "request_id": None if status == "UNCERTAIN" else f"{i:08d}-{key}",
                        "progress": 100 if done else rng.randrange(100),
                        "url": f"https://files.example/{i}.mp4" if done else None,
                        "name": f"{key}.mp4" if done else None,
                        "size_kb": rng.randrange(200, 5000) if done else None,
                        "local_path": f"/data/videos/{key}-{request_hash[:10]}.mp4"
                        if done
                        else None,
                        "sha256": f"{rng.getrandbits(256):064x}" if done else None,
                        "width": 832 if done else None,
                        "height": 480 if done else None,
                        "fps": 16.0 if done else None,
                        "num_frames": 81 if done else None,
                        "duration_s": 5.06 if done else None,
                        "error": None if done or status in POLLED else "the job failed",
                        "cost_credits": 0.25,
                        "owner_host": "bench",
                        "owner_pid": 1,
                        "owner_started": "bench:1",
                        "owner_run_id": None,
                        "claimed_at": stamp(claimed),
                        "heartbeat_at": stamp(claimed),
                        "submitted_at": stamp(claimed + timedelta(seconds=1)),
                        "completed_at": stamp(claimed + timedelta(seconds=120)) if done else None,
                        "updated_at": stamp(claimed + timedelta(seconds=120)),
                        "version": 3,
                    }
                )
            before = conn.scalar(select(func.coalesce(func.max(t.jobs.c.submission_id), 0)))
            _insert_many(conn, t.rows, rows)
            _insert_many(conn, t.jobs, jobs)
            new_jobs = select(t.jobs.c.request_hash, t.jobs.c.submission_id).where(
                t.jobs.c.submission_id > before
            )
            ids = {h: i for h, i in conn.execute(new_jobs)}
            history = []
            for j in jobs:
                kinds = ["INTENT"]
                if j["request_id"] is not None:
                    kinds.append("SUBMITTED")
                if j["status"] not in POLLED:
                    kinds.append(j["status"])
                for kind in kinds:
                    history.append(
                        {
                            "event_id": f"{rng.getrandbits(128):032x}",
                            "submission_id": ids[j["request_hash"]],
                            "partition_key": j["partition_key"],
                            "request_hash": j["request_hash"],
                            "job_kind": j["job_kind"],
                            "model": j["model"],
                            "params_json": j["params_json"],
                            "request_id": j["request_id"] if kind != "INTENT" else None,
                            "event": kind,
                            "attempt": 1,
                            "cost_credits": 0.25 if kind in ("SUBMITTED", "UNCERTAIN") else None,
                            "error": j["error"] if kind == j["status"] else None,
                            "recorded_at": j["claimed_at"],
                        }
                    )
            _insert_many(conn, t.events, history)
            events += len(history)
    seconds = time.perf_counter() - t0
    if ledger.engine.dialect.name == "postgresql":  # fresh statistics, as autovacuum would
        with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            for table in (t.rows, t.jobs, t.events):
                c.exec_driver_sql(f"ANALYZE {table.name}")
    return {"seconds": seconds, "rows": n, "events": events, "statuses": counts}


def measure(ledger: Any, args: Any, tmp: Path) -> dict[str, Any]:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sqlalchemy import bindparam, select, update

    from kvid_dagster.ledger import (
        ClaimOwner,
        JobChange,
        Refusal,
        VideoStatus,
        publish,
        read_tables,
    )

    rng = random.Random(42)
    n = args.rows or (5_000 if args.quick else 100_000)
    pending = min(n, args.pending or (500 if args.quick else 5_000))
    n_changes = min(pending, args.changes or (500 if args.quick else 5_000))
    reps = 1 if args.quick else 3
    slow_reps = 1 if args.quick else 2  # rows() and publish's breakdown: seconds each at 100,000
    figures: dict[str, Any] = {"rows": n, "pending": pending, "changes": n_changes}
    figures["load"] = bulk_load(ledger, n, pending, rng)
    jobs = ledger.tables.jobs
    polled = [s.value for s in VideoStatus if s.needs_polling]

    # --- jobs_to_poll: the pending-jobs query, against the plain SELECT of the same rows -----
    def plain_select() -> list[Any]:
        with ledger.engine.connect() as conn:
            return conn.execute(
                select(jobs)
                .where(jobs.c.status.in_(polled), jobs.c.request_id.is_not(None))
                .order_by(jobs.c.submission_id)
            ).all()

    found = ledger.jobs_to_poll()
    assert len(found) == pending, f"jobs_to_poll found {len(found)} of {pending}"
    figures["jobs_to_poll_s"] = _median(_timed(ledger.jobs_to_poll, reps + 2))
    figures["plain_select_s"] = _median(_timed(plain_select, reps + 2))
    figures["jobs_to_poll_found"] = len(found)

    # --- apply: N status changes in one transaction, against one executemany UPDATE ----------
    def changes(progress: int) -> list[JobChange]:
        subs = sorted(ledger.jobs_to_poll(), key=lambda s: s.submission_id)[:n_changes]
        return [
            JobChange(s.submission_id, s.version, VideoStatus.PROCESSING, progress=progress)
            for s in subs
        ]

    apply_s, plain_s = [], []
    for rep in range(reps):
        todo = changes(10 + rep)
        t0 = time.perf_counter()
        applied = ledger.apply(todo)
        apply_s.append(time.perf_counter() - t0)
        assert len(applied) == n_changes, f"{len(applied)} of {n_changes} changes applied"
        same = [{"sid": c.submission_id, "v": c.expected_version + 1, "p": 50 + rep} for c in todo]
        statement = (
            update(jobs)
            .where(jobs.c.submission_id == bindparam("sid"), jobs.c.version == bindparam("v"))
            .values(
                status="PROCESSING",
                progress=bindparam("p"),
                updated_at=datetime.now(UTC),
                version=jobs.c.version + 1,
            )
        )
        t0 = time.perf_counter()
        with ledger.write() as conn:
            conn.execute(statement, same)
        plain_s.append(time.perf_counter() - t0)
    figures["apply_s"] = _median(apply_s)
    figures["apply_all_s"] = apply_s
    figures["plain_update_s"] = _median(plain_s)

    # --- one change, one commit: the latency of a single status change -----------------------
    singles = []
    subs = ledger.jobs_to_poll()
    for i in range(20 if args.quick else 100):
        sub = subs[i % len(subs)]
        current = ledger.submission(sub.submission_id)
        assert current is not None
        change = JobChange(current.submission_id, current.version, current.status, progress=i)
        t0 = time.perf_counter()
        ledger.apply([change])
        singles.append(time.perf_counter() - t0)
    singles.sort()
    figures["apply_one_ms"] = {
        "median": 1e3 * _median(singles),
        "p95": 1e3 * singles[int(0.95 * len(singles))],
        "max": 1e3 * singles[-1],
        "n": len(singles),
    }

    # --- rows(): the full read (a sensor's first tick) and the re-check of a later tick ------
    figures["rows_s"] = _median(_timed(ledger.rows, slow_reps))

    # --- publishing: the first publication (everything) and the one after a tick's changes ----
    publish_s, stats = [], None
    reset_peak_rss()
    rss_before = proc_status_mb("VmRSS")
    for rep in range(reps):
        t0 = time.perf_counter()
        stats = publish(ledger, tmp / f"catalog-{rep}")
        publish_s.append(time.perf_counter() - t0)
    publish_peak = proc_status_mb("VmHWM")
    assert stats is not None and stats.videos == n and not stats.incremental, stats
    figures["publish_s"] = _median(publish_s)
    figures["publish_all_s"] = publish_s
    figures["publish_events"] = stats.submissions
    figures["publish_rss_before_mb"] = rss_before
    figures["publish_peak_rss_mb"] = publish_peak

    # what a status tick does after its Ledger.apply: re-check the rows changed since the last
    # tick, and publish only those into the previous files
    incremental_s, recheck_s = [], []
    for rep in range(reps):
        before = ledger.revision()
        ledger.apply(changes(80 + rep))
        t0 = time.perf_counter()
        changed, _ = ledger.rows_changed_since(before)
        recheck_s.append(time.perf_counter() - t0)
        assert len(changed) == n_changes, len(changed)
        t0 = time.perf_counter()
        stats = publish(ledger, tmp / "catalog-0")
        incremental_s.append(time.perf_counter() - t0)
        assert stats.incremental and stats.videos == n, stats
    figures["publish_incremental_s"] = _median(incremental_s)
    figures["rows_changed_since_s"] = _median(recheck_s)

    # the parts of a full publication: read_tables (one consistent read into Arrow tables) and
    # the rest of publish() (the fsynced writes, renames and revision checks)
    read_s = []
    for _ in range(slow_reps):
        t0 = time.perf_counter()
        videos, events, _revision = read_tables(ledger)
        read_s.append(time.perf_counter() - t0)
    figures["publish_read_tables_s"] = _median(read_s)
    figures["publish_write_s"] = max(0.0, figures["publish_s"] - _median(read_s))

    def plain_write(rep: int) -> None:
        folder = tmp / f"plain-{rep}"
        folder.mkdir()
        pq.write_table(videos, folder / "videos.parquet")
        pq.write_table(events, folder / "submissions.parquet")

    plain = [0.0] * reps
    for rep in range(reps):
        t0 = time.perf_counter()
        plain_write(rep)
        plain[rep] = time.perf_counter() - t0
    figures["plain_pyarrow_write_s"] = _median(plain)
    published = tmp / "catalog-0"
    figures["published_videos_mb"] = (published / "videos" / "data.parquet").stat().st_size / 2**20
    figures["published_submissions_mb"] = (
        published / "submissions" / "data.parquet"
    ).stat().st_size / 2**20
    figures["arrow_videos_mb"] = videos.nbytes / 2**20
    figures["arrow_submissions_mb"] = events.nbytes / 2**20
    figures["read_parquet_s"] = _median(_timed(lambda: pd.read_parquet(published / "videos"), reps))
    figures["arrow_pool_peak_mb"] = pa.default_memory_pool().max_memory() / 2**20

    # --- the money path of one row: claim (committed) then record its request_id ------------
    owner = ClaimOwner.current()
    new = [
        _Request(f"new-{i:05d}", f"a new prompt {i}", f"{rng.getrandbits(256):064x}")
        for i in range(20 if args.quick else 100)
    ]
    ledger.register(new)
    claims, records = [], []
    for i, row in enumerate(new):
        t0 = time.perf_counter()
        claimed = ledger.claim(row, owner, cost_credits=0.25)
        t1 = time.perf_counter()
        assert not isinstance(claimed, Refusal), claimed
        ledger.record_submitted(claimed, f"new-request-{i}")
        claims.append(t1 - t0)
        records.append(time.perf_counter() - t1)
    figures["claim_ms"] = 1e3 * _median(claims)
    figures["record_submitted_ms"] = 1e3 * _median(records)
    return figures


def main() -> int:
    def add(parser: Any) -> None:
        parser.add_argument("--rows", type=int, default=None, help="rows (default 100000)")
        parser.add_argument("--pending", type=int, default=None, help="polled (default 5000)")
        parser.add_argument("--changes", type=int, default=None, help="apply size (default 5000)")

    args = phase_args(__doc__.splitlines()[0], add)
    from kvid_dagster.ledger import Ledger

    with scratch(args.workdir, "kvid-bench-ledger-") as tmp:
        try:
            with ledger_database(args.backend, tmp / "db") as url:
                ledger = Ledger(url)
                try:
                    t0 = time.perf_counter()
                    figures = measure(ledger, args, tmp)
                    figures["measure_s"] = time.perf_counter() - t0
                finally:
                    ledger.close()
        except DatabaseUnavailable as exc:
            write_skipped(args.out, args.backend, str(exc))
            return 0
    figures["backend"] = args.backend
    figures["database"] = redacted(url)
    for name, value in figures.items():
        if isinstance(value, float):
            print(f"  {name}: {value:.4f}", file=sys.stderr)
    write_result(args.out, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
