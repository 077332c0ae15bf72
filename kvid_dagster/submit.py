"""Submitting prompt rows as kvid jobs, exactly once per canonical request.

For each row, at most ``generate_concurrency`` at a time:

1. claim the next attempt at its request in the ledger (committed, with this process as owner)
   immediately before its own generate leaves, once the client's own limits let it go (the
   client's ``before_send``): a row waiting for a free slot holds nothing;
2. send ``generate``;
3. record the request_id (retried, then journalled), or release the claim when nothing was
   sent or created, or mark it UNCERTAIN when the service may have created a job.

A process killed between 1 and 3 leaves at most ``generate_concurrency`` claims; the next run or
status tick settles them at once (:meth:`Ledger.recover`). Knows neither Dagster nor HTTP: it
drives an :class:`AsyncKvidClient` and a :class:`Ledger`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from kvid_dagster.client import (
    AsyncKvidClient,
    KvidAuthenticationError,
    KvidError,
    KvidUncertainSubmissionError,
    KvidValidationError,
)
from kvid_dagster.ledger import (
    DEFAULT_RULE,
    ClaimOwner,
    ClaimRule,
    InvalidEntry,
    Ledger,
    Refusal,
    Submission,
    VideoStatus,
    refusal_for,
)
from kvid_dagster.pricing import estimate_cost_credits
from kvid_dagster.prompts import PromptRow, PromptTable

log = logging.getLogger("kvid_dagster.submit")

#: generates in flight at once, per submitting process (status polling has its own bound)
DEFAULT_GENERATE_CONCURRENCY = 4
_HEARTBEAT_SECONDS = 15.0


class SubmitAction(StrEnum):
    SUBMITTED = "submitted"
    SKIPPED = "skipped"  # a job exists (or is being sent) for this exact request
    UNCERTAIN = "uncertain"  # the generate may have created a job: never re-sent by itself
    REJECTED = "rejected"  # the service said the request is invalid; nothing billed
    ERROR = "error"  # not sent, or refused: nothing billed, the row stays PENDING


@dataclass(frozen=True)
class SubmitOutcome:
    partition_key: str
    action: SubmitAction
    status: VideoStatus
    request_id: str | None = None
    message: str = ""

    @property
    def is_problem(self) -> bool:
        return self.action in {SubmitAction.UNCERTAIN, SubmitAction.REJECTED, SubmitAction.ERROR}


def latest_submissions(ledger: Ledger, rows: Iterable[PromptRow]) -> dict[str, Submission]:
    """The latest submission of each row's request (by request_hash), where there is one."""
    return ledger.latest_submissions(row.request_hash for row in rows)


def needs_job(row: PromptRow, latest: Mapping[str, Submission]) -> bool:
    """True when the row's exact request has no job at all (what schedules submit)."""
    return refusal_for(latest.get(row.request_hash), ClaimRule()) is None


def _skipped(row: PromptRow, refusal: Refusal) -> SubmitOutcome:
    sub = refusal.submission
    return SubmitOutcome(
        row.partition_key,
        SubmitAction.SKIPPED,
        sub.status if sub else VideoStatus.PENDING,
        sub.request_id if sub else None,
        refusal.reason,
    )


async def submit_rows(
    client: AsyncKvidClient,
    ledger: Ledger,
    rows: Sequence[PromptRow],
    *,
    rule: ClaimRule = DEFAULT_RULE,
    prices: Mapping[str, float] | None = None,
    on_outcome: Callable[[SubmitOutcome], None] | None = None,
    generate_concurrency: int = DEFAULT_GENERATE_CONCURRENCY,
    owner: ClaimOwner | None = None,
    is_alive: Callable[[Submission], bool | None] | None = None,
) -> list[SubmitOutcome]:
    """Submit every row whose request has no job (or that ``rule`` allows to pay again);
    return one outcome per row, in the rows' order.

    Claims of owners that are gone are settled first (``is_alive``: see
    :meth:`Ledger.recover`), so a run after a crash starts clean.
    """
    if generate_concurrency < 1:
        raise ValueError(f"generate_concurrency must be >= 1, got {generate_concurrency}")
    owner = owner or ClaimOwner.current()
    await asyncio.to_thread(ledger.recover, is_alive)
    latest = await asyncio.to_thread(latest_submissions, ledger, rows)
    outcomes: dict[str, SubmitOutcome] = {}
    candidates: list[PromptRow] = []
    for row in dict((r.partition_key, r) for r in rows).values():
        reason = refusal_for(latest.get(row.request_hash), rule)
        if reason is None:
            candidates.append(row)
        else:
            outcomes[row.partition_key] = _skipped(row, Refusal(reason, latest[row.request_hash]))
    gate = asyncio.Semaphore(generate_concurrency)
    in_flight: set[int] = set()

    async def send(row: PromptRow) -> SubmitOutcome:
        async with gate:
            cost = estimate_cost_credits(row.request, prices)
            claim = _Claim(ledger, row, owner, cost, rule)
            try:
                return await _generate(client, ledger, row, claim, in_flight)
            finally:
                if claim.submission is not None:
                    in_flight.discard(claim.submission.submission_id)

    async def send_and_report(row: PromptRow) -> None:
        outcome = await send(row)
        outcomes[row.partition_key] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(_HEARTBEAT_SECONDS)
            with contextlib.suppress(Exception):  # a missed beat only shortens the lease
                await asyncio.to_thread(ledger.heartbeat, list(in_flight))

    beating = asyncio.create_task(heartbeat())
    try:
        # every row is attempted even if one raises something unexpected; that one is re-raised
        results = await asyncio.gather(
            *(send_and_report(row) for row in candidates), return_exceptions=True
        )
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    for result in results:
        if isinstance(result, BaseException):
            raise result
    for row in rows:
        if row.partition_key not in outcomes:  # a second row with the same key
            outcomes[row.partition_key] = SubmitOutcome(
                row.partition_key, SubmitAction.SKIPPED, VideoStatus.PENDING, None, "duplicate key"
            )
    return [outcomes[row.partition_key] for row in rows]


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class _Claim:
    """The claim of one row, made by the client right before its generate is written."""

    def __init__(
        self, ledger: Ledger, row: PromptRow, owner: ClaimOwner, cost: float, rule: ClaimRule
    ) -> None:
        self.ledger, self.row, self.owner, self.cost, self.rule = ledger, row, owner, cost, rule
        self.submission: Submission | None = None

    async def __call__(self) -> None:
        result = await asyncio.to_thread(
            self.ledger.claim, self.row, self.owner, cost_credits=self.cost, rule=self.rule
        )
        if isinstance(result, Refusal):
            raise _Refused(result)
        self.submission = result


