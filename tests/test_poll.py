"""``kvid_dagster.core.poll``: one ``poll_pending`` tick against a real emulator and a real ledger
(SQLite and PostgreSQL): a finished job lands verified in the download folder, a running one
stays pending, the tick goes round from its cursor and defers what its budget leaves, and
``video_path`` names one file per job.

What a tick does under faults (404s and LOST, timeouts and the job deadline, bad downloads,
a tick budget hit mid-call, a tick killed midway) is in ``tests/test_faults_wire.py``,
``tests/test_faults_http.py``, ``tests/test_faults_jobs.py``, ``tests/test_faults_safety.py``
and ``tests/test_faults_processes.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from pathlib import Path

from conftest import EmulatorFactory, fast_config
from faultkit import make_client, poll_once, submit, table_rows, write_table

from kvid_dagster.core.poll import PollConfig, PollReport, poll_pending, video_path
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus
from kvid_dagster.media.preview import cache_path

SLOW_JOB_SECONDS = 30.0  # still running whenever these tests look


def submitted(
    emulator: KvidEmulator, tmp_path: Path, keys: list[str], database_url: str | None = None
) -> Ledger:
    """A ledger whose rows ``keys`` each have a job at ``emulator``."""
    rows = table_rows(write_table(tmp_path / "prompts.csv", keys))
    ledger = Ledger.for_data_dir(tmp_path / "data", database_url)
    ledger.register(rows)
    assert all(o.request_id for o in submit(emulator.base_url, ledger, rows))
    return ledger


def wait_until_finished(emulator: KvidEmulator, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while any(job.state != "COMPLETED" for job in emulator.jobs.values()):
        assert time.monotonic() < deadline, {k: j.state for k, j in emulator.jobs.items()}
        time.sleep(0.05)


def tick(
    emulator: KvidEmulator, ledger: Ledger, config: PollConfig, **kwargs: object
) -> PollReport:
    async def go() -> PollReport:
        async with make_client(emulator.base_url) as client:
            return await poll_pending(client, ledger, config, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_one_tick_completes_a_finished_job_with_its_video_verified_in_the_download_dir(
    emulator: KvidEmulator, database_url: str, tmp_path: Path
) -> None:
    ledger = submitted(emulator, tmp_path, ["a"], database_url)
    [sub] = ledger.submissions()
    wait_until_finished(emulator)
    videos = tmp_path / "videos"

    report = poll_once(emulator.base_url, ledger, videos)
    assert (report.pending, report.polled, report.deferred, report.changed) == (1, 1, 0, 1)
    assert report.errors == [] and report.settled == []
    [event] = report.final
    assert event.partition_key == "a" and event.status is VideoStatus.COMPLETED
    video = event.row.video
    assert video.local_path == str(video_path(videos, sub))
    landed = Path(video.local_path)
    assert landed.parent == videos.resolve()
    assert video.sha256 == hashlib.sha256(landed.read_bytes()).hexdigest()
    width, height, _fps, frames = table_rows(tmp_path / "prompts.csv")[0].request.output_geometry()
    assert (video.width, video.height, video.num_frames) == (width, height, frames)
    assert [p.name for p in videos.glob("*.mp4")] == [landed.name]
    assert not list(videos.glob(".*.unverified.mp4"))  # its staging file renamed into place
    assert cache_path(landed).is_file()  # the UI's preview, made within the tick
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.COMPLETED and row.progress == 100

    after = poll_once(emulator.base_url, ledger, videos)  # nothing is left to poll
    assert (after.pending, after.polled, after.events) == (0, 0, [])


def test_a_running_job_stays_pending_and_nothing_is_downloaded(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(fast_config(job_duration=SLOW_JOB_SECONDS))
    ledger = submitted(emulator, tmp_path, ["a"])
    videos = tmp_path / "videos"
    report = poll_once(emulator.base_url, ledger, videos)
    assert (report.pending, report.polled, report.deferred) == (1, 1, 0)
    assert report.final == []
    row = ledger.row("a")
    assert row is not None and row.status.needs_polling and not row.status.is_terminal
    assert [s.partition_key for s in ledger.jobs_to_poll()] == ["a"]
    assert emulator.stats["result"] == 0 and emulator.stats["files"] == 0
    assert not videos.exists() or not list(videos.glob("*.mp4"))


def test_the_tick_starts_after_its_cursor_and_goes_round(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """One job at a time (the gate is FIFO): the last one polled is the one before the cursor."""
    emulator = emulator_factory(fast_config(job_duration=SLOW_JOB_SECONDS))
    ledger = submitted(emulator, tmp_path, ["a", "b", "c"])
    first, second, third = sorted(s.submission_id for s in ledger.submissions())
    config = PollConfig(download_dir=tmp_path / "videos", concurrency=1)

    fresh = tick(emulator, ledger, config)
    assert (fresh.polled, fresh.last_submission_id) == (3, third)
    resumed = tick(emulator, ledger, config, start_after=first)
    assert (resumed.polled, resumed.last_submission_id) == (3, first)  # b, c, then a
    wrapped = tick(emulator, ledger, config, start_after=third)
    assert (wrapped.polled, wrapped.last_submission_id) == (3, third)  # a, b, c
    assert emulator.stats["status"] == 9
    assert second not in {fresh.last_submission_id, resumed.last_submission_id}


def test_a_spent_budget_defers_every_job_to_the_next_tick_without_asking(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger = submitted(emulator, tmp_path, ["a", "b"])
    wait_until_finished(emulator)
    videos = tmp_path / "videos"
    spent = tick(emulator, ledger, PollConfig(download_dir=videos, tick_budget_seconds=0.0))
    assert (spent.pending, spent.polled, spent.deferred, spent.changed) == (2, 0, 2, 0)
    assert spent.events == [] and spent.last_submission_id is None
    assert emulator.stats["status"] == 0  # not even a status request left
    assert {r.partition_key: r.status for r in ledger.rows()} == {
        "a": VideoStatus.SUBMITTED,
        "b": VideoStatus.SUBMITTED,
    }
    carried = poll_once(emulator.base_url, ledger, videos)
    assert (carried.polled, carried.deferred) == (2, 0)
    assert [e.partition_key for e in carried.final] == ["a", "b"]  # sorted by key


def test_video_path_names_one_file_per_job_inside_the_download_dir(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger = submitted(emulator, tmp_path, ["a"])
    [sub] = ledger.submissions()
    videos = tmp_path / "videos"
    first = video_path(videos, sub)
    assert first == (videos / f"a-{sub.request_hash[:10]}.mp4").resolve()
    retry = video_path(videos, dataclasses.replace(sub, attempt=2))
    assert retry.name == f"a-{sub.request_hash[:10]}-2.mp4"
    edited = video_path(videos, dataclasses.replace(sub, request_hash="f" * 64))
    assert len({first, retry, edited}) == 3  # an edited row keeps each job's video
