"""The ledger's contract, on SQLite and on PostgreSQL (each test in a fresh database).

What the money rules promise, checked against the real database: one claim per attempt at a
request whatever the key and however many claimers race, a dead claimer settled at once, a
paid request_id never lost, changes applied only to what was read, and a catalog published
whole.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from kvid_dagster.ledger import (
    SUBMISSION_COLUMNS,
    VIDEO_COLUMNS,
    ClaimOwner,
    ClaimRule,
    InvalidEntry,
    JobChange,
    Ledger,
    Refusal,
    Submission,
    VideoFile,
    VideoQuality,
    VideoStatus,
    publish,
    submissions_frame,
    videos_frame,
)
from kvid_dagster.ledger.journal import Journal
from kvid_dagster.ledger.publish import published_revision, read_tables
from kvid_dagster.ledger.records import QUALITY_FIELDS
from kvid_dagster.ledger.store import redact_url
from kvid_dagster.ledger.tables import SCHEMA_VERSION, LedgerTables


@dataclass(frozen=True)
class Row:
    """A prompt row as the ledger sees one (``prompts.PromptRow`` has these attributes)."""

    partition_key: str
    request_hash: str
    prompt: str = "a calm lake"
    job_kind: str = "text-to-video"
    model: str = "v1"
    params_json: str = "{}"
    dialect: str = "video"
    user_columns_json: str | None = None


@pytest.fixture
def ledger(database_url: str, tmp_path: Path) -> Iterator[Ledger]:
    made = Ledger(database_url, journal_path=tmp_path / "journal.jsonl")
    yield made
    made.close()


ME = ClaimOwner.current("run-1")


def claimed(ledger: Ledger, row: Row, **kwargs: object) -> Submission:
    result = ledger.claim(row, ME, cost_credits=60.0, **kwargs)
    assert isinstance(result, Submission), result
    return result


def paid(ledger: Ledger, row: Row, request_id: str) -> Submission:
    sub = claimed(ledger, row)
    ledger.record_submitted(sub, request_id)
    found = ledger.submission(sub.submission_id)
    assert found is not None
    return found


def finish(ledger: Ledger, sub: Submission, status: VideoStatus, **kwargs: object) -> None:
    applied = ledger.apply([JobChange(sub.submission_id, sub.version, status, **kwargs)])
    assert [s.submission_id for s in applied] == [sub.submission_id]


def events(ledger: Ledger) -> list[str]:
    return [e["event"] for e in ledger.events()]


# -- rows ----------------------------------------------------------------------------------------


def test_rows_are_pending_or_invalid_and_registering_again_changes_nothing(ledger: Ledger) -> None:
    valid = [Row("a", "h-a"), Row("b", "h-b")]
    assert ledger.register(valid, [InvalidEntry("c", "x", "row 3 (c): seed: not an integer")]) == 3
    assert {r.partition_key: r.status for r in ledger.rows()} == {
        "a": VideoStatus.PENDING, "b": VideoStatus.PENDING, "c": VideoStatus.INVALID,
    }  # fmt: skip
    assert ledger.row("c").error == "row 3 (c): seed: not an integer"
    assert ledger.register(valid, [InvalidEntry("c", "x", "row 3 (c): seed: not an integer")]) == 0
    assert ledger.register([Row("a", "h-a2")]) == 1  # an edit
    assert ledger.row("a").request_hash == "h-a2"


def test_a_claim_is_committed_with_its_owner_and_the_id_recorded_after(ledger: Ledger) -> None:
    ledger.register([Row("a", "h-a")])
    sub = claimed(ledger, Row("a", "h-a"))
    assert sub.status is VideoStatus.SUBMITTING and sub.attempt == 1 and sub.request_id is None
    assert sub.owner == ME and sub.claimed_at is not None
    # seen by every other connection at once: it is committed
    with Ledger(ledger.url) as other:
        assert other.row("a").status is VideoStatus.SUBMITTING
    ledger.record_submitted(sub, "rid-1")
    row = ledger.row("a")
    assert (row.status, row.request_id, row.cost_credits) == (VideoStatus.SUBMITTED, "rid-1", 60.0)
    history = submissions_frame(ledger)
    assert list(history["event"]) == ["INTENT", "SUBMITTED"]
    assert list(history["cost_credits"].fillna(-1)) == [-1, 60.0]  # counted once, when paid


def test_a_request_is_paid_once_whatever_row_asks_for_it(ledger: Ledger) -> None:
    ledger.register([Row("a", "same"), Row("b", "same")])
    paid(ledger, Row("a", "same"), "rid-1")
    refusal = ledger.claim(Row("b", "same"), ME, cost_credits=60.0)
    assert isinstance(refusal, Refusal) and "already has a job" in refusal.reason
    assert refusal.submission is not None and refusal.submission.request_id == "rid-1"
    # both rows show the one job
    assert [r.request_id for r in ledger.rows()] == ["rid-1", "rid-1"]


def test_a_row_edited_back_reuses_its_first_job_and_the_edited_job_is_still_polled(
    ledger: Ledger,
) -> None:
    ledger.register([Row("a", "h-A")])
    first = paid(ledger, Row("a", "h-A"), "rid-A")
    ledger.register([Row("a", "h-B")])
    assert ledger.row("a").status is VideoStatus.PENDING  # its current request has no job
    second = paid(ledger, Row("a", "h-B"), "rid-B")
    ledger.register([Row("a", "h-A")])
    refusal = ledger.claim(Row("a", "h-A"), ME, cost_credits=60.0)
    assert isinstance(refusal, Refusal)  # A was paid: never again
    assert ledger.row("a").request_id == "rid-A"
    assert {s.request_id for s in ledger.jobs_to_poll()} == {"rid-A", "rid-B"}
    finish(ledger, first, VideoStatus.COMPLETED, video=VideoFile(local_path="/v/a-A.mp4"))
    finish(ledger, second, VideoStatus.COMPLETED, video=VideoFile(local_path="/v/a-B.mp4"))
    assert ledger.row("a").video.local_path == "/v/a-A.mp4"
    assert len(ledger.submissions()) == 2


def test_a_job_that_ended_without_a_video_is_paid_again_only_by_force_or_the_retry_rule(
    ledger: Ledger,
) -> None:
    row = Row("a", "h")
    ledger.register([row])
    sub = paid(ledger, row, "rid-1")
    finish(ledger, sub, VideoStatus.FAILED, error="nsfw", completed=True)
    refusal = ledger.claim(row, ME, cost_credits=60.0)
    assert isinstance(refusal, Refusal) and "force: true" in refusal.reason
    retry = claimed(ledger, row, rule=ClaimRule(retry_failed_below=3))
    assert retry.attempt == 2
    ledger.record_submitted(retry, "rid-2")
    retried = ledger.submission(retry.submission_id)
    finish(ledger, retried, VideoStatus.FAILED, error="again", completed=True)
    third = claimed(ledger, row, rule=ClaimRule(retry_failed_below=3))
    ledger.record_submitted(third, "rid-3")
    finish(ledger, ledger.submission(third.submission_id), VideoStatus.FAILED, completed=True)
    assert isinstance(ledger.claim(row, ME, cost_credits=1, rule=ClaimRule(retry_failed_below=3)),
                      Refusal)  # fmt: skip
    forced = claimed(ledger, row, rule=ClaimRule(force=True))
    assert forced.attempt == 4
    assert ledger.row("a").attempts == 4


def test_a_timed_out_job_is_not_retried_by_the_retry_rule(ledger: Ledger) -> None:
    row = Row("a", "h")
    ledger.register([row])
    finish(ledger, paid(ledger, row, "rid-1"), VideoStatus.TIMED_OUT, completed=True)
    refusal = ledger.claim(row, ME, cost_credits=1, rule=ClaimRule(retry_failed_below=5))
    assert isinstance(refusal, Refusal)


def test_a_released_claim_sent_nothing_and_the_row_can_be_claimed_again(ledger: Ledger) -> None:
    row = Row("a", "h")
    ledger.register([row])
    ledger.release(claimed(ledger, row), "KvidRateLimitedError: slow down")
    again = ledger.row("a")
    assert (again.status, again.error) == (VideoStatus.PENDING, "KvidRateLimitedError: slow down")
    assert claimed(ledger, row).attempt == 1
    assert ledger.row("a").error is None
    history = submissions_frame(ledger)
    assert list(history["event"]) == ["INTENT", "FAILED_TO_SUBMIT", "INTENT"]
    assert history["cost_credits"].fillna(0).sum() == 0


def test_a_request_the_service_called_invalid_makes_the_row_invalid(ledger: Ledger) -> None:
    ledger.register([Row("a", "h")])
    ledger.release(claimed(ledger, Row("a", "h")), "KvidValidationError: seed", invalid=True)
    assert ledger.row("a").status is VideoStatus.INVALID


# -- racing claimers -----------------------------------------------------------------------------


def test_threads_racing_for_the_same_requests_claim_each_once(ledger: Ledger) -> None:
    rows = [Row(f"k{i}", f"h{i % 10}") for i in range(40)]  # 4 rows per request
    ledger.register(rows)
    won: list[str] = []
    barrier = threading.Barrier(8)

    def claimer(share: list[Row]) -> None:
        barrier.wait()
        for row in share:
            result = ledger.claim(row, ME, cost_credits=1.0)
            if isinstance(result, Submission):
                won.append(result.request_hash)

    threads = [threading.Thread(target=claimer, args=(rows[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == sorted({r.request_hash for r in rows})
    assert Counter(s.request_hash for s in ledger.submissions()) == dict.fromkeys(won, 1)


def _claim_in_process(url: str, keys: list[str], start: str) -> None:
    while not Path(start).exists():
        pass
    with Ledger(url) as ledger:
        owner = ClaimOwner.current()
        for key in keys:
            ledger.claim(Row(key, f"h-{key}"), owner, cost_credits=1.0)


def test_processes_racing_for_the_same_requests_claim_each_once(
    ledger: Ledger, tmp_path: Path
) -> None:
    keys = [f"k{i}" for i in range(30)]
    ledger.register([Row(k, f"h-{k}") for k in keys])
    start = tmp_path / "go"
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=_claim_in_process, args=(ledger.url, keys[::step], str(start)))
        for step in (1, -1, 1, -1)
    ]
    for p in procs:
        p.start()
    start.write_text("go")
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    subs = ledger.submissions()
    assert sorted(s.partition_key for s in subs) == sorted(keys)  # each once, none twice
    assert len({s.owner.pid for s in subs if s.owner}) >= 1


# -- dead claimers -------------------------------------------------------------------------------


def _dead_owner() -> ClaimOwner:
    """The owner record of a process that has exited."""
    code = (
        "from kvid_dagster.ledger import ClaimOwner; o = ClaimOwner.current('run-dead');"
        "print(o.host, o.pid, o.started, sep='|')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    host, pid, started = out.stdout.strip().split("|")
    return ClaimOwner(host, int(pid), started, "run-dead")


def test_a_dead_owners_claim_is_uncertain_at_once_and_a_live_ones_is_left(ledger: Ledger) -> None:
    ledger.register([Row("dead", "h1"), Row("alive", "h2")])
    dead = ledger.claim(Row("dead", "h1"), _dead_owner(), cost_credits=60.0)
    assert isinstance(dead, Submission)
    claimed(ledger, Row("alive", "h2"))
    report = ledger.recover()
    assert [s.partition_key for s in report.settled] == ["dead"]
    row = ledger.row("dead")
    assert row.status is VideoStatus.UNCERTAIN and row.request_id is None
    assert "h1" in row.error and "run-dead" in row.error and "resolve" in row.error
    assert ledger.row("alive").status is VideoStatus.SUBMITTING
    history = submissions_frame(ledger)
    uncertain = history[history["event"] == "UNCERTAIN"]
    assert list(uncertain["cost_credits"]) == [60.0]  # what it may have cost, counted once
    assert ledger.recover().settled == []  # settled once


def test_another_hosts_claim_is_abandoned_when_its_heartbeat_lease_runs_out(
    ledger: Ledger,
) -> None:
    ledger.register([Row("fresh", "h1"), Row("stale", "h2")])
    far = ClaimOwner("another-host", 1, "boot:1", "run-x")
    for key, hash_ in (("fresh", "h1"), ("stale", "h2")):
        assert isinstance(ledger.claim(Row(key, hash_), far, cost_credits=1.0), Submission)
    stale = next(s for s in ledger.submissions() if s.partition_key == "stale")
    old = datetime.now(UTC) - timedelta(seconds=ledger.claim_lease_seconds + 5)
    jobs = ledger.tables.jobs
    with ledger.write() as conn:
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.submission_id == stale.submission_id)
            .values(heartbeat_at=old)
        )
    assert [s.partition_key for s in ledger.recover().settled] == ["stale"]
    assert ledger.row("fresh").status is VideoStatus.SUBMITTING
    # no opinion from the caller: the lease decides; the run has ended: settled at once
    assert ledger.recover(lambda sub: None).settled == []
    assert [s.partition_key for s in ledger.recover(lambda sub: False).settled] == ["fresh"]


def test_a_person_resolves_an_uncertain_row_either_way(ledger: Ledger) -> None:
    ledger.register([Row("found", "h1"), Row("none", "h2")])
    for key, hash_ in (("found", "h1"), ("none", "h2")):
        ledger.mark_uncertain(claimed(ledger, Row(key, hash_)), "reset")
    row = ledger.resolve_uncertain("found", request_id=" rid-9 ")
    assert (row.status, row.request_id) == (VideoStatus.SUBMITTED, "rid-9")
    assert ledger.resolve_uncertain("none").status is VideoStatus.PENDING
    assert claimed(ledger, Row("none", "h2")).attempt == 1
    with pytest.raises(ValueError, match="not UNCERTAIN"):
        ledger.resolve_uncertain("found")
    assert events(ledger).count("RESOLVED") == 2


# -- a paid request_id is never lost -------------------------------------------------------------


def _fail_request_id_writes(ledger: Ledger) -> tuple[list[str], Callable[..., None]]:
    """Make every write of a request_id fail like a database that went away."""
    failures: list[str] = []

    def refuse(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE") and "request_id" in statement:
            failures.append(statement)
            raise OperationalError(statement, parameters, Exception("database is gone"))

    sa.event.listen(ledger.engine, "before_cursor_execute", refuse)
    return failures, refuse


def test_a_request_id_the_database_refused_is_journalled_and_replayed(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    ledger.register([Row("a", "h")])
    sub = claimed(ledger, Row("a", "h"))
    failures, refuse = _fail_request_id_writes(ledger)
    with caplog.at_level("ERROR", logger="kvid_dagster.ledger"):
        ledger.record_submitted(sub, "rid-paid")
    assert len(failures) == 5  # retried before giving up
    assert "rid-paid" in caplog.text and "journalled" in caplog.text
    assert "rid-paid" in ledger.journal.path.read_text()
    sa.event.remove(ledger.engine, "before_cursor_execute", refuse)  # the database is back
    report = ledger.recover()
    assert [s.request_id for s in report.replayed] == ["rid-paid"]
    assert ledger.row("a").status is VideoStatus.SUBMITTED
    assert not ledger.journal.pending()
    assert ledger.recover().replayed == []  # replayed once


def test_a_journal_replayed_twice_or_half_written_records_each_id_once(
    ledger: Ledger, tmp_path: Path
) -> None:
    ledger.register([Row("a", "h")])
    sub = claimed(ledger, Row("a", "h"))
    line = (
        f'{{"attempt": 1, "partition_key": "a", "request_hash": "h", "request_id": "rid-1", '
        f'"submission_id": {sub.submission_id}}}\n'
    )
    ledger.journal.path.write_text(line + line + '{"attempt": 1, "partit')  # torn last line
    assert [s.request_id for s in ledger.replay_journal()] == ["rid-1"]
    assert events(ledger).count("SUBMITTED") == 1
    assert not Journal(ledger.journal.path).pending()


# -- the poller's changes ------------------------------------------------------------------------


def test_a_change_to_a_submission_someone_moved_meanwhile_is_dropped(ledger: Ledger) -> None:
    ledger.register([Row("a", "h")])
    sub = paid(ledger, Row("a", "h"), "rid-1")
    finish(ledger, sub, VideoStatus.PROCESSING, progress=40)
    stale = ledger.apply([JobChange(sub.submission_id, sub.version, VideoStatus.LOST)])
    assert stale == []
    assert ledger.row("a").status is VideoStatus.PROCESSING and ledger.row("a").progress == 40


def test_terminal_changes_are_in_the_history_and_stop_polling(ledger: Ledger) -> None:
    ledger.register([Row("a", "h1"), Row("b", "h2")])
    a, b = paid(ledger, Row("a", "h1"), "r1"), paid(ledger, Row("b", "h2"), "r2")
    video = VideoFile(url="http://x/a.mp4", local_path="/v/a.mp4", width=854, height=480)
    applied = ledger.apply(
        [
            JobChange(a.submission_id, a.version, VideoStatus.COMPLETED, video=video,
                      completed=True),
            JobChange(b.submission_id, b.version, VideoStatus.FAILED, error="nsfw",
                      completed=True),
        ]
    )  # fmt: skip
    assert {s.status for s in applied} == {VideoStatus.COMPLETED, VideoStatus.FAILED}
    assert ledger.jobs_to_poll() == []
    assert ledger.row("a").video == video and ledger.row("b").error == "nsfw"
    assert events(ledger)[-2:] == ["COMPLETED", "FAILED"]
    moved = ledger.rows_for_submissions([a.submission_id])
    assert [r.partition_key for r in moved[a.submission_id]] == ["a"]


# -- schema --------------------------------------------------------------------------------------


def test_a_budgeted_claims_spend_sums_read_an_index_not_every_job(database_url: str) -> None:
    """Each claim under a budget sums its day's and its run's spend in its own transaction:
    on a ledger of a year of jobs a table scan there would serialise every claim behind it."""
    with Ledger(database_url) as ledger:
        jobs = ledger.tables.jobs
        indexed = {
            tuple(i["column_names"]) for i in sa.inspect(ledger.engine).get_indexes(jobs.name)
        }
        assert {("claimed_at", "cost_credits"), ("owner_run_id", "cost_credits")} <= indexed
        if ledger.engine.dialect.name == "sqlite":
            with ledger.engine.connect() as conn:
                for where in ("claimed_at >= '2026-12-01'", "owner_run_id = 'r'"):
                    plan = conn.exec_driver_sql(
                        f"EXPLAIN QUERY PLAN SELECT sum(cost_credits) FROM {jobs.name} "
                        f"WHERE {where}"
                    ).all()
                    assert "USING COVERING INDEX" in str(plan), plan


def test_the_schema_is_versioned_and_a_newer_one_is_refused(database_url: str) -> None:
    with Ledger(database_url) as ledger:
        meta = ledger.tables.meta
        with ledger.write() as conn:
            version = conn.scalar(
                sa.select(meta.c.int_value).where(meta.c.name == "schema_version")
            )
            assert version == SCHEMA_VERSION
            conn.execute(
                sa.update(meta).where(meta.c.name == "schema_version").values(int_value=99)
            )
    with pytest.raises(RuntimeError, match="newer kvid-dagster"):
        Ledger(database_url)


def test_two_table_prefixes_share_one_database_without_seeing_each_other(
    database_url: str,
) -> None:
    with Ledger(database_url) as one, Ledger(database_url, table_prefix="team_b_") as two:
        one.register([Row("a", "h")])
        assert two.rows() == []
        assert sorted(sa.inspect(two.engine).get_table_names()) == sorted(
            f"{p}{t}" for p in ("kvid_", "team_b_") for t in ("events", "jobs", "meta", "rows")
        )
    with pytest.raises(ValueError, match="prefix"):
        Ledger(database_url, table_prefix="Robert'); DROP TABLE")


def test_the_url_password_never_shows() -> None:
    shown = redact_url("postgresql+psycopg://kvid:s3cret-pw@db:5432/dagster")
    assert "s3cret-pw" not in shown and "db:5432" in shown


# -- publishing ----------------------------------------------------------------------------------


def test_the_published_catalog_is_the_ledger_as_pandas_reads_it(
    ledger: Ledger, tmp_path: Path
) -> None:
    ledger.register([Row("a", "h1"), Row("b", "h2")], [InvalidEntry("c", "p", "bad seed")])
    video = VideoFile(size_kb=12, width=854, height=480, fps=16.0)
    finish(ledger, paid(ledger, Row("a", "h1"), "r1"), VideoStatus.COMPLETED, video=video)
    stats = publish(ledger, tmp_path / "catalog")
    videos = pd.read_parquet(tmp_path / "catalog" / "videos")
    assert tuple(videos.columns) == VIDEO_COLUMNS
    pd.testing.assert_frame_equal(videos, videos_frame(ledger))
    assert str(videos["width"].dtype) == "Int32"  # nulls do not make it float
    assert videos.set_index("partition_key")["status"].to_dict() == {
        "a": "COMPLETED", "b": "PENDING", "c": "INVALID",
    }  # fmt: skip
    history = pd.read_parquet(tmp_path / "catalog" / "submissions")
    assert tuple(history.columns) == SUBMISSION_COLUMNS and len(history) == stats.submissions
    path = tmp_path / "catalog" / "videos" / "data.parquet"
    assert published_revision(path) == ledger.revision() == stats.revision
    assert not [p for p in path.parent.iterdir() if p.name != "data.parquet"]  # no temp files
    again = publish(ledger, tmp_path / "catalog")
    assert again.revision == stats.revision and again.rounds == 1


def test_a_catalog_deleted_or_damaged_by_hand_is_rewritten_whole(
    ledger: Ledger, tmp_path: Path
) -> None:
    ledger.register([Row("a", "h1")])
    publish(ledger, tmp_path)
    (tmp_path / "videos" / "data.parquet").write_bytes(b"PAR1 garbage")
    (tmp_path / "submissions" / "data.parquet").unlink()
    publish(ledger, tmp_path)
    assert list(pd.read_parquet(tmp_path / "videos")["partition_key"]) == ["a"]
    assert pq.read_table(tmp_path / "submissions").num_rows == 0


# -- 0.1's data folders --------------------------------------------------------------------------


def test_each_publication_after_the_first_reads_only_what_changed_and_equals_a_full_read(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Every write path of the ledger, each followed by a publication: after the first, each
    one merges only the rows and events changed since the previous file, and the files are
    always exactly what a full read of the ledger gives."""
    catalog = tmp_path / "catalog"
    video = VideoFile(size_kb=12, width=854, height=480, fps=16.0, local_path="/v/a.mp4")
    subs: dict[str, Submission] = {}

    def latest(key: str) -> Submission:
        row = ledger.row(key)
        assert row is not None and row.submission is not None
        return row.submission

    steps: list[tuple[str, Callable[[], object]]] = [
        ("register", lambda: ledger.register(
            [Row("a", "h1"), Row("b", "h2"), Row("twin", "h1")], [InvalidEntry("c", "p", "bad")]
        )),
        ("claim", lambda: subs.setdefault("b", claimed(ledger, Row("b", "h2")))),
        ("release", lambda: ledger.release(subs.pop("b"), "refused: 400")),
        ("pay", lambda: subs.setdefault("a", paid(ledger, Row("a", "h1"), "r1"))),
        ("progress", lambda: finish(ledger, latest("a"), VideoStatus.PROCESSING, progress=40)),
        ("complete", lambda: finish(ledger, latest("a"), VideoStatus.COMPLETED, video=video)),
        ("uncertain", lambda: ledger.mark_uncertain(claimed(ledger, Row("b", "h2")), "reset")),
        ("resolve none", lambda: ledger.resolve_uncertain("b")),
        ("edit A -> B", lambda: ledger.register(
            [Row("a", "h9"), Row("b", "h2"), Row("twin", "h1")], [InvalidEntry("c", "p", "bad")]
        )),
        ("invalid again", lambda: ledger.register(
            [Row("a", "h9"), Row("twin", "h1")],
            [InvalidEntry("c", "p", "bad"), InvalidEntry("b", "p", "seed: not an integer")],
        )),
        ("edit B -> A", lambda: ledger.register(
            [Row("a", "h1"), Row("twin", "h1")],
            [InvalidEntry("c", "p", "bad"), InvalidEntry("b", "p", "seed: not an integer")],
        )),
    ]  # fmt: skip
    modes = []
    for name, step in steps:
        step()
        stats = publish(ledger, catalog)
        modes.append(stats.incremental)
        videos, history = (pd.read_parquet(catalog / t) for t in ("videos", "submissions"))
        pd.testing.assert_frame_equal(videos, videos_frame(ledger), obj=f"videos after {name}")
        pd.testing.assert_frame_equal(history, submissions_frame(ledger), obj=f"history: {name}")
        assert stats.revision == ledger.revision()
    assert modes == [False] + [True] * (len(steps) - 1)
    shown = pd.read_parquet(catalog / "videos").set_index("partition_key")
    assert shown.loc["twin", "status"] == shown.loc["a", "status"] == "COMPLETED"


