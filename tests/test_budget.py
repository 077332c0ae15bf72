"""The credit budget: priced before anything is sent, only what fits goes, the rest waits PENDING.

Every row here is a v1 480p job of the price table: 60 credits. Generates are counted at the
emulator (what was paid for); the per-day budget is checked in the claim's own transaction, so
concurrent submitters share its room on both ledger backends.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import TEST_API_KEY
from dagster import AssetKey
from faultkit import (
    dagster_home,
    make_client,
    make_defs,
    open_instance,
    run_prompts,
    table_rows,
    tick_until_settled,
    write_table,
)

from kvid_dagster.cli.main import main as cli_main
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptRow
from kvid_dagster.core.submit import SubmitAction, SubmitOutcome, resubmit_failed, submit_rows
from kvid_dagster.definitions import SUBMIT_JOB
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    ClaimOwner,
    ClaimRule,
    JobChange,
    Ledger,
    Refusal,
    SpendCap,
    SpendWindow,
    Submission,
    VideoStatus,
)

PRICE = 60  # v1 480p, one clip
KEYS = [f"b{i}" for i in range(8)]


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Any]:
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        yield instance


@pytest.fixture(autouse=True)
def _no_ledger_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVID_DATABASE_URL", raising=False)


def submit_range(defs: Any, instance: Any, run_config: dict[str, Any] | None = None) -> Any:
    return defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=instance,
        tags={RANGE_START_TAG: KEYS[0], RANGE_END_TAG: KEYS[-1]},
        run_config=run_config,
        raise_on_error=False,
    )


def failure_of(result: Any) -> Any:
    """The ``Failure`` the submitting step raised (its description and metadata)."""
    (failure,) = [
        event.step_failure_data.user_failure_data
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data.user_failure_data is not None
    ]
    return failure


def sent_prompts(emulator: KvidEmulator) -> list[str]:
    return sorted(job.body["prompt"] for job in emulator.jobs.values())


def prompt_of(key: str) -> str:
    return f"A quiet scene number {key}"  # faultkit.write_table's prompts


def statuses(ledger: Ledger) -> dict[str, VideoStatus]:
    return {row.partition_key: row.status for row in ledger.rows()}


def budgeted(
    emulator: KvidEmulator, tmp_path: Path, budget: CreditBudget | None
) -> tuple[Path, Path, Any]:
    """The eight-row table, its data folder, and definitions with ``budget``."""
    prompts = write_table(tmp_path / "p.csv", KEYS)
    data_dir = tmp_path / "data"
    return prompts, data_dir, make_defs(emulator.base_url, prompts, data_dir, budget_credits=budget)


def test_a_budget_for_three_of_eight_rows_sends_three_and_a_later_run_sends_the_rest(
    emulator: KvidEmulator, tmp_path: Path, home: Any
) -> None:
    prompts, data_dir, defs = budgeted(emulator, tmp_path, CreditBudget(per_run=3 * PRICE))
    ledger = KvidProject(prompts, data_dir).ledger()
    assert run_prompts(defs, home)

    result = submit_range(defs, home)
    assert not result.success
    failure = failure_of(result)
    assert "per-run 180 credits" in failure.description, failure.description  # the budget
    assert "priced its rows at 480 credits" in failure.description  # the estimate
    assert "5 rows left (300 credits), PENDING and not sent" in failure.description
    assert failure.metadata["run_spent_credits"].value == 3 * PRICE
    assert failure.metadata["day_spent_credits"].value == 3 * PRICE
    assert failure.metadata["over_budget"].value == 5
    assert emulator.jobs_created == 3
    # the rows go in table order: the first three were sent, the other five wait
    assert sent_prompts(emulator) == [prompt_of(k) for k in KEYS[:3]]
    found = statuses(ledger)
    assert [found[k] for k in KEYS[:3]] == [VideoStatus.SUBMITTED] * 3
    assert [found[k] for k in KEYS[3:]] == [VideoStatus.PENDING] * 5  # never UNCERTAIN/FAILED

    # a later run with room for exactly the five sends exactly them
    roomy = make_defs(
        emulator.base_url, prompts, data_dir, budget_credits=CreditBudget(per_run=5 * PRICE)
    )
    assert submit_range(roomy, home).success
    assert emulator.jobs_created == 8
    assert sent_prompts(emulator) == [prompt_of(k) for k in KEYS]
    tick_until_settled(roomy, home, ledger)
    assert set(statuses(ledger).values()) == {VideoStatus.COMPLETED}
    assert ledger.spent_credits(SpendWindow.DAY) == 8 * PRICE


def test_a_runs_config_lowers_its_own_budget(
    emulator: KvidEmulator, tmp_path: Path, home: Any
) -> None:
    _, _, defs = budgeted(emulator, tmp_path, None)  # no budget in the definitions
    assert run_prompts(defs, home)
    config = {"ops": {"kvid_video_jobs": {"config": {"budget_credits": 2 * PRICE}}}}
    result = submit_range(defs, home, config)
    assert not result.success
    assert "per-run 120 credits" in failure_of(result).description
    assert emulator.jobs_created == 2


def test_the_per_day_budget_holds_across_two_runs(
    emulator: KvidEmulator, tmp_path: Path, home: Any
) -> None:
    prompts, data_dir, defs = budgeted(emulator, tmp_path, CreditBudget(per_day=5 * PRICE))
    assert run_prompts(defs, home)
    first = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=home, tags={RANGE_START_TAG: "b0", RANGE_END_TAG: "b1"}, raise_on_error=False
    )
    assert first.success and emulator.jobs_created == 2

    # a second run, of the other six rows: the day has room for three of them only
    second = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=home, tags={RANGE_START_TAG: "b2", RANGE_END_TAG: "b7"}, raise_on_error=False
    )
    assert not second.success
    failure = failure_of(second)
    assert "per-day 300 credits" in failure.description
    assert "3 rows left (180 credits)" in failure.description, failure.description
    assert failure.metadata["run_spent_credits"].value == 3 * PRICE
    assert failure.metadata["day_spent_credits"].value == 5 * PRICE
    assert emulator.jobs_created == 5
    ledger = KvidProject(prompts, data_dir).ledger()
    assert [statuses(ledger)[k] for k in KEYS[5:]] == [VideoStatus.PENDING] * 3


def submit_now(
    base_url: str,
    ledger: Ledger,
    rows: list[PromptRow],
    start: threading.Barrier | None = None,
    **settings: Any,
) -> list[SubmitOutcome]:
    """One ``submit_rows`` on its own event loop (after ``start``, when given)."""

    async def go() -> list[SubmitOutcome]:
        async with make_client(base_url) as client:
            if start is not None:
                start.wait()
            return await submit_rows(client, ledger, rows, **settings)

    return asyncio.run(go())


def wait_for_blocked_claims(conn: Any, count: int) -> None:
    """Until ``count`` other transactions wait for the write lock ``conn`` holds: on PostgreSQL
    as the server reports it; SQLite's waiting writers are invisible, so there a pause."""
    if conn.dialect.name != "postgresql":
        time.sleep(1.5)
        return
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    deadline = time.monotonic() + 30
    with conn.engine.connect() as watcher:
        while watcher.execute(query).scalar_one() < count:
            assert time.monotonic() < deadline, "the runs' claims never waited for the lock"
            time.sleep(0.02)
            watcher.rollback()  # a fresh snapshot of the activity view