async def _generate(
    client: AsyncKvidClient, ledger: Ledger, row: PromptRow, claim: _Claim, in_flight: set[int]
) -> SubmitOutcome:
    key = row.partition_key

    async def claim_then_send() -> None:
        await claim()
        assert claim.submission is not None
        in_flight.add(claim.submission.submission_id)

    try:
        request_id = await client.generate(row.request, before_send=claim_then_send)
    except _Refused as refused:
        return _skipped(row, refused.refusal)
    except KvidUncertainSubmissionError as exc:
        message = f"uncertain submission: {exc}"
        assert claim.submission is not None  # uncertain means it was sent, so it was claimed
        await asyncio.to_thread(ledger.mark_uncertain, claim.submission, message)
        return SubmitOutcome(key, SubmitAction.UNCERTAIN, VideoStatus.UNCERTAIN, None, message)
    except (KvidError, OSError, ValueError, TypeError) as exc:
        # the service said no, was never reached, or the body could not even be built (an
        # unreadable image): no job exists, nothing was billed
        invalid = isinstance(exc, KvidValidationError)
        message = f"{type(exc).__name__}: {exc}"
        if claim.submission is not None:
            await asyncio.to_thread(ledger.release, claim.submission, message, invalid=invalid)
        action = SubmitAction.REJECTED if invalid else SubmitAction.ERROR
        if isinstance(exc, KvidAuthenticationError):
            action = SubmitAction.ERROR
        status = VideoStatus.INVALID if invalid else VideoStatus.PENDING
        return SubmitOutcome(key, action, status, None, message)
    except BaseException:
        # cancelled or interrupted while the generate may have left: never lose the claim
        if claim.submission is not None:
            with contextlib.suppress(Exception):
                ledger.mark_uncertain(
                    claim.submission, "interrupted while its generate was in flight"
                )
        raise
    # first thing after the answer: the request_id, so the paid job can always be found
    assert claim.submission is not None
    await asyncio.to_thread(ledger.record_submitted, claim.submission, request_id)
    return SubmitOutcome(key, SubmitAction.SUBMITTED, VideoStatus.SUBMITTED, request_id, "")


async def resubmit_failed(
    client: AsyncKvidClient,
    ledger: Ledger,
    rows: Sequence[PromptRow],
    *,
    max_attempts: int,
    prices: Mapping[str, float] | None = None,
    on_outcome: Callable[[SubmitOutcome], None] | None = None,
    generate_concurrency: int = DEFAULT_GENERATE_CONCURRENCY,
) -> list[SubmitOutcome]:
    """The retry policy for FAILED jobs: each of ``rows`` whose request's latest job FAILED is
    sent again, as a new paid job, while the request has had fewer than ``max_attempts``.

    Only FAILED: TIMED_OUT and LOST jobs may still exist (and bill). The rule is checked again
    in the claim's transaction, so two ticks racing still send one retry.
    """
    if max_attempts <= 1 or not rows:
        return []
    latest = latest_submissions(ledger, rows)
    todo = [
        row
        for row in rows
        if (sub := latest.get(row.request_hash)) is not None
        and sub.status is VideoStatus.FAILED
        and sub.attempt < max_attempts
    ]
    if not todo:
        return []
    return await submit_rows(
        client,
        ledger,
        todo,
        rule=ClaimRule(retry_failed_below=max_attempts),
        prices=prices,
        on_outcome=on_outcome,
        generate_concurrency=generate_concurrency,
    )


def invalid_entries(table: PromptTable) -> list[InvalidEntry]:
    """The table's invalid rows as the ledger keys them (``row-N`` when the key is unknown);
    a later duplicate of a valid row's key is not an entry: the valid row owns the key."""
    valid = {row.partition_key for row in table.rows}
    entries = []
    for bad in table.invalid:
        key = bad.partition_key or f"row-{bad.row_number}"
        if key not in valid:
            entries.append(InvalidEntry(key, bad.prompt, bad.message))
    return entries


def register_table(ledger: Ledger, table: PromptTable) -> int:
    """Make the ledger's rows say what the table says; return how many rows changed."""
    return ledger.register(table.rows, invalid_entries(table))
