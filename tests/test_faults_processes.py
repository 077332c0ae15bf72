"""Processes killed with SIGKILL at the worst moments, and processes racing each other.

Every test ends the same way: the next run or sensor tick converges, every job the emulator
created (billed) is in the ledger with its request_id or its submission is UNCERTAIN holding
what was sent, and no row was sent twice. A killed submitter leaves at most
``generate_concurrency`` claims (SUBMITTING); the next run or tick settles them UNCERTAIN at
once, and rows it never claimed are simply sent by the next run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY, EmulatorFactory
from dagster import AssetKey, DagsterRunStatus, RunsFilter
from faultkit import (
    assert_accounted,
    check_verdicts,
    child_stderr,
    dagster_home,
    kill,
    make_client,
    make_defs,
    materialization_counts,
    open_instance,
    poll_once,
    poll_until_settled,
    quiesce,
    run_prompts,
    run_submit,
    spawn,
    statuses,
    submit,
    table_rows,
    tick_until_settled,
    wait_for_file,
    waiting,
    write_table,
)

from kvid_dagster._dagster_common import keys_needing_jobs
from kvid_dagster.cli.runner import evaluate_status_sensor
from kvid_dagster.client import AsyncKvidClient, JobKind, KvidClient, KvidNotFoundError
from kvid_dagster.client._ramp import DEFAULT_INITIAL
from kvid_dagster.client.video_requests import canonical_json
from kvid_dagster.core.poll import PollConfig, poll_pending
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptRow, load_prompt_table
from kvid_dagster.core.submit import register_table
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import ClaimOwner, JobChange, Ledger, Submission, VideoStatus
from kvid_dagster.sensor_builder import StatusCursor

# real servers' rough edges in every emulator here (see conftest.REALISTIC_MARK)
pytestmark = pytest.mark.realistic_emulator

VIDEOS = AssetKey("kvid_videos")


def wait_until_all_completed(emulator: KvidEmulator, count: int, timeout: float = 60) -> None:
    """Wait until the emulator has ``count`` jobs and its status endpoint answers COMPLETED for
    each: their state inside is not enough, a realistic one answers 404 for a moment after
    generate."""

    def answers_completed(client: KvidClient, request_id: str, kind: str) -> bool:
        try:
            return client.status(JobKind(kind), request_id).is_completed
        except KvidNotFoundError:
            return False

    deadline = time.monotonic() + timeout
    with KvidClient(TEST_API_KEY, emulator.base_url) as client:
        while time.monotonic() < deadline:
            jobs = emulator.jobs
            if len(jobs) == count and all(
                answers_completed(client, request_id, job.kind) for request_id, job in jobs.items()
            ):
                return
            time.sleep(0.05)
    raise AssertionError("the emulator's jobs did not complete")


def wait_until(condition: Callable[[], bool], child: Any, timeout: float = 60.0) -> None:
    """Wait for ``condition`` while ``child`` runs (a state the child reaches, then holds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None:
            raise AssertionError(f"child exited {child.returncode}: {child_stderr(child)}")
        if time.monotonic() > deadline:
            raise AssertionError("the child never got there")
        time.sleep(0.02)


def jobs_per_key(jobs: Mapping[str, Any], rows: Sequence[PromptRow]) -> Counter[str]:
    """How many jobs the emulator created for each row (by the body it was sent)."""
    by_body = {canonical_json(row.request.to_body()): row.partition_key for row in rows}
    return Counter(by_body[canonical_json(dict(job.body))] for job in jobs.values())


def keys_in(states: Mapping[str, str], status: str) -> set[str]:
    return {key for key, state in states.items() if state == status}


@pytest.mark.parametrize("moment", ["claimed, not sent", "answer in flight", "generate returned"])
def test_a_run_killed_mid_submission_never_pays_twice(
    moment: str, emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory()
    keys = ["k0", "k1", "k2"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir, home = tmp_path / "data", dagster_home(tmp_path / "home")
    project = KvidProject(prompts, data_dir)
    defs = make_defs(emulator.base_url, prompts, data_dir)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)

    marker = tmp_path / "marker"
    url = emulator.base_url
    if moment == "claimed, not sent":
        # the first claim is committed, its generate not sent; the process freezes there
        child = spawn(
            "child_run_submit_at", home, prompts, data_dir, url, "k0", "k2", "claim_return:1",
            marker,
        )  # fmt: skip
        wait_for_file(marker, child)
    elif moment == "answer in flight":
        # the jobs are created, their answers held back: a new client lets its first
        # DEFAULT_INITIAL generates go, and only those rows are claimed; the third waits in
        # the client holding nothing
        emulator.add_fault("generate", "timeout", times=3, delay=300)  # until the stop
        child = spawn(
            "child_run_submit_at", home, prompts, data_dir, url, "k0", "k2", "none", marker, 600
        )
        wait_until(
            lambda: (
                emulator.jobs_created == DEFAULT_INITIAL
                and len(keys_in(statuses(project.ledger()), "SUBMITTING")) == DEFAULT_INITIAL
            ),
            child,
        )
    else:
        # the generates have returned; their request_ids are about to be recorded
        child = spawn(
            "child_run_submit", home, prompts, data_dir, url, "k0", "k2", "after_generate", marker
        )
        wait_for_file(marker, child)
        assert emulator.wait_for_jobs(3, timeout=60)
    kill(child)
    quiesce(emulator)
    emulator.clear_faults()

    ledger = project.ledger()
    at_kill = statuses(ledger)
    claimed = keys_in(at_kill, "SUBMITTING")
    never_claimed = set(keys) - claimed
    if moment == "claimed, not sent":
        assert claimed and set(at_kill.values()) <= {"SUBMITTING", "PENDING"}
        assert emulator.stats["generate"] == emulator.jobs_created == 0
    elif moment == "answer in flight":
        assert len(claimed) == emulator.jobs_created == DEFAULT_INITIAL  # claimed = sent
        assert set(at_kill.values()) == {"SUBMITTING", "PENDING"}
    else:
        assert claimed == set(keys)  # claims, no request_id
        assert emulator.jobs_created == 3
    assert all(r.request_id is None for r in ledger.rows())
    sent = emulator.stats["generate"]
    with open_instance(home) as instance:
        # the next run settles the dead run's claims UNCERTAIN at once (no grace period) and
        # sends exactly the rows it never claimed
        assert run_submit(defs, instance, "k0", "k2")
        assert emulator.stats["generate"] == sent + len(never_claimed)
        assert keys_in(statuses(ledger), "UNCERTAIN") == claimed
        # the next sensor tick shows every UNCERTAIN row in Dagster
        tick_until_settled(defs, instance, ledger)
        assert check_verdicts(instance, keys) == {k: k not in claimed for k in keys}
        for row in ledger.rows(claimed):
            assert row.error and row.request_hash in row.error and "dashboard" in row.error
        assert_accounted(emulator.jobs, ledger, rows)
        # automation (schedule, prompt sensor) sees nothing to submit
        assert keys_needing_jobs(project, instance)[1] == []

        # a person looks at the dashboard: found jobs are recorded, missing ones released
        found = {canonical_json(dict(j.body)): rid for rid, j in emulator.jobs.items()}
        released = []
        for row in rows:
            if row.partition_key not in claimed:
                continue
            request_id = found.get(canonical_json(row.request.to_body()))
            ledger.resolve_uncertain(row.partition_key, request_id=request_id)
            if request_id is None:
                released.append(row.partition_key)
        if moment == "claimed, not sent":
            assert set(released) == claimed
        if moment == "generate returned":
            assert released == []
        created = emulator.jobs_created
        assert run_submit(defs, instance, "k0", "k2")  # sends exactly the released rows
        assert emulator.jobs_created == created + len(released)
        tick_until_settled(defs, instance, ledger)
        assert set(statuses(ledger).values()) == {"COMPLETED"}
        assert instance.get_materialized_partitions(VIDEOS) == set(keys)
    assert jobs_per_key(emulator.jobs, rows) == dict.fromkeys(keys, 1)
    assert_accounted(emulator.jobs, ledger, rows)
    events = [e["event"] for e in ledger.events()]
    assert events.count("RESOLVED") == len(claimed) and events.count("UNCERTAIN") == len(claimed)


def _pipeline(
    emulator: KvidEmulator, tmp_path: Path, keys: list[str]
) -> tuple[Path, Path, Path, Ledger, Any]:
    """A prompt table of ``keys``, its data folder, a Dagster home, its ledger, definitions."""
    prompts = write_table(tmp_path / "prompts.csv", keys)
    data_dir, home = tmp_path / "data", dagster_home(tmp_path / "home")
    defs = make_defs(emulator.base_url, prompts, data_dir)
    return prompts, data_dir, home, KvidProject(prompts, data_dir).ledger(), defs


@pytest.mark.parametrize("moment", ["reporting", "downloading"])
def test_a_status_tick_killed_midway_converges_on_the_next_tick(
    moment: str, emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory()
    keys = ["k0", "k1", "k2", "k3"]
    prompts, data_dir, home, ledger, defs = _pipeline(emulator, tmp_path, keys)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "k0", "k3")
    wait_until_all_completed(emulator, len(keys))

    marker = tmp_path / "marker"
    child = spawn("child_sensor_tick", home, prompts, data_dir, emulator.base_url, moment, marker)
    wait_for_file(marker, child)
    kill(child)
    with open_instance(home) as instance:
        if moment == "reporting":
            # the ledger has every outcome, Dagster only the first partition's
            assert set(statuses(ledger).values()) == {"COMPLETED"}
            assert len(instance.get_materialized_partitions(VIDEOS)) == 1
        else:
            assert set(statuses(ledger).values()) == {"SUBMITTED"}
            # killed in the middle of a file: its bytes kept for the next tick to continue
            assert list((data_dir / "videos").glob(".*.partial"))
        tick_until_settled(defs, instance, ledger)
        assert set(statuses(ledger).values()) == {"COMPLETED"}
        assert materialization_counts(instance, keys) == dict.fromkeys(keys, 1)
        assert check_verdicts(instance, keys) == dict.fromkeys(keys, True)
    for row in ledger.rows():
        assert row.video.local_path and row.video.sha256
        data = Path(row.video.local_path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.video.sha256
    assert emulator.jobs_created == len(keys)
    assert_accounted(emulator.jobs, ledger, table_rows(prompts))


def test_an_outcome_the_ledger_got_after_the_sensor_checked_is_reported_by_its_next_tick(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """Past its first tick the sensor re-checks only rows changed since the revision in its
    cursor: an outcome recorded after that (by a poller that died before reporting it) is still
    reported, once, and rows checked before are not reported again."""
    keys = ["k0", "k1"]
    _, data_dir, home, ledger, defs = _pipeline(emulator, tmp_path, keys)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)
        assert run_submit(defs, instance, "k0", "k0")
        cursor = None
        while "k0" in waiting(ledger):
            _, cursor = evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
            time.sleep(0.1)
        checked = StatusCursor.parse(cursor).checked
        assert checked is not None and checked <= ledger.revision()
        assert run_submit(defs, instance, "k1", "k1")
        wait_until_all_completed(emulator, len(keys))
        poll_once(emulator.base_url, ledger, data_dir / "videos")  # its report never made
        assert statuses(ledger) == {"k0": "COMPLETED", "k1": "COMPLETED"}
        assert materialization_counts(instance, keys) == {"k0": 1, "k1": 0}
        reported, cursor = evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
        assert reported and materialization_counts(instance, keys) == {"k0": 1, "k1": 1}
        again, _ = evaluate_status_sensor(defs, instance, cursor, "kvid_status_sensor")
        assert again == 0 and materialization_counts(instance, keys) == {"k0": 1, "k1": 1}
    assert emulator.jobs_created == len(keys)


def test_two_runs_submitting_the_same_partitions_at_once_pay_once(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(latency=0.02)  # a wider window for the race
    keys = [f"k{i}" for i in range(6)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    data_dir, home = tmp_path / "data", dagster_home(tmp_path / "home")
    defs = make_defs(emulator.base_url, prompts, data_dir)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)

    go = tmp_path / "go"
    markers = [tmp_path / "ready-a", tmp_path / "ready-b"]
    children = [
        spawn(
            "child_run_submit",
            home,
            prompts,
            data_dir,
            emulator.base_url,
            "k0",
            "k5",
            "plain",
            marker,
            go,
        )
        for marker in markers
    ]
    for marker, child in zip(markers, children, strict=True):
        wait_for_file(marker, child)
    go.touch()  # both runs start submitting the same six partitions now
    assert [child.wait(120) for child in children] == [0, 0]

    assert emulator.jobs_created == emulator.stats["generate"] == len(keys)
    ledger = Ledger.for_data_dir(data_dir)
    assert set(statuses(ledger).values()) == {"SUBMITTED"}
    events = [e["event"] for e in ledger.events()]
    assert events.count("SUBMITTED") == len(keys)
    assert events.count("INTENT") == len(keys)  # one claim per row: the other run skipped it
    assert len(ledger.submissions()) == len(keys)
    with open_instance(home) as instance:
        runs = instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        assert len(runs) == 3  # the table's run and both submitting runs succeeded
    assert_accounted(emulator.jobs, ledger, table_rows(prompts))


def test_concurrent_submitters_killed_mid_submission_lose_no_paid_job(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(latency=0.01, reuse_renders=True)
    keys = [f"k{i:02d}" for i in range(30)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir = tmp_path / "data"
    ledger = Ledger.for_data_dir(data_dir)  # created once, before the writers race
    register_table(ledger, load_prompt_table(prompts))
    groups = [keys[0:10], keys[10:20], keys[20:30]]
    children = [
        spawn("child_submit_rows", prompts, data_dir, emulator.base_url, json.dumps(group))
        for group in groups
    ]
    rng = random.Random(20261126)
    targets = sorted(rng.sample(range(2, 12), 3))  # the third is reachable whoever died first
    killed = 0
    for child, target in zip(children, targets, strict=True):
        # the writers are busy submitting by now: kill this one when the emulator has created
        # `target` jobs in all (unless it finished first)
        deadline = time.monotonic() + 60
        while not emulator.wait_for_jobs(target, timeout=0.05) and child.poll() is None:
            assert time.monotonic() < deadline, f"{emulator.jobs_created} jobs, not {target}"
        if child.poll() is None:
            kill(child)
            killed += 1
    for child in children:
        child.wait(60)
    assert killed >= 1
    quiesce(emulator)

    # what the killed writers left: at most generate_concurrency claims each (a writer that
    # started later may have settled some UNCERTAIN already), every paid job recorded or held
    # by a claim, every other row holding nothing
    at_kill = statuses(ledger)
    in_flight = keys_in(at_kill, "SUBMITTING") | keys_in(at_kill, "UNCERTAIN")
    assert len(in_flight) <= 4 * killed
    assert set(at_kill.values()) <= {"SUBMITTING", "UNCERTAIN", "SUBMITTED", "PENDING"}
    assert_accounted(emulator.jobs, ledger, rows)
    never_claimed = keys_in(at_kill, "PENDING")
    assert set(jobs_per_key(emulator.jobs, rows)) <= set(keys) - never_claimed
    # the recovery run settles the claims and sends exactly the rows that were never claimed
    submit(emulator.base_url, ledger, rows)
    sent = jobs_per_key(emulator.jobs, rows)
    assert all(sent[k] == 1 for k in never_claimed)
    poll_until_settled(emulator.base_url, ledger, data_dir / "videos")
    final = statuses(ledger)
    # an UNCERTAIN row is exactly one whose writer died with its claim in flight
    assert keys_in(final, "UNCERTAIN") == in_flight
    assert keys_in(final, "COMPLETED") == set(keys) - in_flight
    assert_accounted(emulator.jobs, ledger, rows)
    # (a writer killed in the middle of sending a body leaves a truncated request: 422, no job)
    stats = emulator.stats
    assert stats[("generate", 200)] == emulator.jobs_created == len(emulator.jobs), stats
    assert stats["generate"] == stats[("generate", 200)] + stats[("generate", 422)], stats


def _real_request_id(base_url: str, row: PromptRow) -> str:
    async def go() -> str:
        async with make_client(base_url) as client:
            return await client.generate(row.request)

    return asyncio.run(go())


@pytest.mark.parametrize("when", ["while recovery decides", "after recovery settled it"])
def test_a_request_id_recorded_by_a_slow_submitter_is_never_hidden_by_uncertain(
    when: str, emulator: KvidEmulator, tmp_path: Path
) -> None:
    """A submitter that only looked dead records its request_id while (or after) a status tick
    settles its claim: the request_id wins; UNCERTAIN never overwrites a recorded job."""
    prompts = write_table(tmp_path / "prompts.csv", ["slow", "other"])
    rows = {r.partition_key: r for r in table_rows(prompts)}
    ledger = Ledger.for_data_dir(tmp_path / "data")
    register_table(ledger, load_prompt_table(prompts))
    submit(emulator.base_url, ledger, [rows["other"]])
    claimed = ledger.claim(rows["slow"], ClaimOwner.current(), cost_credits=1.0)
    assert isinstance(claimed, Submission)
    late_id = _real_request_id(emulator.base_url, rows["slow"])  # its generate went out

    def is_alive(sub: Submission) -> bool | None:
        if when == "while recovery decides" and sub.submission_id == claimed.submission_id:
            ledger.record_submitted(claimed, late_id)  # recorded as the tick decides
        return False  # the tick takes the owner for gone

    async def tick() -> Any:
        async with make_client(emulator.base_url) as client:
            return await poll_pending(
                client, ledger, PollConfig(tmp_path / "videos"), is_alive=is_alive
            )

    report = asyncio.run(tick())
    row = ledger.row("slow")
    assert row is not None
    if when == "while recovery decides":
        assert report.settled == []
        # recorded, then polled in the same tick like any other job
        assert row.request_id == late_id and row.status is not VideoStatus.UNCERTAIN
        assert row.status.needs_polling or row.status is VideoStatus.COMPLETED
    else:
        assert [s.partition_key for s in report.settled] == ["slow"]
        assert row.status is VideoStatus.UNCERTAIN
        ledger.record_submitted(claimed, late_id)  # the slow submitter's answer lands now
        row = ledger.row("slow")
        assert row is not None
        assert (row.status, row.request_id) == (VideoStatus.SUBMITTED, late_id)
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert set(statuses(ledger).values()) == {"COMPLETED"}
    assert emulator.jobs_created == 2
    assert_accounted(emulator.jobs, ledger, list(rows.values()))


def test_a_change_to_a_job_made_while_a_tick_polls_it_is_not_overwritten(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """Another writer (a second tick, a person resolving) moves a job while this tick waits for
    its status: this tick's change is dropped (versioned write) and the next tick converges."""
    prompts = write_table(tmp_path / "prompts.csv", ["k0", "k1"])
    rows = table_rows(prompts)
    ledger = Ledger.for_data_dir(tmp_path / "data")
    register_table(ledger, load_prompt_table(prompts))
    submit(emulator.base_url, ledger, rows)
    wait_until_all_completed(emulator, 2)
    raced: list[int] = []

    class RacingClient(AsyncKvidClient):
        async def status(self, job_kind: Any, request_id: Any) -> Any:
            sub = next(s for s in ledger.jobs_to_poll() if s.request_id == request_id)
            if sub.partition_key == "k0" and not raced:
                raced.append(sub.submission_id)
                ledger.apply(
                    [JobChange(sub.submission_id, sub.version, VideoStatus.PROCESSING, 42)]
                )
            return await super().status(job_kind, request_id)

    async def tick() -> Any:
        async with RacingClient("test-key", emulator.base_url) as client:
            return await poll_pending(client, ledger, PollConfig(tmp_path / "videos"))

    report = asyncio.run(tick())
    assert raced and any("changed while polled" in e for e in report.errors)
    states = statuses(ledger)
    assert states == {"k0": "PROCESSING", "k1": "COMPLETED"}  # the other writer's change stands
    assert ledger.submission(raced[0]).progress == 42  # type: ignore[union-attr]
    poll_until_settled(emulator.base_url, ledger, tmp_path / "videos")
    assert set(statuses(ledger).values()) == {"COMPLETED"}
    assert_accounted(emulator.jobs, ledger, rows)
