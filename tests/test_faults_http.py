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
from pathlib import Path
from typing import Any

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

from kvid_dagster.catalog import KvidCatalog
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.probe import probe_video

V1_480P_CREDITS = 60.0


@pytest.fixture
def emulator(emulator_factory: EmulatorFactory) -> KvidEmulator:
    """Quicker jobs than the shared fixture's: this file runs dozens of them."""
    return emulator_factory(job_duration=0.1)


def one_row(tmp_path: Path) -> tuple[list[Any], KvidCatalog]:
    rows = table_rows(write_table(tmp_path / "prompts.csv", ["a"]))
    return rows, KvidCatalog(tmp_path / "catalog", durable=False)


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
    rows, catalog = one_row(tmp_path)
    emulator.add_fault("generate", kind, **options)
    [outcome] = submit(emulator.base_url, catalog, rows, timeout=0.5)
    assert outcome.action == "uncertain" and outcome.status == "UNCERTAIN"
    assert emulator.stats["generate"] == 1  # the client did not retry it
    assert emulator.jobs_created == jobs
    record = catalog.get("a")
    assert record is not None and record["status"] == "UNCERTAIN" and record["request_id"] is None
    # what was sent is on the row: the body in the message, the prompt and params beside it
    assert "body=" in record["error"] and rows[0].prompt in record["error"]
    history = catalog.submissions(partition_key="a")
    assert history["event"].tolist() == ["INTENT", "UNCERTAIN"]
    assert history["cost_credits"].iloc[-1] == V1_480P_CREDITS  # may have been billed

    # re-runs and status ticks never send it again
    [again] = submit(emulator.base_url, catalog, rows)
    assert again.action == "skipped" and "UNCERTAIN" in again.message
    poll_until_settled(emulator.base_url, catalog, tmp_path / "videos", intent_grace_s=0.0)
    assert emulator.stats["generate"] == 1 and statuses(catalog) == {"a": "UNCERTAIN"}
    assert_accounted(emulator.jobs, catalog, rows)


# ---------------------------------------------------------------------------------------------
# generate: refusals (nothing created, safe to send again)


