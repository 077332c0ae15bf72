"""Sensors: the status sensor (jobs → runless video materializations), the prompt-table sensor."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dagster import (
    AddDynamicPartitionsRequest,
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    DagsterInstance,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from kvid_dagster._dagster_common import (
    asset_value_loader,
    keys_needing_jobs,
    prompts_change_token,
    publish_catalog,
    quality_check_result,
    range_run_requests,
    video_check_result,
)
from kvid_dagster.catalog_metadata import read_previews
from kvid_dagster.client import AsyncKvidClient
from kvid_dagster.core._aio import run_coroutine
from kvid_dagster.core.budget import CreditBudget
from kvid_dagster.core.poll import PollConfig, PollReport, VideoEvent, poll_pending
from kvid_dagster.core.project import KvidProject, UpstreamLoader
from kvid_dagster.core.prompts import PromptTableError
from kvid_dagster.core.reporting import (
    CHECK_NAMES,
    ReportKind,
    ShownOutcome,
    rows_to_recheck,
    unreported,
    video_reports,
)
from kvid_dagster.core.sources import PromptSourceUnavailable
from kvid_dagster.core.submit import SubmitAction, SubmitOutcome, resubmit_failed
from kvid_dagster.ledger import Submission, VideoStatus
from kvid_dagster.liveness import run_liveness
from kvid_dagster.media.quality import outcomes
from kvid_dagster.options import PromptsSensorOptions, StatusSensorOptions
from kvid_dagster.resources import KvidResource
from kvid_dagster.translator import KvidAsset, KvidSpecs, KvidTranslator, asset_specs


def video_events(
    events: Sequence[VideoEvent],
    translator: KvidTranslator,
    videos_key: AssetKey,
    *,
    checked: Mapping[str, Collection[str]] | None = None,
) -> list[AssetMaterialization | AssetObservation | AssetCheckEvaluation]:
    """The runless events that rows whose job ended turn into (``reporting.video_reports``);
    ``checked``: by check name, the partitions that already have its result, which get none
    (the check's own execution in a run reads the ledger for the latest verdict)."""
    out: list[AssetMaterialization | AssetObservation | AssetCheckEvaluation] = []
    for report in video_reports(events, checked=checked or {}):
        if report.kind is ReportKind.MATERIALIZATION:
            previews = read_previews(report.row)
            event, metadata = (
                AssetMaterialization,
                translator.get_video_metadata(report.row, previews),
            )
        else:
            event, metadata = AssetObservation, translator.get_failure_metadata(report.row)
        out.append(event(asset_key=videos_key, partition=report.partition_key, metadata=metadata))
        results = [quality_check_result(o) for o in report.quality]
        if report.verdict is not None:
            results.insert(0, video_check_result(translator, report.row))
        out += [
            AssetCheckEvaluation(
                asset_key=videos_key,
                check_name=str(result.check_name),
                passed=result.passed,
                metadata=result.metadata,
                severity=result.severity,
                description=result.description,
                partition=report.partition_key,
            )
            for result in results
        ]
    return out


def _partitions_with_check_results(
    instance: DagsterInstance, videos_key: AssetKey, keys: Collection[str]
) -> dict[str, set[str]]:
    """By check name, which of ``keys`` already have its result stored (one query)."""
    if not keys:
        return {}
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [AssetCheckKey(videos_key, name) for name in CHECK_NAMES], partition_keys=sorted(keys)
    )
    checked: dict[str, set[str]] = {}
    for info in infos:
        checked.setdefault(info.check_key.name, set()).add(str(info.partition_key))
    return checked


def _observed_outcomes(
    instance: DagsterInstance, videos_key: AssetKey, keys: Sequence[str]
) -> dict[str, ShownOutcome]:
    """What the latest observation of each partition shows."""
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=videos_key, asset_partitions=list(keys)),
        limit=max(100, 5 * len(keys)),
    ).records
    latest: dict[str, ShownOutcome] = {}
    for record in records:  # newest first
        observation = record.event_log_entry.asset_observation
        if observation is None or observation.partition is None:
            continue
        if observation.partition not in latest:
            meta = observation.metadata
            status, request_id = (
                str(meta[name].value) if name in meta else None for name in ("status", "request_id")
            )
            latest[observation.partition] = ShownOutcome(status, request_id)
    return latest


