"""The Dagster layer through a real (SQLite) Dagster instance and the emulator on a free port."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, TEST_API_KEY
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    Definitions,
    SensorResult,
    SkipReason,
    build_schedule_context,
    build_sensor_context,
    instance_for_test,
)
from faultkit import check_verdicts

from kvid_dagster.cli.runner import evaluate_status_sensor
from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.definitions import CATALOG_JOB, PROMPTS_JOB, SUBMIT_JOB, build_kvid_definitions
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    VIDEO_COLUMNS,
    VIDEO_SCHEMA,
    SubmissionEvent,
    VideoStatus,
    submissions_frame,
    videos_frame,
)
from kvid_dagster.media.probe import probe_video
from kvid_dagster.resources import KvidResource

VIDEOS = AssetKey("kvid_videos")
NOON = datetime(2026, 11, 26, 12, tzinfo=UTC)


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """A copy of the sample table and its images (relative image paths keep working)."""
    folder = tmp_path / "project"
    folder.mkdir()
    shutil.copy(REPO_ROOT / "data" / "prompts.csv", folder / "prompts.csv")
    shutil.copytree(REPO_ROOT / "data" / "images", folder / "images")
    return folder


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[DagsterInstance]:
    home = tmp_path / "dagster_home"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as instance:
        yield instance


def make_defs(emulator: KvidEmulator, prompts: Path, data_dir: Path) -> Definitions:
    resource = KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url)
    return build_kvid_definitions(KvidProject(prompts, data_dir), resource=resource)


def run_job(defs: Definitions, instance: DagsterInstance, name: str, **kwargs: object) -> bool:
    result = defs.resolve_job_def(name).execute_in_process(
        instance=instance, raise_on_error=False, **kwargs
    )
    return result.success


def range_tags(first: str, last: str) -> dict[str, str]:
    return {RANGE_START_TAG: first, RANGE_END_TAG: last}


def tick_until_done(defs: Definitions, instance: DagsterInstance, project: KvidProject) -> int:
    """Evaluate the status sensor (storing its events as the daemon does) until nothing waits."""
    cursor = None
    for ticks in range(1, 200):
        _, cursor = evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
        if not project.ledger().jobs_to_poll():
            return ticks
        time.sleep(0.2)
    raise AssertionError("jobs did not finish")


def write_table(path: Path, rows: list[str], header: str = "prompt_id,prompt,resolution") -> Path:
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_prompts_asset_adds_partitions_and_reports_invalid_rows(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    table = write_table(
        tmp_path / "prompts.csv",
        ["a,A lake at dawn,480p", "b,,480p", "c,A city at night,4k", "d,A quiet forest,480p"],
    )
    defs = make_defs(emulator, table, tmp_path / "data")
    assert run_job(defs, instance, PROMPTS_JOB)
    assert instance.get_dynamic_partitions("kvid_prompts") == ["a", "d"]
    event = instance.get_latest_materialization_event(AssetKey("kvid_prompts"))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert metadata["valid_rows"].value == 2
    assert metadata["invalid_rows"].value == 2
    assert "resolution" in metadata["invalid"].value
    rows = KvidProject(table, tmp_path / "data").ledger().rows_by_key()
    assert rows["b"].status is VideoStatus.INVALID and "prompt" in (rows["b"].error or "")
    assert rows["c"].status is VideoStatus.INVALID and "4k" in (rows["c"].error or "")
    assert rows["a"].status is VideoStatus.PENDING and rows["d"].status is VideoStatus.PENDING
    # the asset published what the ledger says for pandas to read
    published = pd.read_parquet(tmp_path / "data" / "catalog" / "videos")
    assert sorted(published["partition_key"]) == ["a", "b", "c", "d"]
    pd.testing.assert_frame_equal(
        published, videos_frame(KvidProject(table, tmp_path / "data").ledger())
    )
    assert emulator.stats.get("generate", 0) == 0  # nothing was sent


def test_the_tables_own_columns_reach_dagster_and_the_catalog_never_the_service(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    """campaign and owner are the user's: in the kvid_prompts preview, on each video's
    materialization and in catalog/videos; no generate body carries them."""
    table = write_table(
        tmp_path / "prompts.csv",
        ["a,A lake at dawn,480p,spring,ana", "b,A quiet forest,480p,,bo"],
        header="prompt_id,prompt,resolution,campaign,owner",
    )
    data_dir = tmp_path / "data"
    project = KvidProject(table, data_dir)
    defs = make_defs(emulator, table, data_dir)
    assert run_job(defs, instance, PROMPTS_JOB)
    prompts = instance.get_latest_materialization_event(AssetKey("kvid_prompts"))
    assert prompts is not None and prompts.asset_materialization is not None
    metadata = prompts.asset_materialization.metadata
    assert metadata["user_columns"].value == ["campaign", "owner"]
    assert "spring" in metadata["preview"].value and "campaign" in metadata["preview"].value
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags("a", "b"))
    tick_until_done(defs, instance, project)
    shown = {"a": {"campaign": "spring", "owner": "ana"}, "b": {"owner": "bo"}}
    for key, expected in shown.items():
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=VIDEOS, asset_partitions=[key]), limit=1
        ).records
        materialization = records[0].event_log_entry.asset_materialization
        assert materialization is not None
        assert materialization.metadata["user_columns"].value == expected
    assert not any({"campaign", "owner"} & set(job.body) for job in emulator.jobs.values())
    published = pd.read_parquet(data_dir / "catalog" / "videos").set_index("partition_key")
    assert json.loads(published.loc["a", "user_columns_json"]) == {
        "campaign": "spring", "owner": "ana",
    }  # fmt: skip


def test_single_run_submits_every_partition_and_the_sensor_materializes_each_video(
    emulator: KvidEmulator, instance: DagsterInstance, project_dir: Path
) -> None:
    prompts = project_dir / "prompts.csv"
    data_dir = project_dir / "data"
    project = KvidProject(prompts, data_dir)
    defs = make_defs(emulator, prompts, data_dir)
    table = load_prompt_table(prompts)
    keys = table.partition_keys
    assert run_job(defs, instance, PROMPTS_JOB)
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags(keys[0], keys[-1]))
    assert emulator.jobs_created == len(keys)
    assert len(instance.get_run_records()) == 2  # one run for the table, ONE for all partitions
    ledger = project.ledger()
    submitted = ledger.rows_by_key()
    assert all(submitted[k].status is VideoStatus.SUBMITTED for k in keys)
    assert all((submitted[k].request_id or "").startswith("req_") for k in keys)

    tick_until_done(defs, instance, project)
    assert instance.get_materialized_partitions(VIDEOS) == set(keys)
    done = ledger.rows_by_key()
    for row in table.rows:
        record = done[row.partition_key]
        assert record.status is VideoStatus.COMPLETED
        assert record.video.local_path is not None
        path = Path(record.video.local_path)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record.video.sha256
        probe = probe_video(path)
        width, height, fps, frames = row.request.output_geometry(
            image_size=_image_size(row) if row.request.job_kind == "image-to-video" else None
        )
        assert (probe.width, probe.height, probe.num_frames) == (width, height, frames)
        assert probe.fps == pytest.approx(fps)
        video = record.video
        assert (video.width, video.height, video.num_frames) == (width, height, frames)
        # measured against its request, aspect ratio auto by its image beside the table
        quality = video.quality
        assert quality is not None, row.partition_key
        assert (quality.expected_width, quality.expected_height) == (width, height)
        assert quality.matches_request and quality.not_blank and quality.not_frozen
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=VIDEOS, asset_partitions=[row.partition_key]), limit=1
        ).records
        materialization = records[0].event_log_entry.asset_materialization
        assert materialization is not None and materialization.partition == row.partition_key
        metadata = materialization.metadata
        assert metadata["request_id"].value == record.request_id
        assert metadata["width"].value == width and metadata["num_frames"].value == frames
        assert metadata["url"].value.startswith(emulator.base_url)
        assert metadata["sha256"].value == video.sha256
        assert metadata["elapsed_s"].value > 0

    # kvid_catalog republishes from the ledger, with Dagster's standard table metadata
    assert run_job(defs, instance, CATALOG_JOB)
    event = instance.get_latest_materialization_event(AssetKey("kvid_catalog"))
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert metadata["dagster/row_count"].value == len(keys)
    schema = metadata["dagster/column_schema"].value
    assert [c.name for c in schema.columns] == list(VIDEO_COLUMNS)
    assert [c.type for c in schema.columns] == [str(f.type) for f in VIDEO_SCHEMA]
    assert metadata["status_completed"].value == len(keys)
    for check in ("video_ok", "matches_request", "not_blank", "not_frozen"):
        assert check_verdicts(instance, keys, check) == dict.fromkeys(keys, True), check
    assert metadata["ledger_revision"].value == ledger.revision()
    published = pd.read_parquet(project_dir / "data" / "catalog" / "videos")
    pd.testing.assert_frame_equal(published, videos_frame(ledger))
    assert (published["status"] == "COMPLETED").all()
    history = pd.read_parquet(project_dir / "data" / "catalog" / "submissions")
    assert metadata["submission_events"].value == len(history)
    assert (history["event"] == SubmissionEvent.COMPLETED).sum() == len(keys)


def _image_size(row: object) -> tuple[int, int]:
    import av

    image = row.params["image"]  # type: ignore[attr-defined]
    path = REPO_ROOT / "data" / image
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        return frame.width, frame.height


def test_rematerializing_does_not_submit_again_unless_forced(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    table = write_table(tmp_path / "p.csv", [f"k{i},A calm scene {i},480p" for i in range(4)])
    defs = make_defs(emulator, table, tmp_path / "data")
    assert run_job(defs, instance, PROMPTS_JOB)
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags("k0", "k3"))
    assert emulator.jobs_created == 4
    # the same range again, and an overlapping one, and a single partition
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags("k0", "k3"))
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags("k2", "k3"))
    assert run_job(defs, instance, SUBMIT_JOB, partition_key="k1")
    assert emulator.jobs_created == 4
    history = submissions_frame(KvidProject(table, tmp_path / "data").ledger())
    assert (history["event"] == SubmissionEvent.SUBMITTED).sum() == 4
    # forcing is an explicit, separate choice
    forced = {"ops": {"kvid_video_jobs": {"config": {"force": True}}}}
    assert run_job(defs, instance, SUBMIT_JOB, partition_key="k1", run_config=forced)
    assert emulator.jobs_created == 5


def test_a_failed_job_is_recorded_with_its_reason_and_shown_in_dagster(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    table = write_table(
        tmp_path / "p.csv", ["good,A bright meadow,480p", "bad,A doomed shot [[kvid:fail]],480p"]
    )
    data_dir = tmp_path / "data"
    project = KvidProject(table, data_dir)
    defs = make_defs(emulator, table, data_dir)
    assert run_job(defs, instance, PROMPTS_JOB)
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags("good", "bad"))
    tick_until_done(defs, instance, project)
    rows = project.ledger().rows_by_key()
    assert rows["good"].status is VideoStatus.COMPLETED
    assert rows["bad"].status is VideoStatus.FAILED and "kvid:fail" in (rows["bad"].error or "")
    assert instance.get_materialized_partitions(VIDEOS) == {"good"}
    observations = instance.fetch_observations(VIDEOS, limit=10).records
    observed = [r.event_log_entry.asset_observation for r in observations]
    assert [o.partition for o in observed if o is not None] == ["bad"]
    assert observed[0] is not None and "kvid:fail" in observed[0].metadata["reason"].value
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(VIDEOS, "video_ok"), limit=10
    )
    verdicts = {}
    for record in history:
        evaluation = record.evaluation
        assert evaluation is not None
        verdicts[evaluation.partition] = evaluation.passed
    assert verdicts == {"good": True, "bad": False}


def test_schedule_requests_one_run_per_range_of_partitions_without_a_job(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    table = write_table(tmp_path / "p.csv", [f"k{i},Scene {i},480p" for i in range(6)])
    defs = make_defs(emulator, table, tmp_path / "data")
    assert run_job(defs, instance, PROMPTS_JOB)
    schedule = defs.resolve_schedule_def("kvid_daily_schedule")
    requests = schedule.evaluate_tick(
        build_schedule_context(instance=instance, scheduled_execution_time=NOON)
    ).run_requests
    assert [r.tags[RANGE_START_TAG] + ".." + r.tags[RANGE_END_TAG] for r in requests or []] == [
        "k0..k5"
    ]
    assert run_job(defs, instance, SUBMIT_JOB, tags=range_tags("k2", "k3"))
    requests = schedule.evaluate_tick(
        build_schedule_context(instance=instance, scheduled_execution_time=NOON)
    ).run_requests
    assert [r.tags[RANGE_START_TAG] + ".." + r.tags[RANGE_END_TAG] for r in requests or []] == [
        "k0..k1",
        "k4..k5",
    ]
    assert all(r.asset_selection == [AssetKey("kvid_video_jobs")] for r in requests or [])


def test_prompts_sensor_adds_new_rows_as_partitions_and_requests_their_runs(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    table = write_table(tmp_path / "p.csv", ["a,First,480p", "b,Second,480p"])
    defs = make_defs(emulator, table, tmp_path / "data")
    sensor = defs.resolve_sensor_def("kvid_prompts_sensor")

    def evaluate(cursor: str | None) -> SensorResult | SkipReason:
        with build_sensor_context(instance=instance, cursor=cursor, definitions=defs) as ctx:
            return sensor(ctx)

    first = evaluate(None)
    assert isinstance(first, SensorResult)
    assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["a", "b"]]
    ranges = [(r.tags.get(RANGE_START_TAG), r.tags.get(RANGE_END_TAG)) for r in first.run_requests]
    assert ("a", "b") in ranges
    instance.add_dynamic_partitions("kvid_prompts", ["a", "b"])
    assert isinstance(evaluate(first.cursor), SkipReason)  # unchanged table: nothing to do
    with table.open("a", encoding="utf-8") as handle:
        handle.write("c,Third,480p\n")
    second = evaluate(first.cursor)
    assert isinstance(second, SensorResult)
    assert [r.partition_keys for r in second.dynamic_partitions_requests] == [["c"]]
    ranges = [(r.tags.get(RANGE_START_TAG), r.tags.get(RANGE_END_TAG)) for r in second.run_requests]
    assert ("a", "c") in ranges  # none has a job yet: a, b and the new c, one contiguous run


def test_backfill_through_dagsters_backfill_daemon_is_one_run(
    emulator: KvidEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backfill of 40 partitions, launched the way the UI does, runs as ONE run."""
    from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
    from dagster._core.test_utils import create_test_daemon_workspace_context
    from dagster._core.workspace.load_target import PythonFileTarget
    from dagster._daemon.backfill import execute_backfill_iteration

    keys = [f"row-{i:03d}" for i in range(40)]
    table = write_table(tmp_path / "p.csv", [f"{k},Scene {k},480p" for k in keys])
    data_dir = tmp_path / "data"
    for name, value in {
        "KVID_PROMPTS": str(table),
        "KVID_DATA_DIR": str(data_dir),
        "KVID_BASE_URL": emulator.base_url,
        "KVID_API_KEY": TEST_API_KEY,
    }.items():
        monkeypatch.setenv(name, value)
    target = PythonFileTarget(
        python_file=str(REPO_ROOT / "definitions.py"),
        attribute="defs",
        working_directory=str(REPO_ROOT),
        location_name="kvid_dagster",
    )
    (tmp_path / "home").mkdir()
    with (
        instance_for_test(
            temp_dir=str(tmp_path / "home"),
            synchronous_run_coordinator=True,
            synchronous_run_launcher=True,
        ) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        instance.add_dynamic_partitions("kvid_prompts", keys)
        backfill = PartitionBackfill.from_asset_partitions(
            backfill_id="kvidtest",
            asset_graph=workspace.create_request_context().asset_graph,
            partition_names=keys,
            asset_selection=[AssetKey("kvid_video_jobs")],
            backfill_timestamp=time.time(),
            tags={},
            dynamic_partitions_store=instance,
            all_partitions=False,
            title=None,
            description=None,
            run_config=None,
        )
        instance.add_backfill(backfill)
        for _ in range(20):
            list(execute_backfill_iteration(workspace, logging.getLogger("test.backfill")))
            status = instance.get_backfill("kvidtest").status  # type: ignore[union-attr]
            if status == BulkActionStatus.COMPLETED_SUCCESS:
                break
        assert status == BulkActionStatus.COMPLETED_SUCCESS
        runs = instance.get_run_records()
        assert len(runs) == 1
        assert runs[0].dagster_run.tags.get("dagster/backfill") == "kvidtest"
        assert instance.get_materialized_partitions(AssetKey("kvid_video_jobs")) == set(keys)
    assert emulator.jobs_created == 40
    ledger = KvidProject(table, data_dir).ledger()
    # every paid job is in the money record with its request_id, once per partition
    submissions = ledger.submissions()
    assert sorted(s.partition_key for s in submissions) == keys
    assert all(s.status is VideoStatus.SUBMITTED for s in submissions)
    assert {s.request_id for s in submissions} == set(emulator.jobs)
    # kvid_prompts never ran here (the backfill selects kvid_video_jobs only): the
    # submission run registered the rows it submitted
    rows = ledger.rows()
    assert [r.partition_key for r in rows] == keys
    assert all(r.status is VideoStatus.SUBMITTED and r.request_id for r in rows)
    assert {r.request_id for r in rows} == set(emulator.jobs)


def test_kvid_dagster_run_end_to_end_on_the_sample_table(project_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    data_dir = project_dir / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "kvid_dagster.cli", "run", "--prompts",
         str(project_dir / "prompts.csv"), "--data-dir", str(data_dir), "--poll-interval", "0.3"],
        env=env, capture_output=True, text=True, timeout=240, cwd=project_dir,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "embedded emulator" in completed.stderr
    catalog = pd.read_parquet(data_dir / "catalog" / "videos")
    assert len(catalog) == 6 and (catalog["status"] == "COMPLETED").all()
    for record in catalog.to_dict(orient="records"):
        assert Path(record["local_path"]).is_file()
        assert (
            record["local_path"] in completed.stdout or record["partition_key"] in completed.stdout
        )
    history = pd.read_parquet(data_dir / "catalog" / "submissions")
    assert (history["event"] == "SUBMITTED").sum() == 6
    # the Dagster history is in the data dir's instance, for `dagster dev` to show later
    assert (data_dir / "dagster_home" / "dagster.yaml").is_file()
    instance = DagsterInstance.from_config(str(data_dir / "dagster_home"))
    try:
        assert instance.get_materialized_partitions(VIDEOS) == set(catalog["partition_key"])
    finally:
        instance.dispose()


def test_kvid_dagster_run_talks_to_the_configured_service_and_starts_nothing(
    emulator: KvidEmulator, project_dir: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    env.update(KVID_BASE_URL=emulator.base_url, KVID_API_KEY=TEST_API_KEY)
    completed = subprocess.run(
        [sys.executable, "-m", "kvid_dagster.cli", "run", "--prompts",
         str(project_dir / "prompts.csv"), "--data-dir", str(project_dir / "out"),
         "--poll-interval", "0.3"],
        env=env, capture_output=True, text=True, timeout=240, cwd=project_dir,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "embedded emulator" not in completed.stderr
    assert emulator.base_url in completed.stderr
    assert emulator.jobs_created == 6  # the jobs went to the service we configured
    assert TEST_API_KEY not in completed.stdout + completed.stderr


def test_materializing_inside_a_running_event_loop_works(
    emulator: KvidEmulator, instance: DagsterInstance, tmp_path: Path
) -> None:
    """A notebook (or an in-process daemon iteration) already runs an event loop: submitting
    and polling must not trip over asyncio.run's refusal to nest."""
    import asyncio

    table = write_table(tmp_path / "p.csv", ["n1,A notebook scene,480p"])
    data_dir = tmp_path / "data"
    defs = make_defs(emulator, table, data_dir)

    async def notebook_cell() -> None:
        assert run_job(defs, instance, PROMPTS_JOB)
        assert run_job(defs, instance, SUBMIT_JOB, partition_key="n1")
        tick_until_done(defs, instance, KvidProject(table, data_dir))

    asyncio.run(notebook_cell())
    assert emulator.jobs_created == 1
    assert instance.get_materialized_partitions(VIDEOS) == {"n1"}
