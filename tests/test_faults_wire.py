"""What a real network and a hostile storage answer do to polling, and what the ledger keeps.

- a download that is not a video (an HTML page, an MP4 without a video stream) never lands as
  ``.mp4``; it is fetched a bounded number of times, then FETCH_FAILED with its reason and its
  paid request_id, and ``Ledger.refetch`` (``kvid-dagster refetch KEY``) tries again; a video
  of the wrong size is a video: kept, COMPLETED, its ``matches_request`` failed;
- one bad job never stops the others: its problem is recorded on it and the tick goes on;
- a 404 from status is not proof of loss: LOST only after 404s that lasted;
- the tick budget is a hard deadline: a status call that hangs is carried over;
- ``force`` pays once per forced run, not again on its retries.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import av
import pytest
from faultkit import (
    StorageFront,
    assert_accounted,
    make_client,
    mp4_video,
    poll_once,
    poll_until_settled,
    statuses,
    submit,
    submitted,
    table_rows,
)

from kvid_dagster.core.poll import PollConfig, poll_pending
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import (
    ClaimOwner,
    ClaimRule,
    JobChange,
    Ledger,
    Refusal,
    VideoRow,
    VideoStatus,
)
from kvid_dagster.media.preview import PreviewKind, cache_path
from kvid_dagster.media.quality import CheckOutcome, QualityCheck, outcomes

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator

HTML = b"<html><body>Access denied</body></html>"


def audio_only_mp4() -> bytes:
    """A valid MP4 with one audio stream and no video (what a broken render may upload)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame(format="fltp", layout="mono", samples=1024)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def undecodable_mp4() -> bytes:
    """An MP4 whose headers are whole (it probes as 20 frames of 480x270 H.264) and whose
    media data is zeroed: what a storage that lost the bytes may serve."""
    data = bytearray(mp4_video(480, 270, 20))
    media, index = data.find(b"mdat") + 4, data.find(b"moov")
    assert 4 < media < index  # libx264 in MP4: the media data comes before the index
    data[media : index - 4] = bytes(index - 4 - media)
    return bytes(data)


@pytest.fixture
def html_storage() -> Iterator[StorageFront]:
    storage = StorageFront(bad=HTML)
    yield storage
    storage.close()


@pytest.fixture
def audio_storage() -> Iterator[StorageFront]:
    storage = StorageFront(bad=audio_only_mp4(), content_type="video/mp4")
    yield storage
    storage.close()


def row_of(ledger: Ledger, key: str) -> VideoRow:
    row = ledger.row(key)
    assert row is not None, key
    return row


def files_in(folder: Path) -> list[str]:
    """What landed in ``folder``, but the videos' own previews (made after a video lands)."""
    names = {p.name for p in folder.iterdir()} if folder.exists() else set()
    previews = {cache_path(folder / name, kind).name for name in names for kind in PreviewKind}
    return sorted(names - previews)


