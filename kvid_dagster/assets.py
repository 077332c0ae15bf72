"""The kvid assets: prompt table → a submitted job per partition → a video per partition → catalog.

- ``kvid_prompts``: reads and validates the table, adds partitions, reports invalid rows;
- ``kvid_video_jobs`` (one partition per row): submits the row's job, exactly once per request;
- ``kvid_videos`` (same partitions): materialized by the status sensor, never by a run;
- ``kvid_catalog``: republishes the Parquet catalogs from the ledger, on demand (the status
  sensor and every run that changed something publish them too).
"""

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    AssetSpec,
    AutomationCondition,
    BackfillPolicy,
    BetaWarning,
    Config,
    DagsterInstance,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from kvid_dagster._dagster_common import (
    publish_catalog,
    upstream_loader,
    video_check_result,
    video_quality_result,
)
from kvid_dagster.catalog_metadata import (
    PREVIEW_ROWS,
    catalog_contact_sheet,
    catalog_metadata,
    markdown_table,
)
from kvid_dagster.core._aio import run_coroutine
from kvid_dagster.core.budget import CreditBudget, estimate_backfill
from kvid_dagster.core.pricing import DEFAULT_PRICES
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptTable, PromptTableError
from kvid_dagster.core.reporting import VIDEO_CHECK_NAME
from kvid_dagster.core.sources import PromptSourceUnavailable
from kvid_dagster.core.submit import (
    SpendReport,
    SubmitAction,
    SubmitOutcome,
    latest_submissions,
    register_table,
    submit_rows,
)
from kvid_dagster.ledger import ClaimOwner, ClaimRule, SpendWindow, VideoRow
from kvid_dagster.liveness import run_liveness
from kvid_dagster.media.quality import QualityCheck
from kvid_dagster.resources import KvidResource
from kvid_dagster.translator import (
    KvidAsset,
    KvidSpecs,
    KvidTranslator,
    asset_specs,
    partitions_def,
    upstream_key,
)

PREVIEW_USER_COLUMNS = 4  # the first of the table's own columns, in the kvid_prompts preview


class KvidJobsConfig(Config):
    force: bool = Field(
        default=False,
        description="Submit again even when a job exists for the exact same request. Costs money.",
    )
    budget_credits: float | None = Field(
        default=None,
        ge=0,
        description="Credits this run may spend (priced before anything is sent; the rows that "
        "do not fit stay PENDING). The definitions' per-run budget still holds when lower.",
    )

    def run_budget(self, definitions: CreditBudget) -> CreditBudget:
        """The run's ``CreditBudget``: the definitions' one, its per-run credits lowered to
        this run's ``budget_credits`` (a plain number, as the launchpad takes it)."""
        return definitions.with_run_limit(self.budget_credits)


def add_new_partitions(
    instance: DagsterInstance, project: KvidProject, keys: Sequence[str]
) -> list[str]:
    """Add the keys the instance does not have yet, in table order; return them."""
    existing = set(instance.get_dynamic_partitions(project.partitions_name))
    new = [k for k in dict.fromkeys(keys) if k not in existing]
    if new:
        instance.add_dynamic_partitions(project.partitions_name, new)
    return new


def load_table_or_fail(project: KvidProject, context: AssetExecutionContext) -> PromptTable:
    """The table (an upstream asset's value loaded through its IO manager), or the run fails
    with one line saying what is wrong with it or why it cannot be read now."""
    try:
        return project.load_table(upstream_loader(context.instance, context.load_asset_value))
    except (PromptTableError, PromptSourceUnavailable) as exc:
        raise Failure(description=str(exc)) from exc


@dataclass(frozen=True)
class KvidAssetSettings:
    """What the asset bodies need, fixed when the assets are built."""

    project: KvidProject
    translator: KvidTranslator
    prices: Mapping[str, float]
    budget: CreditBudget
    catalog_key: AssetKey  # told of each publication a run makes


