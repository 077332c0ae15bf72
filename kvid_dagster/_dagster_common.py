"""What the assets, sensors, schedule and runner share that needs Dagster's types.

The decisions are made in ``planning`` and ``reporting`` (no Dagster); here they meet the
instance (partitions) and become Dagster objects (run requests, check results, the catalog's
runless materializations). It imports only the layers below it (project, translator,
catalog_metadata); assets, sensors, schedules and the runner import it and never each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    Definitions,
    EventLogRecord,
    MetadataValue,
    RepositoryDefinition,
    RunRequest,
)

from kvid_dagster.catalog_metadata import (
    CONTACT_SHEET_KEY,
    catalog_metadata,
    read_previews,
    shown_catalog,
)
from kvid_dagster.core.planning import JobPlan, partition_ranges, plan_jobs
from kvid_dagster.core.project import KvidProject, UpstreamAsset, UpstreamLoader
from kvid_dagster.core.prompts import PromptTable
from kvid_dagster.core.reporting import VIDEO_CHECK_NAME, unmeasured_reason, verdict_for
from kvid_dagster.core.sources import PromptSourceUnavailable
from kvid_dagster.core.submit import latest_submissions
from kvid_dagster.ledger import VideoRow
from kvid_dagster.media.quality import CheckOutcome, QualityCheck, outcomes
from kvid_dagster.translator import PREVIEW_KEYS, KvidTranslator, upstream_key


def publish_catalog(
    project: KvidProject,
    log: Any,
    instance: DagsterInstance,
    catalog_key: AssetKey,
    *,
    only_if_behind: bool = False,
) -> AssetMaterialization | None:
    """Republish the Parquet catalogs after a change; returns the runless materialization of
    ``catalog_key`` that tells the UI (row count, ledger revision), or None when its latest
    one shows this publication already, or the publication failed.

    ``only_if_behind``: publish only when the ledger moved past what ``catalog_key`` shows
    (the status sensor's rule: it also catches up a publication nobody reported). Never fails
    the caller: the ledger holds everything, and the next publication catches up.
    """
    shown = shown_catalog(instance, catalog_key)
    ledger = project.ledger()
    if only_if_behind and shown.shows(ledger.ledger_id(), ledger.revision()):
        return None
    try:
        stats = project.publish()
    except Exception as exc:  # a full disk must not cost a tick or a run
        log.warning(f"catalog not published: {type(exc).__name__}: {exc}")
        return None
    log.info(
        f"catalog published: {stats.videos} rows, {stats.submissions} events "
        f"(ledger revision {stats.revision}) in {stats.seconds:.2f} s"
    )
    if shown.shows(ledger.ledger_id(), stats.revision):
        return None
    # the contact sheet is kvid_catalog's own (it decodes videos): a later one carries it on
    sheet = {CONTACT_SHEET_KEY: shown.contact_sheet} if shown.contact_sheet is not None else {}
    return AssetMaterialization(
        asset_key=catalog_key, metadata=catalog_metadata(project, stats, sheet)
    )


def latest_materialization(instance: DagsterInstance, key: AssetKey) -> EventLogRecord | None:
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1)
    return records.records[0] if records.records else None


def upstream_loader(instance: DagsterInstance, load: Callable[..., Any]) -> UpstreamLoader:
    """An ``UpstreamLoader`` on a context's ``load_asset_value``: the asset's latest
    materialization, of whichever partition it was (a daily asset's latest day)."""

    def load_latest(upstream: UpstreamAsset) -> Any:
        key = AssetKey(upstream.path)
        record = latest_materialization(instance, key)
        if record is None:
            raise PromptSourceUnavailable(
                f"asset {key.to_user_string()} has never been materialized: the prompt rows "
                "are its value"
            )
        partition = record.partition_key
        return load(key, partition_key=partition) if partition else load(key)

    return load_latest


@contextlib.contextmanager
def asset_value_loader(
    project: KvidProject,
    definitions: RepositoryDefinition | Definitions | None,
    instance: DagsterInstance,
) -> Iterator[UpstreamLoader | None]:
    """Outside a run (a sensor, a schedule, the headless runner): the way to load the
    project's upstream asset through its IO manager, whose resources are entered once, here;
    None when the rows are not an asset's, or there are no definitions to load with."""
    if project.upstream is None or definitions is None:
        yield None
        return
    with definitions.get_asset_value_loader(instance) as loader:
        yield upstream_loader(instance, loader.load_asset_value)


def prompts_change_token(project: KvidProject, instance: DagsterInstance) -> str | None:
    """A cheap token that changes whenever the project's rows may have: an upstream asset's
    latest materialization (a read of the event log), else the source's own (a file's stat,
    an object's ETag, a database's digest). Raises ``PromptSourceUnavailable``."""
    key = upstream_key(project)
    if key is None:
        return project.source().change_token()
    record = latest_materialization(instance, key)
    return None if record is None else f"materialization:{record.storage_id}"


def keys_needing_jobs(
    project: KvidProject,
    instance: DagsterInstance,
    *,
    table: PromptTable | None = None,
    load_upstream: UpstreamLoader | None = None,
    partition_keys: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> JobPlan:
    """``plan_jobs`` on the project's table, ledger and the instance's partitions.

    ``table`` and ``partition_keys`` spare a caller that already has them a second read;
    ``load_upstream``: the caller's way to load an upstream asset's value (see
    ``KvidProject.source``).
    """
    if table is None:
        table = project.load_table(load_upstream)
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
    if row is None:  # RowVerdict.NO_ROW
        return AssetCheckResult(
            check_name=VIDEO_CHECK_NAME, passed=False, metadata={"reason": "no ledger row"}
        )
    if verdict_for(row).passed:
        # the materialization beside it carries the previews: once in the event log is enough
        # (a preview that could not be made still says why)
        metadata = translator.get_video_metadata(row, read_previews(row))
        for key in PREVIEW_KEYS:
            metadata.pop(key, None)
        return AssetCheckResult(check_name=VIDEO_CHECK_NAME, passed=True, metadata=metadata)
    return AssetCheckResult(
        check_name=VIDEO_CHECK_NAME,
        passed=False,
        severity=AssetCheckSeverity.ERROR,
        metadata=translator.get_failure_metadata(row),
    )


def quality_check_result(outcome: CheckOutcome) -> AssetCheckResult:
    """A quality check's result on a measured video: the verdict, what was found against what
    is allowed, and the figures measured beside the ones expected (an advisory check's failure
    is a warning)."""
    metadata: dict[str, Any] = {"result": MetadataValue.text(outcome.description)}
    for name, value in outcome.measured.items():
        metadata[name] = _figure(value)
    for name, value in outcome.expected.items():
        metadata[f"expected_{name}"] = _figure(value) if value is not None else _NOT_KNOWN
    metadata["rule"] = MetadataValue.text(outcome.rule)
    return AssetCheckResult(
        check_name=outcome.check.value,
        passed=outcome.passed,
        severity=AssetCheckSeverity.WARN if outcome.check.advisory else AssetCheckSeverity.ERROR,
        description=outcome.description,
        metadata=metadata,
    )


# an expected figure the request does not determine (aspect ratio auto without the image)
_NOT_KNOWN = MetadataValue.text("not known from the request")


def _figure(value: float) -> MetadataValue:
    return MetadataValue.int(value) if isinstance(value, int) else MetadataValue.float(value)


def video_quality_result(check: QualityCheck, row: VideoRow | None) -> AssetCheckResult:
    """A quality check's result for one ledger row (the check's own execution in a run): a
    partition without a measured video fails it as a warning, saying why (the sensor reports
    nothing for it: ``reporting.VideoReport``)."""
    found = [o for o in outcomes(row.video) if o.check is check] if row is not None else []
    if found:
        return quality_check_result(found[0])
    reason = unmeasured_reason(row)
    return AssetCheckResult(
        check_name=check.value,
        passed=False,
        severity=AssetCheckSeverity.WARN,
        description=reason,
        metadata={"reason": MetadataValue.text(reason)},
    )
