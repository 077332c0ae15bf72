"""Processes killed with SIGKILL at the worst moments, and processes racing each other.

Every test ends the same way: the next run or sensor tick converges, every job the emulator
created (billed) is in the catalog with its request_id or its row is UNCERTAIN holding what was
sent, and no row was sent twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import TEST_API_KEY, EmulatorFactory
from dagster import AssetKey, DagsterRunStatus, RunsFilter
from faultkit import (
    assert_accounted,
    check_verdicts,
    dagster_home,
    kill,
    make_defs,
    materialization_counts,
    open_instance,
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
    write_table,
)

from kvid_dagster.catalog import KvidCatalog
from kvid_dagster.client.requests import canonical_json
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.project import KvidProject
from kvid_dagster.sensors import keys_needing_jobs
from kvid_dagster.submit import resolve_uncertain

VIDEOS = AssetKey("kvid_videos")


def wait_until_all_completed(emulator: KvidEmulator, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = emulator.jobs
        if len(jobs) == count and all(j.state == "COMPLETED" for j in jobs.values()):
            return
        time.sleep(0.05)
    raise AssertionError("the emulator's jobs did not complete")


@pytest.mark.parametrize("moment", ["generate returned", "answer in flight"])
def test_a_run_killed_between_generate_and_recording_never_pays_twice(
    moment: str, emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory()
    keys = ["k0", "k1", "k2"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir, home = tmp_path / "data", dagster_home(tmp_path / "home")
    project = KvidProject(prompts, data_dir)
    defs = make_defs(emulator.base_url, prompts, data_dir, intent_grace_s=0.0)
    with open_instance(home) as instance:
        assert run_prompts(defs, instance)

    marker = tmp_path / "marker"
    in_flight = moment == "answer in flight"
    if in_flight:
        # every job is created at once, its answer held back: kill while it is on the way
        emulator.add_fault("generate", "timeout", times=3, delay=30)
    # otherwise the first generate has returned; its request_id is about to be recorded
    mode = "plain" if in_flight else "after_generate"
    child = spawn(
        "child_run_submit", home, prompts, data_dir, emulator.base_url, "k0", "k2", mode, marker
    )
    if in_flight:
        assert emulator.wait_for_jobs(1, timeout=60)
    else:
        wait_for_file(marker, child)
    kill(child)
    quiesce(emulator)
    emulator.clear_faults()
    created, sent = emulator.jobs_created, emulator.stats["generate"]
    assert created >= 1

    catalog = project.catalog()
    assert set(statuses(catalog).values()) == {"SUBMITTING"}  # intents, no request_id
    assert all(r["request_id"] is None for r in catalog.latest_records())
    with open_instance(home) as instance:
        # the next run finds the intents and sends nothing
        assert run_submit(defs, instance, "k0", "k2")
        assert emulator.stats["generate"] == sent and emulator.jobs_created == created
        # the next sensor tick marks every orphaned intent UNCERTAIN, visibly in Dagster
        tick_until_settled(defs, instance, catalog)
        assert set(statuses(catalog).values()) == {"UNCERTAIN"}
        assert check_verdicts(instance, keys) == dict.fromkeys(keys, False)
        for record in catalog.latest_records():
            assert record["request_hash"] in record["error"] and "dashboard" in record["error"]
        assert_accounted(emulator.jobs, catalog, rows)
        # automation (schedule, prompt sensor) sees nothing to submit
        assert keys_needing_jobs(project, instance)[1] == []

        # a person looks at the dashboard: found jobs are recorded, missing ones released
        found = {canonical_json(dict(j.body)): rid for rid, j in emulator.jobs.items()}
        for row in rows:
            request_id = found.get(canonical_json(row.request.to_body()))
            resolve_uncertain(catalog, row.partition_key, request_id=request_id)
        released = [
            r.partition_key for r in rows if r.partition_key not in _keys_with_job(rows, found)
        ]
        assert run_submit(defs, instance, "k0", "k2")  # sends exactly the released rows
        assert emulator.jobs_created == created + len(released)
        tick_until_settled(defs, instance, catalog)
        assert set(statuses(catalog).values()) == {"COMPLETED"}
        assert instance.get_materialized_partitions(VIDEOS) == set(keys)
    assert_accounted(emulator.jobs, catalog, rows)
    events = catalog.submissions()["event"].tolist()
    assert events.count("RESOLVED") == 3 and events.count("UNCERTAIN") == 3


def _keys_with_job(rows: list, found: dict[bytes, str]) -> set[str]:
    return {r.partition_key for r in rows if canonical_json(r.request.to_body()) in found}


@pytest.mark.parametrize("moment", ["reporting", "downloading"])
def test_a_status_tick_killed_midway_converges_on_the_next_tick(
    moment: str, emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory()
    keys = ["k0", "k1", "k2", "k3"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    data_dir, home = tmp_path / "data", dagster_home(tmp_path / "home")
    catalog = KvidProject(prompts, data_dir).catalog()
    defs = make_defs(emulator.base_url, prompts, data_dir)
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
            # the catalog has every outcome, Dagster only the first partition's
            assert set(statuses(catalog).values()) == {"COMPLETED"}
            assert len(instance.get_materialized_partitions(VIDEOS)) == 1
        else:
            assert set(statuses(catalog).values()) == {"SUBMITTED"}
            assert list((data_dir / "videos").glob(".*.part"))  # killed in the middle of a file
        tick_until_settled(defs, instance, catalog)
        assert set(statuses(catalog).values()) == {"COMPLETED"}
        assert materialization_counts(instance, keys) == dict.fromkeys(keys, 1)
        assert check_verdicts(instance, keys) == dict.fromkeys(keys, True)
    for record in catalog.latest_records():
        data = Path(record["local_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert emulator.jobs_created == len(keys)
    assert_accounted(emulator.jobs, catalog, table_rows(prompts))


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

    assert emulator.jobs_created == len(keys)
    catalog = KvidCatalog.for_data_dir(data_dir)
    assert set(statuses(catalog).values()) == {"SUBMITTED"}
    history = catalog.submissions()
    assert (history["event"] == "SUBMITTED").sum() == len(keys)
    assert (history["event"] == "INTENT").sum() == len(keys)
    with open_instance(home) as instance:
        runs = instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
        assert len(runs) == 3  # the table's run and both submitting runs succeeded
    assert_accounted(emulator.jobs, catalog, table_rows(prompts))


def test_concurrent_submitters_killed_mid_write_lose_no_paid_job(
    emulator_factory: EmulatorFactory, tmp_path: Path
) -> None:
    emulator = emulator_factory(latency=0.01)
    keys = [f"k{i:02d}" for i in range(30)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    rows = table_rows(prompts)
    data_dir = tmp_path / "data"
    KvidCatalog.for_data_dir(data_dir)  # created once, before the writers race
    groups = [keys[0:10], keys[10:20], keys[20:30]]
    children = [
        spawn("child_submit_rows", prompts, data_dir, emulator.base_url, json.dumps(group))
        for group in groups
    ]
    rng = random.Random(20261126)
    targets = sorted(rng.sample(range(2, 28), 3))
    killed = 0
    for child, target in zip(children, targets, strict=True):
        emulator.wait_for_jobs(target, timeout=60)  # the writers are busy recording by now
        if child.poll() is None:
            kill(child)
            killed += 1
    assert killed >= 1
    quiesce(emulator)

    catalog = KvidCatalog.for_data_dir(data_dir)
    # what the killed writers left is readable and consistent, and no part was damaged
    assert_accounted(emulator.jobs, catalog, rows)
    created = emulator.jobs_created
    assert 0 < created <= len(keys)
    # the recovery run sends only rows that never got an intent
    no_intent = [k for k in keys if k not in catalog.records_by_key()]
    submit(emulator.base_url, catalog, rows)
    assert emulator.jobs_created == created + len(no_intent)
    poll_until_settled(emulator.base_url, catalog, data_dir / "videos", intent_grace_s=0.0)
    final = statuses(catalog)
    assert set(final.values()) <= {"COMPLETED", "UNCERTAIN"}
    assert_accounted(emulator.jobs, catalog, rows)
    # an UNCERTAIN row is exactly one whose writer died between its generate and its record
    recorded = {r["request_id"] for r in catalog.latest_records() if r["request_id"]}
    unrecorded = [rid for rid in emulator.jobs if rid not in recorded]
    assert len(unrecorded) <= list(final.values()).count("UNCERTAIN")


def test_a_request_id_recorded_during_a_tick_is_not_hidden_by_a_stale_uncertain(
    emulator: KvidEmulator, tmp_path: Path
) -> None:
    """A slow submitter records its request_id while a status tick is deciding that its
    intent is orphaned: the tick must not overwrite the fresh request_id with UNCERTAIN."""
    from kvid_dagster.client import AsyncKvidClient
    from kvid_dagster.poll import PollConfig, poll_pending

    prompts = write_table(tmp_path / "prompts.csv", ["slow", "other"])
    rows = {r.partition_key: r for r in table_rows(prompts)}
    catalog = KvidCatalog(tmp_path / "catalog", durable=False)
    submit(emulator.base_url, catalog, [rows["other"]])
    late_id = "req_" + "0" * 16
    catalog.update(  # an intent older than the grace period...
        "slow",
        status="SUBMITTING",
        request_hash=rows["slow"].request_hash,
        job_kind=rows["slow"].job_kind,
        submitted_at=datetime.now(UTC) - timedelta(hours=1),
    )

    class RacingClient(AsyncKvidClient):
        async def status(self, job_kind: Any, request_id: Any) -> Any:
            # ...whose submitter records its request_id while the tick is busy
            catalog.update("slow", status="SUBMITTED", request_id=late_id)
            return await super().status(job_kind, request_id)

    async def tick() -> Any:
        async with RacingClient(TEST_API_KEY, emulator.base_url) as client:
            return await poll_pending(
                client, catalog, PollConfig(tmp_path / "videos", intent_grace_s=60.0)
            )

    report = asyncio.run(tick())
    record = catalog.get("slow")
    assert record is not None
    assert (record["status"], record["request_id"]) == ("SUBMITTED", late_id)
    assert any("slow: changed while it was polled" in e for e in report.errors)
    assert [e.partition_key for e in report.terminal] == []
