"""The status sensor's cursor: read back exactly, and an unreadable one starts over (a warning,
never an exception), on a real Dagster instance against the emulator."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import EmulatorFactory
from dagster import AssetKey, SensorResult, build_sensor_context
from faultkit import (
    check_verdicts,
    dagster_home,
    make_defs,
    open_instance,
    run_prompts,
    run_submit,
    waiting,
    write_table,
)

from kvid_dagster.cli.runner import evaluate_status_sensor
from kvid_dagster.emulator import KvidEmulator
from kvid_dagster.ledger import Ledger
from kvid_dagster.sensor_builder import StatusCursor

SENSOR = "kvid_status_sensor"

UNREADABLE = [
    "{not json",
    "garbage",
    "[1, 2, 3]",
    '"a string"',
    "42",
    '{"after": "fox"}',  # 0.1's shape: the last partition key polled
    '{"after": true, "ledger_id": "x", "checked": 3}',
    '{"after": 1, "ledger_id": 7, "checked": 3}',
    '{"after": 1, "ledger_id": "x", "checked": 3, "extra": 0}',
]


def test_a_cursor_reads_back_exactly() -> None:
    cursor = StatusCursor(after=12, ledger_id="ledger-1", checked=40)
    assert StatusCursor.parse(cursor.dump()) == cursor
    assert StatusCursor.parse(StatusCursor().dump()) == StatusCursor()
    assert StatusCursor.parse('{"checked": 5}') == StatusCursor(checked=5)
    assert cursor.checked_in("ledger-1") == 40 and cursor.checked_in("another") is None


@pytest.mark.parametrize("text", [None, ""])
def test_no_cursor_is_a_fresh_one_without_a_warning(text: str | None) -> None:
    warnings: list[str] = []
    assert StatusCursor.parse(text, warn=warnings.append) == StatusCursor()
    assert warnings == []


@pytest.mark.parametrize("text", UNREADABLE)
def test_an_unreadable_cursor_is_a_fresh_one_and_a_warning(text: str) -> None:
    warnings: list[str] = []
    assert StatusCursor.parse(text, warn=warnings.append) == StatusCursor()
    assert len(warnings) == 1 and "starting over" in warnings[0]
    assert StatusCursor.parse(text) == StatusCursor()  # no one to tell: still no exception


def test_a_tick_from_an_unreadable_cursor_rechecks_the_whole_ledger(
    emulator: KvidEmulator, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Ticks whose events never reached Dagster, then a garbage cursor: the fresh cursor re-checks
    every row, so each outcome is reported, and the tick's own cursor is readable."""
    keys = ["k1", "k2"]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    data_dir = tmp_path / "data"
    defs = make_defs(emulator.base_url, prompts, data_dir)
    ledger = Ledger.for_data_dir(data_dir)
    sensor = defs.resolve_sensor_def(SENSOR)
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance) and run_submit(defs, instance, keys[0], keys[-1])
        for _ in range(100):  # ticks whose events are lost
            with build_sensor_context(
                instance=instance, definitions=defs, sensor_name=SENSOR, resources=defs.resources
            ) as context:
                assert isinstance(sensor(context), SensorResult)
            if not waiting(ledger):
                break
            time.sleep(0.15)
        assert not waiting(ledger)
        assert instance.get_materialized_partitions(AssetKey("kvid_videos")) == set()

        capfd.readouterr()
        reported, cursor = evaluate_status_sensor(defs, instance, "{not json", SENSOR)
        logged = capfd.readouterr().err  # the sensor's log: Dagster's console handler
        assert "WARNING - unreadable status sensor cursor '{not json': starting over" in logged
        # a materialization, a video_ok result and the three quality checks' results each, and
        # the catalog's publication, which Dagster never got either
        assert reported == 5 * len(keys) + 1
        assert instance.get_materialized_partitions(AssetKey("kvid_videos")) == set(keys)
        assert check_verdicts(instance, keys) == dict.fromkeys(keys, True)
        parsed = StatusCursor.parse(cursor)
        assert parsed.ledger_id == ledger.ledger_id() and parsed.checked == ledger.revision()
        # from its own cursor the next tick has nothing to re-report
        assert evaluate_status_sensor(defs, instance, cursor, SENSOR)[0] == 0


def test_a_tick_logs_running_jobs_as_one_summary_and_each_finish_on_its_own(
    emulator_factory: EmulatorFactory, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Thousands of running jobs must not be thousands of INFO lines per tick: one summary
    line counts them (each job's progress is DEBUG), and a finished job keeps its own line."""
    slow = emulator_factory(job_duration=3600)
    keys = [f"k{i}" for i in range(5)]
    prompts = write_table(tmp_path / "prompts.csv", keys)
    defs = make_defs(slow.base_url, prompts, tmp_path / "data")
    with open_instance(dagster_home(tmp_path / "home")) as instance:
        assert run_prompts(defs, instance) and run_submit(defs, instance, keys[0], keys[-1])
        capfd.readouterr()
        evaluate_status_sensor(defs, instance, None, SENSOR)
        logged = capfd.readouterr().err
    summaries = re.findall(r"INFO - still running: (.*)", logged)
    assert len(summaries) == 1, logged
    counted = dict(part.split(" ")[::-1] for part in summaries[0].split(", "))
    assert set(counted) <= {"IN_QUEUE", "PROCESSING"} and sum(map(int, counted.values())) == 5
    assert not any(f"{key}: " in logged for key in keys), logged

    fast = emulator_factory()
    defs = make_defs(fast.base_url, prompts, tmp_path / "data2")
    ledger = Ledger.for_data_dir(tmp_path / "data2")
    with open_instance(dagster_home(tmp_path / "home2")) as instance:
        assert run_prompts(defs, instance) and run_submit(defs, instance, keys[0], keys[-1])
        logged = ""
        for _ in range(100):
            capfd.readouterr()
            evaluate_status_sensor(defs, instance, None, SENSOR)
            logged += capfd.readouterr().err
            if not waiting(ledger):
                break
            time.sleep(0.2)
    assert all(f"INFO - {key}: COMPLETED " in logged for key in keys), logged
