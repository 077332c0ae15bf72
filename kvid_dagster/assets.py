"""The kvid assets: prompt table → a submitted job per partition → a video per partition → catalog.

- ``kvid_prompts``: reads and validates the table, adds partitions, reports invalid rows;
- ``kvid_video_jobs`` (one partition per row): submits the row's job, exactly once per request;
- ``kvid_videos`` (same partitions): materialized by the status sensor, never by a run;
- ``kvid_catalog``: compacts and publishes the Parquet catalogs.
"""

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
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

from kvid_dagster._aio import run_coroutine
from kvid_dagster.pricing import DEFAULT_PRICES
from kvid_dagster.project import KvidProject
from kvid_dagster.prompts import PromptTable, PromptTableError, load_prompt_table
from kvid_dagster.resource import KvidResource
from kvid_dagster.submit import SubmitOutcome, register_table, submit_rows
from kvid_dagster.translator import KvidTranslator

PREVIEW_ROWS = 20
VIDEO_CHECK_NAME = "video_ok"


class KvidJobsConfig(Config):
    force: bool = Field(
        default=False,
        description="Submit again even when a job exists for the exact same request. Costs money.",
    )


def _markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        text = "" if value is None else str(value)
        text = text.replace("|", "\\|").replace("\n", " ")
        return text if len(text) <= 80 else text[:79] + "…"

    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    return head + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def add_new_partitions(
    instance: DagsterInstance, project: KvidProject, keys: Sequence[str]
) -> list[str]:
    """Add the keys the instance does not have yet, in table order; return them."""
    existing = set(instance.get_dynamic_partitions(project.partitions_name))
    new = [k for k in dict.fromkeys(keys) if k not in existing]
    if new:
        instance.add_dynamic_partitions(project.partitions_name, new)
    return new


def compact_catalog(project: KvidProject, log: Any) -> None:
    """Fold the catalog log once it has grown (each writer appends a part; every reader pays for
    each unfolded one). Never fails the caller: the log is complete without it."""
    try:
        stats = project.catalog().maybe_compact()
    except Exception as exc:  # a compaction problem must not cost a tick or a run
        log.warning(f"catalog compaction skipped: {type(exc).__name__}: {exc}")
        return
    if stats is not None:
        log.info(f"catalog compacted: {stats.parts_folded} parts in {stats.seconds:.2f} s")


def load_table_or_fail(project: KvidProject) -> PromptTable:
    try:
        return load_prompt_table(project.prompts_path)
    except PromptTableError as exc:
        raise Failure(description=str(exc)) from exc


