"""Jobs that end badly, through the Dagster layer: FAILED (with and without the retry policy),
TIMED_OUT, LOST after the service forgot its jobs or restarted, a forced run that failed and is
re-executed. Each outcome is in the ledger and in the catalog the status sensor publishes,
visible in Dagster (an observation and a failed ``video_ok``), and never paid for twice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import EmulatorFactory
from dagster import AssetKey, ReexecutionOptions
from faultkit import (
    assert_accounted,
    check_verdicts,
    dagster_home,
    execute_submit,
    make_defs,
    materialization_counts,
    open_instance,
    run_prompts,
    run_submit,
    statuses,
    table_rows,
    tick_until_settled,
    write_table,
)

from kvid_dagster._dagster_common import keys_needing_jobs
from kvid_dagster.cli.runner import evaluate_status_sensor
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.project import KvidProject
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, SpendWindow, VideoRow, VideoStatus, submissions_frame
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.resources import KvidResource

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator

VIDEOS = AssetKey("kvid_videos")
FORCE = {"ops": {"kvid_video_jobs": {"config": {"force": True}}}}


def observed(instance: Any, key: str) -> list[dict[str, str]]:
    """The metadata of every observation of ``key``, oldest first."""
    records = instance.fetch_observations(VIDEOS, limit=100).records
    found = [
        {name: str(value.value) for name, value in obs.metadata.items()}
        for r in reversed(records)
        if (obs := r.event_log_entry.asset_observation) is not None and obs.partition == key
    ]
    return found


def row_of(ledger: Ledger, key: str) -> VideoRow:
    row = ledger.row(key)
    assert row is not None, key
    return row


def published_statuses(project: KvidProject) -> dict[str, str]:
    """What the Parquet catalog the sensor ticks and runs published says (not republished here)."""
    videos = pd.read_parquet(project.catalog_dir / "videos")
    return dict(zip(videos["partition_key"], videos["status"], strict=True))


def prompt(key: str) -> str:
    return f"A doomed shot {key} [[kvid:fail]]" if key.startswith("bad") else f"A calm lake {key}"


def test_a_failed_job_keeps_its_reason_and_only_force_pays_again(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    prompts = write_table(tmp_path / "prompts.csv", ["good", "bad"], prompt)
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    defs = make_defs(emulator.base_url, prompts, project.data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "good", "bad")
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"good": "COMPLETED", "bad": "FAILED"}
        assert published_statuses(project) == {"good": "COMPLETED", "bad": "FAILED"}
        bad = row_of(ledger, "bad")
        assert bad.status is VideoStatus.FAILED
        assert bad.error is not None and "kvid:fail" in bad.error
        assert bad.request_id in emulator.jobs
        assert check_verdicts(instance, ["good", "bad"]) == {"good": True, "bad": False}
        [seen] = observed(instance, "bad")
        assert seen["status"] == "FAILED" and "kvid:fail" in seen["reason"]
        assert seen["request_id"] == bad.request_id
        # the failure and its reason are in the money history too
        history = submissions_frame(ledger)
        events = history[history["partition_key"] == "bad"]
        assert events["event"].tolist() == ["INTENT", "SUBMITTED", "FAILED"]
        assert "kvid:fail" in events["error"].iloc[-1]

        # re-runs and automation do not pay for it again; forcing is the explicit choice
        assert run_submit(defs, instance, "good", "bad")
        assert emulator.jobs_created == 2
        assert keys_needing_jobs(project, instance)[1] == []
        assert run_submit(defs, instance, "bad", "bad", run_config=FORCE)
        assert emulator.jobs_created == 3
        tick_until_settled(defs, instance, ledger)
        assert [o["status"] for o in observed(instance, "bad")] == ["FAILED", "FAILED"]
        again = row_of(ledger, "bad")
        assert again.attempts == 2 and again.request_id != bad.request_id
    assert_accounted(emulator.jobs, ledger, table_rows(prompts), allowed_jobs={"bad": 2})


def test_a_forced_run_re_executed_from_failure_pays_only_for_what_it_had_not_sent(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """``force: true`` is one-shot: a forced run that fails after sending, re-executed from
    failure as Dagster's run retries do (same root run), pays only for the row it never sent;
    a new forced run pays for every row again."""
    keys = ["k0", "k1", "k2", "k3"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    defs = make_defs(emulator.base_url, prompts, project.data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:

        def execute(**kwargs: Any) -> Any:
            """A run of k0..k3 that ``reexecution_options`` can make a re-execution."""
            return execute_submit(
                instance, emulator.base_url, prompts, project.data_dir, "k0", "k3", **kwargs
            )

        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "k0", "k3")
        assert emulator.jobs_created == 4
        first_k2 = row_of(ledger, "k2").request_id
        # the forced run: k1's generate creates its job, then answers 500 (UNCERTAIN: paid, its
        # request_id unknown); k2's is refused by 429s beyond the client's retries (nothing
        # created); k0 and k3 are paid. The run fails.
        emulator.add_fault("generate", "500", match="number k1", after_create=True)
        emulator.add_fault("generate", "429", times=50, match="number k2", retry_after=0)
        forced = execute(run_config=FORCE)
        assert not forced.success
        assert emulator.jobs_created == 4 + 3
        assert row_of(ledger, "k1").status is VideoStatus.UNCERTAIN
        assert row_of(ledger, "k2").request_id == first_k2  # its forced job was never made
        emulator.clear_faults()
        sent = emulator.stats["generate"]

        retried = execute(
            reexecution_options=ReexecutionOptions.from_failure(forced.run_id, instance)
        )
        assert retried.success
        assert retried.dagster_run.root_run_id == forced.run_id
        assert retried.dagster_run.run_config == forced.dagster_run.run_config  # forced too
        assert emulator.stats["generate"] == sent + 1 and emulator.jobs_created == 4 + 4  # k2
        by_forced = {s.partition_key for s in ledger.submissions() if s.forced_by == forced.run_id}
        assert by_forced == set(keys)
        # re-executed whole, once more: the same root run, nothing left to pay for
        again = execute(reexecution_options=ReexecutionOptions(parent_run_id=retried.run_id))
        assert again.success and again.dagster_run.root_run_id == forced.run_id
        assert emulator.stats["generate"] == sent + 1

        # a new forced run is a new choice to pay, the UNCERTAIN row's included
        assert run_submit(defs, instance, "k0", "k3", run_config=FORCE)
        assert emulator.jobs_created == 4 + 4 + 4
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == dict.fromkeys(keys, "COMPLETED")
    assert_accounted(
        emulator.jobs, ledger, table_rows(prompts), allowed_jobs=dict.fromkeys(keys, 3)
    )


def test_the_retry_policy_resubmits_failed_jobs_up_to_max_attempts(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    prompts = write_table(tmp_path / "prompts.csv", ["bad", "flaky", "fine"], prompt)
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    defs = make_defs(
        emulator.base_url, prompts, project.data_dir,
        status_sensor=StatusSensorOptions(failed_job_max_attempts=3),
    )  # fmt: skip
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        emulator.fail_next_jobs(1, "GPU worker crashed during inference")
        assert run_submit(defs, instance, "flaky", "flaky")  # its first job will fail
        assert run_submit(defs, instance, "bad", "fine")
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"bad": "FAILED", "flaky": "COMPLETED", "fine": "COMPLETED"}
        # every attempt, its cost and how it ended are in the history
        history = submissions_frame(ledger)
        bad = history[history["partition_key"] == "bad"]
        assert (bad["event"] == "SUBMITTED").sum() == 3 and (bad["event"] == "FAILED").sum() == 3
        assert bad["cost_credits"].sum() == 3 * 60.0
        flaky = history[history["partition_key"] == "flaky"]
        assert flaky["event"].tolist() == [
            "INTENT", "SUBMITTED", "FAILED", "INTENT", "SUBMITTED", "COMPLETED",
        ]  # fmt: skip
        assert flaky["attempt"].tolist() == [1, 1, 1, 2, 2, 2]
        assert "GPU worker crashed" in flaky["error"].iloc[2]
        assert flaky["cost_credits"].sum() == 2 * 60.0
        assert row_of(ledger, "bad").attempts == 3 and row_of(ledger, "flaky").attempts == 2
        # Dagster saw each failure, and the retried partition's video
        assert [o["status"] for o in observed(instance, "bad")] == ["FAILED"] * 3
        assert materialization_counts(instance, ["bad", "flaky", "fine"]) == {
            "bad": 0, "flaky": 1, "fine": 1,
        }  # fmt: skip
        # attempts used up: later ticks leave it alone
        created = emulator.jobs_created
        evaluate_status_sensor(defs, instance, None, "kvid_status_sensor")
        assert emulator.jobs_created == created == 3 + 2 + 1
    assert_accounted(
        emulator.jobs, ledger, table_rows(prompts), allowed_jobs={"bad": 3, "flaky": 2}
    )


def test_the_retry_policy_spends_within_the_days_budget(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """A retry is a paid job in no run: the day's credits cap it, the run's do not."""
    prompts = write_table(tmp_path / "prompts.csv", ["bad"], prompt)
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    budget = CreditBudget(per_run=60.0, per_day=120.0)  # the first job, then one retry
    defs = make_defs(
        emulator.base_url, prompts, project.data_dir,
        status_sensor=StatusSensorOptions(failed_job_max_attempts=3), budget_credits=budget,
    )  # fmt: skip
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "bad", "bad")
        tick_until_settled(defs, instance, ledger)
        for _ in range(2):  # later ticks find no room either
            evaluate_status_sensor(defs, instance, None, "kvid_status_sensor")
    assert emulator.jobs_created == 2
    assert statuses(ledger) == {"bad": "FAILED"} and row_of(ledger, "bad").attempts == 2
    assert ledger.spent_credits(SpendWindow.DAY) == 120.0


def test_timed_out_and_lost_jobs_are_visible_in_dagster_and_polling_stops(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(job_duration=120.0)  # nothing finishes during the test
    prompts = write_table(tmp_path / "prompts.csv", ["lost", "slow"])
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    defs = make_defs(
        emulator.base_url, prompts, project.data_dir,
        status_sensor=StatusSensorOptions(job_deadline_seconds=1.0),
    )  # fmt: skip
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "lost", "lost")
        jobs = dict(emulator.jobs)
        emulator.forget_jobs()  # a restart that lost what it knew
        assert run_submit(defs, instance, "slow", "slow")
        jobs.update(emulator.jobs)
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"lost": "LOST", "slow": "TIMED_OUT"}
        assert published_statuses(project) == {"lost": "LOST", "slow": "TIMED_OUT"}
        assert check_verdicts(instance, ["lost", "slow"]) == {"lost": False, "slow": False}
        [lost], [slow] = observed(instance, "lost"), observed(instance, "slow")
        assert lost["status"] == "LOST" and "no longer knows" in lost["reason"]
        assert slow["status"] == "TIMED_OUT" and "deadline" in slow["reason"]
        assert slow["request_id"] in jobs  # kept: the job may still finish
        assert row_of(ledger, "slow").request_id == slow["request_id"]
        asked = emulator.stats["status"]
        evaluate_status_sensor(defs, instance, None, "kvid_status_sensor")
        assert emulator.stats["status"] == asked  # polling stopped
        # neither is paid for again by a re-run or by automation
        assert run_submit(defs, instance, "lost", "slow")
        assert emulator.jobs_created == 2 and keys_needing_jobs(project, instance)[1] == []
    assert_accounted(jobs, ledger, table_rows(prompts))


def test_an_emulator_restarted_mid_run_leaves_lost_jobs_and_new_ones_go_on(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    first = emulator_factory(job_duration=3.0)
    port = first.port
    prompts = write_table(tmp_path / "prompts.csv", ["a", "b", "c"])
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    # LOST after 1.5 s of 404s: longer than the realistic 404s just after generate (1 s), which
    # the new job c meets and must survive
    defs = make_defs(
        first.base_url, prompts, project.data_dir,
        status_sensor=StatusSensorOptions(lost_after_seconds=1.5),
    )  # fmt: skip
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "a", "b")
        jobs = dict(first.jobs)
        first.stop()  # down: every status call fails to connect
        evaluate_status_sensor(defs, instance, None, "kvid_status_sensor")
        assert statuses(ledger) == {"a": "SUBMITTED", "b": "SUBMITTED", "c": "PENDING"}
        second = emulator_factory(job_duration=0.3, port=port)  # back, with no memory
        assert run_submit(defs, instance, "a", "c")  # only c has no job
        assert second.jobs_created == 1
        jobs.update(second.jobs)
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"a": "LOST", "b": "LOST", "c": "COMPLETED"}
        assert published_statuses(project) == {"a": "LOST", "b": "LOST", "c": "COMPLETED"}
        assert check_verdicts(instance, ["a", "b", "c"]) == {"a": False, "b": False, "c": True}
    assert first.jobs_created + second.jobs_created == 3
    assert_accounted(jobs, ledger, table_rows(prompts))


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("failed_job_max_attempts", 0),
        ("job_deadline_seconds", 0.0),
        ("fetch_attempts", 0),
        ("max_download_bytes", 0),
    ],
)
def test_reliability_settings_are_checked_when_the_options_are_made(
    setting: str, value: float
) -> None:
    """Refused before any definitions exist, naming the setting."""
    with pytest.raises(ValueError, match=setting):
        StatusSensorOptions(**{setting: value})


def test_the_removed_grace_period_setting_is_refused_not_ignored(tmp_path: Path) -> None:
    """``intent_grace_s`` is gone (a claim of a dead submitter is UNCERTAIN at once): an old
    configuration that still passes it fails when the definitions are built."""
    prompts = write_table(tmp_path / "prompts.csv", ["a"])
    with pytest.raises(TypeError, match="intent_grace_s"):
        make_defs("http://127.0.0.1:9", prompts, tmp_path / "data", intent_grace_s=600.0)


def test_the_generate_concurrency_is_checked_when_the_resource_is_built() -> None:
    """What bounds the rows a crash can leave UNCERTAIN must be at least one."""
    with pytest.raises(ValueError, match="generate_concurrency"):
        KvidResource(api_key="k", base_url="http://127.0.0.1:9", generate_concurrency=0)
