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

Two refusals create no job and say something about every row after them: out of credit (402)
stops the submission, and the rows not yet sent stay PENDING (``NO_CREDIT``); the service's
limit on running jobs (429 ``CONCURRENT_LIMIT``) holds the queue until a slot frees, then the
same rows go on, each still paid once.

A credit budget (:class:`CreditBudget`) is planned before anything is sent: the rows that fit go,
in table order, the rest stay PENDING (``OVER_BUDGET``); each claim is checked against the same
caps in its own transaction, so concurrent submitters share the room instead of each spending it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from kvid_dagster.client import (
    AsyncKvidClient,
    KvidAuthenticationError,
    KvidConcurrentLimitError,
    KvidError,
    KvidInsufficientCreditError,
    KvidUncertainSubmissionError,
    KvidValidationError,
)
from kvid_dagster.core.budget import CreditBudget, OverBudget, plan_within, room_left
from kvid_dagster.core.pricing import estimate_cost_credits
from kvid_dagster.core.prompts import PromptRow, PromptTable
from kvid_dagster.ledger import (
    DEFAULT_RULE,
    ClaimOwner,
    ClaimRule,
    InvalidEntry,
    Ledger,
    Refusal,
    SpendWindow,
    Submission,
    VideoStatus,
    refusal_for,
)

log = logging.getLogger("kvid_dagster.core.submit")

#: generates in flight at once, per submitting process (status polling has its own bound)
DEFAULT_GENERATE_CONCURRENCY = 4
#: how long the queue waits after a CONCURRENT_LIMIT refusal without a Retry-After (doubling on
#: each refusal in a row, up to 60 s), and how long it may stay held before its rows give up
DEFAULT_LIMIT_WAIT_S = 10.0
DEFAULT_LIMIT_HOLD_S = 1800.0
_LIMIT_WAIT_MAX_S = 60.0
_HEARTBEAT_SECONDS = 15.0


class SubmitAction(StrEnum):
    SUBMITTED = "submitted"
    SKIPPED = "skipped"  # a job exists (or is being sent) for this exact request
    UNCERTAIN = "uncertain"  # the generate may have created a job: never re-sent by itself
    REJECTED = "rejected"  # the service said the request is invalid; nothing billed
    ERROR = "error"  # not sent, or refused: nothing billed, the row stays PENDING
    NO_CREDIT = "no_credit"  # the account ran out of credit: not sent, the row stays PENDING
    OVER_BUDGET = "over_budget"  # it does not fit the credit budget: not sent, stays PENDING
    DEFERRED = "deferred"  # not sent: the caller's time (a tick's budget) ran out first


@dataclass(frozen=True)
class SubmitOutcome:
    partition_key: str
    action: SubmitAction
    status: VideoStatus
    request_id: str | None = None
    message: str = ""
    estimated_credits: float | None = None  # its priced cost, for a row this run tried to send

    @property
    def is_problem(self) -> bool:
        return self.action in {
            SubmitAction.UNCERTAIN, SubmitAction.REJECTED, SubmitAction.ERROR,
            SubmitAction.NO_CREDIT, SubmitAction.OVER_BUDGET,
        }  # fmt: skip

    @property
    def is_waiting(self) -> bool:
        """Not sent for a reason about the money, not the row: the next run with room sends it."""
        return self.action in {SubmitAction.NO_CREDIT, SubmitAction.OVER_BUDGET}


@dataclass(frozen=True)
class SpendReport:
    """What one submitting run priced, sent and left, and the spend it leaves behind."""

    estimate_credits: float  # every row it tried to send, priced
    sent_credits: float  # the rows it sent, priced
    rows_left: int  # rows over the budget: PENDING, not sent
    left_credits: float
    run_spent_credits: float  # this run's claims, from the ledger
    day_spent_credits: float  # every claim since UTC midnight, from the ledger

    @classmethod
    def of(
        cls, ledger: Ledger, outcomes: Sequence[SubmitOutcome], run_id: str | None
    ) -> SpendReport:
        priced = [o for o in outcomes if o.estimated_credits is not None]
        left = [o for o in priced if o.action is SubmitAction.OVER_BUDGET]
        sent = [o for o in priced if o.action is SubmitAction.SUBMITTED]
        return cls(
            estimate_credits=sum(o.estimated_credits or 0.0 for o in priced),
            sent_credits=sum(o.estimated_credits or 0.0 for o in sent),
            rows_left=len(left),
            left_credits=sum(o.estimated_credits or 0.0 for o in left),
            run_spent_credits=(
                ledger.spent_credits(SpendWindow.RUN, run_id=run_id) if run_id else 0.0
            ),
            day_spent_credits=ledger.spent_credits(SpendWindow.DAY),
        )

    def metadata(self) -> dict[str, float]:
        """For the run's metadata (the rows left are its ``over_budget`` count)."""
        return {
            "estimate_credits": self.estimate_credits,
            "sent_estimate_credits": self.sent_credits,
            "run_spent_credits": self.run_spent_credits,
            "day_spent_credits": self.day_spent_credits,
        }

    def over_budget_message(self, budget: CreditBudget) -> str:
        return (
            f"kvid credit budget ({budget.describe()}): this run priced its rows at "
            f"{self.estimate_credits:g} credits and sent {self.sent_credits:g} worth; "
            f"{self.rows_left} rows left ({self.left_credits:g} credits), PENDING and not sent. "
            f"Spent by this run {self.run_spent_credits:g}, today (UTC) "
            f"{self.day_spent_credits:g}: raise the budget or run again when there is room."
        )