def build_kvid_assets(
    project: KvidProject,
    *,
    translator: KvidTranslator | None = None,
    prices: Mapping[str, float] | None = None,
    jobs_automation_condition: AutomationCondition | None = None,
) -> list[AssetsDefinition | AssetSpec]:
    """The four kvid assets (and the ``video_ok`` check) for one project.

    ``jobs_automation_condition`` (e.g. ``AutomationCondition.on_missing()``) lets declarative
    automation submit new partitions instead of, or beside, the prompt-table sensor.
    """
    translator = translator or KvidTranslator()
    key = {
        name: translator.get_asset_key(name)
        for name in ("kvid_prompts", "kvid_video_jobs", "kvid_videos", "kvid_catalog")
    }
    group = translator.get_group_name()
    price_table = dict(prices or DEFAULT_PRICES)

    @asset(
        key=key["kvid_prompts"],
        group_name=group,
        kinds={"kvid", "csv"},
        description=f"The prompt table {project.prompts_path.name}: validated rows become "
        "partitions; invalid rows are reported, never sent.",
        check_specs=[AssetCheckSpec("all_rows_valid", asset=key["kvid_prompts"])],
    )
    def kvid_prompts(context: AssetExecutionContext) -> MaterializeResult:
        table = load_table_or_fail(project)
        new_keys = add_new_partitions(context.instance, project, table.partition_keys)
        register_table(project.catalog(), table)
        for problem in table.invalid:
            context.log.warning(f"invalid row, not sent: {problem.message}")
        for warning in table.warnings:
            context.log.warning(warning)
        preview = [
            {
                "partition_key": r.partition_key,
                "job": r.job_kind,
                "model": r.model,
                "prompt": r.prompt,
            }
            for r in table.rows[:PREVIEW_ROWS]
        ]
        invalid = [
            {"row": p.row_number, "key": p.partition_key, "field": p.field, "reason": p.reason}
            for p in table.invalid[:PREVIEW_ROWS]
        ]
        metadata: dict[str, Any] = {
            "path": MetadataValue.path(str(project.prompts_path)),
            "rows": len(table.rows) + len(table.invalid),
            "valid_rows": len(table.rows),
            "invalid_rows": len(table.invalid),
            "new_partitions": len(new_keys),
            "preview": MetadataValue.md(
                _markdown_table(preview, ["partition_key", "job", "model", "prompt"])
            ),
        }
        if invalid:
            metadata["invalid"] = MetadataValue.md(
                _markdown_table(invalid, ["row", "key", "field", "reason"])
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
                            "\n".join(f"- {p.message}" for p in table.invalid[:PREVIEW_ROWS])
                            or "none"
                        ),
                    },
                )
            ],
        )

    # `backfill_policy` is beta in Dagster 1.13; the single-run backfill is the point here
    warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=BetaWarning)

    @asset(
        key=key["kvid_video_jobs"],
        deps=[key["kvid_prompts"]],
        partitions_def=project.partitions_def,
        backfill_policy=BackfillPolicy.single_run(),
        pool="kvid",
        group_name=group,
        kinds={"kvid"},
        automation_condition=jobs_automation_condition,
        description="One kvid job per prompt row, submitted once per exact request and recorded "
        "in the catalog before the run returns. A backfill of any size is one run.",
    )
    def kvid_video_jobs(
        context: AssetExecutionContext, config: KvidJobsConfig, kvid: KvidResource
    ) -> MaterializeResult:
        keys = list(context.partition_keys)
        table = load_table_or_fail(project)
        by_key = table.by_key
        invalid_by_key = {p.partition_key: p for p in table.invalid if p.partition_key}
        rows = [by_key[k] for k in keys if k in by_key]
        missing = [k for k in keys if k not in by_key]

        def report(outcome: SubmitOutcome) -> None:
            # one event-log write each (~8 ms): the submitted ones go in the summary and in each
            # partition's metadata instead
            if outcome.action not in {"submitted", "skipped"}:
                context.log.error(f"{outcome.partition_key}: {outcome.action}: {outcome.message}")

        async def submit() -> list[SubmitOutcome]:
            async with kvid.get_async_client() as client:
                return await submit_rows(
                    client,
                    project.catalog(),
                    rows,
                    force=config.force,
                    prices=price_table,
                    on_outcome=report,
                )

        outcomes = run_coroutine(submit()) if rows else []
        for outcome in outcomes:
            context.add_asset_metadata(
                {
                    "action": outcome.action,
                    "status": outcome.status,
                    "request_id": outcome.request_id or "",
                    "note": outcome.message,
                },
                partition_key=outcome.partition_key,
            )
        problems = [o for o in outcomes if o.action in {"uncertain", "error", "rejected"}]
        for k in missing:
            reason = invalid_by_key[k].message if k in invalid_by_key else "not in the table"
            context.log.error(f"{k}: no valid row: {reason}")
        counts: dict[str, int] = {}
        for outcome in outcomes:
            counts[outcome.action] = counts.get(outcome.action, 0) + 1
        context.log.info(
            f"{len(keys)} partitions: "
            + ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
        )
        # two small parts per submitted job: fold them now, so the status sensor's reads stay cheap
        compact_catalog(project, context.log)
        if problems or missing:
            lines = [f"{o.partition_key}: {o.action}: {o.message}" for o in problems]
            lines += [f"{k}: no valid row in the table" for k in missing]
            raise Failure(
                description=f"{len(lines)} of {len(keys)} partitions were not submitted cleanly "
                "(every other one is recorded):\n" + "\n".join(lines[:50]),
                metadata={"partitions": len(keys), **{a: n for a, n in counts.items()}},
            )
        return MaterializeResult(
            metadata={"partitions": len(keys), **{a: n for a, n in counts.items()}}
        )

    kvid_videos = AssetSpec(
        key=key["kvid_videos"],
        deps=[key["kvid_video_jobs"]],
        partitions_def=project.partitions_def,
        group_name=group,
        kinds={"kvid", "mp4"},
        description="The finished videos: materialized by the kvid status sensor when a job "
        "completes (runless events), with the file's own width, height, fps and frames.",
    )

    with warnings.catch_warnings():
        # partitioned asset checks are a preview feature in Dagster 1.13; we rely on it knowingly
        warnings.simplefilter("ignore")

        @asset_check(
            asset=key["kvid_videos"],
            name=VIDEO_CHECK_NAME,
            partitions_def=project.partitions_def,
            description="The partition's job completed and its video was downloaded and verified.",
        )
        def video_ok(context: AssetCheckExecutionContext) -> AssetCheckResult:
            partition_key = context.partition_key if context.has_partition_key else None
            record = project.catalog().get(partition_key) if partition_key else None
            return video_check_result(translator, record)

    @asset(
        key=key["kvid_catalog"],
        deps=[key["kvid_videos"]],
        group_name=group,
        kinds={"parquet"},
        description="Compacts the catalog log and publishes <data_dir>/catalog/videos and "
        "/submissions as Parquet (pandas, DuckDB and Spark read them directly).",
    )
    def kvid_catalog(context: AssetExecutionContext) -> MaterializeResult:
        catalog = project.catalog()
        stats = catalog.compact()
        latest = catalog.latest()
        counts = catalog.counts_by_status()
        context.log.info(f"catalog compacted: {stats}")
        preview = latest.head(PREVIEW_ROWS).to_dict(orient="records")
        return MaterializeResult(
            metadata={
                "videos_path": MetadataValue.path(str(project.catalog_dir / "videos")),
                "submissions_path": MetadataValue.path(str(project.catalog_dir / "submissions")),
                "rows": len(latest),
                **{f"status_{s.lower()}": n for s, n in sorted(counts.items())},
                "preview": MetadataValue.md(
                    _markdown_table(
                        preview,
                        [
                            "partition_key",
                            "status",
                            "request_id",
                            "width",
                            "height",
                            "num_frames",
                            "error",
                        ],
                    )
                ),
            }
        )

    return [kvid_prompts, kvid_video_jobs, kvid_videos, video_ok, kvid_catalog]


def video_check_result(
    translator: KvidTranslator, record: Mapping[str, Any] | None
) -> AssetCheckResult:
    """The ``video_ok`` verdict for one catalog row (shared by the check and the sensor)."""
    if record is None:
        return AssetCheckResult(
            check_name=VIDEO_CHECK_NAME, passed=False, metadata={"reason": "no catalog row"}
        )
    status = str(record.get("status") or "")
    if status == "COMPLETED":
        return AssetCheckResult(
            check_name=VIDEO_CHECK_NAME, passed=True, metadata=translator.get_video_metadata(record)
        )
    return AssetCheckResult(
        check_name=VIDEO_CHECK_NAME,
        passed=False,
        severity=AssetCheckSeverity.ERROR,
        metadata=translator.get_failure_metadata(record),
    )
