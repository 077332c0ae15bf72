"""The ledger against the audit of issue 20, on SQLite and on PostgreSQL.

- the submissions history counts each job's cost once, whatever path wrote its events (item 2);
- a journalled request_id the database refuses never blocks the others, and a request_id as
  long as the client accepts fits, on a database migrated from an older schema (item 4);
- a process that opened the ledger before a newer one migrated it writes nothing (item 9; what
  a process older than revisions writes is published: ``test_ledger.py``);
- a journal line appended while another process replays the journal is never lost;
- the hidden temp files of a publication killed mid-write are cleaned up.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from test_ledger import ME, Row, drop_quality_columns, older_tables

from kvid_dagster.ledger import (
    JobChange,
    Ledger,
    Submission,
    VideoFile,
    VideoStatus,
    publish,
    store,
    submissions_frame,
    videos_frame,
)
from kvid_dagster.ledger.journal import Journal, JournalEntry
from kvid_dagster.ledger.publish import DATA_FILE, STALE_TEMP_SECONDS
from kvid_dagster.ledger.records import QUALITY_FIELDS
from kvid_dagster.ledger.store import LedgerSchemaChanged
from kvid_dagster.ledger.tables import SCHEMA_VERSION

# the longest request id the client accepts (``client/protocol.py``: 1-256 characters)
LONGEST_REQUEST_ID = "r" * 256


@pytest.fixture
def ledger(database_url: str, tmp_path: Path) -> Iterator[Ledger]:
    made = Ledger(database_url, journal_path=tmp_path / "journal.jsonl")
    yield made
    made.close()


def claimed(ledger: Ledger, row: Row, cost: float = 90.0) -> Submission:
    ledger.register([row])
    result = ledger.claim(row, ME, cost_credits=cost)
    assert isinstance(result, Submission), result
    return result


def current(ledger: Ledger, sub: Submission) -> Submission:
    found = ledger.submission(sub.submission_id)
    assert found is not None
    return found


def journalled(sub: Submission, request_id: str) -> JournalEntry:
    return JournalEntry(
        sub.submission_id, sub.request_hash, sub.attempt, sub.partition_key, request_id
    )


# -- item 2: each job's cost counted once --------------------------------------------------------


def assert_each_cost_counted_once(ledger: Ledger, catalog: Path, what: str) -> None:
    """The sum of cost_credits over the history is the sum over the jobs (a claim in flight
    counts from the event that settles it), in the ledger and in the published catalog, read
    incrementally and whole."""
    jobs = sum(
        s.cost_credits or 0.0
        for s in ledger.submissions()
        if s.status is not VideoStatus.SUBMITTING
    )
    history = sum(e["cost_credits"] or 0.0 for e in ledger.events())
    assert history == pytest.approx(jobs), f"after {what}: history {history}, jobs {jobs}"
    publish(ledger, catalog)
    published = pd.read_parquet(catalog / "submissions")["cost_credits"].sum()
    assert published == pytest.approx(jobs), f"after {what}: published {published}, jobs {jobs}"
    assert submissions_frame(ledger)["cost_credits"].sum() == pytest.approx(jobs), what


def test_every_path_that_writes_events_counts_each_jobs_cost_once(
    ledger: Ledger, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"

    def check(what: str) -> None:
        assert_each_cost_counted_once(ledger, catalog, what)

    paid = claimed(ledger, Row("paid", "h-paid"))
    check("a claim")
    ledger.record_submitted(paid, "rid-paid")
    check("a recorded request_id")

    # the documented slow submitter: its claim settled UNCERTAIN, then its id recorded
    slow = claimed(ledger, Row("slow", "h-slow"))
    assert [s.partition_key for s in ledger.recover(lambda sub: False).settled] == ["slow"]
    check("a claim settled UNCERTAIN by recovery")
    ledger.record_submitted(slow, "rid-slow")
    assert current(ledger, slow).status is VideoStatus.SUBMITTED
    check("a request_id recorded after UNCERTAIN")
    slow_events = submissions_frame(ledger).query("partition_key == 'slow'")
    assert slow_events["cost_credits"].sum() == 90.0  # one 90-credit job, not 180

    # a journal replayed after another host settled the claim
    replayed = claimed(ledger, Row("replayed", "h-replayed"))
    ledger.mark_uncertain(replayed, "the answer never came")
    ledger.journal.append(journalled(replayed, "rid-replayed"))
    assert [s.request_id for s in ledger.recover().replayed] == ["rid-replayed"]
    check("a journal replayed after UNCERTAIN")

    ledger.release(claimed(ledger, Row("refused", "h-refused")), "429: refused")
    check("a released claim")

    for key in ("found", "none"):
        ledger.mark_uncertain(claimed(ledger, Row(key, f"h-{key}")), "reset")
    check("two UNCERTAIN claims")
    ledger.resolve_uncertain("found", request_id="rid-found")
    check("an UNCERTAIN resolved with its job")
    ledger.resolve_uncertain("none")
    check("an UNCERTAIN resolved as never created (released)")

    # the poller: the service's own figure replaces the estimate, running or completed
    sub = current(ledger, paid)
    running = JobChange(
        sub.submission_id, sub.version, VideoStatus.FETCHING, extra={"cost_credits": 75.0}
    )
    ledger.apply([running])
    check("a running job whose cost the service reported")
    sub = current(ledger, paid)
    done = JobChange(
        sub.submission_id, sub.version, VideoStatus.COMPLETED, video=VideoFile(url="u"),
        completed=True, extra={"cost_credits": 45.0},
    )  # fmt: skip
    ledger.apply([done])
    assert ledger.row("paid").cost_credits == 45.0
    check("a completed job whose cost the service reported")

    sub = current(ledger, slow)
    ledger.apply([JobChange(sub.submission_id, sub.version, VideoStatus.FETCH_FAILED)])
    check("a job whose video could not be fetched")
    ledger.refetch("slow")
    check("a refetch")
    sub = current(ledger, replayed)
    ledger.apply([JobChange(sub.submission_id, sub.version, VideoStatus.FAILED, error="x")])
    check("a FAILED job")
    history = submissions_frame(ledger)  # money events state it, 0 when counted already
    assert history.query("event == 'INTENT'")["cost_credits"].isna().all()
    assert list(history.query("event == 'FAILED_TO_SUBMIT'")["cost_credits"]) == [0.0]
    assert list(history.query("event == 'RESOLVED'")["cost_credits"]) == [0.0, -90.0]


def _write_0_1_folder(catalog: Path) -> None:
    """A data folder of kvid-dagster 0.1: three rows and the history 0.1 wrote for them (a
    SUBMITTED or UNCERTAIN event with the cost; an intent it never finished has only INTENT)."""
    ts = pa.array([datetime(2026, 11, 1, tzinfo=UTC)] * 3, pa.timestamp("us", tz="UTC"))
    keys, statuses = ["done", "unsure", "unfinished"], ["COMPLETED", "UNCERTAIN", "SUBMITTING"]
    videos = pa.table(
        {
            "partition_key": keys, "prompt": ["p"] * 3, "job_kind": ["text-to-video"] * 3,
            "model": ["v1"] * 3, "request_hash": [f"h-{k}" for k in keys],
            "params_json": ["{}"] * 3, "request_id": ["rid-done", None, None],
            "status": statuses, "attempts": pa.array([1] * 3, pa.int32()),
            "cost_credits": [60.0] * 3, "submitted_at": ts, "updated_at": ts,
        }
    )  # fmt: skip
    history = [
        ("done", "INTENT", None), ("done", "SUBMITTED", 60.0), ("done", "COMPLETED", None),
        ("unsure", "INTENT", None), ("unsure", "UNCERTAIN", 60.0), ("unfinished", "INTENT", None),
    ]  # fmt: skip
    events = pa.table(
        {
            "event_id": [f"e{i}" for i in range(len(history))],
            "partition_key": [k for k, _, _ in history],
            "request_hash": [f"h-{k}" for k, _, _ in history],
            "event": [e for _, e, _ in history], "attempt": [1] * len(history),
            "cost_credits": [c for _, _, c in history],
            "recorded_at": pa.array(ts.to_pylist()[:1] * len(history), ts.type),
        }
    )  # fmt: skip
    for name, table in (("videos", videos), ("submissions", events)):
        (catalog / name).mkdir(parents=True)
        pq.write_table(table, catalog / name / DATA_FILE)
    (catalog / "_log").mkdir()


def test_a_0_1_folder_imports_with_each_jobs_cost_counted_once(
    database_url: str, tmp_path: Path
) -> None:
    """The import settles 0.1's unfinished intent UNCERTAIN, as recovery settles a claim: with
    the UNCERTAIN event that counts its cost."""
    _write_0_1_folder(tmp_path / "catalog")
    with Ledger.for_data_dir(tmp_path, database_url) as ledger:
        assert ledger.row("unfinished").status is VideoStatus.UNCERTAIN
        assert_each_cost_counted_once(ledger, tmp_path / "published", "the import of 0.1")
        assert submissions_frame(ledger)["cost_credits"].sum() == 180.0


# -- item 4: a journal entry that cannot be applied; request ids as long as the client's ---------


def _refuse(ledger: Ledger, request_id: str) -> Callable[..., None]:
    """Make the database refuse every write of ``request_id`` (as PostgreSQL refused a value
    too long for its column)."""

    def refuse(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        values = parameters.values() if isinstance(parameters, dict) else parameters or ()
        if statement.lstrip().upper().startswith("UPDATE") and request_id in values:
            raise sa.exc.DataError(statement, parameters, Exception("value too long"))

    sa.event.listen(ledger.engine, "before_cursor_execute", refuse)
    return refuse


def test_a_journal_entry_the_database_refuses_is_kept_and_reported_and_the_rest_recorded(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    first, refused, last = (claimed(ledger, Row(k, f"h-{k}")) for k in ("first", "bad", "last"))
    for sub in (first, refused, last):
        ledger.journal.append(journalled(sub, f"rid-{sub.partition_key}"))
    refuse = _refuse(ledger, "rid-bad")
    with caplog.at_level("ERROR", logger="kvid_dagster.ledger"):
        report = ledger.recover()  # raised DataError before, for every later run and tick
    assert sorted(s.request_id for s in report.replayed) == ["rid-first", "rid-last"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "bad" in errors[0] and "rid-bad" in errors[0], errors
    assert "DataError" in errors[0] and str(ledger.journal.path) in errors[0]
    assert ledger.journal.pending() and "rid-bad" in ledger.journal.path.read_text()
    assert ledger.row("bad").status is VideoStatus.SUBMITTING
    assert ledger.recover().replayed == []  # still refused: still kept, nothing else blocked
    sa.event.remove(ledger.engine, "before_cursor_execute", refuse)  # the database accepts it
    assert [s.request_id for s in ledger.recover().replayed] == ["rid-bad"]
    assert ledger.row("bad").request_id == "rid-bad" and not ledger.journal.pending()


def test_a_journal_entry_of_another_request_is_kept_not_recorded_on_the_wrong_job(
    ledger: Ledger,
) -> None:
    """A journal from another database (a data folder moved from SQLite to PostgreSQL): its
    submission ids name other jobs here."""
    sub = claimed(ledger, Row("a", "h-a"))
    ledger.journal.append(replace(journalled(sub, "rid-elsewhere"), request_hash="h-other"))
    assert ledger.recover().replayed == []
    assert ledger.row("a").request_id is None and "rid-elsewhere" in ledger.journal.path.read_text()


def _back_to_version_4(ledger: Ledger) -> None:
    """The database as kvid-dagster with schema version 4 left it: request ids VARCHAR(255)
    (SQLite declared the same and never enforced it), no measured videos."""
    t = ledger.tables
    with ledger.engine.begin() as conn:
        drop_quality_columns(conn, t)
        if conn.dialect.name == "postgresql":
            for table in (t.jobs, t.events):
                conn.execute(
                    sa.text(f"ALTER TABLE {table.name} ALTER COLUMN request_id TYPE VARCHAR(255)")
                )
        conn.execute(sa.update(t.meta).where(t.meta.c.name == "schema_version").values(int_value=4))


def test_a_request_id_the_client_accepts_fits_a_ledger_migrated_from_version_4(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit's case end to end: on the old schema the longest id is refused and
    journalled; once the database is migrated it is recorded from the journal."""
    journal = tmp_path / "journal.jsonl"
    with Ledger(database_url, journal_path=journal) as new:
        sub = claimed(new, Row("long", "h-long"))
        _back_to_version_4(new)
    with monkeypatch.context() as old_code:  # a process of version 4 records the id
        old_code.setattr(store, "SCHEMA_VERSION", 4)
        old_code.setattr(store, "_RECORD_BACKOFF_SECONDS", (0.0,) * 4)
        with Ledger(database_url, journal_path=journal) as old:
            old.tables = older_tables(old.tables, QUALITY_FIELDS)
            old.record_submitted(sub, LONGEST_REQUEST_ID)
            postgres = old.engine.dialect.name == "postgresql"
            assert Journal(journal).pending() is postgres  # PostgreSQL refused 256 characters
    with Ledger(database_url, journal_path=journal) as migrated:
        migrated.recover()
        assert migrated.row("long").request_id == LONGEST_REQUEST_ID
        assert not Journal(journal).pending()
        columns = {
            t.name: {c["name"]: c["type"] for c in sa.inspect(migrated.engine).get_columns(t.name)}
            for t in (migrated.tables.jobs, migrated.tables.events)
        }
        if postgres:
            assert all(isinstance(c["request_id"], sa.Text) for c in columns.values()), columns
        version = migrated.tables.meta.c
        with migrated.engine.connect() as conn:
            stored = conn.scalar(
                sa.select(version.int_value).where(version.name == "schema_version")
            )
        assert stored == SCHEMA_VERSION
        sub = claimed(migrated, Row("longer", "h-longer"))
        migrated.record_submitted(sub, LONGEST_REQUEST_ID[:-1] + "x")  # no journal: recorded
        assert not Journal(journal).pending()
        assert LONGEST_REQUEST_ID in {e["request_id"] for e in migrated.events()}


