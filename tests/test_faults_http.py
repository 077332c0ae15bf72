"""The HTTP fault matrix: each fault the emulator injects, on each endpoint, and the end state.

A generate that may have reached the service is never sent again (the row is UNCERTAIN with
the body that was sent); a refusal that created nothing (429) is retried after Retry-After;
reads (status, result, the video file) are retried until the video arrives whole. Each test
ends with :func:`faultkit.assert_accounted`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TEST_API_KEY, EmulatorFactory
from faultkit import (
    RecordedSleep,
    assert_accounted,
    poll_once,
    poll_until_settled,
    statuses,
    submit,
    table_rows,
    write_table,
)

from kvid_dagster.client import AsyncKvidClient, KvidRequest
from kvid_dagster.core.poll import video_path
from kvid_dagster.core.prompts import PromptRow
from kvid_dagster.core.submit import SubmitAction, SubmitOutcome, submit_rows
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger, VideoRow, VideoStatus, submissions_frame, videos_frame
from kvid_dagster.media.preview import PreviewKind, cache_path
from kvid_dagster.media.probe import probe_video

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator

V1_480P_CREDITS = 60.0


@pytest.fixture
def emulator(emulator_factory: EmulatorFactory) -> KvidEmulator:
    """Quicker jobs than the shared fixture's: this file runs dozens of them."""
    return emulator_factory(job_duration=0.1)


def registered(tmp_path: Path, keys: list[str]) -> tuple[list[PromptRow], Ledger]:
    """The table's rows, registered in a fresh ledger (what ``kvid_prompts`` does)."""
    rows = table_rows(write_table(tmp_path / "prompts.csv", keys))
    ledger = Ledger.for_data_dir(tmp_path / "data")
    ledger.register(rows)
    return rows, ledger


def one_row(tmp_path: Path) -> tuple[list[PromptRow], Ledger]:
    return registered(tmp_path, ["a"])


def row_of(ledger: Ledger, key: str) -> VideoRow:
    row = ledger.row(key)
    assert row is not None, key
    return row


def history_of(ledger: Ledger, key: str) -> Any:
    """The submissions history (the published ``catalog/submissions``) of one key."""
    history = submissions_frame(ledger)
    return history[history["partition_key"] == key]


# ---------------------------------------------------------------------------------------------
# generate: ambiguous answers


AMBIGUOUS_GENERATE = [
    # (kind, options, jobs the service created)
    ("500", {}, 0),
    ("502", {}, 0),  # an HTML gateway page
    ("503", {"after_create": True, "retry_after": 1}, 1),
    ("504", {"after_create": True}, 1),
    ("timeout", {"delay": 1.5}, 1),  # created, then the answer comes too late
    ("timeout_before", {"delay": 1.5}, 0),  # nothing created, no answer
    ("reset", {}, 0),
    ("reset", {"after_create": True}, 1),
    ("non_json", {}, 0),
    ("non_json", {"after_create": True}, 1),
    ("malformed", {}, 0),
    ("malformed", {"after_create": True}, 1),
    ("missing_fields", {}, 0),  # a success envelope without its request_id
    ("missing_fields", {"after_create": True}, 1),
]