def test_a_download_that_is_not_a_video_is_fetched_three_times_then_kept_for_refetch(
    emulator_factory: Any, html_storage: StorageFront, tmp_path: Path
) -> None:
    # separate_storage off: its own storage origin would replace the result URLs under test
    emulator = emulator_factory(public_base_url=html_storage.url, separate_storage=False)
    html_storage.target = emulator.base_url
    ledger, rows = submitted(emulator, tmp_path, ["a"])
    videos = tmp_path / "videos"
    poll_until_settled(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.FETCH_FAILED
    assert html_storage.bad_gets == 3  # bounded, not every tick until the deadline
    assert row.error is not None and "not a video" in row.error and "refetch a" in row.error
    assert row.request_id in emulator.jobs  # the paid id is kept
    assert files_in(videos) == []  # nothing landed as .mp4, no staging file left
    poll_once(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    assert html_storage.bad_gets == 3  # FETCH_FAILED is not polled again by itself

    html_storage.bad = None  # the storage is fixed; a person asks again
    assert ledger.refetch("a").status is VideoStatus.FETCHING
    poll_until_settled(emulator.base_url, ledger, videos)
    done = ledger.row("a")
    assert done is not None and done.status is VideoStatus.COMPLETED
    assert done.request_id == row.request_id and emulator.jobs_created == 1
    assert files_in(videos) == [Path(str(done.video.local_path)).name]
    with pytest.raises(ValueError, match="not FETCH_FAILED"):
        ledger.refetch("a")
    assert_accounted(emulator.jobs, ledger, rows)


def test_an_mp4_without_a_video_stream_is_that_jobs_problem_and_the_others_go_on(
    emulator_factory: Any, audio_storage: StorageFront, tmp_path: Path
) -> None:
    # separate_storage off: its own storage origin would replace the result URLs under test
    emulator = emulator_factory(public_base_url=audio_storage.url, separate_storage=False)
    audio_storage.target = emulator.base_url
    ledger, rows = submitted(emulator, tmp_path, ["bad", "good"])
    bad = ledger.row("bad")
    assert bad is not None and bad.request_id
    audio_storage.bad_for = {bad.request_id}
    videos = tmp_path / "videos"
    reports = poll_until_settled(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    assert statuses(ledger) == {"bad": "FETCH_FAILED", "good": "COMPLETED"}
    failed = ledger.row("bad")
    assert failed is not None and failed.error is not None and "not a video" in failed.error
    assert any("bad" in e for r in reports for e in r.errors)
    good = ledger.row("good")
    assert good is not None and files_in(videos) == [Path(str(good.video.local_path)).name]
    assert_accounted(emulator.jobs, ledger, rows)


def test_an_image_to_video_of_the_wrong_size_is_kept_completed_and_fails_matches_request(
    emulator_factory: Any, image_server: str, tmp_path: Path
) -> None:
    """Image-to-video downloads are measured too: with an explicit aspect ratio, the whole
    geometry; with ``auto`` and an image at a URL (not at hand), the short side. A video of
    the wrong size is still a video, paid and delivered: it lands, COMPLETED, fetched once,
    with ``matches_request`` failed naming both sizes. Two storage fronts in a row each spoil
    one job's file."""
    square = StorageFront(bad=mp4_video(480, 480, 81), content_type="video/mp4")  # 1:1 at 480p
    wide = StorageFront(bad=mp4_video(1280, 720, 81), content_type="video/mp4")  # 720p
    # separate_storage off: its own storage origin would replace the result URLs under test
    emulator = emulator_factory(public_base_url=square.url, separate_storage=False)
    square.target, wide.target = wide.url, emulator.base_url
    tiger = f"{image_server}/tiger.jpg"  # 480x600: auto at 480p is 480x600
    table = tmp_path / "prompts.csv"
    table.write_text(
        "prompt_id,prompt,image,model,resolution,aspect_ratio,num_frames\n"
        f"fixed,The tiger blinks,{tiger},v1,480p,16:9,81\n"  # gets 480x480: not 854x480
        f"auto,The tiger yawns,{tiger},v1,480p,auto,81\n"  # gets 1280x720: short side 720
        f"auto-fine,The tiger stares,{tiger},v1,480p,auto,81\n"
        f"fixed-fine,The tiger turns,{tiger},v2,480p,,\n",  # v2: 16:9 by default, 854x480
        encoding="utf-8",
    )
    rows = table_rows(table)
    assert {r.job_kind for r in rows} == {"image-to-video"}
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    submit(emulator.base_url, ledger, rows)
    square.bad_for = {str(row_of(ledger, "fixed").request_id)}
    wide.bad_for = {str(row_of(ledger, "auto").request_id)}
    videos = tmp_path / "videos"
    try:
        poll_until_settled(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    finally:
        square.close()
        wide.close()
    assert set(statuses(ledger).values()) == {"COMPLETED"}
    assert (square.bad_gets, wide.bad_gets) == (1, 1)  # fetched once each: never re-fetched
    verdicts = {}
    for key in ("fixed", "auto", "auto-fine", "fixed-fine"):
        quality = row_of(ledger, key).video.quality
        assert quality is not None
        verdicts[key] = quality.matches_request
    assert verdicts == {"fixed": False, "auto": False, "auto-fine": True, "fixed-fine": True}

    def matches(key: str) -> CheckOutcome:
        return next(
            o
            for o in outcomes(row_of(ledger, key).video)
            if o.check is QualityCheck.MATCHES_REQUEST
        )

    assert "480x480, the request asks for 854x480" in matches("fixed").description
    auto = matches("auto")
    assert "1280x720" in auto.description and "short side of 480 px" in auto.description
    assert auto.expected["width"] is None and auto.expected["short_side"] == 480
    fine = [row_of(ledger, k).video for k in ("auto-fine", "fixed-fine")]
    assert [(v.width, v.height) for v in fine] == [(480, 600), (854, 480)]
    assert len(files_in(videos)) == 4  # every paid video kept
    assert_accounted(emulator.jobs, ledger, rows)


def test_an_mp4_whose_frames_do_not_decode_is_a_failed_fetch_not_a_video(
    emulator_factory: Any, tmp_path: Path
) -> None:
    """The probe reads headers only; the checks' decode reads the frames: a file whose frames
    do not decode is not a video, fetched a bounded number of times, then FETCH_FAILED with
    its paid request_id kept, as any download that is not a video."""
    storage = StorageFront(bad=undecodable_mp4(), content_type="video/mp4")
    # separate_storage off: its own storage origin would replace the result URLs under test
    emulator = emulator_factory(public_base_url=storage.url, separate_storage=False)
    storage.target = emulator.base_url
    ledger, rows = submitted(emulator, tmp_path, ["bad", "good"])
    storage.bad_for = {str(row_of(ledger, "bad").request_id)}
    videos = tmp_path / "videos"
    try:
        poll_until_settled(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    finally:
        storage.close()
    assert statuses(ledger) == {"bad": "FETCH_FAILED", "good": "COMPLETED"}
    assert storage.bad_gets == 3
    error = row_of(ledger, "bad").error
    assert error is not None and "frames do not decode" in error and "refetch bad" in error
    assert files_in(videos) == [Path(str(row_of(ledger, "good").video.local_path)).name]
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_404_from_status_makes_a_job_lost_only_after_the_404s_lasted(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, rows = submitted(emulator, tmp_path, ["a"])
    snapshot = dict(emulator.jobs)
    emulator.forget_jobs()  # a deploy, or a store that does not know the job yet: 404
    videos = tmp_path / "videos"
    for _ in range(4):  # the default window (120 s) is far away: never LOST
        poll_once(emulator.base_url, ledger, videos)
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.SUBMITTED
    assert row.error is not None and "404 (4 in a row" in row.error
    [sub] = ledger.submissions()
    assert sub.not_found_count == 4 and sub.not_found_since is not None

    started_at = time.monotonic()
    poll_until_settled(emulator.base_url, ledger, videos, lost_after_seconds=0.6, pause=0.2)
    assert time.monotonic() - started_at < 30
    lost = ledger.row("a")
    assert lost is not None and lost.status is VideoStatus.LOST
    assert lost.error is not None and "answers of 404 over" in lost.error
    assert_accounted(snapshot, ledger, rows)


def test_a_404_streak_that_ends_is_forgotten(emulator: KvidEmulator, tmp_path: Path) -> None:
    ledger, rows = submitted(emulator, tmp_path, ["a"])
    [sub] = ledger.submissions()
    streak = JobChange(  # two 404s, as a poller recorded them; then the service answers again
        sub.submission_id,
        sub.version,
        sub.status,
        error="status answered 404",
        extra={"not_found_count": 2, "not_found_since": datetime.now(UTC)},
    )
    [noted] = ledger.apply([streak])
    assert noted.not_found_count == 2
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    [done] = ledger.submissions()
    assert done.status is VideoStatus.COMPLETED and done.not_found_count == 0
    assert done.not_found_since is None and done.error is None
    assert_accounted(emulator.jobs, ledger, rows)


def test_the_tick_budget_is_a_hard_deadline_for_every_call(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, rows = submitted(emulator, tmp_path, ["a", "b"])
    emulator.add_fault("status", "timeout", times=2, delay=8.0)  # answers after 8 s

    async def tick() -> Any:
        async with make_client(emulator.base_url, timeout=30.0) as client:
            return await poll_pending(
                client,
                ledger,
                PollConfig(download_dir=tmp_path / "videos", tick_budget_seconds=1.0),
            )

    began = time.monotonic()
    report = asyncio.run(tick())
    elapsed = time.monotonic() - began
    assert elapsed < 4.0, elapsed  # not 8 s, nor 30 s of client timeout
    assert report.deferred == 2 and report.polled == 0
    assert statuses(ledger) == {"a": "SUBMITTED", "b": "SUBMITTED"}  # carried over, unchanged
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert statuses(ledger) == {"a": "COMPLETED", "b": "COMPLETED"}
    assert_accounted(emulator.jobs, ledger, rows)


def test_force_pays_once_per_forced_run_not_again_on_its_retries(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, rows = submitted(emulator, tmp_path, ["a"])
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    forced = ClaimRule(force=True, force_token="root-run-1")
    submit(emulator.base_url, ledger, rows, rule=forced)
    assert emulator.jobs_created == 2
    submit(emulator.base_url, ledger, rows, rule=forced)  # the run retried by Dagster
    assert emulator.jobs_created == 2
    refused = ledger.claim(rows[0], ClaimOwner.current("retry"), cost_credits=1.0, rule=forced)
    assert isinstance(refused, Refusal) and "force pays once per run" in refused.reason
    submit(emulator.base_url, ledger, rows, rule=ClaimRule(force=True, force_token="root-run-2"))
    assert emulator.jobs_created == 3  # a new forced run pays, as asked
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert_accounted(emulator.jobs, ledger, rows, allowed_jobs={"a": 3})


def test_a_realistic_server_gets_every_video_once(emulator_factory: Any, tmp_path: Path) -> None:
    """The emulator's rough edges at once: resets when too many requests are in flight, 404s
    just after generate, null and fractional progress, result URLs on a separate storage
    origin that expire, Retry-After as a date, FAILED messages that echo the request."""
    # a 404 window every job's first poll falls in even on a loaded machine (asserted below)
    emulator = emulator_factory(realistic=True, job_duration=4.0, fresh_404_s=3.0)
    keys = [f"k{i}" for i in range(12)]
    ledger, rows = submitted(emulator, tmp_path, keys)
    assert statuses(ledger) == dict.fromkeys(keys, "SUBMITTED")
    videos = tmp_path / "videos"
    reports = poll_until_settled(emulator.base_url, ledger, videos, pause=0.3)
    assert statuses(ledger) == dict.fromkeys(keys, "COMPLETED")
    assert emulator.jobs_created == len(keys)
    assert emulator.stats.get("files_with_api_key", 0) == 0  # the key stays on the API origin
    assert emulator.stats[("status", 404)] > 0  # just-created jobs answered 404, none LOST
    assert not [e for r in reports for e in r.errors if "LOST" in e]
    assert len(files_in(videos)) == len(keys)
    assert_accounted(emulator.jobs, ledger, rows)


@pytest.mark.parametrize(
    ("storage_host", "allowed", "fetched"),
    [
        ("169.254.169.254", (), False),  # the cloud metadata service
        ("localhost", (), False),  # loopback, but not the API's own host
        ("localhost", ("localhost",), True),  # allowed by the setting
    ],
)
def test_result_urls_to_private_addresses_are_refused_unless_trusted(
    storage_host: str,
    allowed: tuple[str, ...],
    fetched: bool,
    emulator_factory: Any,
    tmp_path: Path,
) -> None:
    first = emulator_factory()  # only to find a free port for the one whose URLs name it
    port = first.port
    first.stop()
    # separate_storage off: its own storage origin would replace the result URLs under test
    emulator = emulator_factory(
        port=port, public_base_url=f"http://{storage_host}:{port}", separate_storage=False
    )
    ledger, rows = submitted(emulator, tmp_path, ["a"])
    videos = tmp_path / "videos"

    async def tick() -> Any:
        async with make_client(
            emulator.base_url, timeout=2.0, allowed_download_hosts=allowed
        ) as client:
            config = PollConfig(download_dir=videos, refetch_interval_seconds=0.0)
            return await poll_pending(client, ledger, config)

    for _ in range(60):
        report = asyncio.run(tick())
        if statuses(ledger)["a"] in {"COMPLETED", "FETCH_FAILED"}:
            break
        time.sleep(0.1)
    row = ledger.row("a")
    assert row is not None
    if fetched:
        assert row.status is VideoStatus.COMPLETED
    else:
        assert row.status is VideoStatus.FETCH_FAILED, report.errors
        assert row.error is not None and "non-public address" in row.error
        assert files_in(videos) == []
    assert_accounted(emulator.jobs, ledger, rows)