def materialize_prompts(
    context: AssetExecutionContext, settings: KvidAssetSettings
) -> MaterializeResult:
    """``kvid_prompts``: validate the table, add its partitions and ledger rows, and report the
    invalid rows and what a backfill would cost."""
    project = settings.project
    table = load_table_or_fail(project, context)
    new_keys = add_new_partitions(context.instance, project, table.partition_keys)
    ledger = project.ledger()
    if register_table(ledger, table):
        publish_catalog_of_run(context, settings)
    backfill = estimate_backfill(
        table.rows,
        latest_submissions(ledger, table.rows),
        settings.prices,
        ledger.spent_credits(SpendWindow.DAY),
    )
    context.log.info(f"a backfill would cost: {backfill.describe()}")
    for problem in table.invalid:
        context.log.warning(f"invalid row, not sent: {problem.message}")
    for warning in table.warnings:
        context.log.warning(warning)
    shown_user_columns = list(table.user_columns[:PREVIEW_USER_COLUMNS])
    preview = [
        {
            "partition_key": r.partition_key,
            "job": r.job_kind,
            "model": r.model,
            "prompt": r.prompt,
            **{c: r.user_columns.get(c, "") for c in shown_user_columns},
        }
        for r in table.rows[:PREVIEW_ROWS]
    ]
    invalid = [
        {"row": p.row_number, "key": p.partition_key, "field": p.field, "reason": p.reason}
        for p in table.invalid[:PREVIEW_ROWS]
    ]
    metadata: dict[str, Any] = {
        "source": MetadataValue.text(project.prompts_name),
        "rows": len(table.rows) + len(table.invalid),
        "valid_rows": len(table.rows),
        "invalid_rows": len(table.invalid),
        "new_partitions": len(new_keys),
        "preview": MetadataValue.md(
            markdown_table(
                preview, ["partition_key", "job", "model", "prompt", *shown_user_columns]
            )
        ),
        "user_columns": MetadataValue.json(list(table.user_columns)),
        # what submitting every partition without a job would cost
        "backfill_partitions": backfill.rows,
        "backfill_estimate_credits": backfill.credits,
        "backfill_unpriced_partitions": backfill.unpriced,
        "day_spent_credits": backfill.spent_today_credits,
    }
    if invalid:
        metadata["invalid"] = MetadataValue.md(
            markdown_table(invalid, ["row", "key", "field", "reason"])
        )
    return MaterializeResult(
        metadata=metadata,
        check_results=[
            AssetCheckResult(
                check_name="all_rows_valid",
                passed=not table.invalid,
                severity=AssetCheckSeverity.WARN,
                metadata={
                    "invalid_rows": len(table.invalid),
                    "first_problems": MetadataValue.md(
                        "\n".join(f"- {p.message}" for p in table.invalid[:PREVIEW_ROWS]) or "none"
                    ),
                },
            )
        ],
    )