def test_a_429_storm_on_generate_waits_retry_after_and_pays_once(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, catalog = one_row(tmp_path)
    emulator.add_fault("generate", 429, times=3, retry_after=7)
    sleep = RecordedSleep()
    [outcome] = submit(emulator.base_url, catalog, rows, sleep=sleep, backoff_max=60.0)
    assert outcome.action == "submitted"
    assert sleep.calls == [7.0, 7.0, 7.0]  # the server's Retry-After, not a guess
    assert emulator.stats[("generate", 429)] == 3 and emulator.jobs_created == 1
    poll_until_settled(emulator.base_url, catalog, tmp_path / "videos")
    assert statuses(catalog) == {"a": "COMPLETED"}
    assert_accounted(emulator.jobs, catalog, rows)


def test_a_429_storm_longer_than_the_retries_leaves_the_row_unpaid_for_the_next_run(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, catalog = one_row(tmp_path)
    emulator.add_fault("generate", 429, times=4, retry_after=1)
    [outcome] = submit(emulator.base_url, catalog, rows, max_retries=3)
    assert outcome.action == "error" and outcome.status == "PENDING"
    assert emulator.jobs_created == 0
    history = catalog.submissions(partition_key="a")
    assert history["event"].tolist() == ["INTENT", "FAILED_TO_SUBMIT"]
    assert history["cost_credits"].iloc[-1] == 0.0
    [outcome] = submit(emulator.base_url, catalog, rows)  # the next run sends it, once
    assert outcome.action == "submitted" and emulator.jobs_created == 1
    poll_until_settled(emulator.base_url, catalog, tmp_path / "videos")
    assert statuses(catalog) == {"a": "COMPLETED"}
    assert_accounted(emulator.jobs, catalog, rows)


def test_a_rate_limited_service_under_load_gets_every_job_once(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    """A real token bucket (8 requests/s) and real Retry-After waits, twelve jobs at once."""
    emulator = emulator_factory(rate_limit=8.0, reuse_renders=True)
    keys = [f"k{i:02d}" for i in range(12)]
    rows = table_rows(write_table(tmp_path / "prompts.csv", keys))
    catalog = KvidCatalog(tmp_path / "catalog", durable=False)
    outcomes = submit(emulator.base_url, catalog, rows, sleep=asyncio.sleep, backoff_max=2.0)
    assert [o.action for o in outcomes] == ["submitted"] * len(keys)
    assert emulator.stats[("generate", 429)] > 0 and emulator.jobs_created == len(keys)
    poll_until_settled(
        emulator.base_url, catalog, tmp_path / "videos", sleep=asyncio.sleep, pause=0.3
    )
    assert set(statuses(catalog).values()) == {"COMPLETED"}
    assert_accounted(emulator.jobs, catalog, rows)


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
    rows, catalog = one_row(tmp_path)
    [outcome] = submit(emulator.base_url, catalog, rows)
    assert outcome.action == "submitted"
    emulator.add_fault(endpoint, kind, times=2, **options)  # the first retry meets it again
    poll_until_settled(emulator.base_url, catalog, tmp_path / "videos", timeout=0.5)
    assert emulator.pending_faults() == []  # both were met
    record = catalog.get("a")
    assert record is not None and record["status"] == "COMPLETED" and record["error"] is None
    data = Path(record["local_path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    probe = probe_video(Path(record["local_path"]))
    width, height, _, frames = rows[0].request.output_geometry()
    assert (probe.width, probe.height, probe.num_frames) == (width, height, frames)
    assert not list((tmp_path / "videos").glob(".*"))  # no partial file left behind
    assert emulator.jobs_created == 1 and emulator.stats["generate"] == 1
    assert_accounted(emulator.jobs, catalog, rows)


def test_a_status_that_never_answers_times_the_job_out_and_polling_stops(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, catalog = one_row(tmp_path)
    submit(emulator.base_url, catalog, rows)
    emulator.add_fault("status", 503, times=10_000)
    reports = poll_until_settled(
        emulator.base_url, catalog, tmp_path / "videos", job_deadline_s=0.5, max_retries=1
    )
    record = catalog.get("a")
    assert record is not None and record["status"] == "TIMED_OUT"
    assert record["request_id"] in emulator.jobs and "no usable status answer" in record["error"]
    assert reports[-1].terminal[0].outcome == "TIMED_OUT"
    asked = emulator.stats["status"]
    poll_until_settled(emulator.base_url, catalog, tmp_path / "videos")
    assert emulator.stats["status"] == asked  # polling stopped
    assert catalog.submissions(partition_key="a")["event"].tolist()[-1] == "TIMED_OUT"
    assert_accounted(emulator.jobs, catalog, rows)


def test_a_video_that_never_downloads_is_fetched_until_the_deadline_then_timed_out(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, catalog = one_row(tmp_path)
    submit(emulator.base_url, catalog, rows)
    emulator.add_fault("files", "malformed", times=10_000)  # always half a video
    seen: set[str] = set()
    for report in poll_until_settled(
        emulator.base_url, catalog, tmp_path / "videos", job_deadline_s=1.5
    ):
        seen |= {e.record["status"] for e in report.events}
    assert "FETCHING" in seen  # completed at the service, retried on every tick meanwhile
    record = catalog.get("a")
    assert record is not None and record["status"] == "TIMED_OUT"
    assert "completed, but fetching the video" in record["error"]
    assert record["local_path"] is None and not list((tmp_path / "videos").glob("*"))
    assert_accounted(emulator.jobs, catalog, rows)


def test_the_api_key_is_scrubbed_when_the_server_echoes_it(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    rows, catalog = one_row(tmp_path)
    emulator.add_fault("generate", "echo_key")
    [outcome] = submit(emulator.base_url, catalog, rows)
    assert outcome.action == "uncertain" and TEST_API_KEY not in outcome.message
    assert "***" in outcome.message  # the echo was there, and was scrubbed
    catalog.update("a", status="SUBMITTED", request_id="req_0000000000000000")
    emulator.add_fault("status", "echo_key", times=10)
    report = poll_once(emulator.base_url, catalog, tmp_path / "videos")
    assert report.errors and "***" in report.errors[0]
    text = json.dumps(report.errors) + json.dumps(catalog.records_by_key(), default=str)
    text += catalog.submissions().to_json(date_format="iso")
    assert TEST_API_KEY not in text
