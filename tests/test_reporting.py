"""``reporting``: which ended jobs Dagster must hear of, as which event and verdict (no
Dagster), on rows read from a real ledger."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from faultkit import write_table

from kvid_dagster.core.poll import VideoEvent
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.core.reporting import (
    REREPORT_WINDOW_S,
    VIDEO_CHECK_NAME,
    ReportKind,
    RowVerdict,
    ShownOutcome,
    rows_to_recheck,
    unreported,
    verdict_for,
    video_reports,
)
from kvid_dagster.core.submit import register_table
from kvid_dagster.ledger import ClaimOwner, JobChange, Ledger, Submission, VideoRow, VideoStatus

OUTCOMES = {
    "done": VideoStatus.COMPLETED,
    "failed": VideoStatus.FAILED,
    "lost": VideoStatus.LOST,
    "running": VideoStatus.PROCESSING,
    "pending": None,  # never submitted
}


@pytest.fixture
def rows(tmp_path: Path) -> dict[str, VideoRow]:
    """A ledger with a row in each state of ``OUTCOMES``, and an invalid row."""
    prompts = write_table(tmp_path / "t.csv", list(OUTCOMES))
    with prompts.open("a", encoding="utf-8") as table_file:
        table_file.write("broken,,480p,81\n")  # no prompt: invalid, never sent
    table = load_prompt_table(prompts)
    ledger = Ledger.for_data_dir(tmp_path / "data")
    register_table(ledger, table)
    for key, status in OUTCOMES.items():
        if status is None:
            continue
        claim = ledger.claim(table.by_key[key], ClaimOwner.current(), cost_credits=1.0)
        assert isinstance(claim, Submission)
        ledger.record_submitted(claim, f"req-{key}")
        sub = ledger.submission(claim.submission_id)
        assert sub is not None
        change = JobChange(
            sub.submission_id, sub.version, status, completed=status is VideoStatus.COMPLETED
        )
        assert ledger.apply([change])
    found = ledger.rows_by_key()
    assert found["broken"].status is VideoStatus.INVALID
    assert {k: found[k].status for k in OUTCOMES} == {
        k: s or VideoStatus.PENDING for k, s in OUTCOMES.items()
    }
    return found


def test_the_verdict_is_passed_only_for_a_completed_row(rows: dict[str, VideoRow]) -> None:
    assert verdict_for(rows["done"]) is RowVerdict.PASSED and RowVerdict.PASSED.passed
    assert verdict_for(rows["failed"]) is RowVerdict.NO_VIDEO
    assert verdict_for(rows["running"]) is RowVerdict.NO_VIDEO
    assert verdict_for(None) is RowVerdict.NO_ROW
    assert not RowVerdict.NO_VIDEO.passed and not RowVerdict.NO_ROW.passed


def test_ended_jobs_are_reported_once_each_with_a_verdict_unless_already_checked(
    rows: dict[str, VideoRow],
) -> None:
    events = [VideoEvent(k, rows[k]) for k in ("done", "running", "failed", "lost", "done")]
    reports = video_reports(events, checked={VIDEO_CHECK_NAME: {"lost"}})
    assert [(r.partition_key, r.kind, r.verdict) for r in reports] == [
        ("done", ReportKind.MATERIALIZATION, RowVerdict.PASSED),
        ("failed", ReportKind.OBSERVATION, RowVerdict.NO_VIDEO),
        ("lost", ReportKind.OBSERVATION, None),  # it has a check result already
        ("done", ReportKind.MATERIALIZATION, None),  # its verdict is in this tick already
    ]
    assert reports[0].row is rows["done"]


def test_recheck_looks_at_ended_rows_not_skipped_and_recent_failures(
    rows: dict[str, VideoRow],
) -> None:
    now = datetime.now(UTC)
    recheck = rows_to_recheck(rows.values(), skip={"lost"}, now=now)
    assert [r.partition_key for r in recheck.completed] == ["done"]
    assert [r.partition_key for r in recheck.ended] == ["failed"]  # not running, pending, broken
    later = now + timedelta(seconds=REREPORT_WINDOW_S + 60)
    old = rows_to_recheck(rows.values(), skip=(), now=later)
    assert [r.partition_key for r in old.completed] == ["done"]  # a video is never too old
    assert old.ended == []


def test_only_what_dagster_does_not_show_is_reported_again(rows: dict[str, VideoRow]) -> None:
    recheck = rows_to_recheck(rows.values(), skip=(), now=datetime.now(UTC))
    assert {r.partition_key for r in recheck.ended} == {"failed", "lost"}
    nothing_shown = unreported(recheck, materialized=set(), observed={})
    assert sorted(e.partition_key for e in nothing_shown) == ["done", "failed", "lost"]
    shown = {
        "failed": ShownOutcome("FAILED", "req-failed"),
        "lost": ShownOutcome("FAILED", "req-lost"),  # shows an earlier outcome: stale
    }
    again = unreported(recheck, materialized={"done"}, observed=shown)
    assert [(e.partition_key, e.row) for e in again] == [("lost", rows["lost"])]


def test_an_outcome_is_stale_only_when_what_it_shows_differs(rows: dict[str, VideoRow]) -> None:
    failed = rows["failed"]
    assert not ShownOutcome("FAILED", "req-failed").is_stale_for(failed)
    assert not ShownOutcome(None, None).is_stale_for(failed)  # shows nothing to contradict
    assert ShownOutcome("FAILED", "req-other").is_stale_for(failed)
    assert ShownOutcome("LOST", None).is_stale_for(failed)


def test_reporting_imports_no_dagster() -> None:
    code = "import sys, kvid_dagster.core.reporting; print('dagster' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