# every text a cell can hold, and what CSV makes hard: quotes, separators, line ends, the
# strings NULL and \\N, an empty string (not null), a lone backslash, non-ASCII
_AWKWARD_TEXTS = [
    "", "NULL", "\\N", "\\", '"quoted", comma', "line\nbreak\r\nand CRLF", "tab\there",
    "視頻 🎬 é", " padded ", "'single'",
]  # fmt: skip


def test_a_publication_gives_every_awkward_text_null_float_and_time_as_the_ledger_holds_it(
    ledger: Ledger,
) -> None:
    """What the catalogs hold, value for value, against the ledger's own typed reads: on
    PostgreSQL the publication reads through COPY as CSV, where quotes, line ends, the string
    NULL and an empty string are easy to get wrong."""
    video = VideoFile(size_kb=12, width=854, height=480, fps=16.0, local_path='/v/"a",.mp4')
    rows = [
        Row(f"k{i}", f"h{i}", prompt=text, user_columns_json=text or None)
        for i, text in enumerate(_AWKWARD_TEXTS)
    ]
    ledger.register(rows, [InvalidEntry("bad", 'a "bad"\nrow', "seed: ''")])
    for i, (row, text) in enumerate(zip(rows, _AWKWARD_TEXTS, strict=True)):
        sub = ledger.claim(row, ME, cost_credits=0.1 * i + 1e-7)
        assert isinstance(sub, Submission), sub
        if i % 3 == 0:
            ledger.release(sub, text)
            continue
        ledger.record_submitted(sub, f"req,{text}")
        found = ledger.submission(sub.submission_id)
        assert found is not None
        if i % 3 == 1:
            finish(ledger, found, VideoStatus.COMPLETED, video=video)
        else:
            finish(ledger, found, VideoStatus.FAILED, error=text)
    videos, history, _revision = read_tables(ledger)

    assert history.to_pylist() == [
        {n: event[n] for n in SUBMISSION_COLUMNS} for event in ledger.events()
    ]
    shown = videos.to_pylist()
    assert [
        (v["partition_key"], v["prompt"], v["user_columns_json"], v["status"], v["error"],
         v["request_id"], v["cost_credits"], v["local_path"], v["updated_at"])
        for v in shown
    ] == [
        (r.partition_key, r.prompt, r.user_columns_json, r.status.value, r.error, r.request_id,
         r.submission.cost_credits if r.submission else None, r.video.local_path, r.updated_at)
        for r in ledger.rows()
    ]  # fmt: skip
    assert {v["prompt"] for v in shown} >= set(_AWKWARD_TEXTS)  # "" is not null
    assert [v["error"] for v in shown if v["status"] == "FAILED"] == [
        t for i, t in enumerate(_AWKWARD_TEXTS) if i % 3 == 2
    ]


