"""``kvid_dagster.options``: the three settings records, their defaults, their checks, and
what each one sets on the definitions ``build_kvid_definitions`` builds.

The reliability rules these options carry are exercised against faults in
``tests/test_faults_jobs.py`` (which also checks that zero values are refused) and
``tests/test_faults_wire.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from dagster import DefaultScheduleStatus, DefaultSensorStatus
from faultkit import write_table

from kvid_dagster.client import DEFAULT_MAX_BYTES
from kvid_dagster.core.poll import (
    DEFAULT_FETCH_ATTEMPTS,
    DEFAULT_JOB_DEADLINE_S,
    DEFAULT_LOST_AFTER_S,
    DEFAULT_TICK_BUDGET_S,
    PollConfig,
)
from kvid_dagster.core.project import KvidProject
from kvid_dagster.definitions import build_kvid_definitions
from kvid_dagster.options import PromptsSensorOptions, ScheduleOptions, StatusSensorOptions
from kvid_dagster.resources import KvidResource


def test_the_defaults_are_the_polling_engines_own() -> None:
    """Defined once, in ``poll``: the default options make exactly the default ``PollConfig``."""
    options = StatusSensorOptions()
    assert options.tick_budget_seconds == DEFAULT_TICK_BUDGET_S
    assert options.job_deadline_seconds == DEFAULT_JOB_DEADLINE_S
    assert options.lost_after_seconds == DEFAULT_LOST_AFTER_S
    assert options.fetch_attempts == DEFAULT_FETCH_ATTEMPTS
    assert options.max_download_bytes == DEFAULT_MAX_BYTES
    assert options.default_status is DefaultSensorStatus.RUNNING
    downloads = Path("videos")
    assert options.poll_config(downloads) == PollConfig(download_dir=downloads)
    assert ScheduleOptions() == ScheduleOptions(
        cron_schedule="0 6 * * *",
        execution_timezone="UTC",
        default_status=DefaultScheduleStatus.STOPPED,  # it spends credits: off until switched on
    )


def test_poll_config_carries_every_polling_setting(tmp_path: Path) -> None:
    options = StatusSensorOptions(
        tick_budget_seconds=7.5,
        download=False,
        job_deadline_seconds=90.0,
        max_download_bytes=1234,
        lost_after_seconds=11.0,
        fetch_attempts=5,
    )
    config = options.poll_config(tmp_path / "videos")
    assert config == PollConfig(
        download_dir=tmp_path / "videos",
        download=False,
        tick_budget_seconds=7.5,
        job_deadline_seconds=90.0,
        max_download_bytes=1234,
        lost_after_seconds=11.0,
        fetch_attempts=5,
    )
    # every PollConfig field the options name is carried, none is left at its default
    carried = {f.name for f in dataclasses.fields(PollConfig)} & {
        f.name for f in dataclasses.fields(StatusSensorOptions)
    }
    assert carried == {
        "download",
        "tick_budget_seconds",
        "job_deadline_seconds",
        "max_download_bytes",
        "lost_after_seconds",
        "fetch_attempts",
    }
    for name in carried:
        assert getattr(config, name) == getattr(options, name), name


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_deadline_seconds", -1.0),
        ("failed_job_max_attempts", True),  # a bool is no count
        ("failed_job_max_attempts", 2.0),
        ("fetch_attempts", "3"),
        ("fetch_attempts", -2),
        ("max_download_bytes", 1.5),
        ("tick_budget_seconds", 0.0),  # no tick would poll anything
        ("tick_budget_seconds", 60.0),  # no tick would end before Dagster's timeout
        ("lost_after_seconds", -5.0),
        ("minimum_interval_seconds", 0),
    ],
)
def test_a_value_no_tick_could_keep_is_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as refused:
        StatusSensorOptions(**{field: value})  # type: ignore[arg-type]
    assert repr(value) in str(refused.value) or str(value) in str(refused.value)


def test_the_options_are_frozen() -> None:
    for options in (StatusSensorOptions(), PromptsSensorOptions(), ScheduleOptions()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            options.default_status = None  # type: ignore[misc]


def test_custom_options_set_the_built_sensors_and_schedule(tmp_path: Path) -> None:
    project = KvidProject(write_table(tmp_path / "ads.csv", ["a"]), tmp_path / "data")
    defs = build_kvid_definitions(
        project,
        resource=KvidResource(api_key="k", base_url="http://127.0.0.1:9"),
        status_sensor=StatusSensorOptions(
            minimum_interval_seconds=3, default_status=DefaultSensorStatus.STOPPED
        ),
        prompts_sensor=PromptsSensorOptions(
            minimum_interval_seconds=120, default_status=DefaultSensorStatus.STOPPED
        ),
        schedule=ScheduleOptions(
            cron_schedule="15 */2 * * *",
            execution_timezone="Europe/Paris",
            default_status=DefaultScheduleStatus.RUNNING,
        ),
    )
    status = defs.resolve_sensor_def("kvid_status_sensor")
    assert (status.minimum_interval_seconds, status.default_status) == (
        3,
        DefaultSensorStatus.STOPPED,
    )
    prompts = defs.resolve_sensor_def("kvid_prompts_sensor")
    assert (prompts.minimum_interval_seconds, prompts.default_status) == (
        120,
        DefaultSensorStatus.STOPPED,
    )
    schedule = defs.resolve_schedule_def("kvid_daily_schedule")
    assert schedule.cron_schedule == "15 */2 * * *"
    assert schedule.execution_timezone == "Europe/Paris"
    assert schedule.default_status is DefaultScheduleStatus.RUNNING


def test_the_default_options_give_the_documented_intervals_and_statuses(tmp_path: Path) -> None:
    project = KvidProject(write_table(tmp_path / "ads.csv", ["a"]), tmp_path / "data")
    defs = build_kvid_definitions(
        project, resource=KvidResource(api_key="k", base_url="http://127.0.0.1:9")
    )
    status = defs.resolve_sensor_def("kvid_status_sensor")
    prompts = defs.resolve_sensor_def("kvid_prompts_sensor")
    assert status.minimum_interval_seconds == StatusSensorOptions().minimum_interval_seconds == 15
    assert prompts.minimum_interval_seconds == PromptsSensorOptions().minimum_interval_seconds
    assert prompts.minimum_interval_seconds == 30
    assert status.default_status is prompts.default_status is DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("kvid_daily_schedule")
    assert schedule.default_status is DefaultScheduleStatus.STOPPED
