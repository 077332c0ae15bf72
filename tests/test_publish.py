"""The published Parquet catalogs follow the ledger.

- a status tick that completes a row publishes it: ``pd.read_parquet(<data_dir>/catalog/...)``
  shows it right after that tick, with no ``kvid_catalog`` materialization (in process, and
  under a real ``dagster-daemon``);
- a row edited A -> B -> A through Dagster costs two jobs, not three; B's job is still polled
  to its video, and the row's video is A's first one again;
- publishing is atomic and idempotent: a reader never sees part of a file or a mix of two
  ledger states, and the last publication is the ledger's revision.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import daemon_log
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance
from faultkit import (
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    table_rows,
    tick_until_settled,
    write_table,
)

from kvid_dagster.cli.runner import evaluate_status_sensor
from kvid_dagster.core.project import KvidProject
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    SUBMISSION_COLUMNS,
    VIDEO_COLUMNS,
    ClaimOwner,
    JobChange,
    Ledger,
    Submission,
    SubmissionEvent,
    VideoFile,
    VideoStatus,
    publish,
    submissions_frame,
    videos_frame,
)
from kvid_dagster.ledger.publish import DATA_FILE, REVISION_KEY, published_revision

STATUS_SENSOR = "kvid_status_sensor"
VIDEOS = AssetKey("kvid_videos")
CATALOG = AssetKey("kvid_catalog")


def catalog_file(data_dir: Path, table: str) -> Path:
    return data_dir / "catalog" / table / DATA_FILE


def read_catalog(data_dir: Path, table: str) -> pd.DataFrame:
    """What a user reads: the published folder, through pandas."""
    return pd.read_parquet(data_dir / "catalog" / table)


def latest_materialization(instance: DagsterInstance, key: str) -> dict[str, Any]:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=VIDEOS, asset_partitions=[key]), limit=1
    ).records
    assert records, f"{key} was never materialized"
    materialization = records[0].event_log_entry.asset_materialization
    assert materialization is not None
    return {name: value.value for name, value in materialization.metadata.items()}


def assert_row_published_complete(data_dir: Path, key: str, ledger: Ledger) -> None:
    """The row is COMPLETED in ``catalog/videos`` with its request_id and video, and its job's
    SUBMITTED and COMPLETED events are in ``catalog/submissions``."""
    row = ledger.row(key)
    assert row is not None and row.status is VideoStatus.COMPLETED
    assert row.request_id and row.video.local_path
    videos = read_catalog(data_dir, "videos").set_index("partition_key")
    assert videos.loc[key, "status"] == "COMPLETED"
    assert videos.loc[key, "request_id"] == row.request_id
    assert videos.loc[key, "local_path"] == row.video.local_path
    assert Path(videos.loc[key, "local_path"]).is_file()
    history = read_catalog(data_dir, "submissions")
    mine = history[(history["partition_key"] == key) & (history["request_id"] == row.request_id)]
    assert {SubmissionEvent.SUBMITTED, SubmissionEvent.COMPLETED} <= set(mine["event"])


# ---------------------------------------------------------------------------------------------
# a completing tick publishes


def test_a_row_completed_by_a_status_tick_is_published_by_that_tick(
    emulator: KvidEmulator, tmp_path: Path, database_url: str
) -> None:
    table = write_table(tmp_path / "p.csv", ["first"])
    data_dir = tmp_path / "data"
    defs = make_defs(emulator.base_url, table, data_dir, database_url=database_url)
    ledger = KvidProject(table, data_dir, database_url=database_url).ledger()
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "first", "first")
        tick_until_settled(defs, instance, ledger)

        write_table(table, ["first", "second"])  # a row added to the table
        assert run_prompts(defs, instance)
        added = read_catalog(data_dir, "videos").set_index("partition_key")
        assert added.loc["second", "status"] == "PENDING"  # kvid_prompts published the row
        assert run_submit(defs, instance, "second", "second")
        cursor = None
        for _ in range(100):
            _, cursor = evaluate_status_sensor(defs, instance, cursor, STATUS_SENSOR)
            # after every tick, what pandas reads is the ledger (a tick that changed nothing
            # publishes nothing, and nothing else changed it)
            assert published_revision(catalog_file(data_dir, "videos")) == ledger.revision()
            pd.testing.assert_frame_equal(read_catalog(data_dir, "videos"), videos_frame(ledger))
            row = ledger.row("second")
            assert row is not None
            if row.status is VideoStatus.COMPLETED:
                break
            assert row.status.needs_polling, row
            time.sleep(0.1)
        else:
            raise AssertionError("the job of 'second' never completed")
        assert_row_published_complete(data_dir, "second", ledger)
        assert_row_published_complete(data_dir, "first", ledger)
        # no kvid_catalog run did it: the tick published, and said so (runless)
        event = instance.get_latest_materialization_event(CATALOG)
        assert event is not None and not event.run_id
        assert latest_materialization(instance, "second")["request_id"] == row.request_id
    assert emulator.jobs_created == 2


DAEMON_DEFINITIONS = '''
"""Only the status sensor (evaluated every daemon loop), against the test's emulator."""
import os

