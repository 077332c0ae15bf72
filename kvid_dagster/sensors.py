"""Sensors: the status sensor (jobs → runless video materializations), the prompt-table sensor."""


import asyncio
import json
from collections.abc import Iterable, Sequence
from typing import Any

from dagster import (
    AddDynamicPartitionsRequest,
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetMaterialization,
    AssetObservation,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from kvid_dagster.assets import VIDEO_CHECK_NAME, video_check_result
from kvid_dagster.poll import PollConfig, PollReport, poll_pending
from kvid_dagster.project import KvidProject
from kvid_dagster.prompts import PromptTableError, load_prompt_table, table_fingerprint
from kvid_dagster.resource import KvidResource
from kvid_dagster.submit import needs_job
from kvid_dagster.translator import KvidTranslator

# Dagster gives a sensor tick 60 s; like dagster-fivetran's polling sensor, stop well before.
DEFAULT_TICK_BUDGET_S = 40.0
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def partition_ranges(ordered_keys: Sequence[str], wanted: Iterable[str]) -> list[tuple[str, str]]:
    """Contiguous runs of ``wanted`` within ``ordered_keys`` (the partitions' insertion order).

    A single-run backfill of a dynamic partitions definition covers a contiguous range, so each
    range becomes one run: hundreds of partitions cost one run, not one process each.
    """
    wanted_set = set(wanted)
    ranges: list[tuple[str, str]] = []
    start: str | None = None
    previous: str | None = None
    for key in ordered_keys:
        if key in wanted_set:
            if start is None:
                start = key
            previous = key
        elif start is not None:
            assert previous is not None
            ranges.append((start, previous))
            start = None
    if start is not None and previous is not None:
        ranges.append((start, previous))
    return ranges


def range_run_requests(
    ordered_keys: Sequence[str], wanted: Iterable[str], *, jobs_key: Any, run_key_prefix: str | None
) -> list[RunRequest]:
    """One run request per contiguous range of ``wanted``, targeting the jobs asset."""
    requests = []
    for first, last in partition_ranges(ordered_keys, wanted):
        tags = {RANGE_START_TAG: first, RANGE_END_TAG: last}
        run_key = f"{run_key_prefix}:{first}:{last}" if run_key_prefix else None
        requests.append(RunRequest(run_key=run_key, asset_selection=[jobs_key], tags=tags))
    return requests


def keys_needing_jobs(
    project: KvidProject, instance: DagsterInstance, extra: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(partition keys in insertion order, the keys whose row has no job for its exact request)."""
    table = load_prompt_table(project.prompts_path)
    ordered = [*instance.get_dynamic_partitions(project.partitions_name), *extra]
    current = project.catalog().records_by_key()
    wanted = [
        row.partition_key for row in table.rows if needs_job(row, current.get(row.partition_key))
    ]
    return ordered, wanted


def video_events(
    report: PollReport, translator: KvidTranslator
) -> list[AssetMaterialization | AssetObservation | AssetCheckEvaluation]:
    """The runless events one poll report turns into."""
    videos_key = translator.get_asset_key("kvid_videos")
    check_key = AssetCheckKey(videos_key, VIDEO_CHECK_NAME)
    events: list[AssetMaterialization | AssetObservation | AssetCheckEvaluation] = []
    for event in report.terminal:
        verdict = video_check_result(translator, event.record)
        if event.outcome == "COMPLETED":
            events.append(
                AssetMaterialization(
                    asset_key=videos_key,
                    partition=event.partition_key,
                    metadata=translator.get_video_metadata(event.record),
                )
            )
        else:
            events.append(
                AssetObservation(
                    asset_key=videos_key,
                    partition=event.partition_key,
                    metadata=translator.get_failure_metadata(event.record),
                )
            )
        events.append(
            AssetCheckEvaluation(
                asset_key=videos_key,
                check_name=check_key.name,
                passed=verdict.passed,
                metadata=verdict.metadata,
                severity=verdict.severity,
                partition=event.partition_key,
            )
        )
    return events


def _unreported_completions(
    project: KvidProject, instance: DagsterInstance, translator: KvidTranslator, skip: set[str]
) -> PollReport:
    """Completed rows whose materialization never reached Dagster (a tick that died after the
    catalog write): reported again, so Dagster and the catalog always converge."""
    from kvid_dagster.poll import VideoEvent

    done = [r for r in project.catalog().latest_records() if r["status"] == "COMPLETED"]
    if not done:
        return PollReport()
    materialized = instance.get_materialized_partitions(translator.get_asset_key("kvid_videos"))
    report = PollReport()
    for record in done:
        key = str(record["partition_key"])
        if key not in materialized and key not in skip:
            report.events.append(VideoEvent(key, "COMPLETED", record))
    return report


def build_kvid_status_sensor(
    project: KvidProject,
    *,
    translator: KvidTranslator | None = None,
    name: str = "kvid_status_sensor",
    minimum_interval_seconds: int = 15,
    tick_budget_s: float = DEFAULT_TICK_BUDGET_S,
    download: bool = True,
    job_deadline_s: float | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> SensorDefinition:
    """Polls every pending job (within ``tick_budget_s``; the rest on the next tick, round robin
    by the cursor) and records finished videos as runless materializations of ``kvid_videos``."""
    translator = translator or KvidTranslator()
    videos_key = translator.get_asset_key("kvid_videos")
    poll_config = PollConfig(
        download_dir=project.videos_dir,
        download=download,
        budget_s=tick_budget_s,
        **({"job_deadline_s": job_deadline_s} if job_deadline_s else {}),
    )

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        asset_selection=[videos_key],
        description="Polls kvid for every pending job; finished videos become materializations of "
        "kvid_videos (failed ones a failed video_ok check), all recorded in the catalog.",
    )
    def kvid_status_sensor(context: SensorEvaluationContext, kvid: KvidResource) -> SensorResult:
        cursor = json.loads(context.cursor) if context.cursor else {}

        async def tick() -> PollReport:
            async with kvid.get_async_client() as client:
                return await poll_pending(
                    client, project.catalog(), poll_config, start_after=cursor.get("after")
                )

        report = asyncio.run(tick())
        for event in report.events:
            line = event.log_lines[-1] if event.log_lines else ""
            status = event.record.get("status")
            if event.outcome == "PROGRESS":
                context.log.info(
                    f"{event.partition_key}: {status} {event.record.get('progress')}%  {line}"
                )
            elif event.outcome == "COMPLETED":
                where = event.record.get("local_path") or event.record.get("url")
                context.log.info(f"{event.partition_key}: COMPLETED {where}")
            else:
                context.log.warning(f"{event.partition_key}: {status}: {event.record.get('error')}")
        for error in report.errors:
            context.log.warning(error)
        reported = {e.partition_key for e in report.terminal}
        late = _unreported_completions(project, context.instance, translator, reported)
        events = video_events(report, translator) + video_events(late, translator)
        context.log.info(
            f"polled {report.polled} of {report.pending} pending jobs in {report.elapsed_s:.1f} s"
            f" ({report.deferred} left for the next tick); {len(report.terminal)} finished"
        )
        return SensorResult(
            asset_events=events,
            cursor=json.dumps({"after": report.last_key if report.deferred else None}),
        )

    return kvid_status_sensor


def build_kvid_prompts_sensor(
    project: KvidProject,
    *,
    translator: KvidTranslator | None = None,
    name: str = "kvid_prompts_sensor",
    minimum_interval_seconds: int = 30,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> SensorDefinition:
    """Watches the prompt table: new or changed rows get their partitions and a submitting run
    (one run per contiguous range of partitions, so a large edit is one run, not hundreds)."""
    translator = translator or KvidTranslator()
    prompts_key = translator.get_asset_key("kvid_prompts")
    jobs_key = translator.get_asset_key("kvid_video_jobs")

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        asset_selection=[prompts_key, jobs_key],
        description=f"Watches {project.prompts_path.name}: new or changed rows become partitions "
        "and are submitted.",
    )
    def kvid_prompts_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        try:
            fingerprint = table_fingerprint(project.prompts_path)
        except OSError as exc:
            return SkipReason(f"cannot read {project.prompts_path}: {exc}")
        if context.cursor == fingerprint:
            return SkipReason("the prompt table has not changed")
        try:
            table = load_prompt_table(project.prompts_path)
        except PromptTableError as exc:
            return SensorResult(skip_reason=SkipReason(str(exc)), cursor=fingerprint)
        existing = context.instance.get_dynamic_partitions(project.partitions_name)
        known = set(existing)
        new_keys = [k for k in table.partition_keys if k not in known]
        ordered, wanted = keys_needing_jobs(project, context.instance, extra=new_keys)
        run_requests = [
            # refresh the table's own asset: its metadata lists the rows and the invalid ones
            RunRequest(run_key=f"{fingerprint[:16]}:prompts", asset_selection=[prompts_key]),
            *range_run_requests(
                ordered, wanted, jobs_key=jobs_key, run_key_prefix=fingerprint[:16]
            ),
        ]
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=(
                [AddDynamicPartitionsRequest(project.partitions_name, new_keys)] if new_keys else []
            ),
            cursor=fingerprint,
        )

    return kvid_prompts_sensor