def latest_submissions(ledger: Ledger, rows: Iterable[PromptRow]) -> dict[str, Submission]:
    """The latest submission of each row's request (by request_hash), where there is one."""
    return ledger.latest_submissions(row.request_hash for row in rows)


def _over_budget(waiting: OverBudget) -> SubmitOutcome:
    return SubmitOutcome(
        waiting.row.partition_key, SubmitAction.OVER_BUDGET, VideoStatus.PENDING, None,
        f"not sent: {waiting.reason}", waiting.cost,
    )  # fmt: skip


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
    limit_wait_s: float = DEFAULT_LIMIT_WAIT_S,
    limit_hold_s: float = DEFAULT_LIMIT_HOLD_S,
    budget: CreditBudget | None = None,
    deadline: float | None = None,
) -> list[SubmitOutcome]:
    """Submit every row whose request has no job (or that ``rule`` allows to pay again);
    return one outcome per row, in the rows' order.

    ``deadline`` (a ``time.monotonic()`` value): no generate starts after it, and a hold for
    the service's limit ends at it; the rows not yet sent are ``DEFERRED`` (nothing claimed).
    A generate already on its way is never abandoned.

    With a ``budget`` the rows are priced first and only those that fit are sent (the rest:
    ``OVER_BUDGET``, PENDING); a per-run budget needs ``owner.run_id`` (ValueError otherwise,
    before anything is sent).

    Claims of owners that are gone are settled first (``is_alive``: see
    :meth:`Ledger.recover`), so a run after a crash starts clean. A CONCURRENT_LIMIT refusal
    holds every new generate for ``limit_wait_s`` (or the server's Retry-After), then they go
    on; rows still held after ``limit_hold_s`` without any job created end as ERROR (PENDING).
    """
    if generate_concurrency < 1:
        raise ValueError(f"generate_concurrency must be >= 1, got {generate_concurrency}")
    owner = owner or ClaimOwner.current()
    if budget is not None and budget.per_run is not None and owner.run_id is None:
        raise ValueError("a per-run credit budget needs the submitting run's id (owner.run_id)")
    await asyncio.to_thread(ledger.recover, is_alive)
    latest = await asyncio.to_thread(latest_submissions, ledger, rows)
    outcomes: dict[str, SubmitOutcome] = {}
    candidates: list[PromptRow] = []
    first_index: dict[str, int] = {}  # a key given twice: its first row is the one sent
    for index, row in enumerate(rows):
        first_index.setdefault(row.partition_key, index)
    for row in (rows[index] for index in first_index.values()):
        reason = refusal_for(latest.get(row.request_hash), rule)
        if reason is None:
            candidates.append(row)
        else:
            outcomes[row.partition_key] = _skipped(row, Refusal(reason, latest[row.request_hash]))
    costs = {row.partition_key: estimate_cost_credits(row.request, prices) for row in candidates}
    if budget is not None:
        room = await asyncio.to_thread(room_left, ledger, budget, owner.run_id)
        plan = plan_within(((r, costs[r.partition_key]) for r in candidates), room)
        candidates = plan.send
        for waiting in plan.waiting:
            outcomes[waiting.row.partition_key] = _over_budget(waiting)
        rule = replace(rule, caps=budget.caps)
    gate = asyncio.Semaphore(generate_concurrency)
    in_flight: set[int] = set()
    service = _ServiceLimits(limit_wait_s, limit_hold_s, deadline)

    async def send(row: PromptRow) -> SubmitOutcome:
        while True:
            await service.open.wait()
            async with gate:
                if service.out_of_credit:
                    return service.no_credit(row)
                if service.past_deadline():
                    return _deferred(row)
                cost = costs[row.partition_key]
                claim = _Claim(ledger, row, owner, cost, rule)
                try:
                    outcome = await _generate(client, ledger, row, claim, in_flight)
                except _Held as held:
                    if not await service.hold(held.retry_after):
                        return SubmitOutcome(
                            row.partition_key, SubmitAction.ERROR, VideoStatus.PENDING, None,
                            f"{held}; held {limit_hold_s:.0f} s without a free slot: not sent",
                        )  # fmt: skip
                    continue
                finally:
                    if claim.submission is not None:
                        in_flight.discard(claim.submission.submission_id)
            if outcome.action is SubmitAction.NO_CREDIT:
                service.out_of_credit = True
            elif outcome.action is SubmitAction.SUBMITTED:
                service.released()
            if outcome.action is SubmitAction.SKIPPED:
                return outcome
            return replace(outcome, estimated_credits=cost)

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
    return [
        outcomes[row.partition_key]
        if first_index[row.partition_key] == index
        else SubmitOutcome(
            row.partition_key,
            SubmitAction.SKIPPED,
            VideoStatus.PENDING,
            None,
            "duplicate key: only the first row with this key is submitted",
        )
        for index, row in enumerate(rows)
    ]


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class _Held(Exception):
    """The service refused a generate for its limit on running jobs: nothing was created."""

    def __init__(self, error: KvidConcurrentLimitError) -> None:
        super().__init__(str(error))
        self.retry_after = error.retry_after