def test_a_catalog_of_another_ledger_is_replaced_by_a_full_publication(
    database_url: str, tmp_path: Path
) -> None:
    """Same folder, a different database (SQLite moved to PostgreSQL, say): nothing of the old
    catalog is merged, whatever its revision."""
    catalog = tmp_path / "catalog"
    with Ledger(f"sqlite:///{tmp_path / 'other.db'}") as other:
        other.register([Row("old", "h0")])
        for _ in range(5):
            other.register([Row("old", f"h{_}")])  # a revision ahead of the new ledger's
        publish(other, catalog)
    with Ledger(database_url) as ledger:
        ledger.register([Row("new", "h1")])
        stats = publish(ledger, catalog)
        assert not stats.incremental
        assert list(pd.read_parquet(catalog / "videos")["partition_key"]) == ["new"]


def drop_quality_columns(conn: sa.Connection, tables: LedgerTables) -> None:
    """The jobs table as schema version 5 had it: no measured videos (what v6 added)."""
    for column in QUALITY_FIELDS:
        conn.execute(sa.text(f"ALTER TABLE {tables.jobs.name} DROP COLUMN {column}"))


def _back_to_version_1(ledger: Ledger) -> None:
    """The database as a 0.2 of schema version 1 left it: no revision columns, no identity,
    no dialects, no spend indexes, request ids VARCHAR(255), no measured videos."""
    t = ledger.tables
    with ledger.write() as conn:
        drop_quality_columns(conn, t)
        for index in ("claimed_at_cost", "run_cost"):
            conn.execute(sa.text(f"DROP INDEX ix_{t.jobs.name}_{index}"))
        for table in (t.rows, t.jobs, t.events):
            conn.execute(sa.text(f"DROP INDEX ix_{table.name}_revision"))
            conn.execute(sa.text(f"ALTER TABLE {table.name} DROP COLUMN revision"))
        conn.execute(sa.text(f"ALTER TABLE {t.rows.name} DROP COLUMN user_columns_json"))
        for column in (
            "not_found_count", "not_found_since", "fetch_failures", "forced_by", "dialect",
            "estimated_credits",
        ):  # fmt: skip
            conn.execute(sa.text(f"ALTER TABLE {t.jobs.name} DROP COLUMN {column}"))
        if conn.dialect.name == "postgresql":
            for table in (t.jobs, t.events):
                conn.execute(
                    sa.text(f"ALTER TABLE {table.name} ALTER COLUMN request_id TYPE VARCHAR(255)")
                )
        conn.execute(sa.delete(t.meta).where(t.meta.c.name == "ledger_id"))
        conn.execute(sa.update(t.meta).where(t.meta.c.name == "schema_version").values(int_value=1))


