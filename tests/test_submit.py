"""``kvid_dagster.core.submit``: ``submit_rows`` and its helpers against a real emulator and a real
ledger (SQLite and PostgreSQL): each request is sent once, within the generate bound, and the
table's invalid rows are recorded, never sent.

What a submission does under faults (ambiguous answers, 429 storms, kills between claim and
record, out of credit, budgets) is in ``tests/test_faults_http.py``,
``tests/test_faults_processes.py``, ``tests/test_races.py``, ``tests/test_budget.py`` and
``tests/test_dialects_pipeline.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import EmulatorFactory, fast_config
from faultkit import submit, table_rows, write_table

from kvid_dagster.core.planning import needs_job
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.core.submit import (
    SubmitAction,
    SubmitOutcome,
    invalid_entries,
    latest_submissions,
    register_table,
)
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus


def test_each_row_is_sent_once_and_a_second_call_skips_it(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["a", "b", "c"]))
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    ledger.register(rows)
    heard: list[SubmitOutcome] = []
    first = submit(emulator.base_url, ledger, rows, on_outcome=heard.append)
    assert [o.partition_key for o in first] == ["a", "b", "c"]  # the rows' order
    assert {o.action for o in first} == {SubmitAction.SUBMITTED}
    assert {o.status for o in first} == {VideoStatus.SUBMITTED}
    request_ids = [o.request_id for o in first]
    assert set(request_ids) == set(emulator.jobs) and len(set(request_ids)) == 3
    assert sorted(heard, key=lambda o: o.partition_key) == first  # told once per row sent
    assert not any(o.is_problem for o in first)

    second = submit(emulator.base_url, ledger, rows)
    assert [o.action for o in second] == [SubmitAction.SKIPPED] * 3
    assert [o.request_id for o in second] == request_ids  # the job it already has
    assert emulator.stats["generate"] == 3 and emulator.jobs_created == 3
    recorded = {r.partition_key: r.request_id for r in ledger.rows()}
    assert recorded == dict(zip(["a", "b", "c"], request_ids, strict=True))


def test_no_more_generates_are_in_flight_than_generate_concurrency(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """Each generate takes 0.25 s at the emulator: six of them two at a time take three waves."""
    latency = 0.25
    emulator = emulator_factory(fast_config(latency=latency))
    rows = table_rows(write_table(tmp_path / "prompts.csv", [f"k{i}" for i in range(6)]))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    began = time.monotonic()
    outcomes = submit(emulator.base_url, ledger, rows, generate_concurrency=2)
    elapsed = time.monotonic() - began
    assert [o.action for o in outcomes] == [SubmitAction.SUBMITTED] * 6
    assert elapsed >= 3 * latency, elapsed  # unbounded, all six would be back in one wave
    assert emulator.jobs_created == 6


def test_past_its_deadline_no_generate_starts_and_the_rest_are_deferred(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """Generates of 2 s one at a time, the deadline 1.5 s away: the first, already on its way
    when the deadline passes, is never abandoned; the other five are DEFERRED, unclaimed, and
    a later call sends them. A deadline already past sends nothing."""
    emulator = emulator_factory(fast_config(latency=2.0))
    keys = [f"k{i}" for i in range(6)]
    rows = table_rows(write_table(tmp_path / "prompts.csv", keys))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    deadline = time.monotonic() + 1.5
    outcomes = submit(emulator.base_url, ledger, rows, generate_concurrency=1, deadline=deadline)
    actions = [o.action for o in outcomes]
    assert actions == [SubmitAction.SUBMITTED] + [SubmitAction.DEFERRED] * 5, actions
    assert emulator.jobs_created == 1
    statuses = [r.status for r in ledger.rows()]
    assert statuses == [VideoStatus.SUBMITTED] + [VideoStatus.PENDING] * 5  # none claimed
    past = submit(emulator.base_url, ledger, rows, deadline=time.monotonic() - 1)
    assert [o.action for o in past][1:] == [SubmitAction.DEFERRED] * 5
    assert emulator.stats["generate"] == 1
    later = submit(emulator.base_url, ledger, rows)
    assert [o.action for o in later] == [SubmitAction.SKIPPED] + [SubmitAction.SUBMITTED] * 5
    assert emulator.jobs_created == 6


def test_a_generate_concurrency_below_one_is_refused_before_anything_is_sent(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["a"]))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    with pytest.raises(ValueError, match="generate_concurrency must be >= 1, got 0"):
        submit(emulator.base_url, ledger, rows, generate_concurrency=0)
    assert emulator.stats["generate"] == 0
    assert ledger.submissions() == []  # nothing claimed either


def test_the_tables_invalid_rows_are_recorded_invalid_and_never_sent(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.csv"
    prompts.write_text(
        "prompt_id,prompt,resolution,num_frames\n"
        "good,A quiet harbour,480p,81\n"
        "huge,A resolution nobody sells,999p,81\n"
        "twice,First of a pair,480p,81\n"
        "twice,Second of a pair,480p,81\n"
        "fine,A quiet field,480p,81\n",
        encoding="utf-8",
    )
    table = load_prompt_table(prompts)
    entries = invalid_entries(table)
    assert {e.partition_key for e in entries} == {"huge", "twice"}
    assert all(e.partition_key not in {r.partition_key for r in table.rows} for e in entries)
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    assert register_table(ledger, table) > 0
    assert register_table(ledger, table) == 0  # the ledger already says what the table says

    outcomes = submit(emulator.base_url, ledger, table.rows)
    assert {o.partition_key: o.action for o in outcomes} == {
        "good": SubmitAction.SUBMITTED,
        "fine": SubmitAction.SUBMITTED,
    }
    sent = sorted(str(job.body.get("prompt")) for job in emulator.jobs.values())
    assert sent == ["A quiet field", "A quiet harbour"]
    by_key = {r.partition_key: r for r in ledger.rows()}
    assert by_key["huge"].status is VideoStatus.INVALID and "999p" in str(by_key["huge"].error)
    assert by_key["twice"].status is VideoStatus.INVALID
    assert "duplicate prompt_id" in str(by_key["twice"].error)
    assert by_key["good"].status is by_key["fine"].status is VideoStatus.SUBMITTED


def test_needs_job_and_latest_submissions_follow_the_ledger(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["a", "b"]))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    assert latest_submissions(ledger, rows) == {}
    assert all(needs_job(row, {}) for row in rows)

    [outcome] = submit(emulator.base_url, ledger, rows[:1])
    latest = latest_submissions(ledger, rows)
    assert set(latest) == {rows[0].request_hash}
    assert latest[rows[0].request_hash].request_id == outcome.request_id
    assert [needs_job(row, latest) for row in rows] == [False, True]


def test_a_row_given_twice_in_one_call_is_sent_once(emulator: KvidEmulator, tmp_path: Path) -> None:
    [row] = table_rows(write_table(tmp_path / "prompts.csv", ["a"]))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register([row])
    outcomes = submit(emulator.base_url, ledger, [row, row])
    assert [(o.partition_key, o.action) for o in outcomes] == [
        ("a", SubmitAction.SUBMITTED),
        ("a", SubmitAction.SKIPPED),
    ]
    assert "duplicate key" in outcomes[1].message
    assert emulator.stats["generate"] == 1 and emulator.jobs_created == 1
    assert len(ledger.submissions()) == 1
