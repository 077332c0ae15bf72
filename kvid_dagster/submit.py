"""Submitting prompt rows as kvid jobs, exactly once per canonical request.

The order of writes is what makes a paid job impossible to lose:

1. under the catalog lock, decide which rows need a job and record the *intent* (``SUBMITTING``,
   with the request hash) — a second process deciding at the same time sees it and stands back;
2. send ``generate``;
3. record the returned ``request_id`` before anything else.

A crash between 2 and 3 leaves a ``SUBMITTING`` row with no ``request_id``: the status poller marks
it ``UNCERTAIN`` after a grace period, for a person to resolve — it is never sent again silently.
Knows neither Dagster nor HTTP: it drives an :class:`AsyncKvidClient` and a :class:`KvidCatalog`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kvid_dagster.catalog import KvidCatalog
from kvid_dagster.client import (
    AsyncKvidClient,
    KvidAuthenticationError,
    KvidError,
    KvidUncertainSubmissionError,
    KvidValidationError,
)
from kvid_dagster.pricing import estimate_cost_credits
from kvid_dagster.prompts import PromptRow, PromptTable

log = logging.getLogger("kvid_dagster.submit")

# A job exists (or may exist) for the row's request: never send it again without `force`.
HOLDS_A_JOB = frozenset({"SUBMITTING", "UNCERTAIN", "COMPLETED"})
# Ended without a usable video, but the request WAS sent (and billed): sending it again is a new
# payment, so only `force` or the retry policy (FAILED only) does it. A TIMED_OUT job may even
# still finish, and a LOST one may have run: neither is re-sent automatically.
ENDED_WITHOUT_VIDEO = frozenset({"FAILED", "TIMED_OUT", "LOST"})
RESUBMITTABLE = ENDED_WITHOUT_VIDEO  # the name earlier versions exported
NO_JOB = frozenset({"PENDING", "INVALID", ""})


@dataclass(frozen=True)
class SubmitOutcome:
    partition_key: str
    action: str  # submitted | skipped | uncertain | rejected | error
    status: str
    request_id: str | None = None
    message: str = ""


def _now() -> datetime:
    return datetime.now(UTC)


def decide(row: PromptRow, current: Mapping[str, Any] | None, *, force: bool) -> str | None:
    """Why ``row`` must not be sent now, or ``None`` when it should be.

    Once per canonical request: re-runs, re-materializations and overlapping backfills send
    nothing for a request that was sent before, whatever became of its job; ``force`` is the
    explicit choice to pay for a new one.
    """
    if current is None or force:
        return None
    status = str(current.get("status") or "")
    same_request = current.get("request_hash") == row.request_hash
    if not same_request:
        # the row changed: a different request is a different job (the old one stays in history)
        if status == "SUBMITTING":
            return "an earlier version of this row is being submitted right now"
        return None
    if status in NO_JOB:
        return None
    rid = current.get("request_id") or "not known"
    if status in ENDED_WITHOUT_VIDEO:
        return (
            f"this exact request was sent already and its job ended {status} (request_id {rid}); "
            "materialize with force: true (or enable the retry policy) to pay for a new job"
        )
    return f"already has a job for this exact request ({status}, request_id {rid})"


def needs_job(row: PromptRow, current: Mapping[str, Any] | None) -> bool:
    """True when the row has no job at all for its exact request (what schedules submit)."""
    return decide(row, current, force=False) is None


def _event_fields(row: PromptRow) -> dict[str, Any]:
    """What the submissions history keeps of a row (the prompt lives in the videos table)."""
    return {
        "partition_key": row.partition_key,
        "job_kind": row.job_kind,
        "model": row.model,
        "request_hash": row.request_hash,
        "params_json": row.params_json,
    }


def _base_fields(row: PromptRow) -> dict[str, Any]:
    return {**_event_fields(row), "prompt": row.prompt}


Policy = Callable[[PromptRow, Mapping[str, Any] | None], str | None]


async def submit_rows(
    client: AsyncKvidClient,
    catalog: KvidCatalog,
    rows: Sequence[PromptRow],
    *,
    force: bool = False,
    prices: Mapping[str, float] | None = None,
    on_outcome: Callable[[SubmitOutcome], None] | None = None,
    policy: Policy | None = None,
) -> list[SubmitOutcome]:
    """Submit every row that has no job for its exact request; return one outcome per row.

    ``policy(row, current)`` (default: :func:`decide` with ``force``) says why a row must not be
    sent; it is evaluated under the catalog lock, against the row's state at that instant.
    """
    should_skip: Policy = policy or (lambda row, current: decide(row, current, force=force))
    outcomes: dict[str, SubmitOutcome] = {}
    to_send: list[tuple[PromptRow, int, float]] = []
    with catalog.lock():
        current_by_key = catalog.records_by_key()
        intents: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for row in rows:
            current = current_by_key.get(row.partition_key)
            reason = should_skip(row, current)
            if reason is not None:
                status = str(current.get("status") if current else "")
                outcomes[row.partition_key] = SubmitOutcome(
                    row.partition_key, "skipped", status, (current or {}).get("request_id"), reason
                )
                continue
            # attempts count submissions of this exact request (what the retry policy bounds)
            same_request = current is not None and current.get("request_hash") == row.request_hash
            attempt = int((current or {}).get("attempts") or 0) + 1 if same_request else 1
            cost = estimate_cost_credits(row.request, prices)
            intents.append(
                {
                    **_base_fields(row),
                    "status": "SUBMITTING",
                    "request_id": None,
                    "progress": 0,
                    "url": None,
                    "name": None,
                    "size_kb": None,
                    "local_path": None,
                    "sha256": None,
                    "error": None,
                    "attempts": attempt,
                    "cost_credits": cost,  # what this attempt costs once sent
                    "submitted_at": _now(),
                    "completed_at": None,
                }
            )
            events.append({**_event_fields(row), "event": "INTENT", "attempt": attempt})
            to_send.append((row, attempt, cost))
        if intents:
            catalog.update_many(intents)
            catalog.record_submissions(events)

    async def send(row: PromptRow, attempt: int, cost: float) -> SubmitOutcome:
        key = row.partition_key
        try:
            request_id = await client.generate(row.request)
        except KvidUncertainSubmissionError as exc:
            message = f"uncertain submission: {exc}"
            catalog.update(key, status="UNCERTAIN", error=message)
            catalog.record_submission(
                **_event_fields(row),
                event="UNCERTAIN",
                attempt=attempt,
                error=message,
                cost_credits=cost,
            )
            return SubmitOutcome(key, "uncertain", "UNCERTAIN", None, message)
        except (KvidError, OSError, ValueError, TypeError) as exc:
            # the service said no, was never reached, or the body could not even be built (an
            # unreadable image): no job exists, nothing was billed
            status = "INVALID" if isinstance(exc, KvidValidationError) else "PENDING"
            message = f"{type(exc).__name__}: {exc}"
            catalog.update(key, status=status, error=message, cost_credits=0.0)
            catalog.record_submission(
                **_event_fields(row),
                event="FAILED_TO_SUBMIT",
                attempt=attempt,
                error=message,
                cost_credits=0.0,
            )
            action = "rejected" if isinstance(exc, KvidValidationError) else "error"
            if isinstance(exc, KvidAuthenticationError):
                action = "error"
            return SubmitOutcome(key, action, status, None, message)
        # first thing after the answer: the request_id, so the paid job can always be found
        catalog.update(key, status="SUBMITTED", request_id=request_id, cost_credits=cost)
        catalog.record_submission(
            **_event_fields(row),
            event="SUBMITTED",
            attempt=attempt,
            request_id=request_id,
            cost_credits=cost,
        )
        return SubmitOutcome(key, "submitted", "SUBMITTED", request_id, "")

    async def send_and_report(row: PromptRow, attempt: int, cost: float) -> None:
        outcome = await send(row, attempt, cost)
        outcomes[row.partition_key] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    # every row is attempted even if one raises something unexpected; that one is then re-raised
    results = await asyncio.gather(
        *(send_and_report(*item) for item in to_send), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [outcomes[row.partition_key] for row in rows if row.partition_key in outcomes]


def retry_refusal(
    row: PromptRow, current: Mapping[str, Any] | None, *, max_attempts: int
) -> str | None:
    """Why the retry policy must not re-submit ``row`` now, or ``None`` when it should.

    Only a FAILED job of the row's exact request is retried, and only while that request has
    had fewer than ``max_attempts`` submissions: TIMED_OUT and LOST jobs may still exist (and
    bill), so they are never re-sent automatically.
    """
    status = str((current or {}).get("status") or "")
    if current is None or status != "FAILED":
        return f"its job is not FAILED ({status or 'no job'})"
    if current.get("request_hash") != row.request_hash:
        return "the row changed since its job failed"
    attempts = int(current.get("attempts") or 0)
    if attempts >= max_attempts:
        return f"all {max_attempts} attempts used"
    return None


async def resubmit_failed(
    client: AsyncKvidClient,
    catalog: KvidCatalog,
    rows: Sequence[PromptRow],
    *,
    max_attempts: int,
    prices: Mapping[str, float] | None = None,
    on_outcome: Callable[[SubmitOutcome], None] | None = None,
) -> list[SubmitOutcome]:
    """The retry policy for FAILED jobs: each of ``rows`` whose job FAILED is sent again, as a
    new job, while its request has had fewer than ``max_attempts`` submissions.

    A forced submission whose condition is re-checked under the catalog lock, so two ticks
    racing still send one retry; every attempt (INTENT, SUBMITTED with its cost, then how it
    ended) is in the submissions history, and the videos row shows the latest attempt.
    """
    if max_attempts <= 1 or not rows:
        return []
    failed = {str(r["partition_key"]): r for r in catalog.pending_records(statuses=["FAILED"])}
    todo = [
        row
        for row in rows
        if row.partition_key in failed
        and retry_refusal(row, failed[row.partition_key], max_attempts=max_attempts) is None
    ]
    if not todo:
        return []

    def policy(row: PromptRow, current: Mapping[str, Any] | None) -> str | None:
        return retry_refusal(row, current, max_attempts=max_attempts)

    return await submit_rows(
        client, catalog, todo, prices=prices, on_outcome=on_outcome, policy=policy
    )


def resolve_uncertain(
    catalog: KvidCatalog, partition_key: str, *, request_id: str | None = None, note: str = ""
) -> None:
    """A person's answer to an ``UNCERTAIN`` row, after looking at the kvid dashboard.

    With the ``request_id`` they found, the row is ``SUBMITTED`` again and polled as usual;
    without one (no job exists), it goes back to ``PENDING`` and the next run submits it. Either
    way a ``RESOLVED`` event records the decision. Raises ValueError for a row not UNCERTAIN.
    """
    if request_id is not None and (not isinstance(request_id, str) or not request_id.strip()):
        raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
    with catalog.lock():
        current = catalog.get(partition_key)
        status = (current or {}).get("status")
        if current is None or status != "UNCERTAIN":
            raise ValueError(f"{partition_key!r} is not UNCERTAIN (status {status!r})")
        if request_id is not None:
            update = {"status": "SUBMITTED", "request_id": request_id.strip(), "error": None}
        else:
            update = {"status": "PENDING", "error": None, "cost_credits": 0.0}
        catalog.update(partition_key, **update)
        catalog.record_submission(
            partition_key=partition_key,
            event="RESOLVED",
            request_hash=current.get("request_hash"),
            job_kind=current.get("job_kind"),
            model=current.get("model"),
            request_id=update.get("request_id"),
            attempt=current.get("attempts"),
            error=note or ("job found" if request_id else "no job found: released for a new one"),
        )


def register_table(catalog: KvidCatalog, table: PromptTable) -> int:
    """Give every table row its catalog row; return how many rows were written.

    New valid rows start ``PENDING``; invalid rows are ``INVALID`` with the reason — unless the
    key already holds a job, whose record is never overwritten by a later edit of the table.
    """
    valid_keys = {row.partition_key for row in table.rows}
    with catalog.lock():
        current = catalog.records_by_key()
        updates: list[dict[str, Any]] = []
        for row in table.rows:
            now = current.get(row.partition_key)
            if now is None or (
                str(now.get("status") or "") in NO_JOB
                and now.get("request_hash") != row.request_hash
            ):
                updates.append({**_base_fields(row), "status": "PENDING", "error": None})
        for bad in table.invalid:
            key = bad.partition_key or f"row-{bad.row_number}"
            if key in valid_keys:
                continue  # a later duplicate of a valid row: the valid one owns the key
            now = current.get(key)
            if now is not None and str(now.get("status") or "") not in NO_JOB:
                continue
            if now is not None and now.get("error") == bad.message:
                continue
            updates.append(
                {
                    "partition_key": key,
                    "prompt": bad.prompt,
                    "status": "INVALID",
                    "error": bad.message,
                }
            )
        if updates:
            catalog.update_many(updates)
    return len(updates)
