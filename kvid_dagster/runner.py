"""The headless pipeline behind ``kvid-dagster run``: the same definitions, a real Dagster instance.

It does what a deployment's daemon would, in one process: materialize ``kvid_prompts``, submit
every partition without a job in one run per contiguous range (the single-run backfill shape),
evaluate the status sensor and store its events exactly as the sensor daemon does
(``report_runless_asset_event``) until every job is terminal, then publish the catalog.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import DagsterInstance, Definitions, SensorResult, build_sensor_context

from kvid_dagster._dagster_common import asset_value_loader, keys_needing_jobs
from kvid_dagster.budget import CreditBudget
from kvid_dagster.definitions import CATALOG_JOB, PROMPTS_JOB, SUBMIT_JOB, build_kvid_definitions
from kvid_dagster.ledger import Ledger, SpendWindow, VideoStatus, videos_frame
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.planning import partition_ranges
from kvid_dagster.progress import Phase, PlainDisplay, ProgressDisplay, ProgressTracker
from kvid_dagster.project import KvidProject
from kvid_dagster.resource import KvidResource
from kvid_dagster.translator import KvidAsset, KvidTranslator, asset_specs

# the run's own events stay in the instance (and in `dagster dev`); the console gets warnings
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def dagster_home_for(data_dir: Path) -> Path:
    """``$DAGSTER_HOME`` if set, else ``<data_dir>/dagster_home`` (created, telemetry off)."""
    home = Path(os.environ.get("DAGSTER_HOME") or data_dir / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    return home


@dataclass
class PipelineResult:
    catalog: pd.DataFrame
    runs: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    sensor_ticks: int = 0
    events_reported: int = 0
    elapsed_seconds: float = 0.0
    spent_credits: float = 0.0  # by this pipeline's submitting runs
    day_spent_credits: float = 0.0  # by every submitter since UTC midnight

    @property
    def ok(self) -> bool:
        valid = self.catalog[self.catalog["status"] != VideoStatus.INVALID]
        return not self.failed_runs and bool((valid["status"] == VideoStatus.COMPLETED).all())


def evaluate_status_sensor(
    defs: Definitions,
    instance: DagsterInstance,
    cursor: str | None,
    sensor_name: str,
    *,
    log_level: int = logging.INFO,
) -> tuple[int, str | None]:
    """One status-sensor tick, its events stored the way the sensor daemon stores them;
    ``log_level`` is that tick's own logger's (no other logger is touched)."""
    sensor_def = defs.resolve_sensor_def(sensor_name)
    resources = defs.resources or {}
    with build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        sensor_name=sensor_name,
        resources=resources,
    ) as context:
        context.log.setLevel(log_level)
        result = sensor_def(context)
    if not isinstance(result, SensorResult):
        return 0, cursor
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return len(result.asset_events), result.cursor


def run_pipeline(
    project: KvidProject,
    resource: KvidResource,
    *,
    translator: KvidTranslator | None = None,
    instance: DagsterInstance | None = None,
    poll_interval_seconds: float = 1.0,
    deadline_seconds: float = 3600.0,
    download: bool = True,
    budget_credits: CreditBudget | None = None,
    display: ProgressDisplay | None = None,
) -> PipelineResult:
    """``budget_credits``: its per-run credits are for the whole pipeline, shared by its
    submitting runs (one per contiguous range of partitions); its per-day credits hold for
    every submitter of the day. ``translator``: the definitions' (their keys and op names
    follow it). ``display`` shows the progress (default: plain lines on stdout, one per
    change)."""
    started = time.monotonic()
    translator = translator or KvidTranslator()
    defs = build_kvid_definitions(
        project,
        resource=resource,
        translator=translator,
        budget_credits=budget_credits,
        status_sensor=StatusSensorOptions(download=download),
    )
    # the per-run room goes to the submitting asset's op, named after its key
    jobs_key = asset_specs(translator, project)[KvidAsset.VIDEO_JOBS].key
    jobs_op = defs.resolve_assets_def(jobs_key).op.name
    if instance is None:
        # this home's instance, without setting $DAGSTER_HOME for the rest of the process
        instance = DagsterInstance.from_config(str(dagster_home_for(project.data_dir)))
    result = PipelineResult(catalog=pd.DataFrame())
    display = display if display is not None else PlainDisplay(sys.stdout)
    tracker = ProgressTracker()
    submit_runs: list[str] = []
    revision = 0  # the ledger revision read up to: a tick reads only the rows that moved

    def run_spend() -> float:
        """What this pipeline's submitting runs have spent so far (an index read per run)."""
        return sum(ledger.spent_credits(SpendWindow.RUN, run_id=r) for r in submit_runs)

    def show(phase: Phase, detail: str = "") -> None:
        nonlocal revision
        changed, revision = ledger.rows_changed_since(revision)
        tracker.see_rows(changed)
        display.update(tracker.progress(phase, ledger.counts_by_status(), run_spend(), detail))

    def execute(
        job_name: str,
        tags: dict[str, str] | None = None,
        run_config: Mapping[str, Any] | None = None,
    ) -> bool:
        job = defs.resolve_job_def(job_name)
        outcome = job.execute_in_process(
            instance=instance,
            tags=tags,
            raise_on_error=False,
            run_config={**QUIET_RUN_CONFIG, **(run_config or {})},
        )
        result.runs.append(outcome.run_id)
        if not outcome.success:
            result.failed_runs.append(outcome.run_id)
            for event in outcome.all_events:
                if event.is_step_failure:
                    error = (
                        event.step_failure_data.user_failure_data or event.step_failure_data.error
                    )
                    text = getattr(error, "description", None) or getattr(error, "message", error)
                    display.note(f"  run {outcome.run_id[:8]} failed: {text}")
        return outcome.success

    with display:
        display.note(f"validating {project.prompts_name}")
        ledger = project.ledger()
        show(Phase.VALIDATING)
        if not execute(PROMPTS_JOB):
            show(Phase.DONE)
            result.catalog = videos_frame(ledger)
            return result
        with asset_value_loader(project, defs, instance) as load:
            ordered, wanted = keys_needing_jobs(project, instance, load_upstream=load)
        ranges = partition_ranges(ordered, wanted)
        display.note(f"submitting {len(wanted)} partition(s) in {len(ranges)} run(s)")
        per_run = budget_credits.per_run if budget_credits is not None else None
        if budget_credits is not None and budget_credits.caps:
            display.note(f"credit budget: {budget_credits.describe()}")
        for number, partition_range in enumerate(ranges, 1):
            show(Phase.SUBMITTING, f"run {number}/{len(ranges)}")
            run_config: dict[str, Any] = {}
            if per_run is not None:  # what the earlier runs of this pipeline left of it
                room = max(0.0, per_run - run_spend())
                run_config = {"ops": {jobs_op: {"config": {"budget_credits": room}}}}
            execute(SUBMIT_JOB, partition_range.run_tags(), run_config)
            submit_runs.append(result.runs[-1])

        cursor: str | None = None
        dialect = resource.dialect.value  # the status sensor polls only this dialect's jobs
        while True:
            # the sensor logs a line at INFO each tick: the display says it once per change
            reported, cursor = evaluate_status_sensor(
                defs, instance, cursor, "kvid_status_sensor", log_level=logging.WARNING
            )
            result.sensor_ticks += 1
            result.events_reported += reported
            show(Phase.POLLING)
            # jobs this dialect can poll, and its claims another live process is still sending
            # (the ticks settle them if that process dies); the other dialect's wait for it
            claims = ledger.submissions([VideoStatus.SUBMITTING])
            waiting = ledger.jobs_to_poll(dialect) + [s for s in claims if s.dialect == dialect]
            if not waiting:
                break
            if time.monotonic() - started > deadline_seconds:
                display.note(
                    f"giving up after {deadline_seconds:.0f} s with {len(waiting)} job(s) still "
                    "running; their request_ids are in the catalog and the status sensor will "
                    "pick them up"
                )
                break
            time.sleep(poll_interval_seconds)
        others = other_dialect_jobs(ledger, dialect)
        if others:
            display.note(others)
        show(Phase.PUBLISHING)
        execute(CATALOG_JOB)
        result.catalog = videos_frame(ledger)
        # read again: a job whose service reported its cost has that cost now, not the estimate
        result.spent_credits = run_spend()
        result.day_spent_credits = ledger.spent_credits(SpendWindow.DAY)
        show(Phase.DONE)
    result.elapsed_seconds = time.monotonic() - started
    return result


