"""``kvid_catalog`` in Dagster stays what the Parquet files hold: each publication by the status
sensor or a run that Dagster does not show yet becomes a runless materialization with the files'
row count and ledger revision, and only those (a real instance, the emulator)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
from conftest import TEST_API_KEY, EmulatorFactory
from dagster import AssetKey, DagsterInstance, EventLogRecord
from dagster.components.testing import create_defs_folder_sandbox
from faultkit import (
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    tick_until_settled,
    write_table,
)

from kvid_dagster import KvidVideosComponent
from kvid_dagster.cli.runner import evaluate_status_sensor
from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import CATALOG_JOB
from kvid_dagster.ledger import Ledger
from kvid_dagster.ledger.publish import published_revision

CATALOG = AssetKey("kvid_catalog")
SENSOR = "kvid_status_sensor"


def catalog_records(instance: DagsterInstance, key: AssetKey = CATALOG) -> list[EventLogRecord]:
    """Every materialization of the catalog, newest first."""
    return list(instance.fetch_materializations(key, limit=1000).records)


def shown(record: EventLogRecord) -> dict[str, Any]:
    materialization = record.asset_materialization
    assert materialization is not None
    return {name: value.value for name, value in materialization.metadata.items()}


def assert_shows_the_files(instance: DagsterInstance, catalog_dir: Path) -> dict[str, Any]:
    """The latest materialization of the catalog shows what its Parquet files hold."""
    records = catalog_records(instance)
    assert records, "kvid_catalog was never materialized"
    latest = shown(records[0])
    files = pd.read_parquet(catalog_dir / "videos")
    assert latest["dagster/row_count"] == len(files)
    assert latest["ledger_revision"] == published_revision(catalog_dir / "videos" / "data.parquet")
    for status, count in files["status"].value_counts().items():
        assert latest[f"status_{str(status).lower()}"] == count
    return latest


def test_the_catalog_shows_the_parquets_rows_after_each_run_and_tick_that_changed_them(
    tmp_path: Path, emulator_factory: EmulatorFactory
) -> None:
    emulator = emulator_factory()
    prompts = write_table(tmp_path / "prompts.csv", ["a", "b"])
    data_dir = tmp_path / "data"
    catalog_dir = data_dir / "catalog"
    defs = make_defs(emulator.base_url, prompts, data_dir)
    ledger = Ledger.for_data_dir(data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)  # registering the rows republished: 2 PENDING
        assert assert_shows_the_files(instance, catalog_dir)["status_pending"] == 2
        assert run_submit(defs, instance, "a", "b")
        assert assert_shows_the_files(instance, catalog_dir)["status_submitted"] == 2
        tick_until_settled(defs, instance, ledger)
        assert assert_shows_the_files(instance, catalog_dir)["status_completed"] == 2
        reported = len(catalog_records(instance))

        # ticks that change nothing say nothing, nor do runs that change nothing (the table
        # read again, every partition's job there already)
        cursor = None
        for _ in range(2):
            _, cursor = evaluate_status_sensor(defs, instance, cursor, SENSOR)
        assert run_prompts(defs, instance) and run_submit(defs, instance, "a", "b")
        for _ in range(2):
            _, cursor = evaluate_status_sensor(defs, instance, cursor, SENSOR)
        assert len(catalog_records(instance)) == reported

        # a new row (the UI showed 6 rows while the Parquet had 7): each step shows it
        write_table(prompts, ["a", "b", "c"])
        assert run_prompts(defs, instance)
        assert assert_shows_the_files(instance, catalog_dir)["dagster/row_count"] == 3
        assert run_submit(defs, instance, "c", "c")
        before = len(catalog_records(instance))
        tick_until_settled(defs, instance, ledger)
        latest = assert_shows_the_files(instance, catalog_dir)
        assert latest["status_completed"] == 3  # the tick that completed c said so
        assert len(catalog_records(instance)) > before

        # kvid_catalog's own materialization has the contact sheet; a later runless one
        # carries it on (it is made from videos, which a tick does not decode again)
        assert defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance).success
        sheet = shown(catalog_records(instance)[0])["contact_sheet"]
        assert "as of" in sheet
        write_table(prompts, ["a", "b", "c", "d"])
        assert run_prompts(defs, instance)
        latest = assert_shows_the_files(instance, catalog_dir)
        assert latest["dagster/row_count"] == 4 and latest["contact_sheet"] == sheet


def test_a_catalog_published_unseen_is_shown_by_the_next_tick_once(
    tmp_path: Path, emulator_factory: EmulatorFactory
) -> None:
    """Files Dagster never heard of (published by `kvid-dagster run` into another instance,
    or before this version): the status sensor's next tick shows them, and only once."""
    emulator = emulator_factory()
    prompts = write_table(tmp_path / "prompts.csv", ["a", "b", "c"])
    data_dir = tmp_path / "data"
    project = KvidProject(prompts, data_dir)
    with open_instance(dagster_home(tmp_path / "elsewhere")) as elsewhere:
        defs = make_defs(emulator.base_url, prompts, data_dir)
        assert run_prompts(defs, elsewhere)
    project.publish()
    defs = make_defs(emulator.base_url, prompts, data_dir)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert catalog_records(instance) == []
        _, cursor = evaluate_status_sensor(defs, instance, None, SENSOR)
        assert assert_shows_the_files(instance, data_dir / "catalog")["dagster/row_count"] == 3
        evaluate_status_sensor(defs, instance, cursor, SENSOR)
        assert len(catalog_records(instance)) == 1


def test_a_component_projects_catalog_is_materialized_once_its_files_exist(
    tmp_path: Path, emulator_factory: EmulatorFactory
) -> None:
    """Under `dg dev` the catalog showed "Never materialized" while its files existed."""
    emulator = emulator_factory()
    attributes = {"api_key": TEST_API_KEY, "base_url": emulator.base_url}
    contents = {"type": "kvid_dagster.KvidVideosComponent", "attributes": attributes}
    videos = AssetKey("kvid_videos")
    with (
        create_defs_folder_sandbox() as sandbox,
        open_instance(dagster_home(tmp_path / "home")) as instance,
    ):
        path = sandbox.scaffold_component(
            KvidVideosComponent, defs_path="videos", defs_yaml_contents=contents
        )
        with sandbox.load_component_and_build_defs(defs_path=path) as (_, defs):
            assert run_prompts(defs, instance)
            keys = instance.get_dynamic_partitions("kvid_prompts")
            assert keys and run_submit(defs, instance, keys[0], keys[-1])
            cursor = None
            deadline = time.monotonic() + 60
            while instance.get_materialized_partitions(videos) != set(keys):
                assert time.monotonic() < deadline, "the videos never finished"
                _, cursor = evaluate_status_sensor(defs, instance, cursor, SENSOR)
                time.sleep(0.15)
            records = catalog_records(instance)
            assert records
            latest = shown(records[0])
            files = pd.read_parquet(latest["videos_path"])
            assert latest["dagster/row_count"] == len(files) == len(keys)
            assert (files["status"] == "COMPLETED").all()
