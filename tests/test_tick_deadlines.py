"""Nothing waits forever: the job deadline holds for jobs a tick's budget keeps cutting short, and
a video that takes longer to download than a tick continues where the last tick stopped.

- a status call that hangs past every tick's budget still ends TIMED_OUT at the job deadline;
- a long download keeps its bytes (``PartialDownload``) and the next tick continues them with
  an HTTP Range request: it finishes, byte for byte the service's file;
- a storage that ignores Range makes every tick start over: each cut counts as a failed fetch,
  so the job ends FETCH_FAILED (its paid request_id kept) instead of downloading forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from faultkit import (
    assert_accounted,
    make_client,
    statuses,
    submitted,
)

from kvid_dagster.client import JobKind, KvidDownloadBusyError, KvidNotFoundError, PartialDownload
from kvid_dagster.core.poll import PollConfig, PollReport, poll_pending
from kvid_dagster.core.prompts import PromptRow
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoStatus

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator


def tick(emulator: KvidEmulator, ledger: Ledger, videos: Path, **config: Any) -> PollReport:
    async def one() -> PollReport:
        async with make_client(emulator.base_url, timeout=30.0) as client:
            return await poll_pending(client, ledger, PollConfig(videos, **config))

    return asyncio.run(one())


def completed_video(emulator: KvidEmulator, ledger: Ledger) -> tuple[str, bytes]:
    """The finished job's result URL and the bytes of its video, as the service has them."""
    [sub] = ledger.submissions()
    kind, request_id = JobKind(sub.job_kind), str(sub.request_id)

    async def fetch() -> tuple[str, bytes]:
        async with make_client(emulator.base_url) as client:
            for _ in range(300):  # a realistic server answers 404 just after generate
                with contextlib.suppress(KvidNotFoundError):
                    if (await client.status(kind, request_id)).is_completed:
                        break
                await asyncio.sleep(0.1)
            result = await client.result(kind, request_id)
        async with httpx.AsyncClient() as plain:
            return result.url, (await plain.get(result.url)).content

    return asyncio.run(fetch())


def test_a_status_that_outlasts_every_tick_still_times_the_job_out(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, rows = submitted(emulator, tmp_path)
    videos = tmp_path / "videos"
    emulator.add_fault("status", "timeout", times=1_000, delay=3.0)  # each answer takes 3 s
    budget = {"tick_budget_seconds": 0.5}
    report = tick(emulator, ledger, videos, job_deadline_seconds=600, **budget)
    assert report.deferred == 1 and statuses(ledger) == {"a": "SUBMITTED"}  # carried over
    report = tick(emulator, ledger, videos, job_deadline_seconds=0.01, **budget)
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.TIMED_OUT, report
    assert row.error is not None and "no status answer within a tick's budget" in row.error
    assert row.request_id in emulator.jobs  # the paid id kept
    assert_accounted(emulator.jobs, ledger, rows)


@pytest.fixture
def slow_storage(emulator: KvidEmulator, tmp_path: Path) -> tuple[Ledger, list[PromptRow], bytes]:
    """A finished job whose video downloads at a third of its size per second."""
    ledger, rows = submitted(emulator, tmp_path)
    _url, video = completed_video(emulator, ledger)
    emulator.config.download_bytes_per_second = len(video) / 3
    return ledger, rows, video


def test_a_download_longer_than_a_tick_continues_where_the_last_tick_stopped(
    emulator: KvidEmulator, slow_storage: tuple[Ledger, list[PromptRow], bytes], tmp_path: Path
) -> None:
    ledger, rows, video = slow_storage
    videos = tmp_path / "videos"
    budget = {"tick_budget_seconds": 1.0, "refetch_interval_seconds": 0.0}
    seen: list[str] = []
    for _ in range(12):  # 3 s of download in ticks of 1 s: a fresh start each tick never ends
        tick(emulator, ledger, videos, **budget)
        row = ledger.row("a")
        assert row is not None
        seen.append(row.status.value)
        if row.status is VideoStatus.COMPLETED:
            break
    assert seen[-1] == "COMPLETED", seen
    assert "FETCHING" in seen and len(seen) >= 3  # it took several ticks
    assert row.video.local_path is not None
    assert row.video.sha256 == hashlib.sha256(video).hexdigest()
    assert Path(row.video.local_path).read_bytes() == video
    assert [p.name for p in videos.glob(".*.partial*")] == []  # nothing kept once done
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_storage_without_range_fails_the_fetch_instead_of_downloading_forever(
    emulator: KvidEmulator, slow_storage: tuple[Ledger, list[PromptRow], bytes], tmp_path: Path
) -> None:
    ledger, rows, _video = slow_storage
    emulator.config.range_requests = False  # the vendor's page promises no Range
    downloads = emulator.stats["files"]
    videos = tmp_path / "videos"
    budget = {"tick_budget_seconds": 1.0, "refetch_interval_seconds": 0.0, "fetch_attempts": 3}
    for _ in range(8):
        tick(emulator, ledger, videos, **budget)
        if statuses(ledger)["a"] == "FETCH_FAILED":
            break
    row = ledger.row("a")
    assert row is not None and row.status is VideoStatus.FETCH_FAILED, row
    assert row.error is not None and "cut by the tick's budget" in row.error
    assert row.request_id in emulator.jobs and emulator.jobs_created == 1  # kept, not re-paid
    # the first cut kept bytes (no one knew the storage would not resume), the next three
    # started over and were counted
    assert emulator.stats["files"] - downloads == 4
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_cancelled_download_resumes_byte_for_byte_and_a_second_downloader_waits(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, _rows = submitted(emulator, tmp_path)
    url, video = completed_video(emulator, ledger)
    emulator.config.download_bytes_per_second = len(video) / 2
    kept = PartialDownload(tmp_path / "video.partial")

    async def cut_then_resume() -> Any:
        async with make_client(emulator.base_url) as client:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.download(url, tmp_path / "v.mp4", partial=kept), 1)
            first = kept.kept_bytes
            assert 0 < first < len(video) and not kept.resumed
            assert kept.path.stat().st_size == first  # on disk, for the next process too
            again = PartialDownload(kept.path)
            downloading = asyncio.ensure_future(
                client.download(url, tmp_path / "v.mp4", partial=again)
            )
            while not again.resumed:  # the second call holds the partial file now
                await asyncio.sleep(0.02)
            with pytest.raises(KvidDownloadBusyError):
                await client.download(url, tmp_path / "w.mp4", partial=PartialDownload(kept.path))
            return await downloading

    done = asyncio.run(cut_then_resume())
    assert done.path.read_bytes() == video
    assert done.sha256 == hashlib.sha256(video).hexdigest()
    assert not kept.path.exists() and not (tmp_path / "w.mp4").exists()


def test_the_emulators_storage_honours_range_and_if_range(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    ledger, _rows = submitted(emulator, tmp_path)
    url, video = completed_video(emulator, ledger)
    with httpx.Client() as http:
        whole = http.get(url)
        etag = whole.headers["ETag"]
        part = http.get(url, headers={"Range": "bytes=100-", "If-Range": etag})
        assert part.status_code == 206 and part.content == video[100:]
        assert part.headers["Content-Range"] == f"bytes 100-{len(video) - 1}/{len(video)}"
        stale = http.get(url, headers={"Range": "bytes=100-", "If-Range": '"another-file"'})
        assert stale.status_code == 200 and stale.content == video  # changed: the whole file
        beyond = http.get(url, headers={"Range": f"bytes={len(video)}-"})
        assert beyond.status_code == 416
