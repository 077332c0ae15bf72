"""``build_kvid_definitions``: everything for one prompt table, wired together."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dagster import (
    AutomationCondition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    EnvVar,
    ExecutorDefinition,
    define_asset_job,
    in_process_executor,
)

from kvid_dagster.assets import build_kvid_assets
from kvid_dagster.budget import CreditBudget
from kvid_dagster.client import DEFAULT_BASE_URL, ApiDialect
from kvid_dagster.project import KvidProject, dialect_from_env
from kvid_dagster.resource import KvidResource
from kvid_dagster.schedules import build_kvid_schedule
from kvid_dagster.sensors import build_kvid_prompts_sensor, build_kvid_status_sensor
from kvid_dagster.translator import KvidAsset, KvidTranslator, asset_specs

PROMPTS_JOB = "kvid_prompts_job"
SUBMIT_JOB = "kvid_submit_job"
CATALOG_JOB = "kvid_catalog_job"


def resource_from_env(dialect: ApiDialect | str | None = None) -> KvidResource:
    """``KVID_API_KEY`` (a secret, never shown), ``KVID_BASE_URL`` (default: the vendor's) and
    the dialect (``dialect``, else ``KVID_API_DIALECT``, else ``video``)."""
    return KvidResource(
        api_key=EnvVar("KVID_API_KEY"),
        base_url=os.environ.get("KVID_BASE_URL") or DEFAULT_BASE_URL,
        dialect=dialect_from_env(dialect),
    )


def build_kvid_definitions(
    prompts_path: str | Path,
    data_dir: str | Path,
    *,
    resource: KvidResource | None = None,
    translator: KvidTranslator | None = None,
    prices: Mapping[str, float] | None = None,
    schedule_cron: str = "0 6 * * *",
    schedule_status: DefaultScheduleStatus = DefaultScheduleStatus.STOPPED,
    sensor_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
    status_sensor_interval_s: int = 15,
    tick_budget_s: float = 40.0,
    download: bool = True,
    job_deadline_s: float | None = None,
    failed_job_max_attempts: int = 1,
    max_download_bytes: int | None = None,
    lost_after_s: float | None = None,
    fetch_attempts: int | None = None,
    jobs_automation_condition: AutomationCondition | None = None,
    partitions_name: str = "kvid_prompts",
    database_url: str | None = None,
    dialect: ApiDialect | str | None = None,
    budget_credits: CreditBudget | None = None,
    param_defaults: Mapping[str, Any] | None = None,
    storage_url: str | None = None,
    executor: ExecutorDefinition | None = in_process_executor,
) -> Definitions:
    """Assets, checks, jobs, sensors, the schedule and the ``kvid`` resource for one table.

    The reliability settings go to the status sensor (see ``build_kvid_status_sensor``):
    ``job_deadline_s`` (default 900 s) before a job is ``TIMED_OUT``, and
    ``failed_job_max_attempts`` (default 1: FAILED jobs are not re-submitted automatically)
    and ``max_download_bytes`` (default 512 MiB), ``lost_after_s`` (default 120 s of 404s
    before a job is LOST) and ``fetch_attempts`` (default 3 before FETCH_FAILED). See
    docs/RELIABILITY.md.

    ``executor`` defaults to the in-process executor: every kvid asset waits on the network or
    the disk, so a step process per run buys nothing and costs ~1.4 s and ~230 MB before the
    first job is sent (measured, docs/BENCHMARKS.md). ``None`` keeps Dagster's default.

    ``database_url`` is the ledger (default ``$KVID_DATABASE_URL``, else the SQLite file
    ``<data_dir>/kvid.db``); a ``postgresql+psycopg://`` URL needs the ``[postgres]`` extra.
    ``dialect`` is the API dialect (default ``$KVID_API_DIALECT``, else ``video``): the table's
    rows are read as its requests, and the default resource speaks it.
    ``budget_credits`` (e.g. ``CreditBudget(per_run=500, per_day=2000)``) caps what the
    submitting runs spend; rows that do not fit stay PENDING and the run fails saying so.
    ``param_defaults`` (e.g. ``{"model": "v2", "resolution": "720p"}``) fill each row's empty
    kvid cells; a name that is no kvid parameter is refused here. ``storage_url`` is where
    videos, previews and the catalogs go (default ``$KVID_STORAGE_URL``, else ``data_dir``):
    a path or any fsspec URL (``s3://bucket/prefix`` with the ``[s3]`` extra).
    """
    project = KvidProject(
        prompts_path,
        data_dir,
        database_url=database_url,
        partitions_name=partitions_name,
        dialect=dialect,
        param_defaults=param_defaults,
        storage_url=storage_url,
    )
    translator = translator or KvidTranslator()
    assets = build_kvid_assets(
        project,
        translator=translator,
        prices=prices,
        jobs_automation_condition=jobs_automation_condition,
        budget_credits=budget_credits,
    )
    key = {asset: spec.key for asset, spec in asset_specs(translator, project).items()}
    jobs = [
        define_asset_job(PROMPTS_JOB, selection=[key[KvidAsset.PROMPTS]]),
        define_asset_job(SUBMIT_JOB, selection=[key[KvidAsset.VIDEO_JOBS]]),
        define_asset_job(CATALOG_JOB, selection=[key[KvidAsset.CATALOG]]),
    ]
    return Definitions(
        assets=assets,
        jobs=jobs,
        executor=executor,
        sensors=[
            build_kvid_status_sensor(
                project,
                translator=translator,
                minimum_interval_seconds=status_sensor_interval_s,
                tick_budget_s=tick_budget_s,
                download=download,
                job_deadline_s=job_deadline_s,
                failed_job_max_attempts=failed_job_max_attempts,
                prices=prices,
                max_download_bytes=max_download_bytes,
                lost_after_s=lost_after_s,
                fetch_attempts=fetch_attempts,
                default_status=sensor_status,
                budget_credits=budget_credits,
            ),
            build_kvid_prompts_sensor(project, translator=translator, default_status=sensor_status),
        ],
        schedules=[
            build_kvid_schedule(
                project,
                translator=translator,
                cron_schedule=schedule_cron,
                default_status=schedule_status,
            )
        ],
        resources={"kvid": resource or resource_from_env(project.dialect)},
    )