def submit_video_jobs(
    context: AssetExecutionContext,
    config: KvidJobsConfig,
    kvid: KvidResource,
    settings: KvidAssetSettings,
) -> MaterializeResult:
    """``kvid_video_jobs``: submit each partition's row once per exact request, within the
    budget; fails naming every partition not submitted cleanly (the others are recorded)."""
    project = settings.project
    keys = list(context.partition_keys)
    if kvid.dialect is not project.dialect:  # its rows would be refused by the client
        raise Failure(
            description=f"the kvid resource speaks the {kvid.dialect} dialect and the "
            f"project's table is read as {project.dialect} requests: set KVID_API_DIALECT "
            "(or the resource's and the definitions' dialect) to one of them"
        )
    table = load_table_or_fail(project, context)
    # a backfill started before kvid_prompts ran still gives every row its ledger row
    registered = register_table(project.ledger(), table)
    by_key = table.by_key
    invalid_by_key = {p.partition_key: p for p in table.invalid if p.partition_key}
    rows = [by_key[k] for k in keys if k in by_key]
    missing = [k for k in keys if k not in by_key]

    budget = config.run_budget(settings.budget)
    run_id = context.run.run_id

    def report(outcome: SubmitOutcome) -> None:
        # one event-log write each (~8 ms): the submitted ones go in the summary and in each
        # partition's metadata instead; the rows left for money are counted in the failure
        if outcome.is_problem and not outcome.is_waiting:
            context.log.error(f"{outcome.partition_key}: {outcome.action}: {outcome.message}")

    async def submit() -> list[SubmitOutcome]:
        async with kvid.get_async_client() as client:
            return await submit_rows(
                client,
                project.ledger(),
                rows,
                rule=ClaimRule(
                    force=config.force,
                    force_token=context.run.root_run_id or context.run.run_id,
                ),
                prices=settings.prices,
                on_outcome=report,
                generate_concurrency=kvid.generate_concurrency,
                owner=ClaimOwner.current(run_id),
                is_alive=run_liveness(context.instance),
                limit_wait_s=kvid.concurrent_limit_wait_seconds,
                budget=budget if budget.caps else None,
            )

    outcomes = run_coroutine(submit()) if rows else []
    for outcome in outcomes:
        context.add_asset_metadata(
            {
                "action": outcome.action.value,
                "status": outcome.status.value,
                "request_id": outcome.request_id or "",
                "note": outcome.message,
                **(
                    {"estimated_credits": outcome.estimated_credits}
                    if outcome.estimated_credits is not None
                    else {}
                ),
            },
            partition_key=outcome.partition_key,
        )
    problems = [o for o in outcomes if o.is_problem]
    for k in missing:
        reason = invalid_by_key[k].message if k in invalid_by_key else "not in the table"
        context.log.error(f"{k}: no valid row: {reason}")
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.action.value] = counts.get(outcome.action.value, 0) + 1
    context.log.info(
        f"{len(keys)} partitions: "
        + ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
    )
    if registered or any(o.action is not SubmitAction.SKIPPED for o in outcomes):
        publish_catalog_of_run(context, settings)
    spend = SpendReport.of(project.ledger(), outcomes, run_id)
    summary = {"partitions": len(keys), **counts, **spend.metadata()}
    if problems or missing:
        waiting = [o for o in problems if o.action is SubmitAction.NO_CREDIT]
        lines = [f"{o.partition_key}: {o.action}: {o.message}" for o in problems]
        lines += [f"{k}: no valid row in the table" for k in missing]
        credit = (
            f"kvid credits ran out: {len(waiting)} rows wait, PENDING and not sent (nothing "
            "was paid for them); add credits and run again.\n"
            if waiting
            else ""
        )
        if spend.rows_left:
            credit += spend.over_budget_message(budget) + "\n"
        raise Failure(
            description=f"{credit}{len(lines)} of {len(keys)} partitions were not submitted "
            "cleanly (every other one is recorded):\n" + "\n".join(lines[:50]),
            metadata=summary,
        )
    return MaterializeResult(metadata=summary)


def _checked_row(
    context: AssetCheckExecutionContext, settings: KvidAssetSettings
) -> VideoRow | None:
    partition_key = context.partition_key if context.has_partition_key else None
    return settings.project.ledger().row(partition_key) if partition_key else None


def check_video(
    context: AssetCheckExecutionContext, settings: KvidAssetSettings
) -> AssetCheckResult:
    """``video_ok`` in a run: the ledger's latest verdict on the partition."""
    return video_check_result(settings.translator, _checked_row(context, settings))


def check_video_quality(
    context: AssetCheckExecutionContext, settings: KvidAssetSettings, check: QualityCheck
) -> AssetCheckResult:
    """A quality check in a run: its verdict on the partition's current video, from what the
    poller measured when it fetched it (nothing is decoded again)."""
    return video_quality_result(check, _checked_row(context, settings))