def test_a_version_1_database_is_migrated_and_its_catalog_republished_whole(
    database_url: str, tmp_path: Path
) -> None:
    """A 0.2 database from before row revisions, dialects and spend indexes: opened by this
    version, it gains them (every existing row at revision 0, every job in the video dialect)
    and the first publication reads everything."""
    catalog = tmp_path / "catalog"
    with Ledger(database_url) as ledger:
        ledger.register([Row("a", "h1")])
        paid(ledger, Row("a", "h1"), "r1")
        publish(ledger, catalog)
        t = ledger.tables
        _back_to_version_1(ledger)
        old_file = catalog / "videos" / "data.parquet"
        meta = dict(pq.read_metadata(old_file).metadata)
        meta.pop(b"kvid.ledger_id")
        pq.write_table(pq.read_table(old_file).replace_schema_metadata(meta), old_file)
    with Ledger(database_url) as ledger:
        assert ledger.row("a") is not None and ledger.row("a").request_id == "r1"  # type: ignore[union-attr]
        (old_job,) = ledger.submissions()
        # every job before v3 went out in the video dialect, priced by the table only
        assert old_job.dialect == "video" and old_job.estimated_credits == old_job.cost_credits
        assert ledger.jobs_to_poll("generation") == [] and len(ledger.jobs_to_poll("video")) == 1
        indexes = {i["name"] for i in sa.inspect(ledger.engine).get_indexes(t.jobs.name)}
        assert {f"ix_{t.jobs.name}_claimed_at_cost", f"ix_{t.jobs.name}_run_cost"} <= indexes
        stats = publish(ledger, catalog)
        assert not stats.incremental
        pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), videos_frame(ledger))
        ledger.register([Row("a", "h1"), Row("b", "h2")])
        assert publish(ledger, catalog).incremental
        assert list(pd.read_parquet(catalog / "videos")["partition_key"]) == ["a", "b"]