def other_dialect_jobs(ledger: Ledger, dialect: str) -> str:
    """What waits for the other API dialect, as one line (empty: nothing): a job id means
    something only to the dialect it was sent in, so no poller of ``dialect`` ever sees them."""
    others = Counter(s.dialect for s in ledger.jobs_to_poll() if s.dialect != dialect)
    return "; ".join(
        f"{count} job(s) sent in the {name} dialect are not polled by this {dialect}-dialect "
        f"run: they wait, request_ids kept, until a run or status sensor with "
        f"KVID_API_DIALECT={name} polls them"
        for name, count in sorted(others.items())
    )


def print_summary(result: PipelineResult, project_dir: Path, out: Any = sys.stdout) -> None:
    frame = result.catalog
    columns = [
        "partition_key",
        "status",
        "model",
        "width",
        "height",
        "fps",
        "num_frames",
        "size_kb",
    ]
    shown = frame[[c for c in columns if c in frame.columns]].copy()
    if "error" in frame.columns:
        shown["note"] = frame["error"].fillna("").astype(str).str.slice(0, 60)
    print(shown.to_string(index=False, na_rep="-"), file=out)
    print(
        f"\n{len(frame)} rows; {result.sensor_ticks} status ticks; "
        f"{len(result.runs)} Dagster runs; "
        f"{result.elapsed_seconds:.1f} s",
        file=out,
    )
    print(
        f"credits: {result.spent_credits:g} spent by these runs, {result.day_spent_credits:g} "
        "today (UTC)",
        file=out,
    )
    print(f"catalog: {project_dir / 'catalog' / 'videos'} (pandas.read_parquet)", file=out)
    print(f"videos:  {project_dir / 'videos'}", file=out)