def test_concurrent_runs_share_the_days_room_instead_of_each_spending_it(
    emulator: KvidEmulator, tmp_path: Path, database_url: str
) -> None:
    # both runs plan while the test holds the ledger's write lock, each seeing room for three
    # rows of its four; their claims wait for the lock, and the claims' own check then lets
    # three go in all, whichever run gets there first
    rows = table_rows(write_table(tmp_path / "p.csv", KEYS))
    ledger = Ledger(database_url)
    ledger.register(rows)
    start = threading.Barrier(2)
    results: dict[str, list[SubmitOutcome]] = {}

    def run(name: str, part: list[PromptRow]) -> None:
        results[name] = submit_now(
            emulator.base_url,
            ledger,
            part,
            start,
            owner=ClaimOwner.current(name),
            budget=CreditBudget(per_day=3 * PRICE),
        )

    threads = [
        threading.Thread(target=run, args=("run-a", rows[:4])),
        threading.Thread(target=run, args=("run-b", rows[4:])),
    ]
    with ledger.write() as conn:
        for thread in threads:
            thread.start()
        wait_for_blocked_claims(conn, 2)
    for thread in threads:
        thread.join(timeout=60)
    outcomes = results["run-a"] + results["run-b"]
    sent = [o for o in outcomes if o.action is SubmitAction.SUBMITTED]
    waiting = [o for o in outcomes if o.action is SubmitAction.OVER_BUDGET]
    assert emulator.jobs_created == 3 and len(sent) == 3, outcomes
    assert len(waiting) == 5 and {o.status for o in waiting} == {VideoStatus.PENDING}
    if ledger.engine.dialect.name == "postgresql":  # both planned three: three refused in claim
        refused = [o for o in waiting if "over the per-day budget of 180" in o.message]
        assert len(refused) == 3, waiting
    assert ledger.spent_credits(SpendWindow.DAY) == 3 * PRICE
    assert sorted(s.value for s in statuses(ledger).values()) == sorted(
        [VideoStatus.SUBMITTED.value] * 3 + [VideoStatus.PENDING.value] * 5
    )
    ledger.close()


