"""``kvid_dagster.assets``: the definitions ``build_kvid_assets`` makes (the jobs asset's pool,
backfill policy and partitions, the automation condition it is given, its run config) and what
the asset bodies do that no other file checks, on a real Dagster instance and the emulator.

The specs (keys, groups, kinds) are in ``tests/test_translator.py``; whole runs of every asset
(the prompts asset's metadata, the catalog's row count and column schema) are in
``tests/test_dagster_pipeline.py``; the jobs asset under faults is in
``tests/test_faults_processes.py`` and ``tests/test_faults_jobs.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    AutomationCondition,
    BackfillPolicy,
)
from faultkit import dagster_home, make_defs, open_instance, run_prompts, write_table
from pydantic import ValidationError

from kvid_dagster.assets import KvidJobsConfig, add_new_partitions, build_kvid_assets
from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import SUBMIT_JOB
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import VideoStatus

PROMPTS, JOBS, VIDEOS, CATALOG = (
    AssetKey(name) for name in ("kvid_prompts", "kvid_video_jobs", "kvid_videos", "kvid_catalog")
)


@pytest.fixture
def project(tmp_path: Path) -> KvidProject:
    return KvidProject(write_table(tmp_path / "prompts.csv", ["a", "b"]), tmp_path / "data")


def by_key(assets: list[AssetsDefinition | AssetSpec]) -> dict[AssetKey, object]:
    found: dict[AssetKey, object] = {}
    for item in assets:
        if isinstance(item, AssetSpec):
            found[item.key] = item
        else:
            found.update(dict.fromkeys(item.keys, item))
    return found


def test_the_jobs_asset_is_a_single_run_backfill_in_the_kvid_pool(project: KvidProject) -> None:
    assets = by_key(build_kvid_assets(project))
    assert set(assets) == {PROMPTS, JOBS, VIDEOS, CATALOG}
    jobs = assets[JOBS]
    assert isinstance(jobs, AssetsDefinition)
    assert jobs.backfill_policy == BackfillPolicy.single_run()
    assert jobs.op.pool == "kvid"  # Dagster's concurrency pool: runs submitting at once queue
    for key in (PROMPTS, CATALOG):
        other = assets[key]
        assert isinstance(other, AssetsDefinition) and other.op.pool is None
        assert other.partitions_def is None  # one table, one catalog
    videos = assets[VIDEOS]
    assert isinstance(videos, AssetSpec)  # materialized by the status sensor, never by a run
    assert jobs.partitions_def == videos.partitions_def == project.partitions_def
    assert videos.deps and [d.asset_key for d in videos.deps] == [JOBS]


def test_the_jobs_automation_condition_is_set_on_the_jobs_asset_only(
    project: KvidProject,
) -> None:
    condition = AutomationCondition.on_missing()
    assets = build_kvid_assets(project, jobs_automation_condition=condition)
    conditions = {
        key: cond
        for item in assets
        if isinstance(item, AssetsDefinition)
        for key, cond in item.automation_conditions_by_key.items()
    }
    assert conditions == {JOBS: condition}
    assert all(item.automation_condition is None for item in assets if isinstance(item, AssetSpec))
    plain = build_kvid_assets(project)
    assert not any(
        item.automation_conditions_by_key for item in plain if isinstance(item, AssetsDefinition)
    )


def test_the_jobs_run_config_refuses_a_negative_budget() -> None:
    assert KvidJobsConfig() == KvidJobsConfig(force=False, budget_credits=None)
    assert KvidJobsConfig(budget_credits=0).budget_credits == 0
    with pytest.raises(ValidationError, match="budget_credits"):
        KvidJobsConfig(budget_credits=-1)


def test_add_new_partitions_adds_only_the_new_keys_in_table_order(
    project: KvidProject, tmp_path: Path
) -> None:
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert add_new_partitions(instance, project, ["b", "a", "b"]) == ["b", "a"]
        assert add_new_partitions(instance, project, ["c", "a", "d"]) == ["c", "d"]
        assert add_new_partitions(instance, project, ["a", "d"]) == []
        assert instance.get_dynamic_partitions(project.partitions_name) == ["b", "a", "c", "d"]


def test_a_run_over_a_row_made_invalid_fails_naming_it_and_submits_the_rest(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """The partitions exist, then the table's row ``b`` breaks: ``a`` and ``c`` are sent, the
    run fails saying ``b`` has no valid row, and ``b`` was never sent."""
    prompts = write_table(tmp_path / "prompts.csv", ["a", "b", "c"])
    data_dir = tmp_path / "data"
    defs = make_defs(emulator.base_url, prompts, data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        prompts.write_text(
            prompts.read_text(encoding="utf-8").replace("b,A quiet scene number b,480p", "b,,480p"),
            encoding="utf-8",
        )
        result = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
            instance=instance, tags={RANGE_START_TAG: "a", RANGE_END_TAG: "c"}, raise_on_error=False
        )
        assert not result.success
        [failure] = [e for e in result.all_events if e.is_step_failure]
        error = failure.step_failure_data.user_failure_data
        assert error is not None and "1 of 3 partitions" in str(error.description)
        assert "b: no valid row in the table" in str(error.description)
    assert emulator.jobs_created == 2
    assert "number b" not in " ".join(str(j.body.get("prompt")) for j in emulator.jobs.values())
    rows = KvidProject(prompts, data_dir).ledger().rows_by_key()
    assert rows["a"].status is rows["c"].status is VideoStatus.SUBMITTED
    assert rows["b"].status is VideoStatus.INVALID
