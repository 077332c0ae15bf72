"""Which partitions need a submitting run, and in which runs: no Dagster, no I/O.

The schedule, the prompt-table sensor and the headless runner ask the same question; the
answer is computed here from what they read (the table, the ledger's latest submissions, the
partitions in insertion order), so it is tested without an instance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from kvid_dagster.core.prompts import PromptRow, PromptTable
from kvid_dagster.ledger import ClaimRule, Submission, refusal_for

# Dagster's tags for a single-run backfill's partition range (a run over first..last)
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


class PartitionRange(NamedTuple):
    """A contiguous run of partitions, first and last included: one submitting run."""

    first: str
    last: str

    def run_tags(self) -> dict[str, str]:
        """The tags that make a run cover exactly this range."""
        return {RANGE_START_TAG: self.first, RANGE_END_TAG: self.last}


class JobPlan(NamedTuple):
    """The partitions in insertion order, and those whose row's exact request has no job."""

    ordered: list[str]
    wanted: list[str]


def partition_ranges(ordered_keys: Sequence[str], wanted: Iterable[str]) -> list[PartitionRange]:
    """Contiguous runs of ``wanted`` within ``ordered_keys`` (the partitions' insertion order).

    A single-run backfill of a dynamic partitions definition covers a contiguous range, so each
    range becomes one run: hundreds of partitions cost one run, not one process each.
    """
    wanted_set = set(wanted)
    ranges: list[PartitionRange] = []
    start: str | None = None
    previous: str | None = None
    for key in ordered_keys:
        if key in wanted_set:
            if start is None:
                start = key
            previous = key
        elif start is not None:
            assert previous is not None
            ranges.append(PartitionRange(start, previous))
            start = None
    if start is not None and previous is not None:
        ranges.append(PartitionRange(start, previous))
    return ranges


def needs_job(row: PromptRow, latest: Mapping[str, Submission]) -> bool:
    """True when the row's exact request has no job at all (what schedules submit): the
    ledger's claim rule, asked before any claim (``submit`` asks it again when claiming)."""
    return refusal_for(latest.get(row.request_hash), ClaimRule()) is None


def plan_jobs(
    table: PromptTable,
    latest: Mapping[str, Submission],
    partition_keys: Sequence[str],
    extra: Sequence[str] = (),
) -> JobPlan:
    """The plan for ``table`` given each request's latest submission (by request hash) and the
    partitions known so far; ``extra``: partitions about to be added, after them."""
    wanted = [row.partition_key for row in table.rows if needs_job(row, latest)]
    return JobPlan([*partition_keys, *extra], wanted)
