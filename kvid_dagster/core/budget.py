"""A credit budget: what submitting may spend, per run and per UTC day.

Planning only, no Dagster and no HTTP. Before a run sends anything it prices every row it would
send (the price table); it sends, in table order, each row that fits what is left, and leaves the
others PENDING (a dear row never blocks the cheaper ones after it).
The ledger checks each claim against the same caps in the claim's own transaction, so two runs
cannot both spend one remaining room. A request the price table cannot price is not sent under
a budget: its cost could not be capped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvid_dagster.core.pricing import estimate_cost_credits
from kvid_dagster.core.prompts import PromptRow
from kvid_dagster.ledger import DEFAULT_RULE, Ledger, SpendCap, SpendWindow, Submission, refusal_for


@dataclass(frozen=True)
class CreditBudget:
    """Credits a submitting run may spend (``per_run``), and all submitters together since
    UTC midnight (``per_day``); None is no limit. Spend is each job's cost: what the service
    reported, else the price table's estimate."""

    per_run: float | None = None
    per_day: float | None = None

    def __post_init__(self) -> None:
        for name in ("per_run", "per_day"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"budget_credits {name} must be a number >= 0, got {value!r}")

    @property
    def caps(self) -> tuple[SpendCap, ...]:
        """What the ledger checks each claim against."""
        windows = ((SpendWindow.RUN, self.per_run), (SpendWindow.DAY, self.per_day))
        return tuple(
            SpendCap(window, credits) for window, credits in windows if credits is not None
        )

    def with_run_limit(self, per_run: float | None) -> CreditBudget:
        """This budget with a run's own limit too (the lower of the two wins)."""
        if per_run is None:
            return self
        lower = per_run if self.per_run is None else min(per_run, self.per_run)
        return CreditBudget(per_run=lower, per_day=self.per_day)

    def describe(self) -> str:
        """``per-run 180 credits, per-day 500 credits`` (what a message names)."""
        return ", ".join(f"per-{cap.window} {cap.credits:g} credits" for cap in self.caps)


@dataclass(frozen=True)
class BackfillEstimate:
    """What submitting every row without a job would cost (what a backfill would send)."""

    rows: int  # rows whose exact request has no job
    credits: float  # their priced cost
    unpriced: int  # of them, rows the price table has no price for (counted as 0 above)
    spent_today_credits: float  # spend since UTC midnight, every submitter together

    def describe(self) -> str:
        unpriced = f"; {self.unpriced} unpriced (not in the price table)" if self.unpriced else ""
        return (
            f"{self.rows} rows without a job: {self.credits:g} credits estimated "
            f"({self.credits / 100:.2f} USD){unpriced}; spent today (UTC): "
            f"{self.spent_today_credits:g} credits"
        )


def estimate_backfill(
    rows: Sequence[PromptRow],
    latest: Mapping[str, Submission],
    prices: Mapping[str, float] | None,
    spent_today_credits: float,
) -> BackfillEstimate:
    """Price the rows of ``rows`` whose request has no job (``latest``: by request_hash)."""
    missing = [
        row for row in rows if refusal_for(latest.get(row.request_hash), DEFAULT_RULE) is None
    ]
    costs = [estimate_cost_credits(row.request, prices) for row in missing]
    return BackfillEstimate(
        rows=len(missing),
        credits=sum(costs),
        unpriced=sum(1 for cost in costs if cost <= 0),
        spent_today_credits=spent_today_credits,
    )


@dataclass(frozen=True)
class OverBudget:
    """A row the plan does not send, and why, with the figures that say so."""

    row: PromptRow
    cost: float
    reason: str


@dataclass(frozen=True)
class BudgetPlan:
    """The rows to send (in table order) and the rows left PENDING for the money."""

    send: list[PromptRow]
    waiting: list[OverBudget]


def plan_within(priced: Iterable[tuple[PromptRow, float]], room: BudgetRoom) -> BudgetPlan:
    """The rows of ``priced`` that fit ``room``, in their order: each row goes if its cost fits
    what is left after the rows planned before it; one that does not fit waits, and the rows
    after it that do still go (a dear row never blocks cheaper ones behind it). A row dearer
    than a cap itself can never fit under this budget, and an unpriced one can never be
    capped: each is told apart from a row that waits for room."""
    send: list[PromptRow] = []
    waiting: list[OverBudget] = []
    planned = 0.0
    for row, cost in priced:
        reason = room.refusal(row, cost, planned)
        if reason is None:
            planned += cost
            send.append(row)
        else:
            waiting.append(OverBudget(row, cost, reason))
    return BudgetPlan(send, waiting)


@dataclass(frozen=True)
class BudgetRoom:
    """What each cap of a budget still allows now (``left`` by cap, in the budget's order)."""

    left: tuple[tuple[SpendCap, float], ...]

    def refusal(self, row: PromptRow, cost: float, planned: float) -> str | None:
        """Why ``row`` (``cost``) cannot go after ``planned`` credits of this plan; None: it
        fits every cap."""
        if cost <= 0:
            return (
                f"no price for {row.model} at this resolution: a budget cannot cap it (add it "
                "to the price table)"
            )
        for cap, left in self.left:
            if cost > cap.credits + _SLACK:
                return (
                    f"it needs {cost:g} credits, more than the whole per-{cap.window} budget of "
                    f"{cap.credits:g}: it is never sent under this budget (raise it to at "
                    f"least {cost:g})"
                )
            remaining = max(0.0, left - planned)
            if cost > remaining + _SLACK:
                before = f", after the {planned:g} this run sends first" if planned else ""
                return (
                    f"{cost:g} credits do not fit the {remaining:g} left of the per-"
                    f"{cap.window} budget of {cap.credits:g}{before}; a run with room sends it"
                )
        return None


# what a float sum of prices may be off by (the ledger's claim check allows the same)
_SLACK = 1e-9


def room_left(ledger: Ledger, budget: CreditBudget, run_id: str | None) -> BudgetRoom:
    """What each cap of ``budget`` still allows now."""
    return BudgetRoom(
        tuple(
            (cap, max(0.0, cap.credits - ledger.spent_credits(cap.window, run_id=run_id)))
            for cap in budget.caps
        )
    )