def unreported_events(
    project: KvidProject,
    instance: DagsterInstance,
    videos_key: AssetKey,
    skip: set[str],
    checked: int | None = None,
) -> tuple[list[VideoEvent], int]:
    """Rows whose outcome never reached Dagster (a tick that died after the ledger write, an
    UNCERTAIN submission of a run): reported again, so Dagster and the ledger converge
    (``reporting.rows_to_recheck`` and ``reporting.unreported`` decide; this reads Dagster).

    Only rows changed after ledger revision ``checked`` are looked at (every row when None);
    returns the events and the revision now checked. The cursor that carries it is stored with
    the tick's events, so a tick that dies before they are stored is checked again.
    """
    changed, revision = project.ledger().rows_changed_since(-1 if checked is None else checked)
    recheck = rows_to_recheck(changed, skip=skip, now=datetime.now(UTC))
    materialized = instance.get_materialized_partitions(videos_key) if recheck.completed else set()
    observed = (
        _observed_outcomes(instance, videos_key, [r.partition_key for r in recheck.ended])
        if recheck.ended
        else {}
    )
    return unreported(recheck, materialized, observed), revision


# the retries' share of a tick's budget when the retry policy is on (at most a quarter of it)
_RETRY_SHARE_MAX_S = 5.0


async def _retry_failed(
    client: AsyncKvidClient,
    settings: StatusSensorSettings,
    deadline: float,
    load_upstream: UpstreamLoader | None,
) -> tuple[list[SubmitOutcome], str | None]:
    """The retry policy's share of a tick: FAILED jobs with attempts left are sent again,
    within the budget's per-day credits, until ``deadline`` (the rest: the next tick)."""
    project, max_attempts = settings.project, settings.failed_job_max_attempts
    ledger = project.ledger()
    failed = [
        r for r in ledger.rows_with_job_status(VideoStatus.FAILED) if r.attempts < max_attempts
    ]
    if not failed:
        return [], None
    try:
        table = project.load_table(load_upstream)
    except (PromptTableError, PromptSourceUnavailable) as exc:
        return [], f"FAILED jobs not retried: {exc}"
    by_key = table.by_key
    rows = [by_key[r.partition_key] for r in failed if r.partition_key in by_key]
    outcomes = await resubmit_failed(
        client, ledger, rows, max_attempts=max_attempts, prices=settings.prices,
        budget=settings.budget, deadline=deadline,
    )  # fmt: skip
    return outcomes, None


def _json_object(cursor: str) -> dict[str, Any] | None:
    """A cursor's JSON object, or None (garbage, or another shape)."""
    try:
        raw = json.loads(cursor)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


_CURSOR_FIELDS: dict[str, type] = {"after": int, "ledger_id": str, "checked": int}


def _is_cursor_field(name: str, value: object) -> bool:
    """A field of this version's cursor, holding its type or null (a bool is no int)."""
    kind = _CURSOR_FIELDS.get(name)
    return kind is not None and (
        value is None or (isinstance(value, kind) and not isinstance(value, bool))
    )