MEASURED = VideoQuality(
    sampled_frames=16, luma_mean=0.0, luma_stddev=0.0, changed_pct=0.0,
    expected_short_side=480, expected_width=None, expected_height=None, expected_fps=16.0,
    expected_frames=81, expected_duration_s=5.062, matches_request=True, not_blank=False,
    not_frozen=False,
)  # fmt: skip


def test_a_version_5_database_gains_measured_videos_and_its_old_videos_show_none(
    database_url: str, tmp_path: Path
) -> None:
    """v6 adds each video's measured picture, expected output and verdicts: a video fetched
    before is not measured (every column null, in the ledger and the republished catalog);
    one fetched after is stored and read back whole, booleans as booleans on both backends."""
    catalog = tmp_path / "catalog"
    with Ledger(database_url) as ledger:
        ledger.register([Row("old", "h-old"), Row("new", "h-new")])
        old_video = VideoFile(local_path="/v/old.mp4", width=854, height=480)
        finish(ledger, paid(ledger, Row("old", "h-old"), "r-old"), VideoStatus.COMPLETED,
               video=old_video, completed=True)  # fmt: skip
        publish(ledger, catalog)
        published_file = catalog / "videos" / "data.parquet"
        pq.write_table(pq.read_table(published_file).drop(list(QUALITY_FIELDS)), published_file)
        with ledger.write() as conn:
            drop_quality_columns(conn, ledger.tables)
            conn.execute(
                sa.update(ledger.tables.meta)
                .where(ledger.tables.meta.c.name == "schema_version")
                .values(int_value=5)
            )
    with Ledger(database_url) as ledger:
        old = ledger.row("old")
        assert old is not None and old.video.width == 854 and old.video.quality is None
        video = VideoFile(local_path="/v/new.mp4", width=854, height=480, quality=MEASURED)
        finish(ledger, paid(ledger, Row("new", "h-new"), "r-new"), VideoStatus.COMPLETED,
               video=video, completed=True)  # fmt: skip
        new = ledger.row("new")
        assert new is not None and new.video.quality == MEASURED
        assert isinstance(new.video.quality.not_blank, bool)
        assert not publish(ledger, catalog).incremental  # v5's file lacks the new columns
        published = pd.read_parquet(catalog / "videos").set_index("partition_key")
        pd.testing.assert_frame_equal(published.reset_index(), videos_frame(ledger))
        assert published["not_blank"].dtype == "boolean"
        assert published.loc["new", ["matches_request", "not_blank", "not_frozen"]].tolist() == [
            True, False, False,
        ]  # fmt: skip
        assert published.loc["old", ["sampled_frames", "not_blank"]].isna().all()


