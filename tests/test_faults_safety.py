"""Downloads (http(s) only, size-capped, atomic, never outside the download folder, one file per
job) and a damaged published catalog (rewritten whole by the next publication, never a crashed
run)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import EmulatorFactory
from faultkit import (
    StorageFront,
    assert_accounted,
    dagster_home,
    make_defs,
    open_instance,
    poll_until_settled,
    run_prompts,
    run_submit,
    statuses,
    submitted,
    table_rows,
    tick_until_settled,
    write_table,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from kvid_dagster.core.poll import video_path
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptRow
from kvid_dagster.definitions import CATALOG_JOB
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    Ledger,
    Submission,
    VideoFile,
    VideoRow,
    VideoStatus,
    submissions_frame,
    videos_frame,
)

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator


@pytest.fixture
def redirector() -> Iterator[StorageFront]:
    front = StorageFront("file://")
    yield front
    front.close()


def run_one(
    emulator: KvidEmulator, tmp_path: Path, **poll: Any
) -> tuple[Ledger, list[PromptRow], Path]:
    ledger, rows = submitted(emulator, tmp_path)
    videos = tmp_path / "videos"
    poll_until_settled(emulator.base_url, ledger, videos, **poll)
    return ledger, rows, videos


def row_of(ledger: Ledger, key: str) -> VideoRow:
    row = ledger.row(key)
    assert row is not None, key
    return row


def job(key: str, *, attempt: int = 1, request_hash: str = "0123456789abcdef" * 4) -> Submission:
    """A submission of ``key`` as the poller hands it to ``video_path``."""
    return Submission(
        submission_id=1, request_hash=request_hash, attempt=attempt, partition_key=key,
        prompt="p", job_kind="t2v", model="v1", params_json="{}",
        status=VideoStatus.SUBMITTED, request_id="req_1", progress=None, video=VideoFile(),
        error=None, cost_credits=None, owner=None, claimed_at=None, heartbeat_at=None,
        submitted_at=None, completed_at=None, updated_at=None, version=0,
    )  # fmt: skip


def test_a_redirect_to_storage_elsewhere_works_without_the_key(
    emulator_factory: EmulatorFactory, redirector: StorageFront, tmp_path: Path
) -> None:
    # result URLs point at the front; separate_storage off, as its own storage origin would
    # replace them (the other rough edges stay on)
    emulator = emulator_factory(public_base_url=redirector.url, separate_storage=False)
    redirector.target = emulator.base_url  # ...which sends every download back to the emulator
    ledger, rows, _ = run_one(emulator, tmp_path)
    assert statuses(ledger) == {"a": "COMPLETED"}
    assert redirector.headers and all("api-key" not in h for h in redirector.headers)
    assert_accounted(emulator.jobs, ledger, rows)


@pytest.mark.parametrize("where", ["a non-http result URL", "a redirect to file://"])
def test_downloads_only_follow_http(
    where: str, emulator_factory: EmulatorFactory, redirector: StorageFront, tmp_path: Path
) -> None:
    base = "ftp://127.0.0.1:21" if where == "a non-http result URL" else redirector.url
    # separate_storage off: its own storage origin would replace the result URLs under test
    emulator = emulator_factory(public_base_url=base, separate_storage=False)
    ledger, rows, videos = run_one(emulator, tmp_path, refetch_interval_seconds=0.0)
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.FETCH_FAILED  # fetched fetch_attempts times, id kept
    assert row.error is not None
    assert "http(s)" in row.error or "UnsupportedProtocol" in row.error
    assert row.video.local_path is None
    assert not videos.exists() or list(videos.iterdir()) == []
    assert_accounted(emulator.jobs, ledger, rows)


def test_downloads_are_size_capped_and_leave_nothing_behind(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, rows, videos = run_one(
        emulator, tmp_path, refetch_interval_seconds=0.0, max_download_bytes=10_000
    )
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.FETCH_FAILED
    assert row.error is not None and "max_bytes=10000" in row.error
    assert list(videos.iterdir()) == []  # no partial file, no temp file
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_symlink_in_the_download_folder_is_not_followed_out_of_it(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"precious")
    videos = tmp_path / "videos"
    videos.mkdir()
    ledger, rows = submitted(emulator, tmp_path)
    [sub] = ledger.submissions()
    trap = videos / video_path(videos, sub).name  # the job's own file name, planted first
    trap.symlink_to(outside)
    poll_until_settled(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    assert outside.read_bytes() == b"precious"
    assert trap.is_symlink() and trap.resolve() == outside.resolve()
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.FETCH_FAILED
    assert row.error is not None and "escapes" in row.error
    assert_accounted(emulator.jobs, ledger, rows)


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(max_size=80),
    attempt=st.integers(min_value=1, max_value=10_000),
    request_hash=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
)
def test_a_video_path_never_leaves_the_download_folder(
    key: str, attempt: int, request_hash: str
) -> None:
    folder = Path("/srv/kvid/videos")
    path = video_path(folder, job(key, attempt=attempt, request_hash=request_hash))
    assert path.parent == folder and path.suffix == ".mp4"
    assert not path.name.startswith(".")
    # one file per job: another attempt, or another request of the same key, never shares it
    assert video_path(folder, job(key, attempt=attempt + 1, request_hash=request_hash)) != path
    other = request_hash[9::-1] + request_hash[10:]
    if other[:10] != request_hash[:10]:
        assert video_path(folder, job(key, attempt=attempt, request_hash=other)) != path


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a/../../b", "..", ".", "", "~root"])
def test_path_like_keys_become_hashed_names(key: str, tmp_path: Path) -> None:
    path = video_path(tmp_path, job(key))
    assert path.parent == tmp_path.resolve() and path.name.startswith("key-")


def published(catalog_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The catalogs as a reader sees them (pandas on the folders), without publishing first."""
    return pd.read_parquet(catalog_dir / "videos"), pd.read_parquet(catalog_dir / "submissions")