@dataclass(frozen=True)
class StatusCursor:
    """Where the status sensor is: the submission id its next tick polls after (round robin
    when a tick's budget does not cover every job) and the ledger (id, revision) whose changes
    it has checked for outcomes Dagster never got.

    An unreadable cursor (not JSON, garbage, an earlier version's shape) starts over: a fresh
    cursor polls from the first job and re-checks the whole ledger, which costs a slower tick
    and loses nothing."""

    after: int | None = None
    ledger_id: str | None = None
    checked: int | None = None

    @classmethod
    def parse(
        cls, cursor: str | None, *, warn: Callable[[str], object] | None = None
    ) -> StatusCursor:
        """The cursor ``cursor`` holds, else a fresh one (and ``warn`` is told why)."""
        if not cursor:
            return cls()
        raw = _json_object(cursor)
        if raw is not None and all(_is_cursor_field(n, v) for n, v in raw.items()):
            return cls(**raw)
        if warn is not None:
            warn(f"unreadable status sensor cursor {cursor[:200]!r}: starting over")
        return cls()

    def checked_in(self, ledger_id: str) -> int | None:
        """The revision checked, if it is of this ledger (a new database is checked whole)."""
        return self.checked if self.ledger_id == ledger_id else None

    def dump(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class StatusSensorSettings:
    """What a status sensor tick needs, fixed when the sensor is built."""

    project: KvidProject
    translator: KvidTranslator
    videos_key: AssetKey
    catalog_key: AssetKey
    poll_config: PollConfig
    failed_job_max_attempts: int
    prices: Mapping[str, float] | None
    budget: CreditBudget | None  # its per-day credits hold the retries (they are in no run)


async def _poll_and_retry(
    kvid: KvidResource,
    settings: StatusSensorSettings,
    cursor: StatusCursor,
    is_alive: Callable[[Submission], bool | None],
    load_upstream: UpstreamLoader | None,
) -> tuple[PollReport, list[SubmitOutcome], str | None]:
    """One budgeted poll of every pending job, then the retry policy's re-submissions; both
    inside the tick's budget (retries waiting on the service's limit included), the polls
    leaving the retries a share of it: with thousands of jobs they would use it all."""
    started = time.monotonic()
    config = settings.poll_config
    deadline = started + config.tick_budget_seconds
    retrying = settings.failed_job_max_attempts > 1
    if retrying:
        share = min(_RETRY_SHARE_MAX_S, config.tick_budget_seconds / 4)
        config = replace(config, tick_budget_seconds=config.tick_budget_seconds - share)
    async with kvid.get_async_client() as client:
        report = await poll_pending(
            client,
            settings.project.ledger(),
            config,
            start_after=cursor.after,
            is_alive=is_alive,
        )
        if not retrying:
            return report, [], None
        return report, *await _retry_failed(client, settings, deadline, load_upstream)


def _log_tick(
    log: Any, report: PollReport, retried: Sequence[SubmitOutcome], max_attempts: int
) -> None:
    moving = Counter(e.row.status for e in report.events if not e.is_final)
    if moving:  # a line per running job would be thousands per tick: those are DEBUG
        log.info("still running: " + ", ".join(f"{n} {s}" for s, n in sorted(moving.items())))
    for event in report.events:
        line = event.log_lines[-1] if event.log_lines else ""
        row = event.row
        if not event.is_final:
            log.debug(f"{event.partition_key}: {row.status} {row.progress}%  {line}")
        elif row.status is VideoStatus.COMPLETED:
            log.info(f"{event.partition_key}: COMPLETED {row.video.local_path or row.video.url}")
            for failed in (o for o in outcomes(row.video) if not o.passed):
                log.warning(f"{event.partition_key}: {failed.check} failed: {failed.description}")
        else:
            log.warning(f"{event.partition_key}: {row.status}: {row.error}")
    for error in report.errors:
        log.warning(error)
    deferred = sum(o.action is SubmitAction.DEFERRED for o in retried)
    if deferred:
        log.info(f"{deferred} FAILED job(s) left for the next tick's retries (budget spent)")
    for outcome in retried:
        if outcome.action is SubmitAction.DEFERRED:
            continue
        if outcome.action is SubmitAction.SUBMITTED:
            log.info(
                f"{outcome.partition_key}: its FAILED job was re-submitted as "
                f"{outcome.request_id} (retry policy: at most {max_attempts})"
            )
        elif outcome.action is not SubmitAction.SKIPPED:
            log.warning(f"{outcome.partition_key}: retry {outcome.action}: {outcome.message}")


def status_sensor_tick(
    context: SensorEvaluationContext, kvid: KvidResource, settings: StatusSensorSettings
) -> SensorResult:
    """Poll, retry, report what ended (and what Dagster never heard of), publish (and report)
    the catalogs if the ledger moved past what ``kvid_catalog`` shows; the cursor is stored
    with the events, so a tick that dies is re-done whole."""
    project, translator, videos_key = settings.project, settings.translator, settings.videos_key
    cursor = StatusCursor.parse(context.cursor, warn=context.log.warning)
    with asset_value_loader(project, context.repository_def, context.instance) as load:
        report, retried, retry_problem = run_coroutine(
            _poll_and_retry(kvid, settings, cursor, run_liveness(context.instance), load)
        )
    _log_tick(context.log, report, retried, settings.failed_job_max_attempts)
    if retry_problem:
        context.log.warning(retry_problem)
    final = report.final
    reported = {e.partition_key for e in final}
    ledger_id = project.ledger().ledger_id()
    late, checked_revision = unreported_events(
        project, context.instance, videos_key, reported, cursor.checked_in(ledger_id)
    )
    checked = _partitions_with_check_results(
        context.instance, videos_key, reported | {e.partition_key for e in late}
    )
    events = video_events(final, translator, videos_key, checked=checked)
    reported_too = {name: checked.get(name, set()) | reported for name in CHECK_NAMES}
    events += video_events(late, translator, videos_key, checked=reported_too)
    context.log.info(
        f"polled {report.polled} of {report.pending} pending jobs in {report.elapsed_s:.1f} s"
        f" ({report.deferred} left for the next tick); {len(final)} finished"
    )
    # anything that changed the ledger (here, in a run, elsewhere) and is not shown yet
    catalog = publish_catalog(
        project, context.log, context.instance, settings.catalog_key, only_if_behind=True
    )
    if catalog is not None:
        events.append(catalog)
    after = report.last_submission_id if report.deferred else None
    return SensorResult(
        asset_events=events,
        cursor=StatusCursor(after, ledger_id, checked_revision).dump(),
    )


def _table_dir(project: KvidProject) -> Path | None:
    """Where the rows' relative image paths resolve when the table is a local file: its
    folder (the videos' expected size follows an ``auto`` request's input image)."""
    uri = None if project.upstream is not None else project.source().uri
    return Path(uri).parent if uri is not None and "://" not in uri else None


def build_kvid_status_sensor(
    project: KvidProject,
    options: StatusSensorOptions = StatusSensorOptions(),
    *,
    translator: KvidTranslator | None = None,
    prices: Mapping[str, float] | None = None,
    budget_credits: CreditBudget | None = None,
    name: str = "kvid_status_sensor",
) -> SensorDefinition:
    """Polls every pending job (within ``options.tick_budget_seconds``; the rest on the next
    tick, round robin by the cursor), records finished videos as runless materializations of
    ``kvid_videos``, and republishes the Parquet catalogs when the ledger changed, with a
    runless materialization of ``kvid_catalog`` saying so.

    ``options`` holds the reliability rules (see ``StatusSensorOptions``). ``budget_credits``:
    its per-day credits hold the retries too (a retry over them is not sent and its row stays
    FAILED); its per-run credits do not, a retry being in no run. Every tick first settles
    claims whose submitter is gone (``UNCERTAIN`` at once).

    Args:
        project: the prompt table, the data folder and the rows' dialect and defaults.
        options: the tick's budget, interval, default status and the reliability rules.
        translator: the asset keys and the videos' metadata (default: ``KvidTranslator``).
        prices: credits per ``model/resolution`` (default: the built-in price table).
        budget_credits: its per-day credits hold the retries of FAILED jobs.
        name: the sensor's name.

    Example:
        .. code-block:: python

            sensor = build_kvid_status_sensor(
                KvidProject("prompts.csv", "data"), StatusSensorOptions(tick_budget_seconds=20)
            )
    """
    translator = translator or KvidTranslator()
    specs = asset_specs(translator, project)
    return status_sensor_from_specs(
        project, options, translator, specs, prices=prices, budget_credits=budget_credits, name=name
    )


def status_sensor_from_specs(
    project: KvidProject,
    options: StatusSensorOptions,
    translator: KvidTranslator,
    specs: KvidSpecs,
    *,
    prices: Mapping[str, float] | None = None,
    budget_credits: CreditBudget | None = None,
    name: str = "kvid_status_sensor",
) -> SensorDefinition:
    """``build_kvid_status_sensor`` with the specs already computed (``build_kvid_definitions``)."""
    videos_key = specs[KvidAsset.VIDEOS].key
    poll_config = replace(options.poll_config(project.videos_dir), image_dir=_table_dir(project))
    settings = StatusSensorSettings(
        project, translator, videos_key, specs[KvidAsset.CATALOG].key,
        poll_config, options.failed_job_max_attempts, prices,
        budget_credits,
    )  # fmt: skip

    @sensor(
        name=name,
        minimum_interval_seconds=options.minimum_interval_seconds,
        default_status=options.default_status,
        asset_selection=[videos_key],
        description="Polls kvid for every pending job; finished videos become materializations of "
        "kvid_videos (failed ones a failed video_ok check), all recorded in the ledger and "
        "published to the Parquet catalogs (a materialization of kvid_catalog says so).",
    )
    def kvid_status_sensor(context: SensorEvaluationContext, kvid: KvidResource) -> SensorResult:
        return status_sensor_tick(context, kvid, settings)

    return kvid_status_sensor


@dataclass(frozen=True)
class PromptsSensorSettings:
    """What a prompt-table sensor tick needs, fixed when the sensor is built."""

    project: KvidProject
    prompts_key: AssetKey
    jobs_key: AssetKey


@dataclass(frozen=True)
class PromptsCursor:
    """What the prompts sensor last saw: the source's cheap change token (a file's stat, an
    object's ETag, a database's digest, an upstream asset's latest materialization) and the
    fingerprint of the rows it last read. An equal token spares the read; an equal
    fingerprint (the file was touched, not changed) spares the runs."""

    token: str | None = None
    fingerprint: str | None = None

    @classmethod
    def parse(cls, cursor: str | None) -> PromptsCursor:
        if not cursor:
            return cls()
        raw = _json_object(cursor)
        if raw is not None and set(raw) <= {"token", "fingerprint"}:
            return cls(**{k: v if isinstance(v, str) else None for k, v in raw.items()})
        return cls(fingerprint=cursor)  # an earlier version's cursor: the table's fingerprint

    def dump(self) -> str:
        return json.dumps(asdict(self))


def prompts_sensor_tick(
    context: SensorEvaluationContext, settings: PromptsSensorSettings
) -> SensorResult | SkipReason:
    """Changed rows: their new partitions, a refresh of ``kvid_prompts``, and one submitting
    run per contiguous range of rows whose request has no job. A source that cannot be read
    now skips the tick, saying why: nothing is marked missing, nothing paid again."""
    project = settings.project
    cursor = PromptsCursor.parse(context.cursor)
    try:
        token = prompts_change_token(project, context.instance)
    except PromptSourceUnavailable as exc:
        return SkipReason(f"{exc}; the next tick tries again")
    if token is not None and token == cursor.token:
        return SkipReason(f"the prompt rows of {project.prompts_name} have not changed")
    try:
        with asset_value_loader(project, context.repository_def, context.instance) as load:
            table = project.load_table(load)
    except PromptSourceUnavailable as exc:
        return SkipReason(f"{exc}; the next tick tries again")
    except PromptTableError as exc:  # read again only once it changes
        cursor = replace(cursor, token=token)
        return SensorResult(skip_reason=SkipReason(str(exc)), cursor=cursor.dump())
    fingerprint = table.fingerprint  # of exactly the rows parsed (the source may have moved on)
    seen = PromptsCursor(token, fingerprint).dump()
    if fingerprint == cursor.fingerprint:
        return SensorResult(
            skip_reason=SkipReason(f"the prompt rows of {project.prompts_name} have not changed"),
            cursor=seen,
        )
    existing = context.instance.get_dynamic_partitions(project.partitions_name)
    known = set(existing)
    new_keys = [k for k in table.partition_keys if k not in known]
    ordered, wanted = keys_needing_jobs(
        project, context.instance, table=table, partition_keys=existing, extra=new_keys
    )
    run_requests = [
        # refresh the table's own asset: its metadata lists the rows and the invalid ones
        RunRequest(run_key=f"{fingerprint[:16]}:prompts", asset_selection=[settings.prompts_key]),
        *range_run_requests(
            ordered, wanted, jobs_key=settings.jobs_key, run_key_prefix=fingerprint[:16]
        ),
    ]
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=(
            [AddDynamicPartitionsRequest(project.partitions_name, new_keys)] if new_keys else []
        ),
        cursor=seen,
    )


