"""Videos as inputs downstream: ``kvid_videos`` loaded by its IO manager, from the ledger.

- a downstream asset with the project's partitions takes its partition's ``KvidVideo`` (named
  by its parameter or by ``ins=``): the ledger's record, whose file PyAV decodes through
  ``open()``, local or on S3;
- an unpartitioned downstream takes every COMPLETED video at once, in table order, as a dict
  or (annotated ``pd.DataFrame``) a DataFrame: never the FAILED, INVALID or PENDING rows;
- a partition without a video is one ``Failure`` naming it, its status and why;
- each project's IO manager has a key of its own, the Component's translated one included;
- under ``dagster-daemon``, an ``AutomationCondition.eager()`` downstream is materialized for
  each partition after the status sensor records its video, and never for a FAILED one.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import pandas as pd
import pytest
from conftest import TEST_API_KEY, daemon_log
from dagster import (
    AssetIn,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    AssetSpec,
    DagsterInstance,
    Definitions,
    DynamicPartitionsDefinition,
    ExecuteInProcessResult,
    asset,
    define_asset_job,
)
from dagster._core.scheduler.instigation import TickStatus
from dagster._core.storage.tags import AUTOMATION_CONDITION_TAG
from faultkit import (
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    tick_until_settled,
    write_table,
)
from test_component import SAMPLE_KEYS, load_scaffolded, submit_all

from kvid_dagster import KvidVideo, KvidVideoIOManager
from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.emulator.server import FAIL_MARKER
from kvid_dagster.io_manager import video_io_manager_key
from kvid_dagster.ledger import Ledger, VideoRow, VideoStatus
from kvid_dagster.media.videos import VIDEO_TABLE_COLUMNS
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.resources import KvidResource
from kvid_dagster.translator import KvidAssetProps, KvidTranslator

VIDEOS = AssetKey("kvid_videos")
PARTITIONS = DynamicPartitionsDefinition(name="kvid_prompts")  # the default project's
# table order is not key order (nor, with six of them, likely a set's)
CAMPAIGNS = {
    "zulu": "spring",
    "alpha": "summer",
    "yankee": "autumn",
    "bravo": "winter",
    "xray": "spring",
    "charlie": "summer",
}
TABLE = (
    "prompt_id,prompt,resolution,num_frames,campaign\n"
    + "".join(f"{key},A quiet harbour {key},480p,81,{c}\n" for key, c in CAMPAIGNS.items())
    + f"bad,A doomed shot {FAIL_MARKER},480p,81,autumn\n"
    + "broken,A scene too large,9000p,81,winter\n"
    + "mike,A slow train at night,480p,81,\n"
)
STATUSES = {
    **dict.fromkeys(CAMPAIGNS, VideoStatus.COMPLETED),
    "bad": VideoStatus.FAILED,
    "broken": VideoStatus.INVALID,
    "mike": VideoStatus.PENDING,  # never submitted
}


@contextlib.contextmanager
def settled(
    emulator: KvidEmulator,
    tmp_path: Path,
    *,
    database_url: str | None = None,
    storage_url: str | None = None,
) -> Iterator[tuple[Definitions, DagsterInstance, Ledger]]:
    """:data:`TABLE` registered, ``zulu``..``bad`` submitted and settled (``mike`` never
    sent): the kvid definitions, the instance and the ledger."""
    table = tmp_path / "p.csv"
    table.write_text(TABLE, encoding="utf-8")
    data_dir = tmp_path / "data"
    defs = make_defs(
        emulator.base_url, table, data_dir, database_url=database_url, storage_url=storage_url
    )
    ledger = KvidProject(table, data_dir, database_url=database_url).ledger()
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "zulu", "bad")
        tick_until_settled(defs, instance, ledger)
        assert {r.partition_key: r.status for r in ledger.rows()} == STATUSES
        yield defs, instance, ledger


def materialize(
    kvid: Definitions,
    instance: DagsterInstance,
    *assets: AssetsDefinition,
    partition_key: str | None = None,
) -> ExecuteInProcessResult:
    """A run of the downstream ``assets`` beside the kvid definitions (their resources)."""
    job = define_asset_job("downstream", selection=[a.key for a in assets])
    defs = Definitions.merge(kvid, Definitions(assets=list(assets), jobs=[job]))
    return defs.resolve_job_def("downstream").execute_in_process(
        instance=instance, partition_key=partition_key, raise_on_error=False
    )


def decoded(video: KvidVideo) -> tuple[str, int, tuple[int, int]]:
    """(sha256 of what ``open()`` reads, frames PyAV decodes from it, the first one's size)."""
    with video.open() as file:
        digest = hashlib.sha256(file.read()).hexdigest()
        file.seek(0)
        with av.open(file) as container:
            sizes = [(frame.width, frame.height) for frame in container.decode(video=0)]
    return digest, len(sizes), sizes[0]


def row_of(ledger: Ledger, key: str) -> VideoRow:
    row = ledger.row(key)
    assert row is not None, key
    return row


def expected_video(ledger: Ledger, key: str) -> KvidVideo:
    """The record the ledger's row says, field by field."""
    row = row_of(ledger, key)
    video = row.video
    assert row.request_id and video.local_path and video.sha256
    assert video.width and video.height and video.fps and video.num_frames and video.duration_s
    return KvidVideo(
        partition_key=key,
        request_id=row.request_id,
        uri=video.local_path,
        width=video.width,
        height=video.height,
        fps=video.fps,
        num_frames=video.num_frames,
        duration_s=video.duration_s,
        sha256=video.sha256,
        size_kb=video.size_kb,
        prompt=str(row.prompt),
        model="v1",
        job_kind="text-to-video",
        user_columns={"campaign": CAMPAIGNS[key]},
    )


def failure_of(result: ExecuteInProcessResult) -> Any:
    """The one step failure of the run: a ``Failure``'s, not a stack trace of ours."""
    [event] = [e for e in result.all_events if e.is_step_failure]
    assert event.step_failure_data.error.cls_name == "Failure"
    failure = event.step_failure_data.user_failure_data
    assert failure is not None
    return failure


def partitioned_downstreams() -> tuple[list[AssetsDefinition], dict[str, dict[str, Any]]]:
    """``poster`` (the parameter names the asset) and ``thumbnail`` (``ins=``, unannotated),
    and what each received, by asset name."""
    seen: dict[str, dict[str, Any]] = {"poster": {}, "thumbnail": {}}

    @asset(partitions_def=PARTITIONS)
    def poster(context, kvid_videos: KvidVideo) -> None:  # a string annotation Dagster refuses
        seen["poster"][context.partition_key] = (kvid_videos, decoded(kvid_videos))

    @asset(partitions_def=PARTITIONS, ins={"clip": AssetIn(VIDEOS)})
    def thumbnail(context, clip: Any) -> None:
        seen["thumbnail"][context.partition_key] = clip

    return [poster, thumbnail], seen


# ---------------------------------------------------------------------------------------------
# one video per partition


def test_a_partitioned_downstream_gets_its_video_as_the_ledger_records_it_and_decodes_it(
    emulator: KvidEmulator, tmp_path: Path, database_url: str
) -> None:
    with settled(emulator, tmp_path, database_url=database_url) as (kvid, instance, ledger):
        downstreams, seen = partitioned_downstreams()
        for key in ["zulu", "alpha"]:
            assert materialize(kvid, instance, *downstreams, partition_key=key).success
            video, (digest, frames, size) = seen["poster"][key]
            assert video == expected_video(ledger, key)
            assert seen["thumbnail"][key] == video
            assert Path(video.uri).is_file()
            assert Path(video.uri).parent == tmp_path / "data" / "videos"
            # the file's own facts: what open() reads is the verified download
            assert digest == video.sha256
            assert frames == video.num_frames > 0
            assert size == (video.width, video.height)
        assert instance.get_materialized_partitions(AssetKey("poster")) == {"zulu", "alpha"}


def test_a_partitioned_downstream_opens_its_video_from_s3(
    s3: Any, bucket: str, emulator: KvidEmulator, tmp_path: Path
) -> None:
    storage_url = f"s3://{bucket}/kvid"
    with settled(emulator, tmp_path, storage_url=storage_url) as (kvid, instance, ledger):
        downstreams, seen = partitioned_downstreams()
        assert materialize(kvid, instance, *downstreams, partition_key="alpha").success
        video, (digest, frames, size) = seen["poster"]["alpha"]
    assert video == expected_video(ledger, "alpha")
    assert video.uri.startswith(f"{storage_url}/videos/") and video.uri.endswith(".mp4")
    assert list((tmp_path / "data").rglob("*.mp4")) == []  # read from the bucket, not a copy
    assert digest == video.sha256
    assert frames == video.num_frames > 0
    assert size == (video.width, video.height)


def test_a_partition_without_a_video_is_one_failure_naming_it_its_status_and_why(
    emulator: KvidEmulator, tmp_path: Path, database_url: str
) -> None:
    with settled(emulator, tmp_path, database_url=database_url) as (kvid, instance, ledger):
        downstreams, seen = partitioned_downstreams()
        service_said = str(row_of(ledger, "bad").error)
        assert FAIL_MARKER in service_said
        for key, status, reason in [
            ("bad", "FAILED", service_said),
            ("mike", "PENDING", "no job was submitted for its request yet"),
        ]:
            result = materialize(kvid, instance, downstreams[0], partition_key=key)
            assert not result.success
            failure = failure_of(result)
            assert failure.description == (
                f"kvid_videos: partition {key!r} has no video ({status}): {reason}"
            )
            assert failure.metadata["status"].value == status
            assert failure.metadata["partition_key"].value == key
        assert seen["poster"] == {}  # the asset's body never ran


def test_a_completed_video_that_was_not_kept_is_a_failure_saying_so(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """``download=False`` keeps only the service's result URL: there is no file to hand out,
    to a partitioned downstream or to one that takes every video."""
    table = write_table(tmp_path / "p.csv", ["solo"])
    defs = make_defs(
        emulator.base_url,
        table,
        tmp_path / "data",
        status_sensor=StatusSensorOptions(download=False),
    )
    ledger = KvidProject(table, tmp_path / "data").ledger()
    downstreams, _ = partitioned_downstreams()

    @asset(ins={"videos": AssetIn(VIDEOS)})
    def every(videos: dict[str, KvidVideo]) -> None:
        raise AssertionError("never called")

    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "solo", "solo")
        tick_until_settled(defs, instance, ledger)
        row = row_of(ledger, "solo")
        assert row.status is VideoStatus.COMPLETED and row.video.local_path is None
        expected = (
            "kvid_videos: partition 'solo' has no video (COMPLETED): its video was not kept "
            f"(the status sensor's download=False); the service's result URL was {row.video.url}"
        )
        for asset_def, partition_key in [(downstreams[0], "solo"), (every, None)]:
            result = materialize(defs, instance, asset_def, partition_key=partition_key)
            assert failure_of(result).description == expected


# ---------------------------------------------------------------------------------------------
# every video at once


def test_an_unpartitioned_downstream_gets_every_completed_video_as_a_dict_or_a_dataframe(
    emulator: KvidEmulator, tmp_path: Path, database_url: str
) -> None:
    got: dict[str, Any] = {}

    @asset(ins={"videos": AssetIn(VIDEOS)})
    def mapping(videos: dict[str, KvidVideo]) -> None:
        got["dict"] = videos

    @asset
    def unannotated(kvid_videos) -> None:  # type: ignore[no-untyped-def]  # Any, on purpose
        got["plain"] = kvid_videos

    @asset(ins={"videos": AssetIn(VIDEOS)})
    def frame(videos: pd.DataFrame) -> None:
        got["frame"] = videos

    @asset(ins={"videos": AssetIn(VIDEOS)})
    def one(videos: KvidVideo) -> None:
        raise AssertionError("never called")

    with settled(emulator, tmp_path, database_url=database_url) as (kvid, instance, ledger):
        assert materialize(kvid, instance, mapping, unannotated, frame).success
        expected = {key: expected_video(ledger, key) for key in CAMPAIGNS}
        # one video asked for, every partition mapped: the user's annotation to change
        assert failure_of(materialize(kvid, instance, one)).description == (
            "input 'videos' is annotated KvidVideo but maps to 8 partitions of kvid_videos: "
            "annotate it dict[str, KvidVideo] (or pd.DataFrame) to take several"
        )
    # table order (not the keys' order); never the FAILED, INVALID or PENDING rows
    assert list(got["dict"].items()) == list(expected.items())
    assert list(got["plain"].items()) == list(expected.items())
    table = got["frame"]
    assert list(table.columns) == list(VIDEO_TABLE_COLUMNS)
    assert table["partition_key"].tolist() == list(CAMPAIGNS)
    assert table.to_dict("records") == [vars(v) for v in expected.values()]
    assert table["user_columns"].tolist() == [{"campaign": c} for c in CAMPAIGNS.values()]


def test_a_run_over_a_range_of_partitions_gets_the_ranges_completed_videos_in_table_order(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """A single-run backfill of a partitioned downstream: Dagster maps the range to a set of
    the videos' partitions; they come back in the table's order."""
    got: dict[str, KvidVideo] = {}

    @asset(partitions_def=PARTITIONS, ins={"videos": AssetIn(VIDEOS)})
    def batch(videos: dict[str, KvidVideo]) -> None:
        got.update(videos)

    with settled(emulator, tmp_path) as (kvid, instance, ledger):
        job = define_asset_job("batch_job", selection=[batch.key])
        defs = Definitions.merge(kvid, Definitions(assets=[batch], jobs=[job]))
        result = defs.resolve_job_def("batch_job").execute_in_process(
            instance=instance, tags={RANGE_START_TAG: "alpha", RANGE_END_TAG: "bad"}
        )
        assert result.success
        in_range = ["alpha", "yankee", "bravo", "xray", "charlie"]  # not zulu; bad FAILED
        assert list(got.items()) == [(key, expected_video(ledger, key)) for key in in_range]


def test_an_input_annotated_as_a_dict_gets_a_dict_even_for_one_partition(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """The annotation decides, not how many partitions the run maps to: a daily downstream
    taking every video (examples/content_pipeline's publish) gets a dict on the day the table
    has one row, and a partitioned one a dict of its own video."""
    got: dict[str, Any] = {}

    @asset(partitions_def=PARTITIONS, ins={"videos": AssetIn(VIDEOS)})
    def batch(videos: dict[str, KvidVideo]) -> None:
        got["batch"] = videos

    with settled(emulator, tmp_path) as (kvid, instance, ledger):
        assert materialize(kvid, instance, batch, partition_key="alpha").success
        assert got["batch"] == {"alpha": expected_video(ledger, "alpha")}


# ---------------------------------------------------------------------------------------------
# the keys: one IO manager per project


class Prefixed(KvidTranslator):
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def get_asset_spec(self, props: KvidAssetProps) -> AssetSpec:
        spec = super().get_asset_spec(props)
        return spec.replace_attributes(key=spec.key.with_prefix(self.prefix))


def videos_spec(defs: Definitions, key: AssetKey) -> AssetSpec:
    return {spec.key: spec for spec in defs.resolve_all_asset_specs()}[key]


def test_each_project_has_its_own_video_io_manager_and_outputs_are_refused(
    tmp_path: Path,
) -> None:
    resource = KvidResource(api_key=TEST_API_KEY, base_url="http://127.0.0.1:9")
    built = {}
    for name in ("ads", "news"):
        project = KvidProject(
            tmp_path / f"{name}.csv", tmp_path / name, partitions_name=f"{name}_prompts"
        )
        defs = build_kvid_definitions(project, resource=resource, translator=Prefixed(name))
        key = video_io_manager_key(AssetKey([name, "kvid_videos"]))
        spec = videos_spec(defs, AssetKey([name, "kvid_videos"]))
        assert spec.metadata["dagster/io_manager_key"] == key
        manager = defs.resources[key]
        assert isinstance(manager, KvidVideoIOManager) and manager.project is project
        built[name] = key
    assert built == {"ads": "ads__kvid_videos_io_manager", "news": "news__kvid_videos_io_manager"}

    # a run's output is never the videos'
    defs = make_defs("http://127.0.0.1:9", tmp_path / "p.csv", tmp_path / "data")

    @asset(io_manager_key=video_io_manager_key(VIDEOS))
    def misplaced() -> int:
        return 1

    with open_instance(dagster_home(tmp_path / "home")) as instance:
        result = materialize(defs, instance, misplaced)
    assert not result.success
    assert failure_of(result).description == (
        "misplaced: the kvid video IO manager only loads kvid_videos (the status sensor "
        "records them); give this output another io_manager_key"
    )


def test_the_components_translated_videos_feed_a_downstream_asset(
    emulator: KvidEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVID_DATABASE_URL", raising=False)
    videos = AssetKey(["marketing", "kvid_videos"])
    got: dict[str, Any] = {}

    @asset(ins={"videos": AssetIn(videos)})
    def campaign(videos: dict[str, KvidVideo]) -> None:
        got.update(videos)

    attributes = {
        "api_key": TEST_API_KEY,
        "base_url": emulator.base_url,
        "translation": {"key_prefix": "marketing"},
    }
    with (
        load_scaffolded(attributes) as (_, data_dir, defs),
        open_instance(dagster_home(tmp_path / "home")) as instance,
    ):
        key = "marketing__kvid_videos_io_manager"
        assert videos_spec(defs, videos).metadata["dagster/io_manager_key"] == key
        assert isinstance(defs.resources[key], KvidVideoIOManager)
        assert submit_all(defs, instance)
        ledger = Ledger(f"sqlite:///{data_dir / 'kvid.db'}")
        tick_until_settled(defs, instance, ledger)
        assert materialize(defs, instance, campaign).success
    assert list(got) == SAMPLE_KEYS
    assert [v.request_id for v in got.values()] == [
        row_of(ledger, k).request_id for k in SAMPLE_KEYS
    ]


# ---------------------------------------------------------------------------------------------
# declarative automation, under the daemon

DAEMON_DEFINITIONS = '''
"""The status sensor and an eager downstream asset, against the test's emulator."""
import os

import av
from dagster import (
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    MaterializeResult,
    asset,
)

from kvid_dagster import KvidVideo
from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.core.project import KvidProject
from kvid_dagster.resources import KvidResource

project = KvidProject(os.environ["KVID_PROMPTS"], os.environ["KVID_DATA_DIR"])


@asset(partitions_def=project.partitions_def, automation_condition=AutomationCondition.eager())
def poster(kvid_videos: KvidVideo) -> MaterializeResult:
    with kvid_videos.open() as file, av.open(file) as container:
        frames = sum(1 for _ in container.decode(video=0))
    return MaterializeResult(metadata={"request_id": kvid_videos.request_id, "frames": frames})


def _with_poster() -> Definitions:
    kvid = build_kvid_definitions(
        project,
        resource=KvidResource(
            api_key=os.environ["KVID_API_KEY"], base_url=os.environ["KVID_BASE_URL"]
        ),
        status_sensor=StatusSensorOptions(minimum_interval_seconds=1),
    )
    return Definitions(
        assets=[*kvid.assets, poster],
        jobs=kvid.jobs,
        sensors=[
            kvid.resolve_sensor_def("kvid_status_sensor"),
            # Dagster 1.13's default automation sensor starts stopped (the UI turns it on)
            AutomationConditionSensorDefinition(
                "poster_automation",
                target=[poster],
                default_status=DefaultSensorStatus.RUNNING,
                minimum_interval_seconds=1,
            ),
        ],
        resources=kvid.resources,
        executor=kvid.executor,
    )


defs = _with_poster()
'''
POSTER = AssetKey("poster")


def latest_record(instance: DagsterInstance, key: AssetKey, partition: str) -> Any:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def automation_ticks(instance: DagsterInstance) -> list[Any]:
    for state in instance.all_instigator_state():
        if state.name == "poster_automation":
            return list(instance.get_ticks(state.instigator_origin_id, state.selector_id))
    return []


def test_under_the_daemon_an_eager_downstream_follows_each_partitions_video(
    emulator: KvidEmulator,
    tmp_path: Path,
    postgres_url: str,
    dagster_daemon: Callable[..., subprocess.Popen[bytes]],
) -> None:
    table = write_table(
        tmp_path / "p.csv",
        ["zulu", "alpha", "bad"],
        lambda key: f"A doomed shot {FAIL_MARKER}" if key == "bad" else f"A calm lake {key}",
    )
    data_dir = tmp_path / "data"
    home = dagster_home(tmp_path / "home")
    daemon = dagster_daemon(
        home,
        DAEMON_DEFINITIONS,
        prompts=table,
        data_dir=data_dir,
        base_url=emulator.base_url,
        database_url=postgres_url,
    )
    defs = make_defs(emulator.base_url, table, data_dir, database_url=postgres_url)
    ledger = KvidProject(table, data_dir, database_url=postgres_url).ledger()
    deadline = time.monotonic() + 240

    def wait(what: str, condition: Callable[[], Any]) -> Any:
        while not (found := condition()):
            assert daemon.poll() is None, daemon_log(tmp_path)
            assert time.monotonic() < deadline, f"{what}\n{daemon_log(tmp_path)}"
            time.sleep(0.2)
        return found

    with open_instance(home) as instance:
        # the daemon's sensors do the rest: the status sensor records each video, the
        # automation sensor launches the poster's runs
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "zulu", "zulu")
        wait("no poster of zulu", lambda: latest_record(instance, POSTER, "zulu"))
        assert run_submit(defs, instance, "alpha", "bad")  # partitions later than the first
        wait("no poster of alpha", lambda: latest_record(instance, POSTER, "alpha"))

        for key in ["zulu", "alpha"]:
            row = row_of(ledger, key)
            assert row.status is VideoStatus.COMPLETED
            video = latest_record(instance, VIDEOS, key)
            poster = latest_record(instance, POSTER, key)
            assert poster.storage_id > video.storage_id  # after its video
            run = instance.get_run_by_id(poster.run_id)
            assert run is not None and run.tags.get(AUTOMATION_CONDITION_TAG) == "true"
            metadata = poster.event_log_entry.asset_materialization.metadata
            assert metadata["request_id"].value == row.request_id
            assert metadata["frames"].value == row.video.num_frames > 0

        # a FAILED partition has no video: an automation tick after the failure was
        # recorded launches nothing for it
        wait("bad never failed", lambda: row_of(ledger, "bad").status is VideoStatus.FAILED)
        failed_at = time.time()
        wait(
            "no automation tick after the failure",
            lambda: any(
                t.timestamp > failed_at and t.status is not TickStatus.STARTED
                for t in automation_ticks(instance)
            ),
        )
        assert latest_record(instance, POSTER, "bad") is None
        assert instance.get_materialized_partitions(POSTER) == {"zulu", "alpha"}
    assert daemon.poll() is None, daemon_log(tmp_path)
    assert emulator.jobs_created == 3
