"""A credit budget: what submitting may spend, per run and per UTC day.

Planning only, no Dagster and no HTTP. Before a run sends anything it prices every row it would
send (the price table); it sends the rows that fit, in table order, and leaves the rest PENDING.
The ledger checks each claim against the same caps in the claim's own transaction, so two runs
cannot both spend one remaining room. A request the price table cannot price is not sent under
a budget: its cost could not be capped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvid_dagster.ledger import DEFAULT_RULE, Ledger, SpendCap, SpendWindow, Submission, refusal_for
from kvid_dagster.pricing import estimate_cost_credits
from kvid_dagster.prompts import PromptRow


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


def plan_within(
    priced: Iterable[tuple[PromptRow, float]], room: float | None
) -> tuple[list[PromptRow], list[PromptRow]]:
    """Split priced rows, in their order, into those to send and those over budget: rows go
    while their running total fits ``room`` (None: no budget); from the first that does not,
    the rest wait, so a later run with room sends exactly them. An unpriced row never fits."""
    send: list[PromptRow] = []
    wait: list[PromptRow] = []
    total = 0.0
    for row, cost in priced:
        if room is None:
            send.append(row)
        elif wait or cost <= 0 or total + cost > room + 1e-9:
            wait.append(row)
        else:
            total += cost
            send.append(row)
    return send, wait


def room_left(ledger: Ledger, budget: CreditBudget, run_id: str | None) -> float | None:
    """What ``budget`` still allows now (None: no limit)."""
    left = [cap.credits - ledger.spent_credits(cap.window, run_id=run_id) for cap in budget.caps]
    return max(0.0, min(left)) if left else None