@pytest.mark.parametrize(
    ("kind", "options", "jobs"),
    AMBIGUOUS_GENERATE,
    ids=[
        f"{k}{'-after-create' if o.get('after_create') else ''}" for k, o, _ in AMBIGUOUS_GENERATE
    ],
)
def test_an_ambiguous_generate_is_uncertain_and_never_sent_again(
    kind: str, options: dict[str, Any], jobs: int, emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, ledger = one_row(tmp_path)
    emulator.add_fault("generate", kind, **options)
    [outcome] = submit(emulator.base_url, ledger, rows, timeout=0.5)
    assert outcome.action is SubmitAction.UNCERTAIN and outcome.status is VideoStatus.UNCERTAIN
    assert emulator.stats["generate"] == 1  # the client did not retry it
    assert emulator.jobs_created == jobs
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.UNCERTAIN and row.request_id is None
    # what was sent is on the submission: the body in the message, the prompt and params beside it
    assert row.error is not None and "body=" in row.error and rows[0].prompt in row.error
    assert row.submission is not None
    assert row.submission.prompt == rows[0].prompt
    assert row.submission.params_json == rows[0].params_json
    history = history_of(ledger, "a")
    assert history["event"].tolist() == ["INTENT", "UNCERTAIN"]
    assert history["cost_credits"].iloc[-1] == V1_480P_CREDITS  # may have been billed

    # re-runs and status ticks never send it again
    [again] = submit(emulator.base_url, ledger, rows)
    assert again.action is SubmitAction.SKIPPED and "UNCERTAIN" in again.message
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert emulator.stats["generate"] == 1 and statuses(ledger) == {"a": "UNCERTAIN"}
    assert_accounted(emulator.jobs, ledger, rows)


# ---------------------------------------------------------------------------------------------
# generate: refusals (nothing created, safe to send again)


def test_a_429_storm_on_generate_waits_retry_after_and_pays_once(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, ledger = one_row(tmp_path)
    emulator.add_fault("generate", 429, times=3, retry_after=7)
    sleep = RecordedSleep()
    [outcome] = submit(emulator.base_url, ledger, rows, sleep=sleep, backoff_max=60.0)
    assert outcome.action is SubmitAction.SUBMITTED
    # the server's Retry-After, not a guess: an HTTP date in whole seconds, so 7 s from when
    # the server wrote it is a wait of 6 to 8 s by the time the client reads it
    assert len(sleep.calls) == 3 and all(6.0 < s <= 8.0 for s in sleep.calls), sleep.calls
    assert emulator.stats[("generate", 429)] == 3 and emulator.jobs_created == 1
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert statuses(ledger) == {"a": "COMPLETED"}
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_429_storm_longer_than_the_retries_leaves_the_row_unpaid_for_the_next_run(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, ledger = one_row(tmp_path)
    emulator.add_fault("generate", 429, times=4, retry_after=1)
    [outcome] = submit(emulator.base_url, ledger, rows, max_retries=3)
    assert outcome.action is SubmitAction.ERROR and outcome.status is VideoStatus.PENDING
    assert emulator.jobs_created == 0
    assert row_of(ledger, "a").status is VideoStatus.PENDING
    assert ledger.submissions() == []  # the claim was released: nothing holds the request
    history = history_of(ledger, "a")
    assert history["event"].tolist() == ["INTENT", "FAILED_TO_SUBMIT"]
    assert history["cost_credits"].iloc[-1] == 0.0
    [outcome] = submit(emulator.base_url, ledger, rows)  # the next run sends it, once
    assert outcome.action is SubmitAction.SUBMITTED and emulator.jobs_created == 1
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert statuses(ledger) == {"a": "COMPLETED"}
    assert_accounted(emulator.jobs, ledger, rows)


class TogetherClient(AsyncKvidClient):
    """Holds every generate until ``expected`` of them wait, then empties the service's token
    bucket and lets them all go at once, however long each row's claim took to commit."""

    def __init__(self, *args: Any, expected: int, drain: Callable[[], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._expected, self._drain = expected, drain
        self._waiting = 0
        self._go = asyncio.Event()

    async def generate(self, request: KvidRequest, **kwargs: Any) -> str:
        self._waiting += 1
        if self._waiting == self._expected:
            self._drain()
            self._go.set()
        await asyncio.wait_for(self._go.wait(), timeout=60)
        return await super().generate(request, **kwargs)


def drain_token_bucket(emulator: KvidEmulator, kind: str) -> None:
    """Spend the emulator's tokens (on status calls, which create nothing) until it says 429."""
    url = f"{emulator.base_url}/ai/video/{kind}/status"
    with httpx.Client(timeout=5.0) as http:
        for _ in range(1000):
            if http.get(url, params={"request_id": "req_drain"}).status_code == 429:
                return
    raise AssertionError("the emulator's token bucket never ran out")


def test_a_rate_limited_service_under_load_gets_every_job_once(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """A real token bucket (8 requests/s) and real Retry-After waits, twelve jobs at once."""
    emulator = emulator_factory(rate_limit=8.0, reuse_renders=True)
    keys = [f"k{i:02d}" for i in range(12)]
    rows, ledger = registered(tmp_path, keys)

    async def go() -> list[SubmitOutcome]:
        async with TogetherClient(
            TEST_API_KEY,
            emulator.base_url,
            timeout=5.0,
            sleep=asyncio.sleep,
            backoff_max=2.0,
            expected=len(keys),
            drain=lambda: drain_token_bucket(emulator, rows[0].job_kind),
        ) as client:
            return await submit_rows(client, ledger, rows, generate_concurrency=len(keys))

    outcomes = asyncio.run(go())
    assert [o.action for o in outcomes] == [SubmitAction.SUBMITTED] * len(keys)
    # twelve generates against an empty bucket refilling at 8/s: some are refused, all retried
    assert emulator.stats[("generate", 429)] > 0 and emulator.jobs_created == len(keys)
    poll_until_settled(
        emulator.base_url, ledger, tmp_path / "videos", sleep=asyncio.sleep, pause=0.3
    )
    assert set(statuses(ledger).values()) == {"COMPLETED"}
    assert_accounted(emulator.jobs, ledger, rows)


# ---------------------------------------------------------------------------------------------
# reads: status, result, the video file


READ_FAULTS = [
    ("status", "500", {}),
    ("status", "503", {"retry_after": 2}),
    ("status", "429", {"retry_after": 3}),
    ("status", "timeout", {"delay": 1.2}),
    ("status", "reset", {}),
    ("status", "non_json", {}),
    ("status", "malformed", {}),
    ("status", "missing_fields", {}),
    ("result", "502", {}),
    ("result", "504", {"body": "json"}),
    ("result", "429", {}),
    ("result", "timeout", {"delay": 1.2}),
    ("result", "reset", {}),
    ("result", "non_json", {}),
    ("result", "malformed", {}),
    ("result", "missing_fields", {}),
    ("files", "500", {}),
    ("files", "503", {"retry_after": 1}),
    ("files", "timeout", {"delay": 1.2}),
    ("files", "reset", {}),
    ("files", "malformed", {}),  # half the video, with a matching Content-Length
    ("files", "missing_fields", {}),  # an empty body
]


@pytest.mark.parametrize(
    ("endpoint", "kind", "options"), READ_FAULTS, ids=[f"{e}-{k}" for e, k, _ in READ_FAULTS]
)
def test_read_faults_are_retried_and_the_video_arrives_whole(
    endpoint: str, kind: str, options: dict[str, Any], emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, ledger = one_row(tmp_path)
    [outcome] = submit(emulator.base_url, ledger, rows)
    assert outcome.action is SubmitAction.SUBMITTED
    emulator.add_fault(endpoint, kind, times=2, **options)  # the first retry meets it again
    poll_until_settled(
        emulator.base_url, ledger, tmp_path / "videos", timeout=0.5, refetch_interval_seconds=0.0
    )
    assert emulator.pending_faults() == []  # both were met
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.COMPLETED and row.error is None
    assert row.submission is not None and row.video.local_path is not None
    local = Path(row.video.local_path)
    assert local == video_path(tmp_path / "videos", row.submission)  # one file per job
    assert hashlib.sha256(local.read_bytes()).hexdigest() == row.video.sha256
    probe = probe_video(local)
    width, height, _, frames = rows[0].request.output_geometry()
    assert (probe.width, probe.height, probe.num_frames) == (width, height, frames)
    assert (row.video.width, row.video.height, row.video.num_frames) == (width, height, frames)
    # no partial file left behind: the hidden files are the video's previews
    hidden = sorted((tmp_path / "videos").glob(".*"))
    assert hidden == sorted(cache_path(local, kind) for kind in PreviewKind)
    assert emulator.jobs_created == 1 and emulator.stats["generate"] == 1
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_status_that_never_answers_times_the_job_out_and_polling_stops(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, ledger = one_row(tmp_path)
    submit(emulator.base_url, ledger, rows)
    emulator.add_fault("status", 503, times=10_000)
    reports = poll_until_settled(
        emulator.base_url, ledger, tmp_path / "videos", job_deadline_seconds=0.5, max_retries=1
    )
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.TIMED_OUT
    assert row.request_id in emulator.jobs
    assert row.error is not None and "no usable status answer" in row.error
    [final] = reports[-1].final
    assert final.partition_key == "a" and final.status is VideoStatus.TIMED_OUT
    asked = emulator.stats["status"]
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert emulator.stats["status"] == asked  # polling stopped
    assert history_of(ledger, "a")["event"].tolist()[-1] == "TIMED_OUT"
    assert_accounted(emulator.jobs, ledger, rows)


def test_a_paid_video_stays_fetchable_past_the_job_deadline_and_after_a_refetch(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """The job deadline bounds the service's work, not our downloads: a completed job whose
    video cannot be fetched ends FETCH_FAILED (never TIMED_OUT), and a refetch long after the
    deadline gets fetch_attempts tries again, not one."""
    rows, ledger = one_row(tmp_path)
    submit(emulator.base_url, ledger, rows)
    videos = tmp_path / "videos"
    emulator.add_fault("files", "malformed", times=3)  # half a video, three times
    while row_of(ledger, "a").status is not VideoStatus.FETCHING:  # done, its video not fetched
        poll_once(emulator.base_url, ledger, videos, refetch_interval_seconds=0.0)
    time.sleep(0.6)
    late = {"job_deadline_seconds": 0.5, "refetch_interval_seconds": 0.0}  # 0.6 s are past it
    poll_until_settled(emulator.base_url, ledger, videos, **late)
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.FETCH_FAILED, row.error
    assert row.error is not None and "kvid-dagster refetch a" in row.error
    assert emulator.stats["files"] == 3
    asked = emulator.stats["status"]
    time.sleep(0.6)  # well past the job deadline now
    emulator.add_fault("files", "malformed", times=1)  # storage still flaky once
    assert ledger.refetch("a").status is VideoStatus.FETCHING
    poll_once(emulator.base_url, ledger, videos, **late)
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.FETCHING, row.error  # a failed try, not the end
    poll_until_settled(emulator.base_url, ledger, videos, **late)
    row = row_of(ledger, "a")
    assert row.status is VideoStatus.COMPLETED and row.video.local_path is not None
    assert emulator.stats["status"] == asked  # once the service said done, only our fetches
    assert emulator.jobs_created == 1
    assert_accounted(emulator.jobs, ledger, rows)


def test_the_api_key_is_scrubbed_when_the_server_echoes_it(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, ledger = one_row(tmp_path)
    emulator.add_fault("generate", "echo_key")
    [outcome] = submit(emulator.base_url, ledger, rows)
    assert outcome.action is SubmitAction.UNCERTAIN and TEST_API_KEY not in outcome.message
    assert "***" in outcome.message  # the echo was there, and was scrubbed
    # a person settles it with a request_id, so the status endpoint gets polled for it
    resolved = ledger.resolve_uncertain("a", request_id="req_0000000000000000")
    assert resolved.status is VideoStatus.SUBMITTED
    emulator.add_fault("status", "echo_key", times=10)
    report = poll_once(emulator.base_url, ledger, tmp_path / "videos")
    assert report.errors and "***" in report.errors[0]
    text = json.dumps(report.errors) + repr(ledger.rows()) + repr(ledger.submissions())
    text += json.dumps(ledger.events(), default=str)
    text += videos_frame(ledger).to_json(date_format="iso")
    text += submissions_frame(ledger).to_json(date_format="iso")
    assert "***" in text and TEST_API_KEY not in text
    # nor anywhere on disk: the ledger database (and its WAL), the journal, the catalogs
    ledger.close()
    on_disk = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert on_disk and all(TEST_API_KEY.encode() not in p.read_bytes() for p in on_disk)
