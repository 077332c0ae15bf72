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
from dagster import (
    DagsterEvent,
    DagsterInstance,
    Definitions,
    SensorResult,
    build_sensor_context,
)
from dagster._utils.error import SerializableErrorInfo

from kvid_dagster._dagster_common import asset_value_loader, keys_needing_jobs
from kvid_dagster.cli.progress import Phase, PlainDisplay, ProgressDisplay, ProgressTracker
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.mistakes import user_errors
from kvid_dagster.core.planning import partition_ranges
from kvid_dagster.core.project import KvidProject
from kvid_dagster.core.prompts import PromptTable
from kvid_dagster.definitions import CATALOG_JOB, PROMPTS_JOB, SUBMIT_JOB, build_kvid_definitions
from kvid_dagster.ledger import Ledger, SpendWindow, VideoStatus, videos_frame
from kvid_dagster.options import StatusSensorOptions
from kvid_dagster.resources import KvidResource
from kvid_dagster.translator import KvidAsset, KvidTranslator, asset_specs

# the run's own events stay in the instance (and in `dagster dev`); the console gets nothing:
# a failed step is reported once, by the runner, in the words of its cause (run_failures)
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
VERBOSE_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}


def dagster_home_for(data_dir: Path) -> Path:
    """``$DAGSTER_HOME`` if set, else ``<data_dir>/dagster_home`` (created, telemetry off)."""
    home = Path(os.environ.get("DAGSTER_HOME") or data_dir / "dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
    return home


@dataclass(frozen=True)
class StepFailure:
    """Why a step of one of the pipeline's runs failed, as a person reads it."""

    run_id: str
    step: str
    message: str  # the cause in its own words: our Failure's description, or the error's
    user_error: bool  # a mistake the user fixes (the table, the key, ...), not a bug of ours
    stack: str  # the whole error with its stack trace and causes

    @classmethod
    def of(cls, run_id: str, event: DagsterEvent) -> StepFailure:
        data = event.step_failure_data
        error = data.error
        stack = error.to_string() if error is not None else ""
        step = event.step_key or "?"
        if data.user_failure_data is not None:  # our own Failure: its words are the message
            return cls(run_id, step, data.user_failure_data.description or "", True, stack)
        cause = _user_cause(error)
        if cause is not None:
            return cls(run_id, step, _said(cause), True, stack)
        root = error
        while root is not None and (root.cause or root.context) is not None:
            root = root.cause or root.context  # Dagster's wrapper first; the bug last
        return cls(run_id, step, _said(root) if root is not None else "?", False, stack)

    def describe(self, verbose: bool = False) -> str:
        """One message; with the stack trace for a bug of ours, or when ``verbose``."""
        head = f"run {self.run_id[:8]} failed in {self.step}: {self.message}"
        return f"{head}\n{self.stack}" if verbose or not self.user_error else head


def _said(error: SerializableErrorInfo) -> str:
    """``Class: message``, without the module path Dagster's record puts before the class."""
    text = error.message.strip()
    at = text.find(f"{error.cls_name}: ")
    return text[at:] if at >= 0 else f"{error.cls_name}: {text}"


def _user_cause(error: SerializableErrorInfo | None) -> SerializableErrorInfo | None:
    """The first error of the chain (Dagster wraps a step's exception) that is a user's."""
    names = {cls.__name__ for base in user_errors() for cls in _subclasses(base)}
    while error is not None:
        if error.cls_name in names:
            return error
        error = error.cause or error.context
    return None


def _subclasses(base: type) -> list[type]:
    return [base, *(c for sub in base.__subclasses__() for c in _subclasses(sub))]


def table_order(table: PromptTable) -> list[str]:
    """The partition keys as the ledger has them, in the table's row order."""
    numbered = [(row.row_number, row.partition_key) for row in table.rows]
    numbered += [(bad.row_number, bad.ledger_key) for bad in table.invalid]
    return list(dict.fromkeys(key for _, key in sorted(numbered)))  # a repeated key: its first


@dataclass
class PipelineResult:
    catalog: pd.DataFrame
    runs: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    failures: list[StepFailure] = field(default_factory=list)
    table_order: list[str] = field(default_factory=list)  # the summary's row order
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
    table: PromptTable | None = None,
    verbose: bool = False,
) -> PipelineResult:
    """``budget_credits``: its per-run credits are for the whole pipeline, shared by its
    submitting runs (one per contiguous range of partitions); its per-day credits hold for
    every submitter of the day. ``translator``: the definitions' (their keys and op names
    follow it). ``display`` shows the progress (default: plain lines on stdout, one per
    change). ``table``: the project's table if the caller has read it (else it is read
    here, before any run: a table that cannot be used raises ``PromptTableError``, and
    nothing starts). A failed step is noted on the display in one line, its cause's words,
    with its stack trace only for a bug of ours or when ``verbose``."""
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
            run_config={
                **(VERBOSE_RUN_CONFIG if verbose else QUIET_RUN_CONFIG),
                **(run_config or {}),
            },
        )
        result.runs.append(outcome.run_id)
        if not outcome.success:
            result.failed_runs.append(outcome.run_id)
            for event in outcome.all_events:
                if event.is_step_failure:
                    failure = StepFailure.of(outcome.run_id, event)
                    result.failures.append(failure)
                    display.note(failure.describe(verbose))
        return outcome.success

    if table is None:
        with asset_value_loader(project, defs, instance) as load:
            table = project.load_table(load)
    result.table_order = table_order(table)
    with display:
        display.note(f"validating {project.prompts_name}")
        ledger = project.ledger()
        show(Phase.VALIDATING)
        if not execute(PROMPTS_JOB):
            result.catalog = videos_frame(ledger)
            return result
        ordered, wanted = keys_needing_jobs(project, instance, table=table)
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


SUMMARY_COLUMNS = (
    "partition_key", "status", "model", "width", "height", "fps", "num_frames", "size_kb",
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def summary_table(frame: pd.DataFrame, order: list[str]) -> list[str]:
    """The catalog's rows as aligned text, in ``order`` (the table's; rows it no longer has
    come after, by key), each row's error in full as the last column, ``note``."""
    if frame.empty:
        return []
    position = {key: i for i, key in enumerate(order)}
    frame = frame.assign(_at=frame["partition_key"].map(position)).sort_values(
        ["_at", "partition_key"], na_position="last", kind="stable"
    )
    columns = [c for c in SUMMARY_COLUMNS if c in frame.columns]
    rows = [[_cell(v) for v in values] for values in frame[columns].itertuples(index=False)]
    errors = frame["error"] if "error" in frame.columns else [None] * len(rows)
    notes = [" ".join(e.split()) if isinstance(e, str) else "" for e in errors]  # one line each
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in columns]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: list[str], note: str) -> str:
        aligned = (
            cell.rjust(width) if number else cell.ljust(width)
            for cell, width, number in zip(cells, widths, numeric, strict=True)
        )
        return "  ".join([*aligned, note]).rstrip()

    return [
        line(columns, "note"),
        *(line(row, note) for row, note in zip(rows, notes, strict=True)),
    ]


def print_summary(result: PipelineResult, project_dir: Path, out: Any = sys.stdout) -> None:
    """Stdout of ``kvid-dagster run``: the rows (none when there are none), then the totals."""
    frame = result.catalog
    for text in summary_table(frame, result.table_order):
        print(text, file=out)
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
