"""``build_kvid_definitions``: everything for one prompt table, wired together."""

from __future__ import annotations

import os
from collections.abc import Mapping

from dagster import (
    AutomationCondition,
    Definitions,
    ExecutorDefinition,
    define_asset_job,
    in_process_executor,
)

from kvid_dagster.assets import assets_from_specs
from kvid_dagster.client import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, ApiDialect
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.project import (
    DATA_DIR_ENV,
    PROMPTS_ENV,
    KvidProject,
    dialect_from_env,
)
from kvid_dagster.io_manager import KvidVideoIOManager, video_io_manager_key
from kvid_dagster.options import PromptsSensorOptions, ScheduleOptions, StatusSensorOptions
from kvid_dagster.resources import KvidResource
from kvid_dagster.schedule_builder import schedule_from_specs
from kvid_dagster.sensor_builder import prompts_sensor_from_specs, status_sensor_from_specs
from kvid_dagster.translator import KvidAsset, KvidTranslator, asset_specs

PROMPTS_JOB = "kvid_prompts_job"
SUBMIT_JOB = "kvid_submit_job"
CATALOG_JOB = "kvid_catalog_job"


def resource_from_env(dialect: ApiDialect | str | None = None) -> KvidResource:
    """``KVID_API_KEY`` (a secret, read when a client is made, never shown; unset, the run or
    tick that needs it fails naming it), ``KVID_BASE_URL`` (default: the vendor's) and the
    dialect (``dialect``, else ``KVID_API_DIALECT``, else ``video``)."""
    return KvidResource(
        api_key_env=API_KEY_ENV,
        base_url=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
        dialect=dialect_from_env(dialect),
    )


def definitions_from_env(
    default_prompts: str | os.PathLike[str] | None = None,
    default_data_dir: str | os.PathLike[str] | None = None,
) -> Definitions:
    """``build_kvid_definitions`` for ``$KVID_PROMPTS`` (a path or an fsspec URL) and
    ``$KVID_DATA_DIR``, each else its default (none: the variable must be set); the service
    from ``$KVID_API_KEY`` and ``$KVID_BASE_URL`` (``resource_from_env``)."""
    prompts = os.environ.get(PROMPTS_ENV) or default_prompts
    data_dir = os.environ.get(DATA_DIR_ENV) or default_data_dir
    if prompts is None or data_dir is None:
        raise ValueError(
            "set KVID_PROMPTS (the prompt table) and KVID_DATA_DIR (the data folder) for these "
            "definitions; `kvid-dagster dev --prompts P --data-dir D` sets both"
        )
    return build_kvid_definitions(KvidProject(prompts, data_dir))


def build_kvid_definitions(
    project: KvidProject,
    *,
    resource: KvidResource | None = None,
    translator: KvidTranslator | None = None,
    prices: Mapping[str, float] | None = None,
    budget_credits: CreditBudget | None = None,
    status_sensor: StatusSensorOptions = StatusSensorOptions(),
    prompts_sensor: PromptsSensorOptions = PromptsSensorOptions(),
    schedule: ScheduleOptions = ScheduleOptions(),
    jobs_automation_condition: AutomationCondition | None = None,
    executor: ExecutorDefinition | None = in_process_executor,
) -> Definitions:
    """Assets, checks, jobs, sensors, the schedule and the ``kvid`` resource for one table.

    ``project`` says where the table, ledger, catalogs and videos are, and the dialect and
    parameter defaults of its rows (see ``KvidProject``), like dagster-dbt's ``DbtProject``;
    the default resource (``resource_from_env``) speaks the project's dialect.
    ``status_sensor``, ``prompts_sensor`` and ``schedule`` are the three factories' settings
    (see ``kvid_dagster.options``; the status sensor's hold the reliability rules, see
    docs/RELIABILITY.md). ``budget_credits`` (e.g. ``CreditBudget(per_run=500,
    per_day=2000)``) caps what the submitting runs spend; rows that do not fit stay PENDING
    and the run fails saying so. ``prices``: credits per ``model/resolution``.

    ``executor`` defaults to the in-process executor: every kvid asset waits on the network or
    the disk, so a step process per run buys nothing and costs ~1.4 s and ~230 MB before the
    first job is sent (measured, docs/BENCHMARKS.md). ``None`` keeps Dagster's default.

    Downstream assets take ``kvid_videos`` as an input (a ``KvidVideo`` per partition, or all
    COMPLETED videos at once): its ``KvidVideoIOManager`` is among the resources, under
    ``video_io_manager_key`` of the videos' asset key.

    Args:
        project: the prompt table, the data folder and the rows' dialect and defaults.
        resource: the ``kvid`` resource (default: ``resource_from_env(project.dialect)``).
        translator: the assets' specs and the videos' metadata (default: ``KvidTranslator``).
        prices: credits per ``model/resolution`` (default: the built-in price table).
        budget_credits: what the submitting runs may spend, per run and per UTC day.
        status_sensor: the status sensor's settings (the reliability rules).
        prompts_sensor: the prompt-table sensor's settings.
        schedule: the schedule's settings.
        jobs_automation_condition: lets declarative automation submit new partitions.
        executor: the runs' executor (default: in-process; ``None``: Dagster's).

    Example:
        .. code-block:: python

            from kvid_dagster import CreditBudget, KvidProject, build_kvid_definitions

            defs = build_kvid_definitions(
                KvidProject("prompts.csv", "data"),
                budget_credits=CreditBudget(per_run=500, per_day=2000),
            )
    """
    translator = translator or KvidTranslator()
    specs = asset_specs(translator, project)
    key = {asset: spec.key for asset, spec in specs.items()}
    videos_io_manager = video_io_manager_key(key[KvidAsset.VIDEOS])
    assets = assets_from_specs(
        project,
        translator,
        specs,
        prices=prices,
        jobs_automation_condition=jobs_automation_condition,
        budget_credits=budget_credits,
        videos_io_manager_key=videos_io_manager,
    )
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
            status_sensor_from_specs(
                project,
                status_sensor,
                translator,
                specs,
                prices=prices,
                budget_credits=budget_credits,
            ),
            prompts_sensor_from_specs(project, prompts_sensor, specs),
        ],
        schedules=[schedule_from_specs(project, schedule, specs)],
        resources={
            "kvid": resource or resource_from_env(project.dialect),
            videos_io_manager: KvidVideoIOManager(project),
        },
    )
