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
# Ended without a usable video: a new, explicit materialization may submit again.
RESUBMITTABLE = frozenset({"FAILED", "TIMED_OUT", "LOST"})
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
    """Why ``row`` must not be sent now, or ``None`` when it should be."""
    if current is None or force:
        return None
    status = str(current.get("status") or "")
    same_request = current.get("request_hash") == row.request_hash
    if not same_request:
        # the row changed: a different request is a different job (the old one stays in history)
        if status == "SUBMITTING":
            return "an earlier version of this row is being submitted right now"
        return None
    if status in NO_JOB or status in RESUBMITTABLE:
        return None
    if status in HOLDS_A_JOB or current.get("request_id"):
        rid = current.get("request_id") or "not yet known"
        return f"already has a job for this exact request ({status}, request_id {rid})"
    return None


def needs_job(row: PromptRow, current: Mapping[str, Any] | None) -> bool:
    """True when the row has no job at all for its exact request (what schedules submit).

    Unlike :func:`decide`, a FAILED, TIMED_OUT or LOST job counts as a job: automation never
    pays for it again; re-materializing the partition by hand (or the retry policy) does.
    """
    if decide(row, current, force=False) is not None:
        return False
    same_request = current is not None and current.get("request_hash") == row.request_hash
    return not (same_request and str(current.get("status") or "") in RESUBMITTABLE)


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


async def submit_rows(
    client: AsyncKvidClient,
    catalog: KvidCatalog,
    rows: Sequence[PromptRow],
    *,
    force: bool = False,
    prices: Mapping[str, float] | None = None,
    on_outcome: Callable[[SubmitOutcome], None] | None = None,
) -> list[SubmitOutcome]:
    """Submit every row that has no job for its exact request; return one outcome per row."""
    outcomes: dict[str, SubmitOutcome] = {}
    to_send: list[tuple[PromptRow, int]] = []
    with catalog.lock():
        current_by_key = catalog.records_by_key()
        intents: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        for row in rows:
            current = current_by_key.get(row.partition_key)
            reason = decide(row, current, force=force)
            if reason is not None:
                status = str(current.get("status") if current else "")
                outcomes[row.partition_key] = SubmitOutcome(
                    row.partition_key, "skipped", status, (current or {}).get("request_id"), reason
                )
                continue
            attempt = int((current or {}).get("attempts") or 0) + 1
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
                    "submitted_at": _now(),
                    "completed_at": None,
                }
            )
            events.append({**_event_fields(row), "event": "INTENT", "attempt": attempt})
            to_send.append((row, attempt))
        if intents:
            catalog.update_many(intents)
            catalog.record_submissions(events)

    async def send(row: PromptRow, attempt: int) -> SubmitOutcome:
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
                cost_credits=estimate_cost_credits(row.request, prices),
            )
            return SubmitOutcome(key, "uncertain", "UNCERTAIN", None, message)
        except (KvidError, OSError, ValueError, TypeError) as exc:
            # the service said no, was never reached, or the body could not even be built (an
            # unreadable image): no job exists, nothing was billed
            status = "INVALID" if isinstance(exc, KvidValidationError) else "PENDING"
            message = f"{type(exc).__name__}: {exc}"
            catalog.update(key, status=status, error=message)
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
        cost = estimate_cost_credits(row.request, prices)
        catalog.update(key, status="SUBMITTED", request_id=request_id, cost_credits=cost)
        catalog.record_submission(
            **_event_fields(row),
            event="SUBMITTED",
            attempt=attempt,
            request_id=request_id,
            cost_credits=cost,
        )
        return SubmitOutcome(key, "submitted", "SUBMITTED", request_id, "")

    async def send_and_report(row: PromptRow, attempt: int) -> None:
        outcome = await send(row, attempt)
        outcomes[row.partition_key] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    # every row is attempted even if one raises something unexpected; that one is then re-raised
    results = await asyncio.gather(
        *(send_and_report(row, attempt) for row, attempt in to_send), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [outcomes[row.partition_key] for row in rows if row.partition_key in outcomes]


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