class _ServiceLimits:
    """What the service said about every row of one submission (out of credit, or hold),
    and the caller's deadline, which ends a hold as it ends the sending."""

    def __init__(self, wait_s: float, hold_s: float, deadline: float | None) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.out_of_credit = False
        self._wait_s, self._hold_s, self._deadline = wait_s, hold_s, deadline
        self._refusals = 0  # in a row, since a job was last created
        self._held_since: float | None = None

    async def hold(self, retry_after: float | None) -> bool:
        """Hold the queue, then reopen it; False once it has been held too long."""
        now = asyncio.get_running_loop().time()
        if self._held_since is None:
            self._held_since = now
        if now - self._held_since >= self._hold_s:
            return False
        delay = retry_after or min(_LIMIT_WAIT_MAX_S, self._wait_s * 2**self._refusals)
        if self._deadline is not None:
            delay = max(0.0, min(delay, self._deadline - time.monotonic()))
        self._refusals += 1
        log.info("the service's limit on running jobs holds new generates for %.1f s", delay)
        self.open.clear()
        try:
            await asyncio.sleep(delay)
        finally:
            self.open.set()
        return True

    def released(self) -> None:
        self._refusals, self._held_since = 0, None

    def past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    @staticmethod
    def no_credit(row: PromptRow) -> SubmitOutcome:
        return SubmitOutcome(
            row.partition_key, SubmitAction.NO_CREDIT, VideoStatus.PENDING, None,
            "not sent: the kvid account ran out of credit",
        )  # fmt: skip


def _deferred(row: PromptRow) -> SubmitOutcome:
    return SubmitOutcome(
        row.partition_key, SubmitAction.DEFERRED, VideoStatus.PENDING, None,
        "not sent: the time given to this submission ran out first",
    )  # fmt: skip


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
        if refused.refusal.over_budget is not None:  # another submitter spent the room first
            return SubmitOutcome(
                key, SubmitAction.OVER_BUDGET, VideoStatus.PENDING, None,
                f"not sent: {refused.refusal.reason}",
            )  # fmt: skip
        return _skipped(row, refused.refusal)
    except KvidUncertainSubmissionError as exc:
        message = f"uncertain submission: {exc}"
        assert claim.submission is not None  # uncertain means it was sent, so it was claimed
        await asyncio.to_thread(ledger.mark_uncertain, claim.submission, message)
        return SubmitOutcome(key, SubmitAction.UNCERTAIN, VideoStatus.UNCERTAIN, None, message)
    except (KvidError, OSError, ValueError, TypeError) as exc:
        # the service said no (out of credit and the running-jobs limit included), was never
        # reached, or the body could not even be built (an image replaced since the table was
        # read): no job exists, nothing was billed, so the claim goes back and nothing is
        # uncertain. INVALID is the service's word on the request (a 4xx after the claim); a
        # body refused before any claim leaves the row PENDING, as the ledger has it
        invalid = isinstance(exc, KvidValidationError) and claim.submission is not None
        message = f"{type(exc).__name__}: {exc}"
        if claim.submission is not None:
            await asyncio.to_thread(ledger.release, claim.submission, message, invalid=invalid)
        else:
            message = f"not sent: {message}"
        if isinstance(exc, KvidConcurrentLimitError):
            raise _Held(exc) from None
        if isinstance(exc, KvidInsufficientCreditError):
            return SubmitOutcome(
                key, SubmitAction.NO_CREDIT, VideoStatus.PENDING, None, f"out of credit: {exc}"
            )
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
    budget: CreditBudget | None = None,
    deadline: float | None = None,
) -> list[SubmitOutcome]:
    """The retry policy for FAILED jobs: each of ``rows`` whose request's latest job FAILED is
    sent again, as a new paid job, while the request has had fewer than ``max_attempts``.

    Only FAILED: TIMED_OUT and LOST jobs may still exist (and bill). The rule is checked again
    in the claim's transaction, so two ticks racing still send one retry. A retry belongs to no
    run, so of a ``budget`` only its per-day credits hold it (retries over them stay FAILED
    until the next day's room). Past ``deadline`` (see :func:`submit_rows`) the rest stay
    FAILED for the next call.
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
        budget=None if budget is None else CreditBudget(per_day=budget.per_day),
        deadline=deadline,
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