def test_a_claim_over_the_cap_is_refused_and_a_released_claim_gives_its_room_back(
    tmp_path: Path, database_url: str
) -> None:
    rows = table_rows(write_table(tmp_path / "p.csv", KEYS[:3]))
    ledger = Ledger(database_url)
    ledger.register(rows)
    day = ClaimRule(caps=(SpendCap(SpendWindow.DAY, 2 * PRICE),))
    first = ledger.claim(rows[0], ClaimOwner.current("run-a"), cost_credits=PRICE, rule=day)
    second = ledger.claim(rows[1], ClaimOwner.current("run-b"), cost_credits=PRICE, rule=day)
    assert isinstance(first, Submission) and isinstance(second, Submission)
    refused = ledger.claim(rows[2], ClaimOwner.current("run-b"), cost_credits=PRICE, rule=day)
    assert isinstance(refused, Refusal) and refused.over_budget == day.caps[0]
    assert "per-day budget of 120 credits (120 spent" in refused.reason
    assert ledger.row(rows[2].partition_key).status is VideoStatus.PENDING
    assert ledger.spent_credits(SpendWindow.RUN, run_id="run-b") == PRICE

    ledger.release(second, "refused by the service: nothing created")  # its room comes back
    again = ledger.claim(rows[2], ClaimOwner.current("run-b"), cost_credits=PRICE, rule=day)
    assert isinstance(again, Submission)
    assert ledger.spent_credits(SpendWindow.DAY) == 2 * PRICE
    ledger.close()


@pytest.fixture
def two_rows(tmp_path: Path) -> Iterator[tuple[list[PromptRow], Ledger]]:
    """Two registered rows in a fresh SQLite ledger."""
    rows = table_rows(write_table(tmp_path / "p.csv", KEYS[:2]))
    ledger = Ledger(f"sqlite:///{tmp_path / 'kvid.db'}")
    ledger.register(rows)
    yield rows, ledger
    ledger.close()