def older_tables(tables: LedgerTables, later: Collection[str]) -> LedgerTables:
    """The ledger's tables as a process of an older schema knows them: without the ``later``
    columns (what it writes takes their defaults)."""
    metadata = sa.MetaData()

    def older(table: sa.Table) -> sa.Table:
        kept = (c._copy() for c in table.columns if c.name not in later)
        return sa.Table(table.name, metadata, *kept)

    return LedgerTables(
        metadata, older(tables.meta), older(tables.rows), older(tables.jobs), older(tables.events)
    )


def _without_revisions(tables: LedgerTables) -> LedgerTables:
    """The ledger's tables as a process of schema version 1 knows them: no revision columns,
    so what it writes takes the migration's default, revision 0."""
    return older_tables(tables, {"revision", *QUALITY_FIELDS})


def test_what_a_process_older_than_revisions_writes_beside_a_migrated_ledger_is_published(
    database_url: str, tmp_path: Path
) -> None:
    """A rolling deploy: a process of schema version 1 still writes after this version
    migrated the database; its new row, its job and its events (all at revision 0) are in
    the publications that follow, as a full read has them."""
    catalog = tmp_path / "catalog"
    with Ledger(database_url) as ledger:
        ledger.register([Row("a", "h1"), Row("b", "h2")])
        _back_to_version_1(ledger)
    with Ledger(database_url) as ledger, Ledger(database_url) as older:
        older.tables = _without_revisions(older.tables)
        paid(ledger, Row("a", "h1"), "r1")
        assert not publish(ledger, catalog).incremental
        older.register([Row("a", "h1"), Row("b", "h2"), Row("c", "h3")])  # a new row
        paid(older, Row("b", "h2"), "r2")  # a job, INTENT and SUBMITTED
        ledger.register([Row("a", "h1", prompt="edited")])  # and a write stamped as usual
        publish(ledger, catalog)
        pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), videos_frame(ledger))
        pd.testing.assert_frame_equal(
            pd.read_parquet(catalog / "submissions"), submissions_frame(ledger)
        )
        published = pd.read_parquet(catalog / "videos").set_index("partition_key")
        assert published.loc["b", "request_id"] == "r2" and "c" in published.index
        ledger.register([Row("d", "h4")])  # nothing behind the revisions' back: incremental
        assert publish(ledger, catalog).incremental
        pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), videos_frame(ledger))