def test_numbers_a_server_reports_that_no_column_holds_are_not_known_and_the_rest_applied(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """A video dialect ``size`` of 1e30 kilobytes, an MP4 claiming 2^40 frames: PostgreSQL
    (and SQLite's driver) refuse them, which failed every job's change of the tick, every
    tick."""
    odd, fine = (claimed(ledger, Row(k, f"h-{k}")) for k in ("odd", "fine"))
    for sub in (odd, fine):
        ledger.record_submitted(sub, f"rid-{sub.partition_key}")
    odd, fine = current(ledger, odd), current(ledger, fine)
    huge = VideoFile(url="u", size_kb=round(1e30), width=640, num_frames=2**40)
    with caplog.at_level("WARNING", logger="kvid_dagster.ledger"):
        applied = ledger.apply(
            [
                JobChange(odd.submission_id, odd.version, VideoStatus.COMPLETED, video=huge),
                JobChange(fine.submission_id, fine.version, VideoStatus.PROCESSING, progress=5),
            ]
        )
    assert len(applied) == 2
    video = ledger.row("odd").video
    assert (video.size_kb, video.num_frames, video.width) == (None, None, 640)
    assert ledger.row("fine").status is VideoStatus.PROCESSING
    assert "size_kb" in caplog.text and "num_frames" in caplog.text


# -- item 9: two versions of the code sharing one ledger -----------------------------------------


def _migrate_as_a_newer_version(url: str) -> None:
    """What a newer kvid-dagster's migration does: a column with a default, the version."""
    engine = sa.create_engine(store.normalize_database_url(url))
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("ALTER TABLE kvid_jobs ADD COLUMN newer INTEGER NOT NULL DEFAULT 0")
            )
            conn.execute(
                sa.text("UPDATE kvid_meta SET int_value = :v WHERE name = 'schema_version'"),
                {"v": SCHEMA_VERSION + 1},
            )
    finally:
        engine.dispose()