def assert_published_is_the_ledger(project: KvidProject, ledger: Ledger) -> None:
    videos, history = published(project.catalog_dir)
    pd.testing.assert_frame_equal(videos, videos_frame(ledger))
    pd.testing.assert_frame_equal(history, submissions_frame(ledger))


def test_a_damaged_published_catalog_is_rewritten_whole_and_the_run_goes_on(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """The Parquet catalogs are copies published from the ledger: a file cut in half or
    deleted by hand, and a temp file a killed publisher left, neither stop a run nor a tick,
    and the next publication (a run, a tick, or ``kvid_catalog``) writes both files whole."""
    keys = ["a", "b"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    defs = make_defs(emulator.base_url, prompts, project.data_dir)
    videos_file = project.catalog_dir / "videos" / "data.parquet"
    history_file = project.catalog_dir / "submissions" / "data.parquet"
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance)  # registering the rows published the catalogs
        assert videos_file.exists() and history_file.exists()
        # a snapshot cut in half, the history deleted, a publisher's temp file left behind
        videos_file.write_bytes(videos_file.read_bytes()[:100])
        history_file.unlink()
        leftover = videos_file.with_name(".data.parquet.deadbeef.tmp")
        leftover.write_bytes(b"PAR1 not really")
        assert run_submit(defs, instance, "a", "b")
        tick_until_settled(defs, instance, ledger)
        assert statuses(ledger) == {"a": "COMPLETED", "b": "COMPLETED"}
        assert emulator.jobs_created == 2
        assert_published_is_the_ledger(project, ledger)  # as the run and the ticks left it
        assert set(published(project.catalog_dir)[0]["status"]) == {"COMPLETED"}

        # damaged again once nothing changes any more: the on-demand republication mends it
        videos_file.write_bytes(b"garbage")
        history_file.write_bytes(history_file.read_bytes()[:50])
        result = defs.resolve_job_def(CATALOG_JOB).execute_in_process(instance=instance)
        assert result.success
        assert_published_is_the_ledger(project, ledger)
    assert emulator.jobs_created == 2  # nothing was sent again
    assert_accounted(emulator.jobs, ledger, table_rows(prompts))


def test_a_deleted_history_file_alone_is_republished_on_demand(tmp_path: Path) -> None:
    prompts = write_table(tmp_path / "prompts.csv", ["a"])
    project = KvidProject(prompts, tmp_path / "data")
    ledger = project.ledger()
    ledger.register(table_rows(prompts))
    project.publish()
    history_file = project.catalog_dir / "submissions" / "data.parquet"
    history_file.unlink()  # the videos file is intact and shows the current revision
    project.publish()  # what kvid_catalog runs; the ledger has not changed
    assert history_file.exists()
    assert_published_is_the_ledger(project, ledger)
