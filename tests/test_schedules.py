"""``kvid_dagster.schedule_builder``: the schedule ``build_kvid_schedule`` makes from its
``ScheduleOptions``, and what its evaluation asks for on a real Dagster instance whose
partitions and ledger say which rows have a job.

The ranges after a partial submission through Dagster runs are in
``tests/test_dagster_pipeline.py``; the schedule has no fault tests of its own (what it
submits goes through ``kvid_video_jobs``, see ``tests/test_faults_processes.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DefaultScheduleStatus,
    ScheduleDefinition,
    build_schedule_context,
)
from faultkit import dagster_home, open_instance, submit, table_rows, write_table

from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.core.project import KvidProject
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.options import ScheduleOptions
from kvid_dagster.schedule_builder import build_kvid_schedule
from kvid_dagster.translator import KvidAsset, KvidTranslator

KEYS = [f"k{i}" for i in range(6)]
MORNING = datetime(2026, 11, 27, 6, tzinfo=UTC)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    with open_instance(dagster_home(tmp_path / "dagster_home")) as instance:
        yield instance


@pytest.fixture
def project(tmp_path: Path) -> KvidProject:
    return KvidProject(write_table(tmp_path / "prompts.csv", KEYS), tmp_path / "data")


def evaluate(
    schedule: ScheduleDefinition, instance: DagsterInstance
) -> tuple[list[tuple[str, str, str | None]], str | None]:
    """The tick's run requests as ``(first, last, run_key)`` and its skip message."""
    with build_schedule_context(instance=instance, scheduled_execution_time=MORNING) as context:
        result = schedule.evaluate_tick(context)
    ranges = [
        (r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG], r.run_key)
        for r in result.run_requests or []
    ]
    return ranges, result.skip_message


def submit_keys(emulator: KvidEmulator, project: KvidProject, keys: set[str]) -> None:
    """Give ``keys`` a job the way a run does, straight through ``submit_rows``."""
    ledger = project.ledger()
    rows = [row for row in table_rows(Path(str(project.source().uri))) if row.partition_key in keys]
    outcomes = submit(emulator.base_url, ledger, rows)
    assert {o.partition_key for o in outcomes if o.request_id} == keys


def test_the_schedule_has_the_options_cron_timezone_and_status(project: KvidProject) -> None:
    options = ScheduleOptions(
        cron_schedule="30 5 * * 1-5",
        execution_timezone="America/New_York",
        default_status=DefaultScheduleStatus.RUNNING,
    )
    schedule = build_kvid_schedule(project, options, name="weekday_videos")
    assert schedule.name == "weekday_videos"
    assert schedule.cron_schedule == "30 5 * * 1-5"
    assert schedule.execution_timezone == "America/New_York"
    assert schedule.default_status is DefaultScheduleStatus.RUNNING
    default = build_kvid_schedule(project)
    assert (default.name, default.cron_schedule, default.execution_timezone) == (
        "kvid_daily_schedule",
        "0 6 * * *",
        "UTC",
    )
    assert default.default_status is DefaultScheduleStatus.STOPPED


def test_it_requests_the_partitions_without_a_job_as_contiguous_ranges_of_the_jobs_asset(
    emulator: KvidEmulator, project: KvidProject, instance: DagsterInstance
) -> None:
    instance.add_dynamic_partitions(project.partitions_name, KEYS)
    submit_keys(emulator, project, {"k1", "k4"})
    schedule = build_kvid_schedule(project)
    with build_schedule_context(instance=instance, scheduled_execution_time=MORNING) as context:
        requests = schedule.evaluate_tick(context).run_requests or []
    assert [(r.tags[RANGE_START_TAG], r.tags[RANGE_END_TAG]) for r in requests] == [
        ("k0", "k0"),
        ("k2", "k3"),
        ("k5", "k5"),
    ]
    assert all(r.asset_selection == [AssetKey("kvid_video_jobs")] for r in requests)
    # one run key per range and scheduled time: a retried tick never asks twice
    stamp = MORNING.isoformat()
    assert [r.run_key for r in requests] == [
        f"{stamp}:k0:k0",
        f"{stamp}:k2:k3",
        f"{stamp}:k5:k5",
    ]
    assert emulator.jobs_created == 2  # evaluating sends nothing


def test_rows_not_yet_partitions_wait_for_kvid_prompts(
    project: KvidProject, instance: DagsterInstance
) -> None:
    """A row the instance has no partition for is not requested (a run could not target it);
    ranges are contiguous in the instance's partition order, where k3 follows k1."""
    instance.add_dynamic_partitions(project.partitions_name, ["k0", "k1", "k3"])
    ranges, skipped = evaluate(build_kvid_schedule(project), instance)
    assert [(first, last) for first, last, _ in ranges] == [("k0", "k3")]
    assert skipped is None
    instance.add_dynamic_partitions(project.partitions_name, ["k2", "k4", "k5"])
    ranges, _ = evaluate(build_kvid_schedule(project), instance)
    assert [(first, last) for first, last, _ in ranges] == [("k0", "k5")]


def test_nothing_is_requested_when_every_partition_has_a_job(
    emulator: KvidEmulator, project: KvidProject, instance: DagsterInstance
) -> None:
    instance.add_dynamic_partitions(project.partitions_name, KEYS)
    submit_keys(emulator, project, set(KEYS))
    ranges, skipped = evaluate(build_kvid_schedule(project), instance)
    assert ranges == []
    assert skipped == "every partition already has a job"
    assert emulator.jobs_created == len(KEYS)


def test_an_unreadable_table_skips_the_tick_saying_why(
    project: KvidProject, instance: DagsterInstance
) -> None:
    instance.add_dynamic_partitions(project.partitions_name, KEYS)
    Path(str(project.source().uri)).write_text("title,colour\nx,red\n", encoding="utf-8")
    ranges, skipped = evaluate(build_kvid_schedule(project), instance)
    assert ranges == []
    assert skipped and "prompt" in skipped


def test_a_translated_jobs_key_is_the_one_requested(
    project: KvidProject, instance: DagsterInstance
) -> None:
    class Media(KvidTranslator):
        def get_asset_key(self, name: str) -> AssetKey:
            return AssetKey(["media", name])

    instance.add_dynamic_partitions(project.partitions_name, KEYS)
    schedule = build_kvid_schedule(project, translator=Media())
    with build_schedule_context(instance=instance, scheduled_execution_time=MORNING) as context:
        requests = schedule.evaluate_tick(context).run_requests or []
    expected = AssetKey(["media", KvidAsset.VIDEO_JOBS.value])
    assert [r.asset_selection for r in requests] == [[expected]]
