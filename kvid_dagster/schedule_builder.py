"""The scheduled content pipeline: submit every partition that has no job yet."""

from __future__ import annotations

from dataclasses import dataclass

from dagster import (
    AssetKey,
    RunRequest,
    ScheduleDefinition,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from kvid_dagster._dagster_common import (
    asset_value_loader,
    keys_needing_jobs,
    range_run_requests,
)
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptTableError
from kvid_dagster.core.sources import PromptSourceUnavailable
from kvid_dagster.options import ScheduleOptions
from kvid_dagster.translator import KvidAsset, KvidSpecs, KvidTranslator, asset_specs


@dataclass(frozen=True)
class ScheduleSettings:
    """What the schedule's evaluation needs, fixed when it is built."""

    project: KvidProject
    jobs_key: AssetKey


def submit_partitions_without_jobs(
    context: ScheduleEvaluationContext, settings: ScheduleSettings
) -> list[RunRequest] | SkipReason:
    """One run per contiguous range of known partitions whose row's request has no job."""
    try:
        project, instance = settings.project, context.instance
        definitions = context.repository_def if project.upstream is not None else None
        with asset_value_loader(project, definitions, instance) as load:
            ordered, wanted = keys_needing_jobs(project, instance, load_upstream=load)
    except (PromptTableError, PromptSourceUnavailable) as exc:
        return SkipReason(str(exc))
    known = set(ordered)
    wanted = [k for k in wanted if k in known]  # unregistered rows: kvid_prompts adds them
    if not wanted:
        return SkipReason("every partition already has a job")
    when = context.scheduled_execution_time
    stamp = when.isoformat() if when else None
    return range_run_requests(ordered, wanted, jobs_key=settings.jobs_key, run_key_prefix=stamp)


def build_kvid_schedule(
    project: KvidProject,
    options: ScheduleOptions = ScheduleOptions(),
    *,
    translator: KvidTranslator | None = None,
    name: str = "kvid_daily_schedule",
) -> ScheduleDefinition:
    """Daily by default (``ScheduleOptions``): one run per contiguous range of partitions whose
    row has no job for its exact request (failed jobs are not paid for again: re-materialize
    those by hand).

    Args:
        project: the prompt table, the data folder and the rows' dialect and defaults.
        options: the cron schedule, its time zone and default status.
        translator: the asset keys (default: ``KvidTranslator``).
        name: the schedule's name.

    Example:
        .. code-block:: python

            schedule = build_kvid_schedule(
                KvidProject("prompts.csv", "data"), ScheduleOptions(cron_schedule="0 6 * * *")
            )
    """
    specs = asset_specs(translator or KvidTranslator(), project)
    return schedule_from_specs(project, options, specs, name=name)


def schedule_from_specs(
    project: KvidProject,
    options: ScheduleOptions,
    specs: KvidSpecs,
    *,
    name: str = "kvid_daily_schedule",
) -> ScheduleDefinition:
    """``build_kvid_schedule`` with the specs already computed (``build_kvid_definitions``)."""
    jobs_key = specs[KvidAsset.VIDEO_JOBS].key
    settings = ScheduleSettings(project, jobs_key)

    @schedule(
        name=name,
        cron_schedule=options.cron_schedule,
        execution_timezone=options.execution_timezone,
        default_status=options.default_status,
        target=[jobs_key],
        description="Submits every kvid partition without a job (the scheduled content pipeline).",
    )
    def kvid_schedule(context: ScheduleEvaluationContext) -> list[RunRequest] | SkipReason:
        return submit_partitions_without_jobs(context, settings)

    return kvid_schedule
