"""The generation dialect through Dagster: the table, the money rules and ``kvid-dagster run``.

Everything above the client is dialect-blind; these tests show that a table of generation
requests goes through the same assets, ledger and sensors, against a real emulator that serves
the generation dialect (strictly, where it says so), with its three money rules counted there:
402 stops the run and leaves the rest PENDING, 429 CONCURRENT_LIMIT holds the queue and every
row is still paid once, and ``used_credit`` is the job's cost.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import TEST_API_KEY, EmulatorFactory, fast_config
from faultkit import dagster_home, open_instance, run_prompts, run_submit, tick_until_settled

from kvid_dagster.cli.progress import PlainDisplay
from kvid_dagster.cli.runner import evaluate_status_sensor, run_pipeline
from kvid_dagster.client import ApiDialect, GenerationTextToVideo, KvidClient
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import load_prompt_table
from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.emulator.generation import ModelFamily
from kvid_dagster.ledger import Ledger, VideoStatus
from kvid_dagster.media.probe import probe_video
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.resources import KvidResource

GENERATION = ApiDialect.GENERATION


def write_rows(path: Path, rows: Sequence[dict[str, str]]) -> Path:
    columns = sorted({name for row in rows for name in row})
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def text_rows(count: int) -> list[dict[str, str]]:
    return [
        {"prompt_id": f"g{i}", "prompt": f"A kite over a beach, take {i}", "resolution": "480p"}
        for i in range(count)
    ]


def generation_defs(
    emulator: KvidEmulator, prompts: Path, data_dir: Path, **resource_settings: Any
) -> Any:
    resource = KvidResource(
        api_key=TEST_API_KEY,
        base_url=emulator.base_url,
        dialect=GENERATION,
        backoff_base_seconds=0.01,
        backoff_max_seconds=1.0,
        **resource_settings,
    )
    project = KvidProject(prompts, data_dir, dialect=GENERATION)
    return build_kvid_definitions(project, resource=resource)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Any]:
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        yield instance


def ledger_of(prompts: Path, data_dir: Path) -> Ledger:
    return KvidProject(prompts, data_dir, dialect=GENERATION).ledger()


def generates(emulator: KvidEmulator) -> int:
    """Jobs the emulator created in the generation dialect (what was paid for)."""
    return sum(1 for job in emulator.jobs.values() if job.dialect.value == "generation")


def test_every_job_kind_goes_through_dagster_and_used_credit_is_the_cost(
    emulator_factory: EmulatorFactory, image_server: str, tmp_path: Path, home: Any
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    prompts = write_rows(
        tmp_path / "p.csv",
        [
            {"prompt_id": "t2v", "prompt": "A lighthouse at dusk", "resolution": "480p",
             "aspect_ratio": "9:16", "model": "seedance"},
            {"prompt_id": "i2v", "prompt": "The tiger blinks", "job": "image-to-video",
             "image_url": f"{image_server}/tiger.jpg", "resolution": "720p",
             "aspect_ratio": "16:9"},
            {"prompt_id": "r2v", "prompt": "Dogs run along the pavilion", "resolution": "480p",
             "job": "reference-to-video", "aspect_ratio": "1:1", "model": "seedance",
             "image_urls": f'["{image_server}/pavilion_park.jpg", "{image_server}/tiger.jpg"]'},
        ],
    )  # fmt: skip
    data_dir = tmp_path / "data"
    defs = generation_defs(emulator, prompts, data_dir)
    ledger = ledger_of(prompts, data_dir)
    assert run_prompts(defs, home)
    assert run_submit(defs, home, "t2v", "r2v")
    tick_until_settled(defs, home, ledger)

    assert emulator.stats["undocumented_field"] == 0  # the strict server saw only documented fields
    videos = pd.read_parquet(data_dir / "catalog" / "videos").set_index("partition_key")
    assert (videos["status"] == "COMPLETED").all(), videos[["status", "error"]]
    expected = {"t2v": (480, 854), "i2v": (1280, 720), "r2v": (480, 480)}
    jobs = {job.request_id: job for job in emulator.jobs.values()}
    for key, (width, height) in expected.items():
        probe = probe_video(Path(videos.loc[key, "local_path"]))
        assert (probe.width, probe.height) == (width, height), key
        job = jobs[videos.loc[key, "request_id"]]
        assert (
            job.kind
            == ("text-to-video", "image-to-video", "reference-to-video")[list(expected).index(key)]
        )
        # the service's figure is the cost; the price table's estimate is kept beside it
        assert videos.loc[key, "cost_credits"] == job.used_credit
    assert videos.loc["t2v", "estimated_credits"] == 39  # seedance 480p, one 5 s clip
    assert generates(emulator) == 3


def test_out_of_credit_stops_the_run_and_leaves_the_rest_pending(
    emulator_factory: EmulatorFactory, tmp_path: Path, home: Any
) -> None:
    # three clips' worth of credit, for eight rows
    emulator = emulator_factory(fast_config(credit_balance=0))
    prompts = write_rows(tmp_path / "p.csv", text_rows(8))
    data_dir = tmp_path / "data"
    defs = generation_defs(emulator, prompts, data_dir, generate_concurrency=1)
    ledger = ledger_of(prompts, data_dir)
    assert run_prompts(defs, home)
    emulator.add_credits(3 * _price_of_one(emulator, prompts))

    result = _submit(defs, home, "g0", "g7")
    assert not result.success
    failure = _failure_text(result)
    assert "credits ran out" in failure and "5 rows wait" in failure, failure
    assert generates(emulator) == 3 and emulator.stats["insufficient_credit"] == 1
    statuses = {row.partition_key: row.status for row in ledger.rows()}
    assert sorted(statuses.values()).count(VideoStatus.SUBMITTED) == 3
    assert [s for s in statuses.values() if s is not VideoStatus.SUBMITTED] == [
        VideoStatus.PENDING
    ] * 5  # never UNCERTAIN, never FAILED: nothing was created for them

    # credit bought: the next run sends exactly the five that waited
    emulator.add_credits(10 * _price_of_one(emulator, prompts))
    assert run_submit(defs, home, "g0", "g7")
    assert generates(emulator) == 8
    tick_until_settled(defs, home, ledger)
    assert {row.status for row in ledger.rows()} == {VideoStatus.COMPLETED}


def test_the_concurrent_job_limit_holds_the_queue_and_each_row_is_paid_once(
    emulator_factory: EmulatorFactory, tmp_path: Path, home: Any
) -> None:
    emulator = emulator_factory(fast_config(concurrent_limit=2, job_duration=0.8))
    prompts = write_rows(tmp_path / "p.csv", text_rows(6))
    data_dir = tmp_path / "data"
    defs = generation_defs(emulator, prompts, data_dir, concurrent_limit_wait_seconds=0.3)
    ledger = ledger_of(prompts, data_dir)
    assert run_prompts(defs, home)
    assert run_submit(defs, home, "g0", "g5")

    assert emulator.stats["concurrent_limit"] > 0  # the limit was met, and waited out
    assert generates(emulator) == 6  # every row paid, and once
    assert len({job.body["prompt"] for job in emulator.jobs.values()}) == 6
    tick_until_settled(defs, home, ledger)
    assert {row.status for row in ledger.rows()} == {VideoStatus.COMPLETED}
    history = pd.read_parquet(data_dir / "catalog" / "submissions")
    assert (history["event"] == "SUBMITTED").sum() == 6
    assert not (history["event"] == "UNCERTAIN").any()


def test_a_canceled_job_ends_canceled_and_is_not_paid_again(
    emulator_factory: EmulatorFactory, tmp_path: Path, home: Any
) -> None:
    emulator = emulator_factory(fast_config(job_duration=30.0))
    prompts = write_rows(tmp_path / "p.csv", text_rows(2))
    data_dir = tmp_path / "data"
    defs = build_kvid_definitions(
        KvidProject(prompts, data_dir, dialect="generation"),
        resource=KvidResource(
            api_key=TEST_API_KEY, base_url=emulator.base_url, dialect="generation"
        ),
        # the FAILED-retry policy: a canceled job is not FAILED
        status_sensor=StatusSensorOptions(failed_job_max_attempts=3),
    )
    ledger = ledger_of(prompts, data_dir)
    assert run_prompts(defs, home)
    assert run_submit(defs, home, "g0", "g1")
    for job_id in list(emulator.jobs):
        emulator.cancel_job(job_id)
    tick_until_settled(defs, home, ledger)
    rows = {row.partition_key: row for row in ledger.rows()}
    assert {row.status for row in rows.values()} == {VideoStatus.CANCELED}
    assert all(row.status.ended_without_video for row in rows.values())
    assert generates(emulator) == 2  # not re-sent by the retry policy, nor by another run
    assert run_submit(defs, home, "g0", "g1")
    assert generates(emulator) == 2


def test_a_row_valid_only_in_the_other_dialect_says_so(tmp_path: Path) -> None:
    table = write_rows(
        tmp_path / "p.csv",
        [
            {"prompt_id": "ref", "prompt": "dogs", "job": "reference-to-video",
             "image_urls": "https://img.example.com/a.png|https://img.example.com/b.png"},
            {"prompt_id": "wan", "prompt": "a lake", "num_frames": "81", "camera_fixed": "true",
             "model": "v2"},
        ],
    )  # fmt: skip
    video = {bad.partition_key: bad.message for bad in load_prompt_table(table).invalid}
    assert "valid in the generation dialect" in video["ref"], video
    assert "KVID_API_DIALECT=generation" in video["ref"]
    generation = load_prompt_table(table, dialect=GENERATION)
    assert [row.partition_key for row in generation.rows] == ["ref"]
    (bad,) = generation.invalid
    assert bad.partition_key == "wan" and "camera_fixed" in bad.message
    assert "valid in the video dialect" not in bad.message  # num_frames + v2: valid in neither


def test_a_resource_of_the_other_dialect_fails_the_run_before_anything_is_sent(
    emulator: KvidEmulator, tmp_path: Path, home: Any
) -> None:
    prompts = write_rows(tmp_path / "p.csv", text_rows(2))
    defs = build_kvid_definitions(
        KvidProject(prompts, tmp_path / "data", dialect="generation"),
        resource=KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url),  # video
    )
    assert run_prompts(defs, home)
    result = _submit(defs, home, "g0", "g1")
    assert not result.success
    assert "dialect" in _failure_text(result)
    assert emulator.jobs_created == 0


def test_kvid_dagster_run_in_the_generation_dialect_against_a_strict_server(
    emulator_factory: EmulatorFactory, image_server: str, tmp_path: Path
) -> None:
    emulator = emulator_factory(fast_config(strict_fields=True))
    prompts = write_rows(
        tmp_path / "p.csv",
        [
            *text_rows(2),
            {"prompt_id": "i2v", "prompt": "The dish steams", "job": "image-to-video",
             "image_url": f"{image_server}/salmon_dish.jpg", "resolution": "480p"},
            {"prompt_id": "r2v", "prompt": "The park at noon", "job": "reference-to-video",
             "image_urls": f"{image_server}/pavilion_park.jpg", "resolution": "480p",
             "duration": "4"},
        ],
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVID_", "DAGSTER_HOME"))}
    env.update(
        KVID_BASE_URL=emulator.base_url, KVID_API_KEY=TEST_API_KEY, KVID_API_DIALECT="generation"
    )
    data_dir = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "kvid_dagster.cli", "run", "--prompts", str(prompts),
         "--data-dir", str(data_dir), "--poll-interval", "0.3"],
        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert generates(emulator) == 4 and emulator.jobs_created == 4
    assert emulator.stats["undocumented_field"] == 0
    videos = pd.read_parquet(data_dir / "catalog" / "videos")
    assert (videos["status"] == "COMPLETED").all(), videos[["partition_key", "status", "error"]]
    for path in videos["local_path"]:
        probe = probe_video(Path(path))
        assert min(probe.width, probe.height) == 480 and probe.num_frames > 0
    assert TEST_API_KEY not in completed.stdout + completed.stderr


# ---------------------------------------------------------------------------------------------


def _price_of_one(emulator: KvidEmulator, prompts: Path) -> float:
    """What the emulator debits for one row of ``text_rows``: a 5 s 480p clip of the server's
    default model (wan), from its own price table."""
    return float(emulator.config.generation_prices[ModelFamily.WAN]["480p"])


def _submit(defs: Any, instance: Any, first: str, last: str) -> Any:
    from kvid_dagster.core.planning import RANGE_END_TAG, RANGE_START_TAG
    from kvid_dagster.definitions import SUBMIT_JOB

    return defs.resolve_job_def(SUBMIT_JOB).execute_in_process(
        instance=instance,
        tags={RANGE_START_TAG: first, RANGE_END_TAG: last},
        raise_on_error=False,
    )


def _failure_text(result: Any) -> str:
    return "\n".join(
        str(event.step_failure_data.error.message)
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data.error is not None
    ) + "\n".join(
        str(event.step_failure_data.user_failure_data.description)
        for event in result.all_events
        if event.is_step_failure and event.step_failure_data.user_failure_data is not None
    )


def test_a_retry_held_by_the_concurrent_limit_waits_no_longer_than_the_ticks_budget(
    emulator_factory: EmulatorFactory, tmp_path: Path, home: Any
) -> None:
    """The FAILED-retry policy meets the service's limit on running jobs (another client of
    the account holds the one slot): the tick ends within its budget instead of holding the
    retry for ``limit_hold_s`` (30 minutes), nothing is claimed or sent, the row stays FAILED,
    and the first tick after the slot frees retries it, once."""
    emulator = emulator_factory(fast_config(concurrent_limit=1, job_duration=60.0))
    prompts = write_rows(tmp_path / "p.csv", text_rows(1))
    data_dir = tmp_path / "data"
    resource = KvidResource(
        api_key=TEST_API_KEY, base_url=emulator.base_url, dialect=GENERATION,
        backoff_base_seconds=0.01, backoff_max_seconds=1.0, concurrent_limit_wait_seconds=0.5,
    )  # fmt: skip
    budget = 2.0
    defs = build_kvid_definitions(
        KvidProject(prompts, data_dir, dialect=GENERATION),
        resource=resource,
        status_sensor=StatusSensorOptions(failed_job_max_attempts=2, tick_budget_seconds=budget),
    )
    ledger = ledger_of(prompts, data_dir)
    assert run_prompts(defs, home) and run_submit(defs, home, "g0", "g0")
    (first,) = list(emulator.jobs)
    emulator.fail_job(first)
    with KvidClient(TEST_API_KEY, emulator.base_url, dialect="generation") as other:
        slot = other.generate(GenerationTextToVideo("another client's job", resolution="480p"))

    started = time.monotonic()
    evaluate_status_sensor(defs, home, None, "kvid_status_sensor")
    took = time.monotonic() - started
    assert emulator.stats["concurrent_limit"] >= 1  # the retry met the limit
    assert took < budget + 5.0, took  # (Dagster, the ledger and publishing: well under 5 s)
    (row,) = ledger.rows()
    assert row.status is VideoStatus.FAILED and row.attempts == 1
    assert emulator.jobs_created == 2

    emulator.cancel_job(slot)
    evaluate_status_sensor(defs, home, None, "kvid_status_sensor")
    (row,) = ledger.rows()
    assert row.attempts == 2 and row.status.needs_polling
    assert emulator.jobs_created == 3


def test_a_run_after_a_dialect_switch_waits_only_for_the_jobs_it_can_poll(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """Jobs sent in the other dialect are never polled by this one: the run must not idle
    until its deadline on them, and must say what waits for the other dialect."""
    prompts = write_rows(tmp_path / "p.csv", text_rows(2))
    data_dir = tmp_path / "data"
    emulator.config.job_duration = 3600.0  # the generation jobs are still running at the end

    def run(dialect: ApiDialect, deadline_seconds: float) -> tuple[Any, str]:
        resource = KvidResource(api_key=TEST_API_KEY, base_url=emulator.base_url, dialect=dialect)
        out = io.StringIO()
        with open_instance(dagster_home(tmp_path / "home")) as instance:
            result = run_pipeline(
                KvidProject(prompts, data_dir, dialect=dialect),
                resource,
                instance=instance,
                poll_interval_seconds=0.2,
                deadline_seconds=deadline_seconds,
                display=PlainDisplay(out),
            )
        return result, out.getvalue()

    run(GENERATION, deadline_seconds=0.0)  # sends both, then stops waiting at once
    assert generates(emulator) == 2
    emulator.config.job_duration = 0.3
    result, shown = run(ApiDialect.VIDEO, deadline_seconds=60.0)
    assert result.ok and emulator.jobs_created == 4
    assert "giving up" not in shown  # it did not wait for what it cannot poll
    assert (
        "2 job(s) sent in the generation dialect are not polled by this video-dialect run" in shown
    )
    assert "KVID_API_DIALECT=generation" in shown
    ledger = ledger_of(prompts, data_dir)
    assert len(ledger.jobs_to_poll("generation")) == 2  # still running, ids kept