def _write_legacy_catalog(root: Path) -> None:
    """A 0.1 catalog: a published snapshot (seq 2) plus newer log parts with ``_set``."""
    ts = datetime(2026, 11, 1, tzinfo=UTC)
    snapshot = pa.table(
        {
            "partition_key": ["done", "paid"],
            "prompt": ["p1", "p2"],
            "job_kind": ["text-to-video"] * 2,
            "model": ["v1"] * 2,
            "request_hash": ["h-done", "h-paid"],
            "params_json": ["{}"] * 2,
            "request_id": ["rid-done", "rid-paid"],
            "status": ["COMPLETED", "SUBMITTED"],
            "attempts": pa.array([1, 1], pa.int32()),
            "cost_credits": [60.0, 60.0],
            "submitted_at": pa.array([ts, ts], pa.timestamp("us", tz="UTC")),
            "updated_at": pa.array([ts, ts], pa.timestamp("us", tz="UTC")),
        }
    )
    (root / "videos").mkdir(parents=True)
    pq.write_table(snapshot.replace_schema_metadata({b"kvid.max_seq": b"2"}),
                   root / "videos" / "data.parquet")  # fmt: skip
    log = root / "_log" / "videos"
    log.mkdir(parents=True)
    stale = pa.table({"partition_key": ["paid"], "status": ["PENDING"], "_set": [["status"]]})
    pq.write_table(stale, log / "0000000000000002-1-aaaa.parquet")  # folded already: skipped
    newer = pa.table(
        {
            "partition_key": ["paid", "orphan"],
            "status": ["IN_QUEUE", "SUBMITTING"],
            "prompt": [None, "p3"],
            "request_hash": [None, "h-orphan"],
            "job_kind": [None, "text-to-video"],
            "model": [None, "v1"],
            "params_json": [None, "{}"],
            "_set": [["status"], ["status", "prompt", "request_hash", "job_kind", "model",
                                  "params_json"]],
        }
    )  # fmt: skip
    pq.write_table(newer, log / "0000000000000003-1-bbbb.parquet")
    (root / "_log" / "submissions").mkdir()
    events = pa.table(
        {
            "event_id": ["e1"], "partition_key": ["paid"], "event": ["SUBMITTED"],
            "request_id": ["rid-paid"], "cost_credits": [60.0],
            "recorded_at": pa.array([ts], pa.timestamp("us", tz="UTC")),
        }
    )  # fmt: skip
    pq.write_table(events, root / "_log" / "submissions" / "0000000000000001-1-cccc.parquet")


