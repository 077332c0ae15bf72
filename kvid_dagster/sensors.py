"""Sensors: the status sensor (jobs → runless video materializations), the prompt-table sensor."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from dagster import (
    AddDynamicPartitionsRequest,
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from kvid_dagster._aio import run_coroutine
from kvid_dagster.assets import VIDEO_CHECK_NAME, publish_catalog, video_check_result
from kvid_dagster.client import AsyncKvidClient
from kvid_dagster.ledger import VideoStatus
from kvid_dagster.liveness import run_liveness
from kvid_dagster.poll import (
    DEFAULT_JOB_DEADLINE_S,
    PollConfig,
    PollReport,
    VideoEvent,
    poll_pending,
)
from kvid_dagster.project import KvidProject
from kvid_dagster.prompts import (
    PromptTable,
    PromptTableError,
    table_fingerprint,
)
from kvid_dagster.resource import KvidResource
from kvid_dagster.submit import (
    SubmitAction,
    SubmitOutcome,
    latest_submissions,
    needs_job,
    resubmit_failed,
)
from kvid_dagster.translator import KvidTranslator

# Dagster gives a sensor tick 60 s; like dagster-fivetran's polling sensor, stop well before.
DEFAULT_TICK_BUDGET_S = 40.0
# how far back a tick looks for failures Dagster never heard of (a tick killed mid-report)
REREPORT_WINDOW_S = 24 * 3600.0
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
    project: KvidProject,
    instance: DagsterInstance,
    *,
    table: PromptTable | None = None,
    partition_keys: Sequence[str] | None = None,
    extra: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """(partition keys in insertion order, the keys whose row's exact request has no job).

    ``table`` and ``partition_keys`` spare a caller that already has them a second read.
    """
    if table is None:
        table = project.load_table()
    if partition_keys is None:
        partition_keys = instance.get_dynamic_partitions(project.partitions_name)
    ordered = [*partition_keys, *extra]
    latest = latest_submissions(project.ledger(), table.rows)
    wanted = [row.partition_key for row in table.rows if needs_job(row, latest)]
    return ordered, wanted


def video_events(
    events: Sequence[VideoEvent], translator: KvidTranslator, *, checked: Collection[str] = ()
) -> list[AssetMaterialization | AssetObservation | AssetCheckEvaluation]:
    """The runless events that rows whose job ended turn into.

    ``checked``: partitions that already have a ``video_ok`` result. Dagster 1.13 stores one
    runless check result per (check, partition) and fails the whole tick on a second one (a
    UNIQUE constraint of its storage), so those get their materialization or observation only;
    the check's own execution (``video_ok`` in a run) reads the ledger for the latest verdict.
    """
    videos_key = translator.get_asset_key("kvid_videos")
    check_key = AssetCheckKey(videos_key, VIDEO_CHECK_NAME)
    done = set(checked)
    out: list[AssetMaterialization | AssetObservation | AssetCheckEvaluation] = []
    for event in events:
        if not event.is_final:
            continue
        verdict = video_check_result(translator, event.row)
        if event.status is VideoStatus.COMPLETED:
            out.append(
                AssetMaterialization(
                    asset_key=videos_key,
                    partition=event.partition_key,
                    metadata=translator.get_video_metadata(event.row),
                )
            )
        else:
            out.append(
                AssetObservation(
                    asset_key=videos_key,
                    partition=event.partition_key,
                    metadata=translator.get_failure_metadata(event.row),
                )
            )
        if event.partition_key in done:
            continue
        done.add(event.partition_key)
        out.append(
            AssetCheckEvaluation(
                asset_key=videos_key,
                check_name=check_key.name,
                passed=verdict.passed,
                metadata=verdict.metadata,
                severity=verdict.severity,
                partition=event.partition_key,
            )
        )
    return out


def _partitions_with_check_results(
    instance: DagsterInstance, translator: KvidTranslator, keys: Collection[str]
) -> set[str]:
    """Which of ``keys`` already have a ``video_ok`` result stored (one query)."""
    if not keys:
        return set()
    check_key = AssetCheckKey(translator.get_asset_key("kvid_videos"), VIDEO_CHECK_NAME)
    infos = instance.event_log_storage.get_asset_check_partition_info(
        [check_key], partition_keys=sorted(keys)
    )
    return {str(info.partition_key) for info in infos}


def _observed_outcomes(
    instance: DagsterInstance, translator: KvidTranslator, keys: Sequence[str]
) -> dict[str, tuple[str | None, str | None]]:
    """The (status, request_id) the latest observation of each partition reported."""
    records = instance.fetch_observations(
        AssetRecordsFilter(
            asset_key=translator.get_asset_key("kvid_videos"), asset_partitions=list(keys)
        ),
        limit=max(100, 5 * len(keys)),
    ).records
    latest: dict[str, tuple[str | None, str | None]] = {}
    for record in records:  # newest first
        observation = record.event_log_entry.asset_observation
        if observation is None or observation.partition is None:
            continue
        if observation.partition not in latest:
            meta = observation.metadata
            shown = tuple(
                str(meta[name].value) if name in meta else None for name in ("status", "request_id")
            )
            latest[observation.partition] = (shown[0], shown[1])
    return latest


def unreported_events(
    project: KvidProject,
    instance: DagsterInstance,
    translator: KvidTranslator,
    skip: set[str],
    checked: int | None = None,
) -> tuple[list[VideoEvent], int]:
    """Rows whose outcome never reached Dagster (a tick that died after the ledger write, an
    UNCERTAIN submission of a run): reported again, so Dagster and the ledger converge. A
    COMPLETED row needs a materialization of its partition; a row that ended without a video in
    the last day an observation showing its status and request_id.

    Only rows changed after ledger revision ``checked`` are looked at (every row when None);
    returns the events and the revision now checked. The cursor that carries it is stored with
    the tick's events, so a tick that dies before they are stored is checked again.
    """
    changed, revision = project.ledger().rows_changed_since(-1 if checked is None else checked)
    rows = [r for r in changed if r.partition_key not in skip]
    since = datetime.now(UTC) - timedelta(seconds=REREPORT_WINDOW_S)
    done = [r for r in rows if r.status is VideoStatus.COMPLETED]
    ended = [
        r
        for r in rows
        if r.status.is_terminal
        and r.status not in {VideoStatus.COMPLETED, VideoStatus.INVALID}
        and (r.updated_at is None or r.updated_at >= since)
    ]
    events: list[VideoEvent] = []
    if done:
        materialized = instance.get_materialized_partitions(translator.get_asset_key("kvid_videos"))
        events += [
            VideoEvent(r.partition_key, r) for r in done if r.partition_key not in materialized
        ]
    if ended:
        observed = _observed_outcomes(instance, translator, [r.partition_key for r in ended])
        for row in ended:
            shown = observed.get(row.partition_key)
            now = (row.status.value, row.request_id or "")
            stale = shown is None or any(
                seen is not None and seen != actual for seen, actual in zip(shown, now, strict=True)
            )
            if stale:
                events.append(VideoEvent(row.partition_key, row))
    return events, revision


async def _retry_failed(
    client: AsyncKvidClient,
    project: KvidProject,
    max_attempts: int,
    prices: Mapping[str, float] | None,
) -> tuple[list[SubmitOutcome], str | None]:
    """The retry policy's share of a tick: FAILED jobs with attempts left are sent again."""
    ledger = project.ledger()
    failed = [
        r for r in ledger.rows_with_job_status(VideoStatus.FAILED) if r.attempts < max_attempts
    ]
    if not failed:
        return [], None
    try:
        table = project.load_table()
    except PromptTableError as exc:
        return [], f"FAILED jobs not retried: {exc}"
    by_key = table.by_key
    rows = [by_key[r.partition_key] for r in failed if r.partition_key in by_key]
    outcomes = await resubmit_failed(client, ledger, rows, max_attempts=max_attempts, prices=prices)
    return outcomes, None


@dataclass(frozen=True)
class StatusCursor:
    """Where the status sensor is: the submission id its next tick polls after (round robin
    when a tick's budget does not cover every job) and the ledger (id, revision) whose changes
    it has checked for outcomes Dagster never got. An unreadable cursor starts over."""

    after: int | None = None
    ledger_id: str | None = None
    checked: int | None = None

    @classmethod
    def parse(cls, cursor: str | None) -> StatusCursor:
        try:
            raw = json.loads(cursor or "{}")
            values = {n: raw.get(n) for n in ("after", "ledger_id", "checked")}
        except (ValueError, AttributeError):
            return cls()
        ints = {
            n: v if isinstance(v, int) and not isinstance(v, bool) else None
            for n, v in values.items()
            if n != "ledger_id"
        }
        ledger_id = values["ledger_id"] if isinstance(values["ledger_id"], str) else None
        return cls(ints["after"], ledger_id, ints["checked"])

    def checked_in(self, ledger_id: str) -> int | None:
        """The revision checked, if it is of this ledger (a new database is checked whole)."""
        return self.checked if self.ledger_id == ledger_id else None

    def dump(self) -> str:
        return json.dumps(
            {"after": self.after, "ledger_id": self.ledger_id, "checked": self.checked}
        )


def build_kvid_status_sensor(
    project: KvidProject,
    *,
    translator: KvidTranslator | None = None,
    name: str = "kvid_status_sensor",
    minimum_interval_seconds: int = 15,
    tick_budget_s: float = DEFAULT_TICK_BUDGET_S,
    download: bool = True,
    job_deadline_s: float | None = None,
    failed_job_max_attempts: int = 1,
    prices: Mapping[str, float] | None = None,
    max_download_bytes: int | None = None,
    lost_after_s: float | None = None,
    fetch_attempts: int | None = None,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
) -> SensorDefinition:
    """Polls every pending job (within ``tick_budget_s``; the rest on the next tick, round robin
    by the cursor), records finished videos as runless materializations of ``kvid_videos``, and
    republishes the Parquet catalogs when anything changed.

    - ``job_deadline_s`` (default 900 s, three times the vendor's 5 minutes): a job not finished
      this long after its submission is marked ``TIMED_OUT`` and no longer polled;
    - ``failed_job_max_attempts`` (default 1: off): a job that ends ``FAILED`` is re-submitted
      as a new job until its request has had this many submissions (each one is paid for);
    - ``max_download_bytes`` (default 512 MiB): a bigger video is refused, nothing is kept;
    - ``lost_after_s`` (default 120 s): a job is LOST only after status has answered 404 this
      long (a 404 right after generate or during a deploy is not proof of loss);
    - ``fetch_attempts`` (default 3, 20 s apart): then a completed job whose video cannot be
      fetched or is not a video is FETCH_FAILED, its request_id kept (``kvid-dagster refetch``).

    Every tick first settles claims whose submitter is gone (``UNCERTAIN`` at once).
    """
    translator = translator or KvidTranslator()
    videos_key = translator.get_asset_key("kvid_videos")
    deadline = DEFAULT_JOB_DEADLINE_S if job_deadline_s is None else job_deadline_s
    if deadline <= 0:
        raise ValueError(f"need job_deadline_s > 0, got {deadline}")
    if isinstance(failed_job_max_attempts, bool) or failed_job_max_attempts < 1:
        raise ValueError(f"failed_job_max_attempts must be >= 1, got {failed_job_max_attempts}")
    poll_config = PollConfig(
        download_dir=project.videos_dir,
        download=download,
        budget_s=tick_budget_s,
        job_deadline_s=deadline,
        **({"max_download_bytes": max_download_bytes} if max_download_bytes else {}),
        **({"lost_after_s": lost_after_s} if lost_after_s is not None else {}),
        **({"fetch_attempts": fetch_attempts} if fetch_attempts is not None else {}),
    )

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        asset_selection=[videos_key],
        description="Polls kvid for every pending job; finished videos become materializations of "
        "kvid_videos (failed ones a failed video_ok check), all recorded in the ledger and "
        "published to the Parquet catalogs.",
    )
    def kvid_status_sensor(context: SensorEvaluationContext, kvid: KvidResource) -> SensorResult:
        is_alive = run_liveness(context.instance)
        cursor = StatusCursor.parse(context.cursor)

        async def tick() -> tuple[PollReport, list[SubmitOutcome], str | None]:
            async with kvid.get_async_client() as client:
                report = await poll_pending(
                    client,
                    project.ledger(),
                    poll_config,
                    start_after=cursor.after,
                    is_alive=is_alive,
                )
                if failed_job_max_attempts <= 1:
                    return report, [], None
                return report, *await _retry_failed(
                    client, project, failed_job_max_attempts, prices
                )

        report, retried, retry_problem = run_coroutine(tick())
        for event in report.events:
            line = event.log_lines[-1] if event.log_lines else ""
            row = event.row
            if not event.is_final:
                context.log.info(f"{event.partition_key}: {row.status} {row.progress}%  {line}")
            elif row.status is VideoStatus.COMPLETED:
                context.log.info(
                    f"{event.partition_key}: COMPLETED {row.video.local_path or row.video.url}"
                )
            else:
                context.log.warning(f"{event.partition_key}: {row.status}: {row.error}")
        for error in report.errors:
            context.log.warning(error)
        if retry_problem:
            context.log.warning(retry_problem)
        for outcome in retried:
            if outcome.action is SubmitAction.SUBMITTED:
                context.log.info(
                    f"{outcome.partition_key}: its FAILED job was re-submitted as "
                    f"{outcome.request_id} (retry policy: at most {failed_job_max_attempts})"
                )
            elif outcome.action is not SubmitAction.SKIPPED:
                context.log.warning(
                    f"{outcome.partition_key}: retry {outcome.action}: {outcome.message}"
                )
        final = report.final
        reported = {e.partition_key for e in final}
        ledger_id = project.ledger().ledger_id()
        late, checked_revision = unreported_events(
            project, context.instance, translator, reported, cursor.checked_in(ledger_id)
        )
        checked = _partitions_with_check_results(
            context.instance, translator, reported | {e.partition_key for e in late}
        )
        events = video_events(final, translator, checked=checked)
        events += video_events(late, translator, checked=checked | reported)
        context.log.info(
            f"polled {report.polled} of {report.pending} pending jobs in {report.elapsed_s:.1f} s"
            f" ({report.deferred} left for the next tick); {len(final)} finished"
        )
        if report.changed or report.settled or retried:
            publish_catalog(project, context.log)
        after = report.last_submission_id if report.deferred else None
        return SensorResult(
            asset_events=events,
            cursor=StatusCursor(after, ledger_id, checked_revision).dump(),
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
            table = project.load_table()
        except PromptTableError as exc:
            return SensorResult(skip_reason=SkipReason(str(exc)), cursor=fingerprint)
        fingerprint = table.fingerprint  # of exactly the bytes parsed (the file may have moved on)
        existing = context.instance.get_dynamic_partitions(project.partitions_name)
        known = set(existing)
        new_keys = [k for k in table.partition_keys if k not in known]
        ordered, wanted = keys_needing_jobs(
            project, context.instance, table=table, partition_keys=existing, extra=new_keys
        )
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