def materialize_catalog(context: AssetExecutionContext, project: KvidProject) -> MaterializeResult:
    """``kvid_catalog``: republish the Parquet catalogs, with their row count, columns, a
    preview and a contact sheet of the latest videos."""
    stats = project.publish()
    context.log.info(f"catalog published: {stats}")
    sheet = catalog_contact_sheet(stats.videos_table, context.log)
    return MaterializeResult(metadata=catalog_metadata(project, stats, sheet))


def publish_catalog_of_run(context: AssetExecutionContext, settings: KvidAssetSettings) -> None:
    """Republish the catalogs after this run changed the ledger, and tell the UI at once
    (runless: a run that fails afterwards must not take the report with it)."""
    event = publish_catalog(settings.project, context.log, context.instance, settings.catalog_key)
    if event is None:
        return
    try:
        context.instance.report_runless_asset_event(event)
    except Exception as exc:  # the catalog is published: the next publication reports it
        context.log.warning(f"catalog publication not reported: {type(exc).__name__}: {exc}")


def _asset_kwargs(spec: AssetSpec, deps: Sequence[AssetKey]) -> dict[str, Any]:
    """The translator's share of an ``@asset``: all of its spec but the kvid-owned parts.
    ``deps`` are kvid's; a spec that names its own replaces them (as a component's
    ``translation`` does)."""
    return {
        "key": spec.key,
        "deps": list(spec.deps) or deps,
        "group_name": spec.group_name,
        "kinds": spec.kinds,
        "description": spec.description,
        "metadata": spec.metadata,
        "tags": spec.tags,
        "owners": spec.owners,
        "code_version": spec.code_version,
        "automation_condition": spec.automation_condition,
        "freshness_policy": spec.freshness_policy,
        "output_required": not spec.skippable,
    }


def build_kvid_assets(
    project: KvidProject,
    *,
    translator: KvidTranslator | None = None,
    prices: Mapping[str, float] | None = None,
    jobs_automation_condition: AutomationCondition | None = None,
    budget_credits: CreditBudget | None = None,
    videos_io_manager_key: str | None = None,
) -> list[AssetsDefinition | AssetSpec]:
    """The four kvid assets (and the checks on ``kvid_videos``: ``video_ok`` and the quality
    checks, ``quality.QualityCheck``) for one project, from the translator's specs.

    ``budget_credits`` caps what submitting spends, per run and per UTC day (a run's config
    ``budget_credits`` may lower its own); ``kvid_prompts`` reports what a backfill would cost.

    ``jobs_automation_condition`` (e.g. ``AutomationCondition.on_missing()``) lets declarative
    automation submit new partitions instead of, or beside, the prompt-table sensor.

    ``videos_io_manager_key`` names the resource that loads ``kvid_videos`` for downstream
    assets (``build_kvid_definitions`` provides a ``KvidVideoIOManager`` under it).

    Args:
        project: the prompt table, the data folder and the rows' dialect and defaults.
        translator: the assets' specs and the videos' metadata (default: ``KvidTranslator``).
        prices: credits per ``model/resolution`` (default: the built-in price table).
        jobs_automation_condition: the submitting asset's automation condition.
        budget_credits: what submitting may spend, per run and per UTC day.
        videos_io_manager_key: the resource that loads ``kvid_videos`` downstream.

    Example:
        .. code-block:: python

            assets = build_kvid_assets(
                KvidProject("prompts.csv", "data"),
                jobs_automation_condition=AutomationCondition.on_missing(),
            )
    """
    translator = translator or KvidTranslator()
    return assets_from_specs(
        project,
        translator,
        asset_specs(translator, project),
        prices=prices,
        jobs_automation_condition=jobs_automation_condition,
        budget_credits=budget_credits,
        videos_io_manager_key=videos_io_manager_key,
    )


