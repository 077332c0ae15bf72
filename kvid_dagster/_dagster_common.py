"""What the assets, sensors, schedule and runner share that needs Dagster's types.

The decisions are made in ``planning`` and ``reporting`` (no Dagster); here they meet the
instance (partitions) and become Dagster objects (run requests, check results). It imports only
the layers below it (project, translator); assets, sensors, schedules and the runner import it
and never each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    DagsterInstance,
    RunRequest,
)

from kvid_dagster.ledger import VideoRow
from kvid_dagster.planning import JobPlan, partition_ranges, plan_jobs
from kvid_dagster.project import KvidProject
from kvid_dagster.prompts import PromptTable
from kvid_dagster.reporting import VIDEO_CHECK_NAME, verdict_for
from kvid_dagster.submit import latest_submissions
from kvid_dagster.translator import PREVIEW_KEY, KvidTranslator


def publish_catalog(project: KvidProject, log: Any) -> None:
    """Republish the Parquet catalogs after a change. Never fails the caller: the ledger holds
    everything, and the next publication (any tick, run or ``kvid_catalog``) catches up."""
    try:
        stats = project.publish()
    except Exception as exc:  # a full disk must not cost a tick or a run
        log.warning(f"catalog not published: {type(exc).__name__}: {exc}")
        return
    log.info(
        f"catalog published: {stats.videos} rows, {stats.submissions} events "
        f"(ledger revision {stats.revision}) in {stats.seconds:.2f} s"
    )


def keys_needing_jobs(
    project: KvidProject,
    instance: DagsterInstance,
    *,
    table: PromptTable | None = None,
    partition_keys: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> JobPlan:
    """``plan_jobs`` on the project's table, ledger and the instance's partitions.

    ``table`` and ``partition_keys`` spare a caller that already has them a second read.
    """
    if table is None:
        table = project.load_table()
    if partition_keys is None:
        partition_keys = instance.get_dynamic_partitions(project.partitions_name)
    return plan_jobs(table, latest_submissions(project.ledger(), table.rows), partition_keys, extra)


def range_run_requests(
    ordered_keys: Sequence[str],
    wanted: Iterable[str],
    *,
    jobs_key: AssetKey,
    run_key_prefix: str | None,
) -> list[RunRequest]:
    """One run request per contiguous range of ``wanted``, targeting the jobs asset."""
    return [
        RunRequest(
            run_key=f"{run_key_prefix}:{r.first}:{r.last}" if run_key_prefix else None,
            asset_selection=[jobs_key],
            tags=r.run_tags(),
        )
        for r in partition_ranges(ordered_keys, wanted)
    ]


def video_check_result(translator: KvidTranslator, row: VideoRow | None) -> AssetCheckResult:
    """The ``video_ok`` result for one ledger row (the check's own and the sensor's)."""
    if row is None:  # Verdict.NO_ROW
        return AssetCheckResult(
            check_name=VIDEO_CHECK_NAME, passed=False, metadata={"reason": "no ledger row"}
        )
    if verdict_for(row).passed:
        # the materialization beside it carries the preview: once in the event log is enough
        metadata = translator.get_video_metadata(row)
        metadata.pop(PREVIEW_KEY, None)
        return AssetCheckResult(check_name=VIDEO_CHECK_NAME, passed=True, metadata=metadata)
    return AssetCheckResult(
        check_name=VIDEO_CHECK_NAME,
        passed=False,
        severity=AssetCheckSeverity.ERROR,
        metadata=translator.get_failure_metadata(row),
    )