def build_kvid_prompts_sensor(
    project: KvidProject,
    options: PromptsSensorOptions = PromptsSensorOptions(),
    *,
    translator: KvidTranslator | None = None,
    name: str = "kvid_prompts_sensor",
) -> SensorDefinition:
    """Watches the prompt table: new or changed rows get their partitions and a submitting run
    (one run per contiguous range of partitions, so a large edit is one run, not hundreds).

    Args:
        project: the prompt table, the data folder and the rows' dialect and defaults.
        options: the sensor's interval and default status.
        translator: the asset keys (default: ``KvidTranslator``).
        name: the sensor's name.

    Example:
        .. code-block:: python

            sensor = build_kvid_prompts_sensor(KvidProject("prompts.csv", "data"))
    """
    specs = asset_specs(translator or KvidTranslator(), project)
    return prompts_sensor_from_specs(project, options, specs, name=name)


def prompts_sensor_from_specs(
    project: KvidProject,
    options: PromptsSensorOptions,
    specs: KvidSpecs,
    *,
    name: str = "kvid_prompts_sensor",
) -> SensorDefinition:
    """``build_kvid_prompts_sensor`` with the specs already computed (by
    ``build_kvid_definitions``)."""
    settings = PromptsSensorSettings(
        project, specs[KvidAsset.PROMPTS].key, specs[KvidAsset.VIDEO_JOBS].key
    )

    @sensor(
        name=name,
        minimum_interval_seconds=options.minimum_interval_seconds,
        default_status=options.default_status,
        asset_selection=[settings.prompts_key, settings.jobs_key],
        description=f"Watches {project.prompts_name}: new or changed rows become partitions "
        "and are submitted.",
    )
    def kvid_prompts_sensor(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        return prompts_sensor_tick(context, settings)

    return kvid_prompts_sensor