def assets_from_specs(
    project: KvidProject,
    translator: KvidTranslator,
    specs: KvidSpecs,
    *,
    prices: Mapping[str, float] | None = None,
    jobs_automation_condition: AutomationCondition | None = None,
    budget_credits: CreditBudget | None = None,
    videos_io_manager_key: str | None = None,
) -> list[AssetsDefinition | AssetSpec]:
    """``build_kvid_assets`` with the specs already computed (``build_kvid_definitions``)."""
    specs = dict(specs)  # the jobs' automation condition goes onto this build's copy
    key = {asset: spec.key for asset, spec in specs.items()}
    settings = KvidAssetSettings(
        project,
        translator,
        dict(prices or DEFAULT_PRICES),
        budget_credits or CreditBudget(),
        key[KvidAsset.CATALOG],
    )
    partitions = partitions_def(project)
    if jobs_automation_condition is not None:
        specs[KvidAsset.VIDEO_JOBS] = specs[KvidAsset.VIDEO_JOBS].replace_attributes(
            automation_condition=jobs_automation_condition
        )

    @asset(
        # an upstream asset whose value is the table: its materializations refresh this one
        **_asset_kwargs(
            specs[KvidAsset.PROMPTS],
            [upstream] if (upstream := upstream_key(project)) is not None else [],
        ),
        check_specs=[AssetCheckSpec("all_rows_valid", asset=key[KvidAsset.PROMPTS])],
    )
    def kvid_prompts(context: AssetExecutionContext) -> MaterializeResult:
        return materialize_prompts(context, settings)

    with warnings.catch_warnings():
        # `backfill_policy` is beta in Dagster 1.13; the single-run backfill is the point here
        warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=BetaWarning)

        @asset(
            **_asset_kwargs(specs[KvidAsset.VIDEO_JOBS], [key[KvidAsset.PROMPTS]]),
            partitions_def=partitions,
            backfill_policy=BackfillPolicy.single_run(),
            pool="kvid",
        )
        def kvid_video_jobs(
            context: AssetExecutionContext, config: KvidJobsConfig, kvid: KvidResource
        ) -> MaterializeResult:
            return submit_video_jobs(context, config, kvid, settings)

    videos_spec = specs[KvidAsset.VIDEOS]
    kvid_videos = videos_spec.replace_attributes(
        deps=list(videos_spec.deps) or [key[KvidAsset.VIDEO_JOBS]],
        partitions_def=partitions,
    )
    if videos_io_manager_key is not None:
        kvid_videos = kvid_videos.with_io_manager_key(videos_io_manager_key)

    with warnings.catch_warnings():
        # partitioned asset checks are a preview feature in Dagster 1.13; we rely on it knowingly
        warnings.simplefilter("ignore")

        @asset_check(
            asset=key[KvidAsset.VIDEOS],
            name=VIDEO_CHECK_NAME,
            partitions_def=partitions,
            description="The partition's job completed and its video was downloaded and verified.",
        )
        def video_ok(context: AssetCheckExecutionContext) -> AssetCheckResult:
            return check_video(context, settings)

        quality_checks = [
            _quality_check(check, key[KvidAsset.VIDEOS], settings) for check in QualityCheck
        ]

    @asset(**_asset_kwargs(specs[KvidAsset.CATALOG], [key[KvidAsset.VIDEOS]]))
    def kvid_catalog(context: AssetExecutionContext) -> MaterializeResult:
        return materialize_catalog(context, project)

    return [kvid_prompts, kvid_video_jobs, kvid_videos, video_ok, *quality_checks, kvid_catalog]


def _quality_check(
    check: QualityCheck, videos: AssetKey, settings: KvidAssetSettings
) -> AssetChecksDefinition:
    """One quality check of ``kvid_videos`` (a function of its own: each check its body)."""

    @asset_check(
        asset=videos,
        name=check.value,
        partitions_def=partitions_def(settings.project),
        description=check.description,
    )
    def quality_check(context: AssetCheckExecutionContext) -> AssetCheckResult:
        return check_video_quality(context, settings, check)

    return quality_check