from dagster import Definitions

from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.core.project import KvidProject
from kvid_dagster.resources import KvidResource



def _status_sensor_only() -> Definitions:
    every = build_kvid_definitions(
        KvidProject(os.environ["KVID_PROMPTS"], os.environ["KVID_DATA_DIR"]),
        resource=KvidResource(
            api_key=os.environ["KVID_API_KEY"], base_url=os.environ["KVID_BASE_URL"]
        ),
        status_sensor=StatusSensorOptions(minimum_interval_seconds=1),
    )
    return Definitions(
        assets=every.assets,
        jobs=every.jobs,
        sensors=[every.resolve_sensor_def("kvid_status_sensor")],
        resources=every.resources,
        executor=every.executor,
    )


defs = _status_sensor_only()
'''


def status_sensor_ticks(instance: DagsterInstance) -> list[Any]:
    """The status sensor's ticks as the daemon stored them, newest first."""
    for state in instance.all_instigator_state():
        if state.name == STATUS_SENSOR:
            return list(instance.get_ticks(state.instigator_origin_id, state.selector_id))
    return []


def test_under_dagster_daemon_the_completing_tick_publishes_the_row(
    emulator: KvidEmulator,
    tmp_path: Path,
    dagster_daemon: Callable[..., subprocess.Popen[bytes]],
) -> None:
    table = write_table(tmp_path / "p.csv", ["solo"])
    data_dir = tmp_path / "data"
    home = dagster_home(tmp_path / "home")
    daemon = dagster_daemon(
        home,
        DAEMON_DEFINITIONS,
        prompts=table,
        data_dir=data_dir,
        base_url=emulator.base_url,
    )
    defs = make_defs(emulator.base_url, table, data_dir)
    ledger = KvidProject(table, data_dir).ledger()
    deadline = time.monotonic() + 240
    with open_instance(home) as instance:
        # the daemon ticks on its own (5 s loop); the submission is a run of this process
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "solo", "solo")
        while (row := ledger.row("solo")) is None or row.status is not VideoStatus.COMPLETED:
            assert row is not None and row.status.needs_polling, row
            assert daemon.poll() is None, daemon_log(tmp_path)
            assert time.monotonic() < deadline, f"never completed: {row}\n{daemon_log(tmp_path)}"
            time.sleep(0.2)
        sub = row.submission
        assert sub is not None and sub.completed_at is not None
        completed = sub.completed_at.timestamp()

        def completing_tick() -> Any:
            # the tick that recorded the completion started before it and ended after it
            for tick in status_sensor_ticks(instance):
                if tick.timestamp <= completed and tick.end_timestamp is not None:
                    return tick if tick.end_timestamp >= completed else None
            return None

        while (tick := completing_tick()) is None:
            assert daemon.poll() is None, daemon_log(tmp_path)
            assert time.monotonic() < deadline, f"no finished tick\n{daemon_log(tmp_path)}"
            time.sleep(0.05)
        # right after that tick (the next one is 5 s away and has nothing to change)
        assert_row_published_complete(data_dir, "solo", ledger)
        assert published_revision(catalog_file(data_dir, "videos")) == ledger.revision()
        assert not tick.is_failure, tick.tick_data.error
        event = instance.get_latest_materialization_event(CATALOG)  # the daemon stored it
        assert event is not None and not event.run_id
        assert latest_materialization(instance, "solo")["request_id"] == row.request_id
    assert daemon.poll() is None, daemon_log(tmp_path)
    assert emulator.jobs_created == 1


# ---------------------------------------------------------------------------------------------
# A -> B -> A


def test_a_row_edited_a_b_a_costs_two_jobs_and_gets_back_its_first_video(
    emulator: KvidEmulator, tmp_path: Path, database_url: str
) -> None:
    prompts = {"A": "A red kite over the dunes", "B": "A blue kite over the sea"}
    table = tmp_path / "p.csv"
    data_dir = tmp_path / "data"
    defs = make_defs(emulator.base_url, table, data_dir, database_url=database_url)
    ledger = KvidProject(table, data_dir, database_url=database_url).ledger()

    def edit(which: str, instance: DagsterInstance) -> Submission | None:
        """The table says ``which``; kvid_prompts and the submission run; the row's job."""
        write_table(table, ["r"], lambda _key: prompts[which])
        assert run_prompts(defs, instance)
        row = ledger.row("r")
        assert row is not None and row.prompt == prompts[which]
        assert run_submit(defs, instance, "r", "r")
        row = ledger.row("r")
        assert row is not None
        return row.submission

    with open_instance(dagster_home(tmp_path / "home")) as instance:
        first = edit("A", instance)
        assert first is not None and first.request_id
        tick_until_settled(defs, instance, ledger)
        first_row = ledger.row("r")
        assert first_row is not None and first_row.status is VideoStatus.COMPLETED
        a_video = first_row.video
        assert a_video.local_path and Path(a_video.local_path).is_file()

        b_job = edit("B", instance)
        assert b_job is not None and b_job.request_id and b_job.request_id != first.request_id
        assert emulator.jobs_created == 2
        # back to A before any tick saw B's job finish: the row changed while B ran
        back = edit("A", instance)
        assert emulator.jobs_created == 2  # A's job is reused, not sent a third time
        assert back is not None and back.submission_id == first.submission_id
        assert b_job.submission_id in {s.submission_id for s in ledger.jobs_to_poll()}
        assert ledger.row("r").status is VideoStatus.COMPLETED  # type: ignore[union-attr]

        tick_until_settled(defs, instance, ledger)
        # B's job, no longer any row's current one, was still polled to its video
        b_done = ledger.submission(b_job.submission_id)
        assert b_done is not None and b_done.status is VideoStatus.COMPLETED
        assert b_done.request_id == b_job.request_id
        assert b_done.video.local_path and Path(b_done.video.local_path).is_file()
        assert b_done.video.local_path != a_video.local_path
        # the row's current video is A's first job's
        row = ledger.row("r")
        assert row is not None and row.status is VideoStatus.COMPLETED
        assert row.request_id == first.request_id
        assert row.video.local_path == a_video.local_path
        assert row.video.sha256 == a_video.sha256
        assert Path(a_video.local_path).is_file()
        # and so say Dagster and the published catalogs
        assert latest_materialization(instance, "r")["request_id"] == first.request_id
        videos = read_catalog(data_dir, "videos").set_index("partition_key")
        assert videos.loc["r", "request_id"] == first.request_id
        assert videos.loc["r", "local_path"] == a_video.local_path
        history = read_catalog(data_dir, "submissions")
        pd.testing.assert_frame_equal(history, submissions_frame(ledger))
        of_b = history[history["request_id"] == b_job.request_id]
        assert set(of_b["event"]) >= {SubmissionEvent.SUBMITTED, SubmissionEvent.COMPLETED}
        assert set(of_b["request_hash"]) == {b_job.request_hash}
        assert (history["event"] == SubmissionEvent.SUBMITTED).sum() == 2
    assert set(emulator.jobs) == {first.request_id, b_job.request_id}
    assert [s.request_id for s in ledger.submissions()] == [first.request_id, b_job.request_id]


# ---------------------------------------------------------------------------------------------
# atomic and idempotent


ROWS = 30
STEPS = 16
WAIT_S = 60.0  # a bound on a wait that ends as soon as the reader saw a state, never a pause


def test_publishing_is_atomic_and_idempotent_under_concurrent_writes(
    tmp_path: Path, database_url: str
) -> None:
    """Two publishers race while a writer changes every job at each step (one transaction:
    step ``i`` completes a job and sets every other one's progress to ``i``) and a reader reads
    the published files in a loop. Every read is a whole table of one ledger state."""
    rows = table_rows(write_table(tmp_path / "p.csv", [f"k{i:02d}" for i in range(ROWS)]))
    ledger = Ledger(database_url)
    ledger.register(rows)
    owner = ClaimOwner.current()
    subs: list[Submission] = []
    for i, row in enumerate(rows):
        claimed = ledger.claim(row, owner, cost_credits=1.0)
        assert isinstance(claimed, Submission)
        ledger.record_submitted(claimed, f"req_{i:04d}")
        subs.append(claimed)
    catalog = tmp_path / "catalog"
    videos_file, submissions_file = (
        catalog / "videos" / DATA_FILE,
        catalog / "submissions" / DATA_FILE,
    )
    publish(ledger, catalog)

    step_of_revision = {ledger.revision(): 0}  # what each ledger state is
    seen: list[tuple[str, int | None, int]] = []  # (what, its revision, the step it shows)
    latest_seen = [-1]
    problems: list[str] = []
    writing_done, reading_done = threading.Event(), threading.Event()
    progress = threading.Condition()

    def step_shown(frame: pd.DataFrame) -> int:
        """The step a videos table shows; raises if it is not one whole ledger state."""
        assert list(frame.columns) == list(VIDEO_COLUMNS)
        assert len(frame) == ROWS and frame["partition_key"].is_unique
        done = frame[frame["status"] == "COMPLETED"]
        live = frame[frame["status"] != "COMPLETED"]
        step = len(done)
        assert set(live["status"]) <= ({"PROCESSING"} if step else {"SUBMITTED"}), frame
        assert (live["progress"] == step).all(), frame
        assert sorted(done["partition_key"]) == [r.partition_key for r in rows[:step]]
        return step

    def history_shown(frame: pd.DataFrame) -> int:
        """The step a submissions table shows (its COMPLETED events), checked whole."""
        assert list(frame.columns) == list(SUBMISSION_COLUMNS)
        assert frame["event_id"].is_unique
        step = int((frame["event"] == SubmissionEvent.COMPLETED).sum())
        assert len(frame) == 2 * ROWS + step  # INTENT and SUBMITTED of each row, and those
        return step

    def reader() -> None:
        while not reading_done.is_set():
            try:
                # the user's reads: the published folders, through pandas
                seen.append(("videos-dir", None, step_shown(read_catalog_dir(catalog, "videos"))))
                seen.append(
                    ("history-dir", None, history_shown(read_catalog_dir(catalog, "submissions")))
                )
                # each file opened once, so its revision and its content are of the same file
                videos, revision = read_once(videos_file)
                seen.append(("videos", revision, step_shown(videos)))
                history, history_revision = read_once(submissions_file)
                seen.append(("submissions", history_revision, history_shown(history)))
            except Exception as exc:  # every failed read is the finding
                problems.append(f"reader: {type(exc).__name__}: {exc}")
                return
            with progress:
                latest_seen[0] = max(latest_seen[0], revision)
                progress.notify_all()

    def publisher() -> None:
        try:
            while not writing_done.is_set():
                publish(ledger, catalog)
            publish(ledger, catalog)  # the writer is done: the last word
        except Exception as exc:
            problems.append(f"publisher: {type(exc).__name__}: {exc}")

    def writer() -> None:
        current = {s.submission_id: ledger.submission(s.submission_id) for s in subs}
        versions = {i: sub.version for i, sub in current.items() if sub is not None}
        try:
            for step in range(1, STEPS + 1):
                ending = subs[step - 1].submission_id
                video = VideoFile(url=f"http://kvid.test/{step}.mp4", size_kb=step)
                changes = [
                    JobChange(
                        ending, versions[ending], VideoStatus.COMPLETED, progress=100,
                        video=video, completed=True,
                    ),
                    *(
                        JobChange(
                            s.submission_id, versions[s.submission_id], VideoStatus.PROCESSING,
                            progress=step,
                        )
                        for s in subs[step:]
                    ),
                ]  # fmt: skip
                revision = ledger.revision() + 1  # nobody else writes
                applied = ledger.apply(changes)
                assert len(applied) == len(changes)
                versions.update({s.submission_id: s.version for s in applied})
                assert ledger.revision() == revision
                step_of_revision[revision] = step
                if step % 2:  # every other step, two changes back to back
                    continue
                with progress:  # the reader saw this state before the next change

                    def shown(revision: int = revision) -> bool:
                        return latest_seen[0] >= revision or bool(problems)

                    assert progress.wait_for(shown, WAIT_S), f"step {step} never read"
        except Exception as exc:
            problems.append(f"writer: {type(exc).__name__}: {exc}")
        finally:
            writing_done.set()

    threads = [threading.Thread(target=f) for f in (reader, publisher, publisher, writer)]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join(timeout=300)
    reading_done.set()
    threads[0].join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert problems == []

    # every read showed one ledger state, the one its revision says
    for table, revision, step in seen:
        if revision is not None:
            assert step_of_revision[revision] == step, (table, revision, step)
    revisions = {revision for table, revision, _ in seen if table == "videos"}
    assert len(revisions) >= STEPS // 2  # the reader saw the states it waited for, at least
    # the last publication is the ledger's latest state
    final = ledger.revision()
    assert step_of_revision[final] == STEPS
    assert published_revision(videos_file) == final == published_revision(submissions_file)
    pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), videos_frame(ledger))
    pd.testing.assert_frame_equal(
        pd.read_parquet(catalog / "submissions"), submissions_frame(ledger)
    )
    # idempotent: publishing an unchanged ledger writes nothing
    before = {p: os.stat(p) for p in (videos_file, submissions_file)}
    again = publish(ledger, catalog)
    assert (again.revision, again.rounds, again.videos) == (final, 1, ROWS)
    for path, stat in before.items():
        now = os.stat(path)
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # nothing half-written is left beside the files
    assert list(catalog.rglob("*.tmp")) == []
    for table in ("videos", "submissions"):
        assert [p.name for p in (catalog / table).iterdir()] == [DATA_FILE]
    ledger.close()


def read_catalog_dir(catalog: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(catalog / table)


def read_once(path: Path) -> tuple[pd.DataFrame, int]:
    """A published file and the ledger revision it records, from one open of the file.

    Not ``pq.read_table(path)``: pyarrow 26 opens a file path twice and reads the pages of the
    second open with the footer of the first, so a rename in between fails the read (about 5%
    of reads during a publish storm, measured); an open file keeps the one it opened, and the
    folder reads (what the docs tell users) never failed.
    """
    with path.open("rb") as handle:
        table = pq.read_table(handle)
    return table.to_pandas(), int(table.schema.metadata[REVISION_KEY])


def test_the_last_publisher_to_finish_leaves_the_latest_revision(tmp_path: Path) -> None:
    """Publisher 1 checked the published revision and is about to rename its file when a
    change is committed and publisher 2 publishes it, in each of publisher 1's rounds. When
    both have returned, the latest state must be the one published (module docstring)."""
    publish_module = importlib.import_module("kvid_dagster.ledger.publish")
    rows = table_rows(write_table(tmp_path / "p.csv", ["a"]))
    ledger = Ledger(f"sqlite:///{tmp_path / 'kvid.db'}")
    ledger.register(rows)
    claimed = ledger.claim(rows[0], ClaimOwner.current(), cost_credits=1.0)
    assert isinstance(claimed, Submission)
    ledger.record_submitted(claimed, "req_1")
    catalog = tmp_path / "catalog"
    publish(ledger, catalog)

    def change() -> None:
        sub = ledger.submission(claimed.submission_id)
        assert sub is not None
        progress = (sub.progress or 0) + 1
        assert ledger.apply(
            [JobChange(sub.submission_id, sub.version, VideoStatus.PROCESSING, progress=progress)]
        )

    write = publish_module._write_hidden
    overtaken: list[int] = []
    others: list[threading.Thread] = []
    by_others: set[int] = set()  # the revisions publisher 2 writes (the files are written
    # in worker threads: the revision, not the thread, tells the publishers apart)

    def write_overtaken(table: Any, path: Path, stands: dict[bytes, bytes]) -> Path:
        hidden = write(table, path, stands)
        revision = int(stands[REVISION_KEY])
        if revision not in by_others and path.parent.name == "videos":
            change()  # a tick commits a change and publishes it, all before our rename
            by_others.add(ledger.revision())
            other = threading.Thread(target=publish, args=(ledger, catalog))
            others.append(other)
            other.start()
            other.join(timeout=10)  # (a publisher that waits for ours cannot finish first)
            overtaken.append(revision)
        return hidden

    change()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish_module, "_write_hidden", write_overtaken)
        stats = publish(ledger, catalog)
    for other in others:
        other.join(timeout=60)
    assert overtaken and not any(other.is_alive() for other in others)
    published = published_revision(catalog / "videos" / DATA_FILE)
    assert published == ledger.revision(), (published, stats)
    pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), videos_frame(ledger))
    ledger.close()


def test_a_file_that_cannot_be_written_fails_the_publication_and_leaves_nothing_hidden(
    tmp_path: Path,
) -> None:
    """Both files are written at once; when one cannot be (its folder is a file here), the
    publication raises, the other's hidden file is removed, and what was published stays."""
    rows = table_rows(write_table(tmp_path / "p.csv", ["a", "b"]))
    ledger = Ledger(f"sqlite:///{tmp_path / 'kvid.db'}")
    ledger.register(rows)
    catalog = tmp_path / "catalog"
    publish(ledger, catalog)
    before = pd.read_parquet(catalog / "videos")
    (catalog / "submissions" / DATA_FILE).unlink()
    (catalog / "submissions").rmdir()
    (catalog / "submissions").write_text("not a folder")
    claimed = ledger.claim(rows[0], ClaimOwner.current(), cost_credits=1.0)
    assert isinstance(claimed, Submission)
    ledger.record_submitted(claimed, "req_1")
    with pytest.raises(OSError):
        publish(ledger, catalog)
    assert sorted(p.name for p in (catalog / "videos").iterdir()) == [DATA_FILE]
    pd.testing.assert_frame_equal(pd.read_parquet(catalog / "videos"), before)
    ledger.close()