def test_a_process_that_opened_the_ledger_before_a_newer_one_migrated_it_writes_nothing(
    ledger: Ledger,
) -> None:
    sub = claimed(ledger, Row("sent", "h-sent"))
    ledger.register([Row("next", "h-next")])
    revision = ledger.revision()
    _migrate_as_a_newer_version(ledger.url)
    with pytest.raises(LedgerSchemaChanged, match=f"schema version {SCHEMA_VERSION + 1}.*restart"):
        ledger.claim(Row("next", "h-next"), ME, cost_credits=1.0)
    with pytest.raises(LedgerSchemaChanged):
        ledger.register([Row("new", "h-new")])
    assert [s.partition_key for s in ledger.submissions()] == ["sent"]
    assert ledger.row("new") is None and ledger.revision() == revision
    # a paid id it got meanwhile is not lost: journalled at once (no retry will write it)
    ledger.record_submitted(sub, "rid-sent")
    assert "rid-sent" in ledger.journal.path.read_text()


# -- the journal: appending while another process replays ----------------------------------------


def _waiting_for_a_lock(path: Path) -> bool:
    """Whether some process waits for a lock on the file ``path`` names (``/proc/locks``)."""
    inode = os.stat(path).st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and int(fields[fields.index("->") + 5].rsplit(":", 1)[1]) == inode:
            return True
    return False