def test_a_data_folder_of_version_0_1_is_imported_once_with_its_request_ids(
    tmp_path: Path,
) -> None:
    _write_legacy_catalog(tmp_path / "catalog")
    with Ledger.for_data_dir(tmp_path) as ledger:
        rows = ledger.rows_by_key()
        assert {k: r.status for k, r in rows.items()} == {
            "done": VideoStatus.COMPLETED,
            "paid": VideoStatus.IN_QUEUE,
            "orphan": VideoStatus.UNCERTAIN,  # an intent 0.1 never finished: maybe paid
        }
        assert rows["paid"].request_id == "rid-paid"
        assert {s.request_id for s in ledger.jobs_to_poll()} == {"rid-paid"}
        # 0.1's history, then the import's own settlement of the unfinished intent
        assert [(e["event"], e["request_id"]) for e in ledger.events()] == [
            ("SUBMITTED", "rid-paid"), ("UNCERTAIN", None),
        ]  # fmt: skip
    assert not (tmp_path / "catalog" / "_log").exists()
    assert (tmp_path / "catalog" / "_log.imported-0.1").is_dir()
    with Ledger.for_data_dir(tmp_path) as again:
        assert len(again.submissions()) == 3 and len(again.events()) == 2
        assert again.import_legacy_catalog(tmp_path / "catalog") == 0


def test_the_default_ledger_is_a_sqlite_file_in_wal_mode(tmp_path: Path) -> None:
    with Ledger.for_data_dir(tmp_path) as ledger:
        assert ledger.url == f"sqlite:///{tmp_path.resolve() / 'kvid.db'}"
        with ledger.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    assert os.stat(tmp_path / "kvid.db").st_size > 0