def test_a_per_run_budget_without_a_run_id_is_refused_before_anything_is_sent(
    emulator: KvidEmulator, two_rows: tuple[list[PromptRow], Ledger]
) -> None:
    rows, ledger = two_rows
    with pytest.raises(ValueError, match="per-run credit budget needs"):
        submit_now(emulator.base_url, ledger, rows, budget=CreditBudget(per_run=PRICE))
    assert emulator.jobs_created == 0
    with pytest.raises(ValueError, match="must be a number >= 0"):
        CreditBudget(per_day=-1)


def test_under_a_budget_a_row_without_a_price_is_not_sent(
    emulator: KvidEmulator, two_rows: tuple[list[PromptRow], Ledger]
) -> None:
    rows, ledger = two_rows
    outcomes = submit_now(
        emulator.base_url, ledger, rows, prices={}, budget=CreditBudget(per_day=10 * PRICE)
    )
    assert {o.action for o in outcomes} == {SubmitAction.OVER_BUDGET}
    assert all("no price for v1" in o.message for o in outcomes), outcomes
    assert emulator.jobs_created == 0
    assert set(statuses(ledger).values()) == {VideoStatus.PENDING}


def test_the_retry_policy_spends_only_what_the_days_budget_leaves(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """Retries of FAILED jobs belong to no run: the per-day credits hold them, the per-run
    ones cannot, and a retry over the day's room is not sent (its row stays FAILED)."""
    rows = table_rows(write_table(tmp_path / "p.csv", KEYS[:3]))
    with Ledger(f"sqlite:///{tmp_path / 'kvid.db'}") as ledger:
        ledger.register(rows)
        assert {o.action for o in submit_now(emulator.base_url, ledger, rows)} == {
            SubmitAction.SUBMITTED
        }
        for row in ledger.rows():
            sub = row.submission
            assert sub is not None
            ledger.apply([JobChange(sub.submission_id, sub.version, VideoStatus.FAILED)])

        async def retry() -> list[SubmitOutcome]:
            async with make_client(emulator.base_url) as client:
                return await resubmit_failed(
                    client, ledger, rows, max_attempts=3,
                    budget=CreditBudget(per_run=0, per_day=4 * PRICE),
                )  # fmt: skip

        outcomes = asyncio.run(retry())
        assert [o.action for o in outcomes] == [
            SubmitAction.SUBMITTED, SubmitAction.OVER_BUDGET, SubmitAction.OVER_BUDGET
        ]  # fmt: skip
        assert emulator.jobs_created == 4
        assert statuses(ledger) == {
            KEYS[0]: VideoStatus.SUBMITTED, KEYS[1]: VideoStatus.FAILED,
            KEYS[2]: VideoStatus.FAILED,
        }  # fmt: skip
        assert ledger.spent_credits(SpendWindow.DAY) == 4 * PRICE


def test_kvid_prompts_reports_what_a_backfill_would_cost(
    emulator: KvidEmulator, tmp_path: Path, home: Any
) -> None:
    _, _, defs = budgeted(emulator, tmp_path, CreditBudget(per_run=3 * PRICE))

    def reported() -> dict[str, Any]:
        assert run_prompts(defs, home)
        event = home.get_latest_materialization_event(AssetKey("kvid_prompts"))
        metadata = event.asset_materialization.metadata
        return {k: metadata[k].value for k in metadata if "credits" in k or "backfill" in k}

    assert reported() == {
        "backfill_partitions": 8,
        "backfill_estimate_credits": 8 * PRICE,
        "backfill_unpriced_partitions": 0,
        "day_spent_credits": 0,
    }
    assert not submit_range(defs, home).success  # three sent, five over budget
    assert reported() == {
        "backfill_partitions": 5,
        "backfill_estimate_credits": 5 * PRICE,
        "backfill_unpriced_partitions": 0,
        "day_spent_credits": 3 * PRICE,
    }


def test_kvid_dagster_estimate_prints_the_cost_and_writes_nothing(
    emulator: KvidEmulator, tmp_path: Path, home: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts, data_dir, defs = budgeted(emulator, tmp_path, CreditBudget(per_run=3 * PRICE))
    assert cli_main(["estimate", "--prompts", str(prompts), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "8 rows without a job: 480 credits estimated (4.80 USD)" in out, out
    assert "spent today (UTC): 0 credits" in out
    assert not (data_dir / "kvid.db").exists()  # no ledger is created to estimate

    assert run_prompts(defs, home)
    submit_range(defs, home)
    assert cli_main(["estimate", "--prompts", str(prompts), "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "5 rows without a job: 300 credits estimated (3.00 USD)" in out, out
    assert "spent today (UTC): 180 credits" in out

    missing = tmp_path / "absent.csv"
    assert cli_main(["estimate", "--prompts", str(missing), "--data-dir", str(data_dir)]) == 2
    assert "absent.csv" in capsys.readouterr().err


def _cli(*args: str, emulator: KvidEmulator, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    env |= {"KVID_BASE_URL": emulator.base_url, "KVID_API_KEY": TEST_API_KEY}
    return subprocess.run(
        [sys.executable, "-m", "kvid_dagster.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_kvid_dagster_run_with_a_budget_exits_1_naming_it_and_the_next_run_finishes(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    prompts = write_table(tmp_path / "p.csv", KEYS)
    where = ["--prompts", str(prompts), "--data-dir", str(tmp_path / "data")]

    refused = _cli("run", *where, "--budget-credits", "-5", emulator=emulator, cwd=tmp_path)
    assert refused.returncode == 2 and "not a number of credits >= 0" in refused.stderr
    assert emulator.jobs_created == 0  # bad input: refused before anything was sent

    done = _cli("run", *where, "--budget-credits", "180", emulator=emulator, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "credit budget: per-run 180 credits" in done.stderr
    assert "5 rows left (300 credits), PENDING and not sent" in done.stderr, done.stderr
    assert "credits: 180 spent by these runs, 180 today (UTC)" in done.stdout, done.stdout
    assert emulator.jobs_created == 3

    done = _cli("run", *where, "--budget-credits", "300", emulator=emulator, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert emulator.jobs_created == 8
    assert "credits: 300 spent by these runs, 480 today (UTC)" in done.stdout, done.stdout


def test_a_dear_row_never_blocks_the_cheaper_rows_after_it(
    emulator: KvidEmulator, tmp_path: Path, home: Any
) -> None:
    """Under 100 credits: a (v1 480p, 60) goes; b (v1 720p, 120) can never fit and says what
    it needs; c (v2 480p, 39) still fits the 40 left after a, and goes; d (39) does not fit
    the 1 left after a and c, and says so with the figures."""
    prompts = tmp_path / "p.csv"
    prompts.write_text(
        "prompt_id,prompt,model,resolution\n"
        "a,A quiet scene number a,v1,480p\n"
        "b,A quiet scene number b,v1,720p\n"
        "c,A quiet scene number c,v2,480p\n"
        "d,A quiet scene number d,v2,480p\n",
        encoding="utf-8",
    )
    defs = make_defs(
        emulator.base_url, prompts, tmp_path / "data", budget_credits=CreditBudget(per_run=100)
    )
    assert run_prompts(defs, home)
    result = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=home, tags={RANGE_START_TAG: "a", RANGE_END_TAG: "d"}, raise_on_error=False
    )
    assert not result.success
    assert sent_prompts(emulator) == [prompt_of("a"), prompt_of("c")]
    lines = failure_of(result).description.splitlines()
    assert (
        "b: over_budget: not sent: it needs 120 credits, more than the whole per-run budget of "
        "100: it is never sent under this budget (raise it to at least 120)"
    ) in lines, lines
    assert (
        "d: over_budget: not sent: 39 credits do not fit the 1 left of the per-run budget of "
        "100, after the 99 this run sends first; a run with room sends it"
    ) in lines, lines
