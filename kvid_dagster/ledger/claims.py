"""Claim rules: when a request may be (re)sent, what a claim may spend, and why one is refused.

Pure decisions on records, apart from the storage that enforces them in its transactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from kvid_dagster.ledger.records import Submission
from kvid_dagster.ledger.status import VideoStatus

#: A claim of another host whose heartbeat is older than this is taken as abandoned.
DEFAULT_CLAIM_LEASE_SECONDS = 120.0


class SpendWindow(StrEnum):
    """Which claims a credit cap counts."""

    RUN = "run"  # the claims of the claiming owner's Dagster run
    DAY = "day"  # the claims since the UTC midnight before the claim, whoever made them


@dataclass(frozen=True)
class SpendCap:
    """At most ``credits`` over the claims of ``window``: checked in the claim's transaction,
    so two submitters cannot both spend the same remaining room."""

    window: SpendWindow
    credits: float


@dataclass(frozen=True)
class ClaimRule:
    """When a request that was sent before may be sent again (each time is paid), and what
    the claim may spend."""

    force: bool = False  # pay for a new attempt whatever became of the last one
    # the forced run's root run id: its retries and re-executions do not pay a second time
    force_token: str | None = None
    retry_failed_below: int | None = None  # the retry policy: a FAILED request with fewer attempts
    caps: tuple[SpendCap, ...] = ()  # the credit budget the claim's cost must fit in


#: send a request only if it was never sent (or its last claim was released)
DEFAULT_RULE = ClaimRule()


@dataclass(frozen=True)
class Refusal:
    """Why a row was not claimed, with the submission that stands in its way."""

    reason: str
    submission: Submission | None = None
    over_budget: SpendCap | None = None  # the cap the claim's cost did not fit in


def day_start(moment: datetime) -> datetime:
    """The UTC midnight at or before ``moment``: where a day's spend starts."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def refusal_for(latest: Submission | None, rule: ClaimRule) -> str | None:
    """Why a request whose latest submission is ``latest`` must not be claimed again, or None."""
    if latest is None:
        return None
    status, rid = latest.status, latest.request_id or "not known"
    if status is VideoStatus.SUBMITTING:
        owner = latest.owner
        who = f" by pid {owner.pid} on {owner.host}" if owner else ""
        return f"this exact request is being submitted right now{who}"
    if rule.force:
        if rule.force_token is not None and latest.forced_by == rule.force_token:
            return (
                f"already sent by this forced run ({rule.force_token}, request_id {rid}): "
                "force pays once per run, not again when the run is retried or re-executed"
            )
        return None
    if status.ended_without_video:
        if (
            rule.retry_failed_below is not None
            and status is VideoStatus.FAILED
            and latest.attempt < rule.retry_failed_below
        ):
            return None
        return (
            f"this exact request was sent already and its job ended {status} (request_id {rid}); "
            "materialize with force: true (or enable the retry policy) to pay for a new job"
        )
    return f"already has a job for this exact request ({status}, request_id {rid})"
