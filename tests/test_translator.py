"""``KvidTranslator.get_asset_spec``: the specs, and what an overriding subclass changes on the
Definitions ``build_kvid_definitions`` actually builds (the assets, check, jobs, sensors and
schedule agree on every key); and what each video's record says: the run that submitted it,
where it is kept, the service's URL as text (a real instance, the emulator)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from conftest import EmulatorFactory, fast_config
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    AssetSpec,
    DagsterInstance,
    DagsterRunMetadataValue,
    Definitions,
    EventLogEntry,
    TextMetadataValue,
    TimestampMetadataValue,
    UrlMetadataValue,
)
from faultkit import (
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    tick_until_settled,
    write_table,
)

from kvid_dagster.core.planning import PartitionRange
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.reporting import VIDEO_CHECK_NAME
from kvid_dagster.definitions import CATALOG_JOB, PROMPTS_JOB, SUBMIT_JOB, build_kvid_definitions
from kvid_dagster.ledger import Ledger, Submission, VideoFile, VideoRow, VideoStatus
from kvid_dagster.media.quality import QualityCheck
from kvid_dagster.translator import (
    ASSET_NAMES,
    SUBMITTING_RUN_KEY,
    URI_KEY,
    KvidAsset,
    KvidAssetProps,
    KvidTranslator,
)


@pytest.fixture
def project(tmp_path: Path) -> KvidProject:
    return KvidProject(write_table(tmp_path / "ads.csv", ["a", "b"]), tmp_path / "data")


def test_each_kvid_asset_has_a_spec_with_its_key_group_and_at_most_three_kinds(
    project: KvidProject,
) -> None:
    translator = KvidTranslator()
    specs = {a: translator.get_asset_spec(KvidAssetProps(a, project)) for a in KvidAsset}
    assert all(isinstance(spec, AssetSpec) for spec in specs.values())
    assert [spec.key for spec in specs.values()] == [AssetKey([n]) for n in ASSET_NAMES]
    assert {spec.group_name for spec in specs.values()} == {"kvid"}
    assert all(1 <= len(spec.kinds) <= 3 for spec in specs.values())
    assert specs[KvidAsset.VIDEOS].kinds == {"kvid", "mp4"}
    assert specs[KvidAsset.CATALOG].kinds == {"parquet"}
    prompts = specs[KvidAsset.PROMPTS]
    assert "ads.csv" in (prompts.description or "")
    assert prompts.metadata["dagster/uri"].value == project.source().uri


def test_the_older_overrides_still_make_the_spec(project: KvidProject) -> None:
    class Prefixed(KvidTranslator):
        def get_asset_key(self, name: str) -> AssetKey:
            return AssetKey(["media", name])

        def get_group_name(self) -> str:
            return "media"

    spec = Prefixed().get_asset_spec(KvidAssetProps(KvidAsset.VIDEO_JOBS, project))
    assert spec.key == AssetKey(["media", "kvid_video_jobs"]) and spec.group_name == "media"


class Studio(KvidTranslator):
    """A user's translator: its own keys, group, descriptions, owners and tags, through
    ``get_asset_spec``."""

    def get_asset_spec(self, props: KvidAssetProps) -> AssetSpec:
        spec = super().get_asset_spec(props)
        return spec.replace_attributes(
            key=AssetKey(["studio", props.asset.name.lower()]),
            group_name="studio",
            description=f"studio {props.asset.name.lower()} of "
            f"{Path(props.project.prompts_name).name}",
            owners=["team:studio"],
            tags={"cost-centre": "ads"},
        )


def test_an_overridden_spec_changes_the_built_definitions(project: KvidProject) -> None:
    defs = build_kvid_definitions(project, translator=Studio())
    Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {AssetKey(["studio", a.name.lower()]) for a in KvidAsset}
    assert graph.get_all_asset_keys() == keys
    for key in keys:
        node = graph.get(key)
        assert node.group_name == "studio"
        assert node.description == f"studio {key.path[-1]} of ads.csv"
        assert node.owners == ["team:studio"] and node.tags["cost-centre"] == "ads"
        assert 1 <= len(node.kinds) <= 3
    videos = AssetKey(["studio", "videos"])
    assert graph.get(videos).partitions_def == project.partitions_def
    assert graph.get(AssetKey(["studio", "video_jobs"])).partitions_def == project.partitions_def
    assert graph.get(videos).parent_keys == {AssetKey(["studio", "video_jobs"])}
    assert AssetCheckKey(videos, VIDEO_CHECK_NAME) in graph.asset_check_keys
    assert {AssetCheckKey(videos, check) for check in QualityCheck} <= graph.asset_check_keys
    selected = {
        name: defs.resolve_job_def(name).asset_layer.selected_asset_keys
        for name in (PROMPTS_JOB, SUBMIT_JOB, CATALOG_JOB)
    }
    assert selected == {
        PROMPTS_JOB: {AssetKey(["studio", "prompts"])},
        SUBMIT_JOB: {AssetKey(["studio", "video_jobs"])},
        CATALOG_JOB: {AssetKey(["studio", "catalog"])},
    }
    status = defs.resolve_sensor_def("kvid_status_sensor").asset_selection
    assert status is not None and status.resolve(graph) == {videos}


def test_building_the_definitions_sets_no_warning_filter(project: KvidProject) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        before = list(warnings.filters)
        defs = build_kvid_definitions(project)
        defs.resolve_job_def(SUBMIT_JOB)
        assert warnings.filters == before
    # the one beta argument kvid relies on is silenced where it is passed, and only there
    assert not [w for w in caught if "backfill_policy" in str(w.message)]


def video_record(instance: DagsterInstance, key: str) -> EventLogEntry:
    """The latest event of ``kvid_videos``' partition ``key`` (a materialization, or an
    observation of a job that ended without a video)."""
    for fetch in (instance.fetch_materializations, instance.fetch_observations):
        records = fetch(
            AssetRecordsFilter(asset_key=AssetKey("kvid_videos"), asset_partitions=[key]), limit=1
        ).records
        if records:
            return records[0].event_log_entry
    raise AssertionError(f"nothing recorded for {key}")


def submit_and_settle(base_url: str, folder: Path, key: str) -> tuple[str, Ledger, Path]:
    """``key``'s row submitted by a run and settled by status ticks; (that run's id, the
    ledger, DAGSTER_HOME)."""
    prompts = write_table(folder / "prompts.csv", [key])
    home = dagster_home(folder / "home")
    defs = make_defs(base_url, prompts, folder / "data")
    ledger = Ledger.for_data_dir(folder / "data")
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)
        result = defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
            instance=instance, tags=PartitionRange(key, key).run_tags()
        )
        assert result.success
        tick_until_settled(defs, instance, ledger)
    return result.run_id, ledger, home


def test_a_videos_record_names_its_submitting_run_and_links_the_kept_copy_not_the_service(
    tmp_path: Path, emulator_factory: EmulatorFactory
) -> None:
    emulator = emulator_factory()
    run_id, ledger, home = submit_and_settle(emulator.base_url, tmp_path, "a")
    row = ledger.row("a")
    assert row is not None and row.submission is not None and row.video.url
    with open_instance(home) as instance:
        metadata = video_record(instance, "a").asset_materialization.metadata
        # a runless event: the UI's own "Run" says None, so the record says which run it was
        submitting = metadata[SUBMITTING_RUN_KEY]
        assert isinstance(submitting, DagsterRunMetadataValue) and submitting.run_id == run_id
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.job_name == SUBMIT_JOB
        # where the video is kept is its URI; the service's URL (an emulator's port, a storage
        # link that expires) is text, with when it was fetched
        uri = metadata[URI_KEY]
        assert isinstance(uri, TextMetadataValue) and uri.value == row.video.local_path
        assert Path(uri.value).is_file()
        url = metadata["url"]
        assert isinstance(url, TextMetadataValue) and url.value == row.video.url
        assert url.value.startswith(emulator.base_url)
        fetched = metadata["url_fetched_at"]
        assert row.submission.completed_at is not None
        assert isinstance(fetched, TimestampMetadataValue)
        assert fetched.value == row.submission.completed_at.timestamp()
        assert not [k for k, v in metadata.items() if isinstance(v, UrlMetadataValue)]


def test_a_failed_jobs_observation_names_its_submitting_run(
    tmp_path: Path, emulator_factory: EmulatorFactory
) -> None:
    emulator = emulator_factory(fast_config(failure_rate=1.0))
    run_id, ledger, home = submit_and_settle(emulator.base_url, tmp_path, "a")
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.FAILED
    with open_instance(home) as instance:
        observation = video_record(instance, "a").asset_observation
        assert observation is not None
        submitting = observation.metadata[SUBMITTING_RUN_KEY]
        assert isinstance(submitting, DagsterRunMetadataValue) and submitting.run_id == run_id


def test_a_video_not_kept_has_no_uri_and_its_url_as_text(project: KvidProject) -> None:
    """``download=False``: the service's URL is all there is, and it expires: not a URI."""
    submission = Submission(
        submission_id=1, request_hash="h", attempt=1, partition_key="a", prompt="p",
        job_kind="text-to-video", model="v1", params_json="{}", status=VideoStatus.COMPLETED,
        request_id="req_1", progress=100, video=VideoFile(url="https://cdn.example/a.mp4?sig=1"),
        error=None, cost_credits=None, owner=None, claimed_at=None, heartbeat_at=None,
        submitted_at=None, completed_at=None, updated_at=None, version=1,
    )  # fmt: skip
    row = VideoRow(
        "a", "p", "text-to-video", "v1", "h", "{}", VideoStatus.COMPLETED, None, submission
    )
    metadata = KvidTranslator().get_video_metadata(row)
    assert URI_KEY not in metadata and SUBMITTING_RUN_KEY not in metadata
    assert metadata["url"] == TextMetadataValue("https://cdn.example/a.mp4?sig=1")
    assert "url_fetched_at" not in metadata  # not known