def test_a_line_appended_to_a_journal_taken_for_replay_is_not_lost(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the audit saw: an appender opens the journal, a replayer renames and reads
    it, the appender writes, the replayer deletes the file it read. Driven step by step: the
    appender pauses right after opening the file, and writes while the replayer replays."""
    first, second = (claimed(ledger, Row(k, f"h-{k}")) for k in ("first", "second"))
    journal = ledger.journal
    journal.append(journalled(first, "rid-first"))
    opened, go = threading.Event(), threading.Event()
    appender_name = "appender"
    real_open = os.open

    def pausing_open(path: Any, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        if threading.current_thread().name == appender_name and not opened.is_set():
            opened.set()
            go.wait()
        return fd

    monkeypatch.setattr(os, "open", pausing_open)
    appender = threading.Thread(
        target=journal.append, args=(journalled(second, "rid-second"),), name=appender_name
    )
    appender.start()
    assert opened.wait(30)
    taken: list[Path] = []
    real_record = ledger._record_submitted

    def record_while_the_appender_writes(*args: Any) -> Submission | None:
        if not go.is_set():  # the file is taken and read: let the appender write now
            taken.extend(journal.path.parent.glob(".*.replaying"))
            go.set()
            deadline = time.monotonic() + 30
            while appender.is_alive() and not _waiting_for_a_lock(taken[0]):
                assert time.monotonic() < deadline, "the appender neither wrote nor waited"
                time.sleep(0.01)
        return real_record(*args)

    monkeypatch.setattr(ledger, "_record_submitted", record_while_the_appender_writes)
    assert [s.request_id for s in ledger.replay_journal()] == ["rid-first"]
    appender.join(30)
    assert not appender.is_alive()
    assert [s.request_id for s in ledger.replay_journal()] == ["rid-second"]  # not lost
    assert ledger.row("second").request_id == "rid-second" and not journal.pending()


def _append_many(path: str, writer: int, count: int) -> None:
    journal = Journal(Path(path))
    for i in range(count):
        journal.append(JournalEntry(writer * 100_000 + i, "h", 1, f"k{writer}", f"r{writer}-{i}"))


def _replay_until(path: str, stop: str, found: str) -> None:
    """Take the journal over and over until ``stop`` exists, then once more; write every id
    taken to ``found`` (what a replayer records)."""
    journal = Journal(Path(path))
    with open(found, "a") as out:
        while True:
            last = Path(stop).exists()
            with journal.taken() as entries:
                out.writelines(f"{e.request_id}\n" for e in entries)
                out.flush()
                os.fsync(out.fileno())
            if last:
                return
            time.sleep(0.001)  # leave the writers some of the two cores


def test_processes_appending_while_others_replay_lose_no_line(tmp_path: Path) -> None:
    path, stop = tmp_path / "journal.jsonl", tmp_path / "stop"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(path), w, 300)) for w in range(3)]
    replayers = [
        context.Process(target=_replay_until, args=(str(path), str(stop), str(tmp_path / f"r{i}")))
        for i in range(2)
    ]
    for p in (*writers, *replayers):
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    stop.write_text("stop")
    for p in replayers:
        p.join(120)
        assert p.exitcode == 0
    with Journal(path).taken() as rest:
        left = [e.request_id for e in rest]
    taken = [line for i in range(2) for line in (tmp_path / f"r{i}").read_text().split()]
    expected = {f"r{w}-{i}" for w in range(3) for i in range(300)}
    assert sorted(taken + left) == sorted(expected)  # each once: none lost, none twice


# -- publications killed mid-write ---------------------------------------------------------------


def test_the_hidden_temp_files_of_a_killed_publication_are_removed_once_stale(
    ledger: Ledger, tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog"
    ledger.register([Row("a", "h-a")])
    publish(ledger, catalog)
    stale = [
        catalog / t / f".{DATA_FILE}.dead{i}.tmp" for i, t in enumerate(("videos", "submissions"))
    ]
    live = catalog / "videos" / f".{DATA_FILE}.live0000.tmp"  # another publisher's, mid-write
    for file in (*stale, live):
        file.write_bytes(b"PAR1 half a file")
    old = time.time() - STALE_TEMP_SECONDS - 60
    for file in stale:
        os.utime(file, (old, old))
    ledger.register([Row("b", "h-b")])
    publish(ledger, catalog)
    assert [f for f in stale if f.exists()] == [] and live.exists()
    pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), videos_frame(ledger))
